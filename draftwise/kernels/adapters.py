"""Thin adapters: draftwise's verification behind the calls of two other stacks.

- :func:`flashinfer_chain_speculative_sampling` takes the arguments of FlashInfer's
  ``flashinfer.sampling.chain_speculative_sampling`` (probabilities, padded ``[B, K]`` drafts) and
  returns what it returns: output ids ``[B, K+1]`` int32 padded with -1, the accepted count (each
  position tested on its own) and the emitted draft count.
- :func:`vllm_rejection_sampler` takes the arguments of vLLM v1's ``RejectionSampler.forward``
  (``SpecDecodeMetadata``, flat draft probabilities, target logits of the drafted positions, the
  bonus ids vLLM sampled itself, ``SamplingMetadata``) and returns its output ids
  ``[B, max_spec_len + 1]`` int32 padded with -1.

Both give draftwise's tokens: the same law as the stack's own kernels (lossless speculative
sampling), drawn from draftwise's counter-based noise (Philox keyed by a per-request seed), not from
the stack's generators; see ``docs/serving.md`` for each difference. Nothing here imports the stacks.
"""

from __future__ import annotations

from typing import Optional

import torch

from .backend import get_implementation, resolve_backend
from .ragged import verify_chain_ragged
from .spec import _check_tensor, _describe, _seeds, normalize_inputs

# ---------------------------------------------------------------------------------------------
# FlashInfer


