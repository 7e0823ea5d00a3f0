"""Chain verification of a ragged batch: every request's drafts flattened into one buffer, the layout
serving stacks (vLLM, SGLang) keep. Same contract and noise as :func:`draftwise.kernels.verify_chain`
(see :mod:`draftwise.kernels.spec`): for the same inputs and seeds it gives the same tokens.

The layout, for B = 3 requests with 2, 0 and 3 drafts (N = 5 drafted tokens)::

    draft_token_ids       [N]         a0 a1 | c0 c1 c2
    cu_num_draft_tokens   [B]         2, 2, 5        inclusive: cu[b] = drafts of requests 0..b
    target_logits         [N + B, V]  a0 a1 a+ | b+ | c0 c1 c2 c+
    draft_probs           [N, V]      a0 a1 | c0 c1 c2           (or None: one-hot drafts)
    output_tokens         [B, K + 1]  K = max_draft_len = 3; accepted, recovered or bonus, then -1
    num_accepted          [B]

Request b's drafts are ``draft_token_ids[cu[b-1] : cu[b]]`` (``cu[-1]`` read as 0) and its target
rows ``target_logits[cu[b-1] + b : cu[b] + b + 1]``: one row per drafted position, then its bonus
position (``x+`` above). ``cu_num_draft_tokens`` is vLLM's ``SpecDecodeMetadata.cu_num_draft_tokens``:
``B`` entries, no leading 0. With ``bonus_token_ids`` (vLLM's rejection sampler, whose caller samples
the bonus token itself) ``target_logits`` holds the drafted positions only, ``[N, V]``, and
``bonus_token_ids[b]`` is emitted when every draft of request b passes.

What each backend reads in place and what it copies:

- ``triton``: the kernels index the flat buffers by offsets (row ``cu[b-1] + b + i``); nothing of
  size V is copied or padded, int32 ids and counts are read as they are.
- ``cpp``: the C++ kernel takes contiguous ``[n, k+1, V]`` blocks, which consecutive requests with the
  same draft count already are: one call per such run, on pointers into the caller's buffers, the
  runs cut and spread over a pool of threads. int32 ids are widened (N ids). With
  ``bonus_token_ids`` one call per request; the last request's rows are copied with one spare row.
- ``torch``: the reference computes the target law of every flat row, ``[N + B, V]`` (the padded
  reference computes ``[B, K+1, V]``); no padded tensor is built.
"""

from __future__ import annotations

import concurrent.futures
import functools
import numbers
import os
from typing import NamedTuple, Optional

import torch

from .backend import resolve_backend
from .reference import (
    STREAM_ACCEPT, STREAM_RACE, _lenient, _race, philox_race_uniform, philox_uniform, sanitize_logits, target_probs,
)
from .spec import (
    PAD_TOKEN, LenienceKind, VerifyOutput, _check_tensor, _describe, _lenience, _per_row, _seeds, check_row_values,
)


