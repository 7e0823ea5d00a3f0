"""Fused chain verification in Triton (same contract as :func:`reference.chain_reference`).

Two launches per call, nothing of size V written to memory:

1. ``_chain_stats_kernel``, grid ``(B*(K+1), C1)``: each program reads one vocabulary chunk of one
   (row, position) of the logits and writes its partial max, sum-exp and argmax. When some row
   uses top-k/top-p (``check_row_values``: the one host sync per call, which also rejects
   out-of-range per-row values) there is one chunk per (row, position) and the program also finds
   the exact keep threshold of top-k, then of top-p, by a 16-way search over the order-preserving
   int32 key of the float32 logit (up to 8 passes over the row each). It also resets the per-row
   scratch that launch 2 combines into.
2. ``_chain_sample_kernel``, grid ``(B, C2)``: every program combines the ``(K+1) x C1``
   partials of its row, decides acceptance for the whole row (the same answer in every program),
   then races over its chunk at the emitted position j: ``argmax_v r(v) / E_v`` over the
   residual ``r = max(0, p - q)`` and over ``p`` in the same pass. Chunk winners meet in
   ``tl.atomic_max`` on ``(float32 score bits << 32) | (2**31 - 1 - v)`` (higher score, then lower
   index wins); the last program of the row to arrive (an atomic counter) writes its outputs,
   taking the p winner when no chunk saw a positive residual.

The kernels verify only: ``accept_probs`` (a statistic) is computed beside them by the dispatch
(:func:`draftwise.kernels.backend.get_implementation`).

Ragged batches (:func:`verify_chain_ragged_triton`, the layout of ``ragged.py``): the same two
launches on flat buffers, turned on by the constexpr ``RAGGED``. Each program finds its request's
offset and draft count in the inclusive counts ``cu`` (clamped to the buffers) and indexes rows by
offset; positions past the request's own read nothing. ``BONUS_IDS``: the logits hold the drafted
positions only, and the given id is emitted where every draft passes (no race there).

Math is float32 for any input dtype; injected uniforms are read as float32. The launcher makes
the last dimension of every input unit-stride and converts float types the kernels do not read
(float8 ...) to float32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .spec import ChainInputs, LenienceKind, VerifyOutput, check_row_values

# Tuning knobs: vocabulary tile per loop step, vocabulary entries per program in each launch, and
# the tile of the threshold search (it holds a [tile, 16] comparison).
BLOCK_V = 2048
STATS_CHUNK = 16384
SAMPLE_CHUNK = 8192
FILTER_BLOCK_V = 512

_FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)
_ROUND_A = tl.constexpr(0xD2511F53)
_ROUND_B = tl.constexpr(0xCD9E8D57)
_KEY_A = tl.constexpr(0x9E3779B9)
_KEY_B = tl.constexpr(0xBB67AE85)


@triton.jit
def philox_word(seed, c0, c1, c2):
    """Word 0 of Philox4x32-10 keyed by int64 ``seed``, counter ``(c0, c1, c2, 0)``, as uint32."""
    zero = c0 * 0 + c1 * 0 + c2 * 0  # every word at the counters' common shape
    k0 = ((zero + seed) & 0xFFFFFFFF).to(tl.uint32)
    k1 = (((zero + seed) >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = (zero + c0).to(tl.uint32)
    c1 = (zero + c1).to(tl.uint32)
    c2 = (zero + c2).to(tl.uint32)
    c3 = zero.to(tl.uint32)
    for _ in tl.static_range(10):
        a, b = c0, c2
        c0 = tl.umulhi(b, _ROUND_B) ^ c1 ^ k0
        c2 = tl.umulhi(a, _ROUND_A) ^ c3 ^ k1
        c1 = b * _ROUND_B
        c3 = a * _ROUND_A
        k0 = k0 + _KEY_A
        k1 = k1 + _KEY_B
    return c0


@triton.jit
def philox_uniform(seed, c0, c1, c2):
    """The acceptance draw ``((x >> 9) + 0.5) / 2**23``: exact in float32, inside (0, 1)."""
    return ((philox_word(seed, c0, c1, c2) >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07


@triton.jit
def _race_exponential(t):
    """E = -log(1 - t) ~ Exp(1) for a race draw t in (0, 1], precise for small t (Kahan's log1p:
    -log(y) * t / (1 - y) with y = 1 - t rounded; t when y rounds to 1; +inf at t = 1)."""
    y = 1.0 - t
    e = -tl.log(y) * t / (1.0 - y)
    return tl.where(y == 1.0, t, tl.where(y > 0.0, e, float("inf")))


@triton.jit
def _lenient(p, lenience_arg, LENIENCE: tl.constexpr):
    """f(p): p / eps or p / eps**2 (lenience_arg is the divisor), p ** eps, or p."""
    if LENIENCE == 1 or LENIENCE == 2:
        f = p / lenience_arg
    elif LENIENCE == 3:
        f = tl.where(p > 0, tl.exp2(lenience_arg * tl.log2(tl.where(p > 0, p, 1.0))), 0.0)
    else:
        f = p
    return f


@triton.jit
def _logits(ptr, mask):
    """Sanitised float32 logits: NaN is the lowest value, all clamped to the float32 range."""
    x = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x = tl.where(x == x, x, -_FLOAT32_MAX)
    return tl.minimum(tl.maximum(x, -_FLOAT32_MAX), _FLOAT32_MAX)


@triton.jit
def _probs(ptr, mask):
    """Draft probabilities as float32: NaN and negatives count as 0."""
    q = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    return tl.where(q == q, tl.maximum(q, 0.0), 0.0)


@triton.jit
def _key(x):
    """Order-preserving int32 key of a float32 (-0.0 sorts just below +0.0)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _mass_above(row_ptr, vocab, x, floor, m, t, BLOCK_V: tl.constexpr):
    """Sum of exp((l - m) / t) over the logits l > x with l >= floor."""
    offs = tl.arange(0, BLOCK_V)
    acc = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        mask = v0 + offs < vocab
        l = _logits(row_ptr + v0 + offs, mask)
        acc += tl.exp(tl.where(mask & (l > x) & (l >= floor), (l - m) / t, -float("inf")))
    return tl.sum(acc, 0)