def flashinfer_chain_speculative_sampling(
    draft_probs,
    draft_token_ids,
    target_probs,
    maybe_output_accepted_token_num: Optional[torch.Tensor] = None,
    maybe_output_emitted_draft_token_num: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    seed=None,
    offset=None,
    *,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer's ``chain_speculative_sampling`` computed by draftwise.

    Args:
        draft_probs: ``[B, K, V]`` the draft's law at each drafted position.
        draft_token_ids: ``[B, K]`` int32 or int64 drafted ids.
        target_probs: ``[B, K+1, V]`` the target's law (already processed: temperature, top-k ...).
        maybe_output_accepted_token_num, maybe_output_emitted_draft_token_num: ``[B]`` int tensors
            the counts are added to in place, as FlashInfer does; None allocates them.
        deterministic: accepted for the signature; draftwise's kernels are always deterministic.
        generator: draws the seed and offset when either is None.
        seed, offset: ints or int64 tensors of length 1 or B. Request b's Philox key is
            ``seed_b ^ (offset_b << 32)`` where ``seed_b`` is ``seed + b`` for one seed and
            ``seed[b]`` for B of them; advance ``offset`` between calls for fresh noise.
        backend: "triton", "cpp" or "torch"; None picks the best for the device.

    Returns:
        ``(output_token_ids [B, K+1] int32, accepted_token_num [B], emitted_draft_token_num [B])``:
        accepted tokens, then the recovered or bonus token, then -1; the number of positions whose
        acceptance test passes when each is tested on its own (the draws of the verification
        itself, against ``target_probs`` as given); the number of accepted drafts.

    The target law is ``softmax(log(target_probs))``, one elementwise pass over ``target_probs``
    (a new ``[B, K+1, V]`` tensor): zero probabilities stay exactly zero, the rest match to float32
    rounding. No host sync when ``seed`` and ``offset`` are tensors (or ints).
    """
    _check_flashinfer_shapes(draft_probs, draft_token_ids, target_probs)
    batch = target_probs.shape[0]
    device = target_probs.device
    seeds = _flashinfer_seeds(seed, offset, generator, batch, device)
    logits = torch.log(target_probs)
    inputs = normalize_inputs(draft_token_ids, draft_probs, logits, seed=seeds)
    out = get_implementation(resolve_backend(backend, device), filtered=False)(inputs)
    accepted = _independent_accepts(draft_token_ids, draft_probs, target_probs, seeds)
    accepted_num = _accumulate(maybe_output_accepted_token_num, accepted, "maybe_output_accepted_token_num")
    emitted_num = _accumulate(maybe_output_emitted_draft_token_num, out.num_accepted,
                              "maybe_output_emitted_draft_token_num")
    return out.output_tokens.to(torch.int32), accepted_num, emitted_num


def _check_flashinfer_shapes(draft_probs, draft_token_ids, target_probs) -> None:
    """The probabilities' types and shapes against the drafts, named as FlashInfer names them (the rest
    is checked by ``normalize_inputs``)."""
    for name, x in (("target_probs", target_probs), ("draft_probs", draft_probs)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {_describe(x)}")
        _check_tensor(name, x, 3, target_probs.device, floating=True)
    _check_tensor("draft_token_ids", draft_token_ids, 2, target_probs.device, floating=False)
    batch, k = draft_token_ids.shape
    if target_probs.shape[:2] != (batch, k + 1):
        raise ValueError(f"target_probs: expected shape ({batch}, {k + 1}, V) for draft_token_ids of shape "
                         f"({batch}, {k}), got {_describe(target_probs)}")


def _flashinfer_seeds(seed, offset, generator, batch: int, device) -> torch.Tensor:
    """``[B]`` int64 Philox keys from FlashInfer's (seed, offset) pair (drawn from ``generator`` when
    either is None). No host read of tensor values."""
    if seed is None or offset is None:
        drawn = torch.randint(0, 2**62, (2,), generator=generator,
                              device=generator.device if generator is not None else "cpu")
        seed, offset = drawn[:1].to(device), drawn[1:].to(device)
    if isinstance(seed, torch.Tensor) != isinstance(offset, torch.Tensor):
        raise ValueError(f"seed, offset: expected both tensors or both ints, got {_describe(seed)} and "
                         f"{_describe(offset)}")
    if isinstance(seed, torch.Tensor):
        rows = torch.arange(batch, dtype=torch.int64, device=device)
        seed = _seed_rows("seed", seed, batch, device) + (rows if seed.numel() == 1 else 0)
        offset = _seed_rows("offset", offset, batch, device)
    else:
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 2**31:
            raise ValueError(f"offset: expected an int in [0, 2**31) or an int64 tensor, got {_describe(offset)}")
        seed = _seeds(seed, batch, device)
        offset = torch.full((batch,), offset, dtype=torch.int64, device=device)
    return seed ^ (offset << 32)


def _seed_rows(name: str, x: torch.Tensor, batch: int, device) -> torch.Tensor:
    if x.dtype != torch.int64 or x.dim() != 1 or x.shape[0] not in (1, batch):
        raise ValueError(f"{name}: expected an int or an int64 tensor of length 1 or {batch}, got {_describe(x)}")
    if x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} like target_probs, got {_describe(x)}")
    return x.expand(batch)


def _accumulate(into: Optional[torch.Tensor], counts: torch.Tensor, name: str) -> torch.Tensor:
    if into is None:
        return counts.to(torch.int32)
    if not isinstance(into, torch.Tensor) or into.shape != counts.shape or into.is_floating_point():
        raise ValueError(f"{name}: expected an integer tensor of shape {tuple(counts.shape)}, got {_describe(into)}")
    return into.add_(counts.to(into.dtype))


def _independent_accepts(tokens, draft_probs, target_probs, seeds) -> torch.Tensor:
    """``[B]``: positions i with ``u_i * q_i(x_i) < p_i(x_i)``, each tested on its own, with the
    verification's own acceptance draws u_i (ids outside ``[0, V)`` never pass)."""
    k, vocab = tokens.shape[1], target_probs.shape[-1]
    tokens = tokens.long()
    valid = (tokens >= 0) & (tokens < vocab)
    safe = torch.where(valid, tokens, 0).unsqueeze(-1)
    p_x = target_probs[:, :k].float().gather(-1, safe).squeeze(-1)
    q_x = draft_probs.float().gather(-1, safe).squeeze(-1).nan_to_num(0.0).clamp_min(0.0)
    u = philox_accept_uniforms(seeds, k)
    return (valid & (u * q_x < p_x)).sum(-1)


# Philox4x32-10 (spec.py's noise) in int64 torch arithmetic: on any device, no host round trip.
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, constant: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * constant`` for ``a`` in [0, 2**32), without int64 overflow."""
    high_part, low_part = (a >> 16) * constant, (a & 0xFFFF) * constant  # each < 2**48
    high = (high_part + (low_part >> 16)) >> 16
    low = (low_part + ((high_part & 0xFFFF) << 16)) & _MASK32
    return high, low


def philox_accept_uniforms(seeds: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, k]`` float32: the acceptance draw of each row seed at positions ``0 .. k-1`` (counter
    ``(0, position, 0, 0)``), ``((x >> 9) + 0.5) / 2**23`` of word x, bit-exact with the kernels'."""
    key0 = (seeds & _MASK32).view(-1, 1)
    key1 = ((seeds >> 32) & _MASK32).view(-1, 1)
    c1 = torch.arange(k, dtype=torch.int64, device=seeds.device).view(1, -1).expand(seeds.shape[0], k)
    c0, c2, c3 = torch.zeros_like(c1), torch.zeros_like(c1), torch.zeros_like(c1)
    for _ in range(10):
        high_a, low_a = _mul32(c0, _ROUND_A)
        high_b, low_b = _mul32(c2, _ROUND_B)
        c0, c1, c2, c3 = high_b ^ c1 ^ key0, low_b, high_a ^ c3 ^ key1, low_a
        key0, key1 = (key0 + _KEY_A) & _MASK32, (key1 + _KEY_B) & _MASK32
    return ((c0 >> 9).float() + 0.5) * 2.0**-23