class RaggedInputs(NamedTuple):
    """Validated ragged inputs (see the module docstring for the layout): ids ``[N]``, counts ``[B]``,
    logits ``[N + B, V]`` (``[N, V]`` with bonus ids), per-row ``[B]`` parameters and seeds."""

    draft_tokens: torch.Tensor  # [N] int32 or int64
    cu_num_draft_tokens: torch.Tensor  # [B] int32 or int64, inclusive
    target_logits: torch.Tensor  # [N + B, V] or [N, V] float
    draft_probs: Optional[torch.Tensor]  # [N, V] float or None
    bonus_token_ids: Optional[torch.Tensor]  # [B] int or None
    temperature: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64
    top_p: torch.Tensor  # [B] float32
    seeds: torch.Tensor  # [B] int64
    lenience_kind: LenienceKind
    lenience_epsilon: float
    max_draft_len: Optional[int]  # None until read from the counts

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(B, K, V)`` as the padded call would see it (K = max_draft_len)."""
        return self.cu_num_draft_tokens.shape[0], self.max_draft_len, self.target_logits.shape[-1]


def verify_chain_ragged(
    draft_token_ids,
    cu_num_draft_tokens,
    target_logits,
    draft_probs=None,
    *,
    bonus_token_ids=None,
    max_draft_len: Optional[int] = None,
    temperature=1.0,
    top_k=None,
    top_p=None,
    lenience=None,
    seed=None,
    filtered: Optional[bool] = None,
    backend: Optional[str] = None,
) -> VerifyOutput:
    """Verify a ragged batch of drafted chains (the flat layout of the module docstring) in one step.

    Args:
        draft_token_ids: ``[N]`` int32 or int64, every request's drafts one after the other. An id
            outside ``[0, V)`` ends its request's drafts, as ``PAD_TOKEN`` does in ``verify_chain``.
        cu_num_draft_tokens: ``[B]`` int32 or int64 inclusive cumulative draft counts (vLLM's layout,
            no leading 0); zero-draft requests repeat the previous value.
        target_logits: ``[N + B, V]`` target logits, per request its drafted positions then its bonus
            position; ``[N, V]`` (drafted positions only) when ``bonus_token_ids`` is given.
        draft_probs: ``[N, V]``, the law each draft was drawn from, or None for one-hot drafts.
        bonus_token_ids: ``[B]`` or ``[B, 1]`` ids emitted when every draft of a request passes
            (a bonus sampled by the caller, as vLLM does), or None to sample it here.
        max_draft_len: K, the output width minus one (at least the largest count); None reads it
            from the counts (a host sync).
        temperature, top_k, top_p, lenience: as in ``verify_chain``, a scalar or one value per request.
        seed: an int64 ``[B]`` tensor of per-request seeds, or an int (request b uses ``seed + b``), or
            None (drawn on the host). Request b's noise is the noise of row b of ``verify_chain``.
        filtered: whether some request may use top-k or top-p. None checks the per-row values
            (a host sync; out-of-range values raise); a bool skips that check (the caller vouches).
        backend: "triton", "cpp" or "torch"; None picks the best for the device.

    Returns:
        :class:`VerifyOutput` ``(output_tokens [B, K+1], num_accepted [B], None)`` in the dtype of
        ``draft_token_ids``: exactly what ``verify_chain`` returns for the same requests padded to K.

    Host syncs: none on the Triton backend when ``max_draft_len`` and ``filtered`` are given and
    ``seed`` is a tensor, so the call can be captured in a CUDA graph (the count values are then not
    validated; the kernels clamp them, so every load stays inside the buffers). ``max_draft_len=None``
    and ``filtered=None`` cost one sync each; the torch and C++ backends read on the host anyway
    and always validate the counts.
    """
    inputs = ragged_inputs(
        draft_token_ids, cu_num_draft_tokens, target_logits, draft_probs, bonus_token_ids=bonus_token_ids,
        max_draft_len=max_draft_len, temperature=temperature, top_k=top_k, top_p=top_p, lenience=lenience,
        seed=seed,
    )
    if filtered is not None and not isinstance(filtered, bool):
        raise TypeError(f"filtered: expected None or a bool, got {_describe(filtered)}")
    name = resolve_backend(backend, inputs.target_logits.device)
    if name != "triton" or inputs.max_draft_len is None:
        inputs = inputs._replace(max_draft_len=check_counts(inputs))
    if filtered is None and name != "cpp":  # the C++ kernel checks the per-row values as it reads them
        filtered = _check_rows(inputs)
    if name == "triton":
        from .chain_triton import verify_chain_ragged_triton

        out = verify_chain_ragged_triton(
            inputs.draft_tokens, inputs.cu_num_draft_tokens, inputs.target_logits, inputs.draft_probs,
            inputs.bonus_token_ids, max_draft_len=inputs.max_draft_len, temperature=inputs.temperature,
            top_k=inputs.top_k, top_p=inputs.top_p, seeds=inputs.seeds, lenience_kind=inputs.lenience_kind,
            lenience_epsilon=inputs.lenience_epsilon, filtered=filtered,
        )
    elif name == "cpp":
        out = ragged_cpp(inputs)
    else:
        out = ragged_reference(inputs, filtered=filtered)
    dtype = inputs.draft_tokens.dtype
    return VerifyOutput(out.output_tokens.to(dtype), out.num_accepted.to(dtype))


# ---------------------------------------------------------------------------------------------
# Validation


def ragged_inputs(draft_token_ids, cu_num_draft_tokens, target_logits, draft_probs=None, *, bonus_token_ids=None,
                  max_draft_len=None, temperature=1.0, top_k=None, top_p=None, lenience=None,
                  seed=None) -> RaggedInputs:
    """The arguments of :func:`verify_chain_ragged` checked (types, shapes, dtypes, devices; no tensor
    values) and brought to :class:`RaggedInputs`; errors name the argument."""
    if not isinstance(target_logits, torch.Tensor):
        raise TypeError(f"target_logits: expected a torch.Tensor, got {_describe(target_logits)}")
    device = target_logits.device
    _check_tensor("target_logits", target_logits, 2, device, floating=True)
    for name, ids in (("draft_token_ids", draft_token_ids), ("cu_num_draft_tokens", cu_num_draft_tokens)):
        _check_tensor(name, ids, 1, device, floating=False)
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name}: expected an int32 or int64 tensor, got {_describe(ids)}")
    num_tokens, batch = draft_token_ids.shape[0], cu_num_draft_tokens.shape[0]
    bonus = _bonus_ids(bonus_token_ids, batch, device)
    _check_rows_of_logits(target_logits, cu_num_draft_tokens, num_tokens, with_bonus_rows=bonus is None)
    vocab = target_logits.shape[1]
    if vocab < 1:
        raise ValueError(f"target_logits: expected a vocabulary of at least 1, got {_describe(target_logits)}")
    if draft_probs is not None:
        _check_tensor("draft_probs", draft_probs, 2, device, floating=True)
        if draft_probs.shape != (num_tokens, vocab):
            hint = " (V mismatch: the draft's vocabulary differs from the target's)" if (
                draft_probs.shape[0] == num_tokens) else ""
            raise ValueError(f"draft_probs: expected shape ({num_tokens}, {vocab}){hint}, got {_describe(draft_probs)}")
    kind, epsilon = _lenience(lenience)
    return RaggedInputs(
        draft_tokens=draft_token_ids, cu_num_draft_tokens=cu_num_draft_tokens, target_logits=target_logits,
        draft_probs=draft_probs, bonus_token_ids=bonus,
        temperature=_per_row("temperature", temperature, batch, device, torch.float32, 1.0),
        top_k=_per_row("top_k", top_k, batch, device, torch.int64, 0),
        top_p=_per_row("top_p", top_p, batch, device, torch.float32, 1.0),
        seeds=_seeds(seed, batch, device), lenience_kind=kind, lenience_epsilon=epsilon,
        max_draft_len=_max_draft_len(max_draft_len),
    )


def _max_draft_len(value) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"max_draft_len: expected None or an int >= 0, got {_describe(value)}")
    if value < 0:
        raise ValueError(f"max_draft_len: expected None or an int >= 0, got {value}")
    return int(value)


def _bonus_ids(bonus_token_ids, batch: int, device) -> Optional[torch.Tensor]:
    """``[B]`` or ``[B, 1]`` integer ids as a ``[B]`` view, or None."""
    if bonus_token_ids is None:
        return None
    if not isinstance(bonus_token_ids, torch.Tensor):
        raise TypeError(f"bonus_token_ids: expected None or a tensor of shape ({batch},), got "
                        f"{_describe(bonus_token_ids)}")
    if bonus_token_ids.is_floating_point() or bonus_token_ids.is_complex() or bonus_token_ids.dtype == torch.bool:
        raise TypeError(f"bonus_token_ids: expected an integer tensor, got {_describe(bonus_token_ids)}")
    if bonus_token_ids.shape not in ((batch,), (batch, 1)):
        raise ValueError(f"bonus_token_ids: expected shape ({batch},) or ({batch}, 1), got "
                         f"{_describe(bonus_token_ids)}")
    if bonus_token_ids.device != device:
        raise ValueError(f"bonus_token_ids: expected a tensor on {device} like target_logits, got "
                         f"{_describe(bonus_token_ids)}")
    return bonus_token_ids.reshape(batch)


def _check_rows_of_logits(target_logits, cu, num_tokens: int, *, with_bonus_rows: bool) -> None:
    batch = cu.shape[0]
    rows = num_tokens + batch if with_bonus_rows else num_tokens
    if target_logits.shape[0] == rows:
        return
    if with_bonus_rows and target_logits.shape[0] == rows - 1:
        raise ValueError(
            f"cu_num_draft_tokens: expected one inclusive cumulative count per request (vLLM's layout, no "
            f"leading 0): target_logits has {target_logits.shape[0]} = N + B - 1 rows for N = {num_tokens} "
            f"drafts, as if it held a leading 0, got {_describe(cu)}"
        )
    what = "N + B rows (each request's drafted positions, then its bonus position)" if with_bonus_rows else (
        "N rows (the drafted positions; bonus_token_ids gives the bonus)")
    raise ValueError(f"target_logits: expected {what} = {rows} for N = {num_tokens} drafts and B = {batch} "
                     f"requests, got {_describe(target_logits)}")


def counts_of(cu: torch.Tensor) -> torch.Tensor:
    """``[B]`` int64 draft counts from inclusive cumulative counts (no host read)."""
    return torch.diff(cu.long(), prepend=cu.new_zeros(1, dtype=torch.int64))


def check_counts(inputs: RaggedInputs) -> int:
    """Read the draft counts on the host (one sync), check them against the buffers and return
    ``max_draft_len`` (the given one, or the largest count)."""
    cu = inputs.cu_num_draft_tokens
    num_tokens = inputs.draft_tokens.shape[0]
    if cu.shape[0] == 0:
        if num_tokens:
            raise ValueError(f"draft_token_ids: expected no drafts for an empty batch, got {num_tokens}")
        return inputs.max_draft_len or 0
    counts = counts_of(cu)
    smallest, largest, total = torch.stack([counts.min(), counts.max(), cu[-1].long()]).tolist()
    if smallest < 0:
        raise ValueError("cu_num_draft_tokens: expected non-decreasing counts >= 0 (inclusive cumulative "
                         "sums), got a decreasing or negative value")
    if total != num_tokens:
        raise ValueError(f"cu_num_draft_tokens: expected the last entry to equal the number of drafts "
                         f"{num_tokens} (draft_token_ids), got {total}")
    if inputs.max_draft_len is not None and largest > inputs.max_draft_len:
        raise ValueError(f"max_draft_len: expected at least the largest draft count {largest}, got "
                         f"{inputs.max_draft_len}")
    return largest if inputs.max_draft_len is None else inputs.max_draft_len


class _Rows(NamedTuple):  # what check_row_values reads of ChainInputs
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    shape: tuple


def _check_rows(inputs: RaggedInputs) -> bool:
    """:func:`~draftwise.kernels.spec.check_row_values` of the per-request parameters (one sync)."""
    return check_row_values(_Rows(inputs.temperature, inputs.top_k, inputs.top_p, inputs.shape))


# ---------------------------------------------------------------------------------------------
# torch: the reference, indexed by offsets


def ragged_reference(inputs: RaggedInputs, filtered: Optional[bool] = None,
                     compute_dtype: torch.dtype = torch.float32) -> VerifyOutput:
    """:func:`~draftwise.kernels.reference.chain_reference` on the flat buffers: the target law of every
    flat row, then per request the drafted positions and the emitted one gathered by offset.
    ``max_draft_len`` must be set (:func:`check_counts`). Outputs int64."""
    batch, k, vocab = inputs.shape
    device = inputs.target_logits.device
    num_rows, num_tokens = inputs.target_logits.shape[0], inputs.draft_tokens.shape[0]
    bonus = inputs.bonus_token_ids
    counts = counts_of(inputs.cu_num_draft_tokens)
    starts = inputs.cu_num_draft_tokens.long() - counts
    requests = torch.arange(batch, device=device)
    first_row = starts if bonus is not None else starts + requests  # row of each request's position 0
    output = torch.full((batch, k + 1), PAD_TOKEN, dtype=torch.int64, device=device)
    if batch == 0:
        return VerifyOutput(output, torch.zeros(0, dtype=torch.int64, device=device))
    if num_rows == 0:  # bonus ids and no drafts at all
        output[:, 0] = bonus.long()
        return VerifyOutput(output, torch.zeros(batch, dtype=torch.int64, device=device))

    probs, greedy_tokens = _flat_law(inputs, counts if bonus is not None else counts + 1, filtered, compute_dtype)
    is_greedy = (inputs.temperature == 0).view(-1, 1)

    columns = torch.arange(k, device=device).view(1, -1)
    flat, safe_tokens, drafted = _drafts(inputs.draft_tokens, starts, counts, columns, vocab)
    num_drafted = drafted.sum(-1)
    rows = (first_row.view(-1, 1) + columns).clamp(max=num_rows - 1)  # [B, K] logits row of each position

    p_x = probs[rows, safe_tokens]
    q = None
    if inputs.draft_probs is None:
        q_x = torch.ones_like(p_x)
    else:
        q = inputs.draft_probs
        q_x = _sanitize_probs(q[flat, safe_tokens] if num_tokens else torch.zeros_like(p_x), compute_dtype)
    accept_u = philox_uniform(inputs.seeds.view(-1, 1), 0, columns, STREAM_ACCEPT).to(compute_dtype)
    sampled_accept = accept_u * q_x < _lenient(p_x, kind=inputs.lenience_kind, epsilon=inputs.lenience_epsilon)
    greedy_accept = safe_tokens == greedy_tokens[rows]
    accepted = torch.where(is_greedy, greedy_accept, sampled_accept) & drafted
    j = accepted.long().cumprod(-1).sum(-1)  # num_accepted [B]

    emit_row = (first_row + j).clamp(max=num_rows - 1)
    p_j = probs[emit_row]  # [B, V]
    q_j = _draft_law_at(q, safe_tokens, starts + j, j, num_drafted, p_j, compute_dtype)
    residual = (p_j - q_j).clamp_min(0.0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_j)  # empty: fall back to p
    race_u = philox_race_uniform(
        inputs.seeds.view(-1, 1), torch.arange(vocab, device=device), j.view(-1, 1), STREAM_RACE
    ).to(compute_dtype)
    emitted = torch.where(is_greedy.view(-1), greedy_tokens[emit_row], _race(residual, race_u))
    if bonus is not None:
        emitted = torch.where(j == counts, bonus.long(), emitted)

    output_columns = torch.arange(k + 1, device=device).view(1, -1)
    output = torch.where(output_columns < j.view(-1, 1), torch.cat([safe_tokens, output[:, :1]], 1), output)
    output[requests, j] = emitted
    return VerifyOutput(output, j)


def _drafts(draft_tokens, starts, counts, columns, vocab: int):
    """The drafts as ``[B, K]``: each position's index into the flat buffers (clamped), its id (0 past
    the request's drafts) and whether it is drafted (before the request's first id outside [0, V))."""
    num_tokens = draft_tokens.shape[0]
    flat = (starts.view(-1, 1) + columns).clamp(0, max(num_tokens - 1, 0))
    tokens = draft_tokens.long()[flat] if num_tokens else torch.zeros_like(flat)
    tokens = torch.where(columns < counts.view(-1, 1), tokens, PAD_TOKEN)
    drafted = ((tokens >= 0) & (tokens < vocab)).long().cumprod(-1).bool()
    return flat, torch.where(drafted, tokens, 0), drafted


def _flat_law(inputs: RaggedInputs, spans: torch.Tensor, filtered, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The target law of every flat row ``[R, V]`` (request b owns ``spans[b]`` consecutive rows) and
    each row's argmax ``[R]`` (lowest index on ties)."""
    num_rows = inputs.target_logits.shape[0]
    requests = torch.arange(spans.shape[0], device=spans.device)
    row_request = torch.repeat_interleave(requests, spans, output_size=num_rows)
    logits = sanitize_logits(inputs.target_logits, dtype)
    probs = target_probs(logits.unsqueeze(1), inputs.temperature[row_request], inputs.top_k[row_request],
                         inputs.top_p[row_request], filtered).squeeze(1)
    return probs, logits.argmax(-1)