@triton.jit
def _threshold(row_ptr, vocab, hi, target, floor, m, t, WEIGHTED: tl.constexpr, BLOCK_V: tl.constexpr):
    """Smallest float32 x with ``mass(x) < target``, mass(x) = count (or weight exp((l - m) / t)) of
    the logits l > x with l >= floor: a search over x's int32 key in [key(-FLOAT32_MAX), hi] that
    probes 16 keys per pass over the row (8 passes for the whole float32 range)."""
    offs = tl.arange(0, BLOCK_V)
    probes = tl.arange(0, 16).to(tl.int64)
    lo = tl.full([], -2139095040, tl.int64)  # _key(-FLOAT32_MAX)
    hi = hi.to(tl.int64)
    while lo < hi:
        keys = lo + (hi - lo) * probes // 16
        x = tl.where(keys >= 0, keys, keys ^ 0x7FFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
        mass = tl.zeros([16], tl.float32)
        for v0 in range(0, vocab, BLOCK_V):
            mask = v0 + offs < vocab
            l = _logits(row_ptr + v0 + offs, mask)
            if WEIGHTED:
                weight = tl.exp(tl.where(mask & (l >= floor), (l - m) / t, -float("inf")))
            else:
                weight = (mask & (l >= floor)).to(tl.float32)
            mass += tl.sum(tl.where(l[:, None] > x[None, :], weight[:, None], 0.0), 0)
        failing = tl.sum((mass >= target).to(tl.int64), 0)  # the answer lies in (keys[failing - 1], keys[failing]]
        hi = tl.where(failing < 16, tl.sum(tl.where(probes == failing, keys, 0), 0), hi)
        lo = tl.where(failing > 0, tl.sum(tl.where(probes == failing - 1, keys, 0), 0) + 1, lo)
    return tl.where(lo >= 0, lo, lo ^ 0x7FFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _race_key(score, index, vocab):
    """Best lane as ``(score bits << 32) | (2**31 - 1 - index)``: int64 order = higher score, then
    lower index; -1 when no lane has a score >= 0."""
    best = tl.max(score, 0)
    index = tl.min(tl.where(score == best, index, vocab), 0)
    key = (best.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (0x7FFFFFFF - index).to(tl.int64)
    return tl.where(best >= 0, key, -1)


@triton.jit
def _max_sum_argmax(row_ptr, start, end, vocab, t, BLOCK_V: tl.constexpr):
    """One pass over logits ``[start, end)`` of a row: the max m, Σ exp((l − m) / t) (an online
    softmax sum, rescaled as the max grows) and the first index of the max (``vocab`` if empty)."""
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([], -float("inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)  # per lane, relative to the running scalar max m
    lane_max = tl.full([BLOCK_V], -float("inf"), tl.float32)
    lane_arg = tl.zeros([BLOCK_V], tl.int32)  # first index of each lane's max
    for v0 in range(start, end, BLOCK_V):
        mask = v0 + offs < end
        l = tl.where(mask, _logits(row_ptr + v0 + offs, mask), -float("inf"))
        new_m = tl.maximum(m, tl.max(l, 0))
        s = s * tl.exp((m - new_m) / t) + tl.exp((l - new_m) / t)
        lane_arg = tl.where(l > lane_max, v0 + offs, lane_arg)
        lane_max = tl.maximum(lane_max, l)
        m = new_m
    return m, tl.sum(s, 0), tl.min(tl.where(lane_max == m, lane_arg, vocab), 0)


@triton.jit
def _filtered(row_ptr, vocab, m, t, k, top_p, use_k, use_p, BLOCK_V: tl.constexpr, FILTER_BLOCK_V: tl.constexpr):
    """Top-k, then top-p of what top-k kept, on one row of max m: the threshold (a token is kept
    iff its logit is >= it; -inf keeps all) and the kept weight Σ exp((l − m) / t)."""
    no_key = -2139095040  # _key(-FLOAT32_MAX): an empty search
    hi = tl.where(use_k, _key(m), no_key)
    threshold = _threshold(row_ptr, vocab, hi, k.to(tl.float32), -float("inf"), m, t, False, FILTER_BLOCK_V)
    threshold = tl.where(use_k, threshold, -float("inf"))
    total = _mass_above(row_ptr, vocab, -float("inf"), threshold, m, t, BLOCK_V)
    hi = tl.where(use_p, _key(m), no_key)
    threshold_p = _threshold(row_ptr, vocab, hi, top_p * total, threshold, m, t, True, FILTER_BLOCK_V)
    threshold = tl.where(use_p, tl.maximum(threshold, threshold_p), threshold)
    return threshold, _mass_above(row_ptr, vocab, -float("inf"), threshold, m, t, BLOCK_V)


@triton.jit
def _ragged_span(cu_ptr, b, num_tokens, k_max):
    """Request b of a ragged batch: its first index in the flat draft buffers and its draft count,
    from inclusive cumulative counts (``cu[b]`` = drafts of requests 0..b), clamped so that every
    load stays inside the buffers whatever ``cu`` holds."""
    end = tl.load(cu_ptr + b).to(tl.int64)
    start = tl.where(b > 0, tl.load(cu_ptr + tl.maximum(b - 1, 0)).to(tl.int64), 0)
    start = tl.minimum(tl.maximum(start, 0), num_tokens)
    end = tl.minimum(tl.maximum(end, start), num_tokens)
    return start, tl.minimum(end - start, k_max)


@triton.jit(do_not_specialize=["num_positions", "num_tokens"])
def _chain_stats_kernel(
    logits_ptr,  # [B, K+1, V] float (any), unit stride along V; RAGGED: [N + B, V] ([N, V] with BONUS_IDS)
    temperature_ptr,  # [B] float32
    top_k_ptr,  # [B] int64
    top_p_ptr,  # [B] float32
    cu_ptr,  # [B] int32/int64 (RAGGED): inclusive cumulative draft counts
    max_ptr,  # [B*(K+1), C1] float32 out
    sum_ptr,  # [B*(K+1), C1] float32 out: sum over the chunk of exp((l - chunk max) / t), kept l only
    argmax_ptr,  # [B*(K+1), C1] int32 out: first index of the chunk max
    threshold_ptr,  # [B*(K+1)] float32 out (FILTER): keep l >= threshold
    best_ptr,  # [B, 2] int64 out: set to -1 (race winners of launch 2)
    arrivals_ptr,  # [B] int32 out: set to 0
    num_positions,  # K + 1
    vocab,
    chunk,
    num_tokens,  # N (RAGGED)
    stride_lb, stride_lk,
    FILTER: tl.constexpr, RAGGED: tl.constexpr, BONUS_IDS: tl.constexpr, BLOCK_V: tl.constexpr,
    FILTER_BLOCK_V: tl.constexpr,
):
    # Online softmax statistics of one (row, position, chunk): M = max l, S = sum exp((l - M) / t),
    # first argmax; reads each logit once (4 B/elem for fp32). FILTER: one chunk per row, and up to
    # 19 more passes over it (top-k and top-p thresholds, their kept mass) to set S over the kept l.
    # RAGGED: request b's position i is row start_b (+ b unless BONUS_IDS) + i of the flat logits;
    # positions past the request's own read nothing.
    rp = tl.program_id(0)
    c = tl.program_id(1)
    b = rp // num_positions
    position = rp % num_positions
    if RAGGED:
        start, count = _ragged_span(cu_ptr, b, num_tokens, num_positions - 1)
        if BONUS_IDS:  # no logits row at the bonus position
            live = position < count
            first_row = start
        else:
            live = position <= count
            first_row = start + b
        row_ptr = logits_ptr + (first_row + tl.minimum(position, count)) * stride_lk
        vocab_live = tl.where(live, vocab, 0)
    else:
        live = position >= 0
        row_ptr = logits_ptr + b.to(tl.int64) * stride_lb + position.to(tl.int64) * stride_lk
        vocab_live = vocab
    t = tl.load(temperature_ptr + b)
    t = tl.where(t > 0, t, 1.0)

    first = (position + c == 0).to(tl.int32)  # one program per row resets its scratch
    pair = tl.arange(0, 2)
    tl.store(best_ptr + 2 * b + pair, tl.full([2], -1, tl.int64), mask=pair < 2 * first)
    tl.store(arrivals_ptr + b, 0, mask=first == 1)

    chunk_start = c * chunk
    m, s, arg = _max_sum_argmax(row_ptr, chunk_start, tl.minimum(chunk_start + chunk, vocab_live), vocab, t,
                                BLOCK_V)

    if FILTER:
        k = tl.load(top_k_ptr + b)
        top_p = tl.load(top_p_ptr + b)
        threshold, s = _filtered(row_ptr, vocab_live, m, t, k, top_p, (k > 0) & (k < vocab) & live,
                                 (top_p < 1.0) & live, BLOCK_V, FILTER_BLOCK_V)
        tl.store(threshold_ptr + rp, threshold)

    n_chunks = tl.num_programs(1)
    tl.store(max_ptr + rp * n_chunks + c, m)
    tl.store(sum_ptr + rp * n_chunks + c, s)
    tl.store(argmax_ptr + rp * n_chunks + c, arg)


@triton.jit(do_not_specialize=["k_max", "num_stat_chunks", "num_tokens"])
def _chain_sample_kernel(
    logits_ptr,  # [B, K+1, V] float (any), unit stride along V; RAGGED: [N + B, V] ([N, V] with BONUS_IDS)
    draft_probs_ptr,  # [B, K, V] float (HAS_Q), unit stride along V; RAGGED: [N, V]
    draft_tokens_ptr,  # [B, K] int64; RAGGED: [N] int64
    cu_ptr,  # [B] int32/int64 (RAGGED): inclusive cumulative draft counts
    bonus_ptr,  # [B] int (BONUS_IDS): the token emitted when every draft passes
    temperature_ptr,  # [B] float32
    seeds_ptr,  # [B] int64 (not HAS_UNIFORMS)
    accept_u_ptr,  # [B, K] float (HAS_UNIFORMS)
    race_u_ptr,  # [B, K+1, V] float (HAS_UNIFORMS), unit stride along V
    max_ptr,  # [B*(K+1), C1] float32
    sum_ptr,  # [B*(K+1), C1] float32
    argmax_ptr,  # [B*(K+1), C1] int32
    threshold_ptr,  # [B*(K+1)] float32 (FILTER)
    best_ptr,  # [B, 2] int64: residual and p race winners, packed
    arrivals_ptr,  # [B] int32
    output_tokens_ptr,  # [B, K+1] int64 out
    num_accepted_ptr,  # [B] int64 out
    k_max,
    vocab,
    num_stat_chunks,
    chunk,
    lenience_arg,  # LINEAR / SQUARE: the divisor eps or eps**2; POWER: the exponent eps
    num_tokens,  # N (RAGGED)
    stride_lb, stride_lk, stride_qb, stride_qk, stride_db, stride_ab, stride_rb, stride_rk,
    FILTER: tl.constexpr, HAS_Q: tl.constexpr, HAS_UNIFORMS: tl.constexpr, LENIENCE: tl.constexpr,
    RAGGED: tl.constexpr, BONUS_IDS: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # p_i(v) = [l >= thr_i] exp((l - M_i) / t) / S_i from the partials; accept x_i iff
    # u_i q_i(x_i) < f(p_i(x_i)); emitted token: argmax_v max(0, p_j - q_j)(v) / E_v, or over
    # p_j when that residual is all zero. Reads one chunk of logits (and q, race noise) at j only.
    # RAGGED: the row's drafts, q and logits start at its offset in the flat buffers; BONUS_IDS:
    # when every draft passes, the given bonus id is emitted instead of a race.
    b = tl.program_id(0)
    c = tl.program_id(1)
    b64 = b.to(tl.int64)
    t = tl.load(temperature_ptr + b)
    greedy = t == 0
    t = tl.where(greedy, 1.0, t)

    i = tl.arange(0, BLOCK_K)
    valid = i <= k_max
    if RAGGED:
        start, count = _ragged_span(cu_ptr, b, num_tokens, k_max)
        tokens_ptr = draft_tokens_ptr + start
        q_row_ptr = draft_probs_ptr + start * stride_qk
        if BONUS_IDS:
            logits_row_ptr = logits_ptr + start * stride_lk
            live = i < count
        else:
            logits_row_ptr = logits_ptr + (start + b) * stride_lk
            live = i <= count
    else:
        count = k_max
        tokens_ptr = draft_tokens_ptr + b64 * stride_db
        q_row_ptr = draft_probs_ptr + b64 * stride_qb
        logits_row_ptr = logits_ptr + b64 * stride_lb
        live = valid
    cell = (b * (k_max + 1) + i)[:, None] * num_stat_chunks + tl.arange(0, BLOCK_C)[None, :]
    cell_mask = live[:, None] & (tl.arange(0, BLOCK_C)[None, :] < num_stat_chunks)
    m_c = tl.load(max_ptr + cell, mask=cell_mask, other=-_FLOAT32_MAX)
    m = tl.max(m_c, 1)
    s_c = tl.load(sum_ptr + cell, mask=cell_mask, other=0.0)
    s = tl.sum(s_c * tl.exp((tl.where(cell_mask, m_c, m[:, None]) - m[:, None]) / t), 1)
    s = tl.where(live, s, 1.0)
    m = tl.where(live, m, 0.0)
    arg_c = tl.load(argmax_ptr + cell, mask=cell_mask, other=0)
    arg = tl.min(tl.where(cell_mask & (m_c == m[:, None]), arg_c, vocab), 1)
    if FILTER:
        thr = tl.load(threshold_ptr + b * (k_max + 1) + i, mask=live, other=0.0)
    else:
        thr = tl.full([BLOCK_K], -float("inf"), tl.float32)

    # Acceptance of every drafted position (identical in all programs of the row).
    x = tl.load(tokens_ptr + i, mask=i < count, other=-1)
    drafted = (x >= 0) & (x < vocab)
    x = tl.where(drafted, x, 0)
    num_drafted = tl.min(tl.where(drafted, BLOCK_K, i), 0)
    l_x = _logits(logits_row_ptr + i.to(tl.int64) * stride_lk + x, drafted)
    p_x = tl.exp(tl.where(drafted & (l_x >= thr), (l_x - m) / t, -float("inf"))) / s
    if HAS_Q:
        q_x = _probs(q_row_ptr + i.to(tl.int64) * stride_qk + x, drafted)
    else:
        q_x = tl.full([BLOCK_K], 1.0, tl.float32)
    if HAS_UNIFORMS:
        u = tl.load(accept_u_ptr + b64 * stride_ab + i, mask=i < k_max, other=0.5).to(tl.float32)
    else:
        seed = tl.load(seeds_ptr + b)
        u = philox_uniform(seed, i * 0, i, 0)
    f = _lenient(p_x, lenience_arg, LENIENCE)
    accepted = drafted & tl.where(greedy, x == arg, u * q_x < f)
    j = tl.min(tl.where(accepted, BLOCK_K, i), 0)

    # The race over this program's chunk at the emitted position j (sampled rows only).
    if BONUS_IDS:
        race = ~greedy & (j < count)  # at j = count the bonus id is emitted
    else:
        race = ~greedy
    use_q = j < num_drafted
    at_j = i == j
    m_j = tl.sum(tl.where(at_j, m, 0.0), 0)
    s_j = tl.sum(tl.where(at_j, s, 0.0), 0)
    thr_j = tl.max(tl.where(at_j, thr, -float("inf")), 0)
    x_j = tl.where(use_q, tl.sum(tl.where(at_j, x, 0), 0), -1)  # one-hot q_j at x_j; none at the bonus
    row_ptr = logits_row_ptr + j.to(tl.int64) * stride_lk
    q_ptr = q_row_ptr + j.to(tl.int64) * stride_qk
    u_ptr = race_u_ptr + b64 * stride_rb + j.to(tl.int64) * stride_rk

    offs = tl.arange(0, BLOCK_V)
    start = c * chunk
    end = tl.where(race, tl.minimum(start + chunk, vocab), start)
    q_end = tl.where(use_q, end, 0)
    best_r = tl.full([BLOCK_V], -1.0, tl.float32)  # per lane: best score and its first index
    best_p = tl.full([BLOCK_V], -1.0, tl.float32)
    arg_r = tl.zeros([BLOCK_V], tl.int32)
    arg_p = tl.zeros([BLOCK_V], tl.int32)
    for v0 in range(start, end, BLOCK_V):
        v = v0 + offs
        mask = v < end
        l = _logits(row_ptr + v, mask)
        p = tl.exp(tl.where(mask & (l >= thr_j), (l - m_j) / t, -float("inf"))) / s_j
        if HAS_Q:
            q = _probs(q_ptr + v, v < q_end)
        else:
            q = tl.where(v == x_j, 1.0, 0.0)
        if HAS_UNIFORMS:
            draw = tl.load(u_ptr + v, mask=mask, other=0.5).to(tl.float32)
        else:
            draw = (philox_word(seed, v, j, 1) | 1).to(tl.float32) * 2.3283064365386963e-10
        e = _race_exponential(draw)
        r = tl.maximum(p - q, 0.0)
        score_r = tl.where(mask & (r > 0), r / e, -1.0)
        score_p = tl.where(mask, p / e, -1.0)
        arg_r = tl.where(score_r > best_r, v, arg_r)
        arg_p = tl.where(score_p > best_p, v, arg_p)
        best_r = tl.maximum(best_r, score_r)
        best_p = tl.maximum(best_p, score_p)

    key_r = _race_key(best_r, arg_r, vocab)
    key_p = _race_key(best_p, arg_p, vocab)
    tl.atomic_max(best_ptr + 2 * b, key_r, mask=race)
    tl.atomic_max(best_ptr + 2 * b + 1, key_p, mask=race)

    arrived = tl.atomic_add(arrivals_ptr + b, 1)
    if arrived == tl.num_programs(1) - 1:
        # Last program of the row: emit. Atomic reads see every chunk's winner.
        won_r = tl.atomic_max(best_ptr + 2 * b, -1)
        won_p = tl.atomic_max(best_ptr + 2 * b + 1, -1)
        won = tl.where(won_r >= 0, won_r, won_p)
        sampled = 0x7FFFFFFF - (won & 0xFFFFFFFF)
        token = tl.where(greedy, tl.sum(tl.where(i == j, arg, 0), 0).to(tl.int64), sampled)
        token = tl.minimum(tl.maximum(token, 0), vocab - 1)
        if BONUS_IDS:
            token = tl.where(j == count, tl.load(bonus_ptr + b).to(tl.int64), token)
        out = tl.where(i < j, x, tl.where(i == j, token, -1))
        tl.store(output_tokens_ptr + b64 * (k_max + 1) + i, out, mask=valid)
        tl.store(num_accepted_ptr + b, j.to(tl.int64))

KERNEL_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _contiguous_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a unit stride along its last dimension (the kernels index it without a stride)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _readable_float(x: torch.Tensor) -> torch.Tensor:
    """A float input in a dtype the kernels read, unit stride along its last dimension."""
    return _contiguous_last(x if x.dtype in KERNEL_FLOATS else x.float())


def _check_device(device: torch.device) -> None:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"target_logits: the triton backend needs CUDA tensors (or TRITON_INTERPRET=1), "
                         f"got tensors on {device}")


def verify_chain_triton(
    inp: ChainInputs, *, filtered: bool | None = None, block_v: int | None = None,
    stats_chunk: int | None = None, sample_chunk: int | None = None,
) -> VerifyOutput:
    """Chain verification in two Triton launches.

    ``filtered``: whether some row may use top-k or top-p, from a caller that has checked the
    per-row values itself (a generation, once); None checks them here, one host sync. The other
    keywords override the module's tuning knobs.
    """
    if not isinstance(inp, ChainInputs):
        raise TypeError(f"inp: expected ChainInputs (see normalize_inputs), got {type(inp).__name__}")
    batch, k, vocab = inp.shape
    device = inp.target_logits.device
    _check_device(device)
    output_tokens = torch.empty((batch, k + 1), dtype=torch.int64, device=device)
    num_accepted = torch.empty((batch,), dtype=torch.int64, device=device)
    if batch == 0:
        return VerifyOutput(output_tokens, num_accepted)

    if filtered is None:
        filtered = check_row_values(inp)  # the one host sync
    logits = _readable_float(inp.target_logits)
    has_q = inp.draft_probs is not None and k > 0
    uniforms = None
    if inp.uniforms is not None:
        uniforms = (_readable_float(inp.uniforms.accept) if k > 0 else logits, _readable_float(inp.uniforms.race))
    _launch(
        output_tokens, num_accepted, k=k, vocab=vocab, logits=logits,
        draft_probs=_readable_float(inp.draft_probs) if has_q else None,
        draft_tokens=_contiguous_last(inp.draft_tokens) if k > 0 else num_accepted,
        rows=(inp.temperature, inp.top_k, inp.top_p), seeds=inp.seeds, uniforms=uniforms, ragged=None,
        filtered=filtered, lenience=(inp.lenience_kind, inp.lenience_epsilon),
        tuning=(block_v, stats_chunk, sample_chunk),
    )
    return VerifyOutput(output_tokens, num_accepted)


def verify_chain_ragged_triton(
    draft_tokens: torch.Tensor, cu_num_draft_tokens: torch.Tensor, target_logits: torch.Tensor,
    draft_probs: torch.Tensor | None, bonus_token_ids: torch.Tensor | None, *, max_draft_len: int,
    temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, seeds: torch.Tensor,
    lenience_kind: LenienceKind, lenience_epsilon: float, filtered: bool, block_v: int | None = None,
    stats_chunk: int | None = None, sample_chunk: int | None = None,
) -> VerifyOutput:
    """Chain verification of a ragged batch, indexed in place by offsets (no padded copy).

    Takes what :func:`draftwise.kernels.verify_chain_ragged` has validated: ``draft_tokens [N]``,
    ``cu_num_draft_tokens [B]`` (inclusive), ``target_logits [N + B, V]`` (``[N, V]`` when
    ``bonus_token_ids [B]`` is given), ``draft_probs [N, V]`` or None, ``[B]`` per-row
    parameters and seeds; ``filtered`` as :func:`verify_chain_triton`'s, here decided by the
    caller. Returns ``output_tokens [B, max_draft_len + 1]`` and ``num_accepted [B]``, int64.
    Reads no tensor value on the host: ``cu`` is clamped in the kernels, so any values keep
    every load inside the buffers.
    """
    batch, vocab = cu_num_draft_tokens.shape[0], target_logits.shape[-1]
    device = target_logits.device
    _check_device(device)
    k = max_draft_len
    output_tokens = torch.empty((batch, k + 1), dtype=torch.int64, device=device)
    num_accepted = torch.empty((batch,), dtype=torch.int64, device=device)
    if batch == 0:
        return VerifyOutput(output_tokens, num_accepted)
    num_tokens = draft_tokens.shape[0]
    has_q = draft_probs is not None and num_tokens > 0 and k > 0
    logits = _readable_float(target_logits)
    _launch(
        output_tokens, num_accepted, k=k, vocab=vocab, logits=logits,
        draft_probs=_readable_float(draft_probs) if has_q else None,
        draft_tokens=draft_tokens.contiguous() if num_tokens > 0 else num_accepted,
        rows=(temperature, top_k, top_p), seeds=seeds, uniforms=None,
        ragged=(cu_num_draft_tokens.contiguous(), bonus_token_ids, num_tokens),
        filtered=filtered, lenience=(lenience_kind, lenience_epsilon),
        tuning=(block_v, stats_chunk, sample_chunk),
    )
    return VerifyOutput(output_tokens, num_accepted)


def _launch(output_tokens, num_accepted, *, k, vocab, logits, draft_probs, draft_tokens, rows, seeds, uniforms,
            ragged, filtered, lenience, tuning) -> None:
    """Both launches over ``B = num_accepted.shape[0]`` rows of ``k`` drafts. ``ragged``: None for
    ``[B, K+1, V]`` logits, else ``(cu [B], bonus ids [B] or None, N)`` for flat ``[rows, V]`` ones."""
    batch, device = num_accepted.shape[0], logits.device
    block_v, stats_chunk, sample_chunk = tuning
    temperature, top_k, top_p = (_contiguous_last(x) for x in rows)
    seeds = _contiguous_last(seeds) if seeds is not None else num_accepted
    accept_u, race_u = uniforms if uniforms is not None else (logits, logits)
    has_q = draft_probs is not None
    draft_probs = draft_probs if has_q else logits
    cu, bonus, num_tokens = ragged if ragged is not None else (num_accepted, None, 0)
    bonus = bonus.contiguous() if bonus is not None else num_accepted
    if ragged is None:  # [B, K+1, V]: row and position strides
        strides = dict(stride_lb=logits.stride(0), stride_lk=logits.stride(1), stride_qb=draft_probs.stride(0),
                       stride_qk=draft_probs.stride(1), stride_db=draft_tokens.stride(0))
    else:  # flat rows: a request starts at its offset, positions are consecutive rows
        strides = dict(stride_lb=0, stride_lk=logits.stride(0), stride_qb=0, stride_qk=draft_probs.stride(0),
                       stride_db=0)
    layout = dict(RAGGED=ragged is not None, BONUS_IDS=ragged is not None and ragged[1] is not None)

    block = max(16, min(block_v or BLOCK_V, triton.next_power_of_2(vocab)))
    chunk1 = vocab if filtered else triton.cdiv(stats_chunk or STATS_CHUNK, block) * block
    chunk2 = triton.cdiv(sample_chunk or SAMPLE_CHUNK, block) * block
    chunks1, chunks2 = triton.cdiv(vocab, chunk1), triton.cdiv(vocab, chunk2)
    positions = batch * (k + 1)
    stats = torch.empty((3, positions, chunks1), dtype=torch.float32, device=device)
    threshold = torch.empty((positions,), dtype=torch.float32, device=device) if filtered else stats
    best = torch.empty((batch, 2), dtype=torch.int64, device=device)
    arrivals = torch.empty((batch,), dtype=torch.int32, device=device)
    argmax = stats[2].view(torch.int32)
    num_warps = 8 if block >= 2048 else 4

    _chain_stats_kernel[(positions, chunks1)](
        logits_ptr=logits, temperature_ptr=temperature, top_k_ptr=top_k, top_p_ptr=top_p, cu_ptr=cu,
        max_ptr=stats[0], sum_ptr=stats[1], argmax_ptr=argmax, threshold_ptr=threshold,
        best_ptr=best, arrivals_ptr=arrivals, num_positions=k + 1, vocab=vocab, chunk=chunk1,
        num_tokens=num_tokens, stride_lb=strides["stride_lb"], stride_lk=strides["stride_lk"],
        FILTER=filtered, **layout, BLOCK_V=block,
        FILTER_BLOCK_V=min(block, FILTER_BLOCK_V), num_warps=num_warps,
    )
    lenience_kind, eps = lenience[0], float(lenience[1])
    lenience_arg = eps * eps if lenience_kind == LenienceKind.SQUARE else eps
    _chain_sample_kernel[(batch, chunks2)](
        logits_ptr=logits, draft_probs_ptr=draft_probs, draft_tokens_ptr=draft_tokens, cu_ptr=cu, bonus_ptr=bonus,
        temperature_ptr=temperature, seeds_ptr=seeds, accept_u_ptr=accept_u, race_u_ptr=race_u,
        max_ptr=stats[0], sum_ptr=stats[1], argmax_ptr=argmax, threshold_ptr=threshold,
        best_ptr=best, arrivals_ptr=arrivals, output_tokens_ptr=output_tokens,
        num_accepted_ptr=num_accepted,
        k_max=k, vocab=vocab, num_stat_chunks=chunks1, chunk=chunk2, lenience_arg=lenience_arg,
        num_tokens=num_tokens, **strides, stride_ab=accept_u.stride(0),
        stride_rb=race_u.stride(0), stride_rk=race_u.stride(1) if race_u.dim() > 2 else 0,
        FILTER=filtered, HAS_Q=has_q, HAS_UNIFORMS=uniforms is not None, LENIENCE=int(lenience_kind), **layout,
        BLOCK_K=max(2, triton.next_power_of_2(k + 1)), BLOCK_C=max(2, triton.next_power_of_2(chunks1)),
        BLOCK_V=block, num_warps=num_warps,
    )