# ---------------------------------------------------------------------------------------------
# vLLM


def vllm_rejection_sampler(
    metadata,
    draft_probs: Optional[torch.Tensor],
    target_logits: torch.Tensor,
    bonus_token_ids: torch.Tensor,
    sampling_metadata,
    *,
    seeds: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """vLLM v1's ``RejectionSampler.forward`` computed by draftwise.

    Args:
        metadata: vLLM's ``SpecDecodeMetadata`` (read: ``draft_token_ids [N]``,
            ``num_draft_tokens`` (a list), ``cu_num_draft_tokens [B]`` inclusive, ``max_spec_len``).
        draft_probs: ``[N, V]`` or None (n-gram drafts: one-hot).
        target_logits: ``[N, V]`` the target's logits at the drafted positions, any penalties or
            logit processors already applied; temperature, top-k and top-p are applied here.
        bonus_token_ids: ``[B, 1]`` the token vLLM sampled at each bonus position; emitted when
            every draft of the request passes.
        sampling_metadata: vLLM's ``SamplingMetadata`` (read: ``all_greedy``, ``temperature``
            (greedy requests hold vLLM's greedy marker, any value <= 0), ``top_k``, ``top_p``,
            ``generators``).
        seeds: ``[B]`` int64 per-request seeds. None derives them: from the request's
            ``torch.Generator`` in ``sampling_metadata.generators`` (drawn only for requests with
            drafts, as vLLM does), else from torch's default generator.
        backend: "triton", "cpp" or "torch"; None picks the best for the device.

    Returns:
        ``output_token_ids [B, max_spec_len + 1]`` int32: accepted tokens, then the recovered token
        or the bonus id, then -1.

    No host sync on the Triton backend when ``seeds`` is given (``max_spec_len`` is a host int
    and whether top-k / top-p are on is read from ``sampling_metadata``, not from tensor values).
    """
    num_draft_tokens = list(metadata.num_draft_tokens)
    cu = metadata.cu_num_draft_tokens
    if not isinstance(cu, torch.Tensor) or cu.shape != (len(num_draft_tokens),):
        raise ValueError(f"metadata.cu_num_draft_tokens: expected a tensor of shape ({len(num_draft_tokens)},) "
                         f"like metadata.num_draft_tokens, got {_describe(cu)}")
    max_spec_len = getattr(metadata, "max_spec_len", None)
    if max_spec_len is None:
        max_spec_len = max(num_draft_tokens, default=0)
    device = target_logits.device
    temperature, top_k, top_p = _vllm_sampling(sampling_metadata)
    if seeds is None:
        seeds = _vllm_seeds(sampling_metadata, num_draft_tokens, device)
    out = verify_chain_ragged(
        metadata.draft_token_ids, cu, target_logits, draft_probs, bonus_token_ids=bonus_token_ids,
        max_draft_len=int(max_spec_len), temperature=temperature, top_k=top_k, top_p=top_p, seed=seeds,
        filtered=top_k is not None or top_p is not None, backend=backend,
    )
    return out.output_tokens.to(torch.int32)


def _vllm_sampling(sampling_metadata):
    """``(temperature, top_k, top_p)`` in draftwise's convention: temperature 0 for greedy requests;
    top-k / top-p None when vLLM has them off for the whole batch."""
    if sampling_metadata.all_greedy:
        return 0.0, None, None
    temperature = sampling_metadata.temperature
    temperature = torch.where(temperature > 0, temperature.float(), 0.0)
    return temperature, sampling_metadata.top_k, sampling_metadata.top_p


def _vllm_seeds(sampling_metadata, num_draft_tokens: list[int], device) -> torch.Tensor:
    """``[B]`` int64 seeds: each seeded request's from its generator, the others from the default one."""
    seeds = torch.randint(-(2**63), 2**63 - 1, (len(num_draft_tokens),), dtype=torch.int64, device=device)
    for index, generator in getattr(sampling_metadata, "generators", {}).items():
        if num_draft_tokens[index] > 0:
            drawn = torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, generator=generator,
                                  device=generator.device)
            seeds[index] = drawn.to(device)[0]
    return seeds
