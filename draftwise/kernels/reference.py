"""Pure-torch chain verification: the oracle of every test and the fallback backend.

Vectorised over the batch, float64-capable (``compute_dtype``). It materialises what the fused
kernels never do (the probabilities of every position, sorted logits for top-k/top-p); the
contract is in :mod:`draftwise.kernels.spec`.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .spec import PAD_TOKEN, ChainInputs, LenienceKind, Uniforms, VerifyOutput, check_row_values, normalize_inputs

FLOAT32_MAX = torch.finfo(torch.float32).max

# Philox4x32-10 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3").
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = np.uint64(0x9E3779B9)
PHILOX_KEY_B = np.uint64(0xBB67AE85)
MASK32 = np.uint64(0xFFFFFFFF)
STREAM_ACCEPT = 0
STREAM_RACE = 1


def philox_word(seeds: torch.Tensor, c0, c1, c2) -> np.ndarray:
    """Word 0 of Philox4x32-10 keyed by int64 ``seeds``, counter ``(c0, c1, c2, 0)``, as uint64.

    All arguments broadcast; counters are int64 tensors or ints in [0, 2**32). The arithmetic
    runs in numpy's uint64, where a 32 x 32-bit product is exact, in place (the counters are as
    large as the vocabulary times the rows; the keys stay at the seeds' shape).
    """
    def as_uint64(x) -> np.ndarray:
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        return x.astype(np.int64).view(np.uint64) if x.dtype == np.int64 else x.astype(np.uint64)

    key = as_uint64(seeds)
    c0, c1, c2 = (as_uint64(c) for c in (c0, c1, c2))
    shape = np.broadcast_shapes(c0.shape, c1.shape, c2.shape, key.shape)
    c0, c1, c2 = (np.broadcast_to(c, shape).copy() for c in (c0, c1, c2))
    c3, product_a, product_b = np.zeros(shape, np.uint64), np.empty(shape, np.uint64), np.empty(shape, np.uint64)
    k0, k1 = key & MASK32, key >> np.uint64(32)
    round_a, round_b, shift = np.uint64(PHILOX_ROUND_A), np.uint64(PHILOX_ROUND_B), np.uint64(32)
    for _ in range(10):
        # (c0, c1, c2, c3) <- (hi(c2 * B) ^ c1 ^ k0, lo(c2 * B), hi(c0 * A) ^ c3 ^ k1, lo(c0 * A))
        np.multiply(c0, round_a, out=product_a)
        np.multiply(c2, round_b, out=product_b)
        np.right_shift(product_b, shift, out=c0)
        c0 ^= c1
        c0 ^= k0
        np.right_shift(product_a, shift, out=c2)
        c2 ^= c3
        c2 ^= k1
        np.bitwise_and(product_b, MASK32, out=c1)
        np.bitwise_and(product_a, MASK32, out=c3)
        k0, k1 = (k0 + PHILOX_KEY_A) & MASK32, (k1 + PHILOX_KEY_B) & MASK32
    return c0


def philox_uniform(seeds: torch.Tensor, c0, c1, c2) -> torch.Tensor:
    """The acceptance draw: ``((x >> 9) + 0.5) / 2**23`` of word x, strictly inside (0, 1) and exact
    in float32 (float64 tensor on the seeds' device)."""
    word = philox_word(seeds, c0, c1, c2)
    return torch.from_numpy(((word >> np.uint64(9)).astype(np.float64) + 0.5) * 2.0**-23).to(seeds.device)


def philox_race_uniform(seeds: torch.Tensor, c0, c1, c2) -> torch.Tensor:
    """The race draw: ``float32(x | 1) / 2**32`` of word x, in (0, 1], with full float32 precision
    near 0 where the race is decided (float64 tensor on the seeds' device)."""
    word = philox_word(seeds, c0, c1, c2) | np.uint64(1)
    return torch.from_numpy(word.astype(np.float32).astype(np.float64) * 2.0**-32).to(seeds.device)


def seeded_uniforms(seeds: torch.Tensor, k: int, vocab: int) -> Uniforms:
    """The noise the kernels draw for row seeds ``[B]``, materialised (for tests and debugging)."""
    rows = seeds.view(-1, 1, 1)
    positions = torch.arange(k + 1, device=seeds.device).view(1, -1, 1)
    accept = philox_uniform(rows[:, :k, 0], 0, positions[:, :k, 0], STREAM_ACCEPT)
    race = philox_race_uniform(rows, torch.arange(vocab, device=seeds.device), positions, STREAM_RACE)
    return Uniforms(accept=accept, race=race)


def sanitize_logits(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rounded to float32 (the kernels' precision), NaN as the lowest value, clamped to its range."""
    logits = logits.float().to(dtype)
    return torch.nan_to_num(logits, nan=-FLOAT32_MAX, posinf=FLOAT32_MAX, neginf=-FLOAT32_MAX)


def _top_k_mask(logits: torch.Tensor, top_k: torch.Tensor, sorted_desc: torch.Tensor) -> torch.Tensor:
    """Keep v when fewer than k logits are strictly larger, i.e. ``l_v >= k-th largest``."""
    vocab = logits.shape[-1]
    active = (top_k > 0) & (top_k < vocab)
    kth_index = (top_k.clamp(1, vocab) - 1).view(-1, 1, 1).expand(-1, logits.shape[1], 1)
    kth = sorted_desc.gather(-1, kth_index)
    kth = torch.where(active.view(-1, 1, 1), kth, torch.full_like(kth, -torch.inf))
    return logits >= kth


def _top_p_mask(
    logits: torch.Tensor, weights: torch.Tensor, top_p: torch.Tensor, sorted_desc: torch.Tensor
) -> torch.Tensor:
    """Keep v when the weight of strictly larger logits is below ``top_p * total weight``."""
    vocab = logits.shape[-1]
    order = logits.argsort(dim=-1, descending=True, stable=True)
    prefix = torch.cat([torch.zeros_like(weights[..., :1]), weights.gather(-1, order).cumsum(-1)], -1)
    ascending = sorted_desc.flip(-1).contiguous()
    num_larger = vocab - torch.searchsorted(ascending, logits.contiguous(), right=True)
    mass_above = prefix.gather(-1, num_larger)
    total = prefix[..., -1:]
    return mass_above < top_p.to(weights.dtype).view(-1, 1, 1) * total


def target_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    filtered: bool | None = None,
) -> torch.Tensor:
    """The target distribution of every position ``[B, J, V]`` after temperature, top-k, top-p.

    ``logits`` are sanitised; rows with temperature 0 get the temperature-1 distribution (the
    greedy path does not use it). ``filtered``: whether any row uses top-k or top-p, when the
    caller knows (else it is read from the tensors, one host sync).
    """
    temperature = torch.where(temperature > 0, temperature, 1.0).to(logits.dtype).view(-1, 1, 1)
    row_max = logits.amax(-1, keepdim=True)
    weights = torch.exp((logits - row_max) / temperature)
    vocab = logits.shape[-1]
    if filtered is None:
        filtered = bool(((top_k > 0) & (top_k < vocab)).any() or (top_p < 1).any())
    if filtered:
        sorted_desc = logits.sort(-1, descending=True).values
        weights = weights * _top_k_mask(logits, top_k, sorted_desc)
        weights = weights * _top_p_mask(logits, weights, top_p, sorted_desc)
    return weights / weights.sum(-1, keepdim=True)


def _lenient(p: torch.Tensor, *, kind: LenienceKind, epsilon: float) -> torch.Tensor:
    if kind == LenienceKind.LINEAR:
        return p / epsilon
    if kind == LenienceKind.SQUARE:
        return p / (epsilon * epsilon)
    if kind == LenienceKind.POWER:
        return p**epsilon
    return p


def race_exponentials(noise: torch.Tensor) -> torch.Tensor:
    """``E = -log(1 - t)``: Exp(1) variates from race draws t, precise where t (and E) is small."""
    return -torch.log1p(-noise)


def _race(weights: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Exponential race: ``argmax_v w(v) / E_v`` samples ``norm(w)`` (lowest index on ties)."""
    return (weights / race_exponentials(noise)).argmax(-1)


def chain_reference(inp: ChainInputs, compute_dtype: torch.dtype = torch.float64,
                    filtered: bool | None = None) -> VerifyOutput:
    """Chain verification of a validated batch (see :mod:`draftwise.kernels.spec`); ``filtered``
    as :func:`~draftwise.kernels.chain_triton.verify_chain_triton`'s."""
    if not isinstance(inp, ChainInputs):
        raise TypeError(f"inp: expected ChainInputs (see normalize_inputs), got {type(inp).__name__}")
    if filtered is None:
        filtered = check_row_values(inp)
    batch, k, vocab = inp.shape
    device = inp.target_logits.device
    rows = torch.arange(batch, device=device)
    logits = sanitize_logits(inp.target_logits, compute_dtype)
    probs = target_probs(logits, inp.temperature, inp.top_k, inp.top_p, filtered)  # [B, K+1, V]
    greedy_tokens = logits.argmax(-1)  # [B, K+1], lowest index on ties
    is_greedy = (inp.temperature == 0).view(-1, 1)

    tokens = inp.draft_tokens
    in_vocab = (tokens >= 0) & (tokens < vocab)
    drafted = in_vocab.long().cumprod(-1).bool()  # [B, K], positions before the first pad
    num_drafted = drafted.sum(-1)
    safe_tokens = torch.where(drafted, tokens, 0)

    p_x = probs[:, :k].gather(-1, safe_tokens.unsqueeze(-1)).squeeze(-1)
    if inp.draft_probs is None:
        q = None
        q_x = torch.ones_like(p_x)
    else:
        q = inp.draft_probs.float().to(compute_dtype).nan_to_num(0.0).clamp_min(0.0)
        q_x = q.gather(-1, safe_tokens.unsqueeze(-1)).squeeze(-1)

    if inp.uniforms is not None:
        accept_u = inp.uniforms.accept.to(compute_dtype)
    else:
        positions = torch.arange(k, device=device).view(1, -1)
        accept_u = philox_uniform(inp.seeds.view(-1, 1), 0, positions, STREAM_ACCEPT).to(compute_dtype)

    lenient = functools.partial(_lenient, kind=inp.lenience_kind, epsilon=inp.lenience_epsilon)
    sampled_accept = accept_u * q_x < lenient(p_x)
    greedy_accept = safe_tokens == greedy_tokens[:, :k]
    accepted = torch.where(is_greedy, greedy_accept, sampled_accept) & drafted
    num_accepted = accepted.long().cumprod(-1).sum(-1)  # [B]

    # The emitted position j: the first rejection, or the bonus position k_b.
    j = num_accepted
    p_j = probs[rows, j]  # [B, V]
    q_j = _draft_distribution_at(q, safe_tokens, j, num_drafted, p_j)
    residual = (p_j - q_j).clamp_min(0.0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_j)  # empty: fall back to p

    if inp.uniforms is not None:
        race_u = inp.uniforms.race.to(compute_dtype)[rows, j]
    else:
        race_u = philox_race_uniform(
            inp.seeds.view(-1, 1), torch.arange(vocab, device=device), j.view(-1, 1), STREAM_RACE
        ).to(compute_dtype)
    sampled_token = _race(residual, race_u)
    emitted = torch.where(is_greedy.view(-1), greedy_tokens[rows, j], sampled_token)

    output = torch.full((batch, k + 1), PAD_TOKEN, dtype=torch.int64, device=device)
    columns = torch.arange(k + 1, device=device).view(1, -1)
    output = torch.where(columns < j.view(-1, 1), torch.cat([safe_tokens, output[:, :1]], 1), output)
    output[rows, j] = emitted

    accept_probs = acceptance_probabilities(inp, compute_dtype, filtered) if inp.return_accept_probs else None
    return VerifyOutput(output, num_accepted, accept_probs)


def _draft_distribution_at(q, tokens, j, num_drafted, like) -> torch.Tensor:
    """q at each row's position j as ``[B, V]``: one-hot drafts give one-hot rows; 0 at the bonus."""
    batch, k = tokens.shape
    q_j = torch.zeros_like(like)
    if k == 0:
        return q_j
    rows, position = torch.arange(batch, device=like.device), j.clamp(max=k - 1)
    if q is None:
        q_j[rows, tokens[rows, position]] = 1.0
    else:
        q_j = q[rows, position]
    return torch.where((j < num_drafted).view(-1, 1), q_j, 0.0)


def acceptance_probabilities(inp: ChainInputs, compute_dtype: torch.dtype | None = None,
                             filtered: bool | None = None) -> torch.Tensor:
    """``[B, K]`` float32: the probability that a draft from q passes each drafted position,
    ``sum_v min(q, f(p))`` (``sum min(p, q)`` when lossless; ``min(1, f(p(x)))`` for one-hot
    drafts); greedy rows: ``q(argmax p)`` (one-hot: whether x is the argmax); NaN past the drafts.

    A statistic, not part of verification: every backend's kernel leaves it out and the dispatch
    computes it here, on the inputs' device, only when ``return_accept_probs`` asks for it. An
    all-greedy batch needs only the argmax; otherwise the target's law of every drafted position
    is materialised, in ``compute_dtype`` (default: float32, float64 when top-k or top-p decide
    what is kept, so that the kept set is the reference's). ``filtered`` as
    :func:`chain_reference`'s (None: checked here).
    """
    if filtered is None:
        filtered = check_row_values(inp)
    k, vocab = inp.shape[1:]
    logits = sanitize_logits(inp.target_logits[:, :k], torch.float32)
    greedy_tokens = logits.argmax(-1)  # lowest index on ties, as the kernels
    tokens = inp.draft_tokens
    drafted = ((tokens >= 0) & (tokens < vocab)).long().cumprod(-1).bool()
    tokens = torch.where(drafted, tokens, 0)
    q = None if inp.draft_probs is None else inp.draft_probs.float().nan_to_num(0.0).clamp_min(0.0)
    if q is None:
        values = (tokens == greedy_tokens).float()
    else:
        values = q.gather(-1, greedy_tokens.unsqueeze(-1)).squeeze(-1)
    is_greedy = (inp.temperature == 0).view(-1, 1)
    if not bool(is_greedy.all()):
        dtype = compute_dtype or (torch.float64 if filtered else torch.float32)
        probs = target_probs(logits.to(dtype), inp.temperature, inp.top_k, inp.top_p, filtered)
        f_p = _lenient(probs, kind=inp.lenience_kind, epsilon=inp.lenience_epsilon)
        if q is None:
            sampled = f_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).clamp_max(1.0)
        else:
            sampled = torch.minimum(f_p, q.to(dtype)).sum(-1)
        values = torch.where(is_greedy, values.to(dtype), sampled)
    return torch.where(drafted, values, torch.nan).float()


def verify_chain_ref(draft_tokens, draft_probs, target_logits, *, compute_dtype: torch.dtype = torch.float64,
                     **options) -> VerifyOutput:
    """:func:`draftwise.kernels.verify_chain` (the same arguments, as keywords) computed here in
    ``compute_dtype``."""
    return chain_reference(normalize_inputs(draft_tokens, draft_probs, target_logits, **options), compute_dtype)