def _sanitize_probs(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Draft probabilities as the kernels read them: NaN and negatives count as 0."""
    return q.float().to(dtype).nan_to_num(0.0).clamp_min(0.0)


def _draft_law_at(q, tokens, flat_j, j, num_drafted, like, dtype) -> torch.Tensor:
    """q at each request's position j as ``[B, V]`` (one-hot for one-hot drafts); 0 past the drafts."""
    batch, k = tokens.shape
    q_j = torch.zeros_like(like)
    if k == 0:
        return q_j
    if q is None:
        q_j[torch.arange(batch, device=like.device), tokens.gather(1, j.clamp(max=k - 1).view(-1, 1)).view(-1)] = 1.0
    elif q.shape[0]:
        q_j = _sanitize_probs(q[flat_j.clamp(max=q.shape[0] - 1)], dtype)
    return torch.where((j < num_drafted).view(-1, 1), q_j, 0.0)


# ---------------------------------------------------------------------------------------------
# cpp: one call per run of requests with the same draft count


def runs_of(counts: list[int], *, singles: bool = False, most: int | None = None) -> list[tuple[int, int, int]]:
    """``(first, end, count)`` of each run of consecutive requests with the same draft count, at most
    ``most`` requests long (each request alone when ``singles``)."""
    runs: list[tuple[int, int, int]] = []
    for b, count in enumerate(counts):
        last = runs[-1] if runs else None
        if last and not singles and last[2] == count and last[1] == b and (most is None or b - last[0] < most):
            runs[-1] = (last[0], b + 1, count)
        else:
            runs.append((b, b + 1, count))
    return runs


def ragged_cpp(inputs: RaggedInputs, num_threads: Optional[int] = None) -> VerifyOutput:
    """Ragged verification by the C++ kernel on CPU tensors: one call per run of requests with the same
    draft count, on addresses inside the flat buffers (see the module docstring). Runs are cut to at
    most B / (4 threads) requests and spread over ``num_threads`` threads (the kernel releases the
    GIL), one kernel thread each. ``max_draft_len`` must be set and the counts checked
    (:func:`check_counts`). Outputs int64."""
    from .chain_cpp import FLOAT32, FLOAT_DTYPES, INT64, _buffer, _extension

    ext = _extension()
    device = inputs.target_logits.device
    if device.type != "cpu":
        raise ValueError(f"target_logits: the cpp backend needs CPU tensors, got a tensor on {device}")
    batch, k_max, vocab = inputs.shape
    logits = _buffer(inputs.target_logits, FLOAT_DTYPES)
    buffers = dict(
        probs=None if inputs.draft_probs is None else _buffer(inputs.draft_probs, FLOAT_DTYPES),
        tokens=_buffer(inputs.draft_tokens, INT64), temperature=_buffer(inputs.temperature, FLOAT32),
        top_k=_buffer(inputs.top_k, INT64), top_p=_buffer(inputs.top_p, FLOAT32), seeds=_buffer(inputs.seeds, INT64),
    )
    output = torch.full((batch, k_max + 1), PAD_TOKEN, dtype=torch.int64)
    num_accepted = torch.zeros(batch, dtype=torch.int64)
    bonus = inputs.bonus_token_ids
    counts = counts_of(inputs.cu_num_draft_tokens)
    starts = (inputs.cu_num_draft_tokens.long() - counts).tolist()
    threads = torch.get_num_threads() if num_threads is None else int(num_threads)
    calls, narrower = [], []
    most = -(-batch // (4 * threads)) if threads > 1 else None  # requests per call: a few calls per thread
    for first, end, k in runs_of(counts.tolist(), singles=bonus is not None, most=most):
        if bonus is not None and k == 0:  # nothing to verify: the bonus id
            output[first, 0] = bonus[first]
            continue
        start = starts[first]
        block = _logits_block(logits, start if bonus is not None else start + first, end - first, k, bonus is not None)
        out = output[first:end] if k == k_max else torch.empty(end - first, k + 1, dtype=torch.int64)
        calls.append(functools.partial(_cpp_call, ext, block, buffers, first, start, end - first, k, vocab, inputs,
                                       out, num_accepted[first:]))
        if k != k_max:
            narrower.append((first, end, k, out))
    _run_calls(calls, threads)
    for first, end, k, out in narrower:
        output[first:end, : k + 1] = out
    if bonus is not None:
        _emit_bonus(output, num_accepted, counts, bonus)
    return VerifyOutput(output, num_accepted)


def _run_calls(calls: list, threads: int) -> None:
    """Each call on ``threads`` kernel threads when there is one, else spread over a pool of ``threads``
    Python threads, one kernel thread each."""
    if threads <= 1 or len(calls) <= 1:
        for call in calls:
            call(threads)
        return
    for _ in _pool(threads, os.getpid()).map(lambda call: call(1), calls):
        pass


@functools.lru_cache(maxsize=None)
def _pool(threads: int, pid: int) -> concurrent.futures.ThreadPoolExecutor:
    """A pool per thread count and process (a forked child gets its own)."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="draftwise-ragged")


def _logits_block(logits: torch.Tensor, row: int, n: int, k: int, bonus_ids: bool) -> torch.Tensor:
    """The ``n * (k + 1)`` rows from ``row`` the C++ kernel reads for ``n`` requests of ``k`` drafts.
    With bonus ids (one request, no row of its own at the bonus position) the next request's first row
    stands in, or, past the last row, a copy of the request's rows with one spare row."""
    if row + n * (k + 1) <= logits.shape[0]:
        return logits[row:]
    assert bonus_ids and n == 1, "a ragged block ends past the logits"
    spare = logits.new_zeros(1, logits.shape[1])
    return torch.cat([logits[row:row + k], spare])


def _cpp_call(ext, logits, buffers, first, start, n, k, vocab, inputs, out, num_accepted, threads: int) -> None:
    """One C++ verification of requests ``first .. first + n`` (drafts from ``start``)."""
    from .chain_cpp import DTYPE_CODES, _address

    def at(name: str, index: int) -> int:
        x = buffers[name]
        return 0 if x is None else x[index:].data_ptr()

    probs = buffers["probs"]
    ext.verify_chain(
        draft_tokens_ptr=at("tokens", start),
        draft_probs_ptr=at("probs", start), draft_probs_dtype=DTYPE_CODES[probs.dtype] if probs is not None else 0,
        target_logits_ptr=_address(logits), target_logits_dtype=DTYPE_CODES[logits.dtype],
        temperature_ptr=at("temperature", first), top_k_ptr=at("top_k", first), top_p_ptr=at("top_p", first),
        seeds_ptr=at("seeds", first), accept_uniforms_ptr=0, accept_uniforms_dtype=0, race_uniforms_ptr=0,
        race_uniforms_dtype=0, batch=n, num_draft=k, vocab=vocab, lenience_kind=int(inputs.lenience_kind),
        lenience_epsilon=float(inputs.lenience_epsilon), output_tokens_ptr=_address(out),
        num_accepted_ptr=_address(num_accepted), num_threads=threads,
    )


def _emit_bonus(output, num_accepted, counts, bonus) -> None:
    """Where every draft passed (``num_accepted == count``), the given bonus id is the emitted token."""
    rows = torch.arange(output.shape[0])
    all_passed = num_accepted == counts
    output[rows, num_accepted] = torch.where(all_passed, bonus.long(), output[rows, num_accepted])


def pad_ragged(draft_token_ids, cu_num_draft_tokens, target_logits, draft_probs=None, *,
               max_draft_len: Optional[int] = None):
    """The padded ``verify_chain`` inputs of a ragged batch (with bonus rows): ``(draft_tokens [B, K]``
    padded with ``PAD_TOKEN``, ``draft_probs [B, K, V]`` or None, ``target_logits [B, K+1, V])``, each
    tensor one gather of rows (a position past a request's drafts repeats one of its rows, which
    verification never uses). What a caller of the padded entry pays: ``B (2K + 1)`` rows of V read
    and written (``B (K + 1)`` without draft probabilities)."""
    inputs = ragged_inputs(draft_token_ids, cu_num_draft_tokens, target_logits, draft_probs,
                           max_draft_len=max_draft_len, seed=0)
    k = check_counts(inputs)
    batch, device = cu_num_draft_tokens.shape[0], target_logits.device
    counts = counts_of(cu_num_draft_tokens)
    starts = cu_num_draft_tokens.long() - counts
    columns = torch.arange(k + 1, device=device).view(1, -1)
    rows = (starts + torch.arange(batch, device=device)).view(-1, 1) + torch.minimum(columns, counts.view(-1, 1))
    num_tokens = draft_token_ids.shape[0]
    flat = (starts.view(-1, 1) + columns[:, :k]).clamp(0, max(num_tokens - 1, 0))
    in_request = columns[:, :k] < counts.view(-1, 1)
    if num_tokens == 0:
        tokens = torch.full((batch, k), PAD_TOKEN, dtype=draft_token_ids.dtype, device=device)
        probs = None if draft_probs is None else draft_probs.new_zeros(batch, k, target_logits.shape[-1])
    else:
        tokens = torch.where(in_request, draft_token_ids[flat], PAD_TOKEN).to(draft_token_ids.dtype)
        probs = None if draft_probs is None else draft_probs[flat]
    return tokens, probs, target_logits[rows]
