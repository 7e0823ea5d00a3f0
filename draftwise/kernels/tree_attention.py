"""Tree attention: the T nodes of a token tree attend to their request's prefix and to their ancestors.

Queries are the T tree nodes of each request; keys and values sit in the engine's static cache
(S slots per row): the committed prefix in slots ``[0, L)`` (``[start, L)`` when the batch is
left-padded) and the tree's own K/V in slots ``[L, L + T)``. Slots past ``L + T`` are never read.
Node i attends to the whole prefix and to the tree nodes j whose bit j is set in its ancestor
word ``tree_mask[b, i]`` (bit i itself for a valid node; 0 marks a padding node). For the tree
``0 ─ 1 ─ 3`` with ``0 ─ 2`` beside it, after a prefix of L = 3::

                  prefix      tree block
    slot          0 1 2       3 4 5 6      tree_mask (bits 3..0)
    node 0        x x x       x . . .      0b0001
    node 1        x x x       x x . .      0b0011
    node 2        x x x       x . x .      0b0101
    node 3        x x x       x x . x      0b1011

The Triton kernel works in two phases over one KV head at a time, its G = Hq / Hkv query heads
and T nodes packed into the rows of one query block (GQA packing: row r is node r // G, head
r % G of the group), so each K/V tile is loaded once for all of them (once per block of
``MAX_BLOCK_M`` packed rows, half that when D > 64: G · T beyond it, e.g. G = 8 with T = 64,
reads the prefix once per block):

(a) **prefix**, no mask: an online softmax over the prefix tiles. When B × Hkv programs cannot
    fill the GPU, the prefix is split in ``num_splits`` ranges (split-K), each program writing a
    partial: its normalised output o_s and its log-sum-exp lse_s (natural log, −inf when the
    range is empty).
(b) **tree block**: the T × T scores with the ancestor bits as mask, then the partials merged by
    log-sum-exp:  lse = log Σ_s exp(lse_s),  out = Σ_s exp(lse_s − lse) · o_s.
    With a single split the tree program runs phase (a) itself: online softmax merges tile by
    tile, the same sum without the round trip through memory.

Every exponent is taken against a finite shift (0 when all seen so far is masked), so an empty
part (prefix length 0, an empty split) weighs exp(−inf) = 0 and never yields NaN. Scores and
accumulators are float32 for any input dtype; the output has the input's dtype. Padding nodes
(``tree_mask == 0``) and nodes with nothing to attend return zeros and lse = −inf.

No mask of size T × S exists anywhere: the prefix needs none and the tree block's comes from T
bit words. :func:`tree_attention_ref` builds that mask explicitly and is the oracle of the tests.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch

from .backend import has_triton, triton_interpreted

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference works without the triton extra
    triton = tl = None

MAX_NODES = 64  # one int64 ancestor word per node
FLOATS = (torch.float32, torch.float16, torch.bfloat16)

# Tuning knobs: prefix slots per tile, the largest packed query block, and the most prefix splits.
BLOCK_N = 64
MAX_BLOCK_M = 128
MAX_SPLITS = 16
MIN_SPLIT_SLOTS = 256  # a split shorter than this costs more in launch and merge than it saves
FP32_DOT_PRECISION = "ieee"  # fp32 inputs are for checking: no tf32 rounding


def _jit(**options):
    """``triton.jit`` when triton is installed; the kernels are then never called otherwise."""
    return (lambda fn: triton.jit(fn, **options)) if triton is not None else (lambda fn: fn)


# --------------------------------------------------------------------------------------------
# Public entry point and the reference
# --------------------------------------------------------------------------------------------


def tree_attention(q, k, v, prefix_lengths, tree_mask, scale=None, backend=None, *, prefix_starts=None,
                   num_splits=None, return_lse=False, validate=True):
    """Attention of T tree nodes per request over its prefix and its ancestors in the tree.

    Args:
        q: ``[B, T, Hq, D]`` queries of the tree nodes (float32, float16 or bfloat16), T <= 64.
        k, v: ``[B, Hkv, S, D]`` the static cache, same dtype as q; Hq a multiple of Hkv (GQA).
            The tree's own keys and values sit in slots ``[prefix_lengths[b], prefix_lengths[b] + T)``.
        prefix_lengths: ``[B]`` int64 (or int32) committed length L of each row, L + T <= S.
        tree_mask: ``[B, T]`` int64 ancestor words: bit j of ``tree_mask[b, i]`` set iff node i
            attends to node j; 0 marks a padding node. Bits at or above T are ignored.
        scale: the softmax scale, ``1 / sqrt(D)`` by default.
        backend: "triton" or "torch" (the reference); None picks triton on CUDA, torch otherwise.
        prefix_starts: ``[B]`` first attended prefix slot (left padding); None means 0.
        num_splits: prefix splits of the triton kernel; None picks from the GPU's size.
        return_lse: also return the natural-log log-sum-exp of each row's scores, ``[B, T, Hq]`` float32.
        validate: check the values of prefix_lengths / prefix_starts (one host sync). Loads stay
            inside ``[0, S)`` either way.

    Returns:
        ``[B, T, Hq, D]`` in q's dtype (zeros for padding nodes), and the lse when asked for
        (−inf for padding nodes).
    """
    name = _resolve_backend(backend, q.device)
    if name == "torch":
        return tree_attention_ref(q, k, v, prefix_lengths, tree_mask, scale, prefix_starts=prefix_starts,
                                  return_lse=return_lse, validate=validate)
    return tree_attention_triton(q, k, v, prefix_lengths, tree_mask, scale, prefix_starts=prefix_starts,
                                 num_splits=num_splits, return_lse=return_lse, validate=validate)


def tree_attention_ref(q, k, v, prefix_lengths, tree_mask, scale=None, backend=None, *, prefix_starts=None,
                       num_splits=None, return_lse=False, validate=True):
    """The oracle: an explicit ``[B, T, S]`` boolean mask and float32 SDPA (same contract as
    :func:`tree_attention`; ``backend`` and ``num_splits`` are accepted and ignored)."""
    prefix_starts = _check_inputs(q, k, v, prefix_lengths, tree_mask, prefix_starts, validate)
    group = q.shape[2] // k.shape[1]
    scale = _scale(scale, q.shape[-1])
    mask = tree_attention_mask(prefix_lengths, tree_mask, k.shape[2], prefix_starts)  # [B, T, S]
    # Slots nobody attends (garbage past L + T, left padding) are zeroed: 0 * NaN would leak.
    used = mask.any(dim=1)[:, None, :, None]
    keys = torch.where(used, k.float(), 0.0).repeat_interleave(group, dim=1)  # [B, Hq, S, D]
    values = torch.where(used, v.float(), 0.0).repeat_interleave(group, dim=1)
    queries = q.float().transpose(1, 2)  # [B, Hq, T, D]
    attend = mask[:, None]  # [B, 1, T, S]
    out = torch.nn.functional.scaled_dot_product_attention(queries, keys, values, attn_mask=attend, scale=scale)
    alive = attend.any(dim=-1, keepdim=True)  # rows with something to attend; the rest give 0
    out = torch.where(alive, out, 0.0).transpose(1, 2).to(q.dtype)
    if not return_lse:
        return out
    scores = (queries @ keys.transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores.masked_fill(~attend, -math.inf), dim=-1)  # −inf for empty rows
    return out, lse.transpose(1, 2).contiguous()


def tree_attention_mask(prefix_lengths, tree_mask, num_slots, prefix_starts=None):
    """``[B, T, S]`` bool: node i of row b attends to slot s (the reference's explicit mask).
    Padding nodes (ancestor word 0) attend to nothing."""
    batch, nodes = tree_mask.shape
    device = tree_mask.device
    slots = torch.arange(num_slots, device=device).view(1, -1)
    starts = torch.zeros_like(prefix_lengths) if prefix_starts is None else prefix_starts
    prefix = (slots >= starts.view(-1, 1)) & (slots < prefix_lengths.view(-1, 1))  # [B, S]
    # 1 << j as int64 (1 << 63 is the sign bit), made on the device: no copy, graph-capturable.
    bits = torch.ones(nodes, dtype=torch.int64, device=device) << torch.arange(nodes, device=device)
    tree = (tree_mask.unsqueeze(-1) & bits) != 0  # [B, T, T]: node i attends to node j
    mask = prefix.unsqueeze(1).expand(batch, nodes, num_slots).clone()
    tree_slots = (prefix_lengths.view(-1, 1) + torch.arange(nodes, device=device)).clamp(max=num_slots - 1)
    mask.scatter_(2, tree_slots.unsqueeze(1).expand(batch, nodes, nodes), tree)
    return mask & (tree_mask != 0).unsqueeze(-1)


# --------------------------------------------------------------------------------------------
# Validation and backend choice
# --------------------------------------------------------------------------------------------


def _scale(scale, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _check_inputs(q, k, v, prefix_lengths, tree_mask, prefix_starts, validate: bool):
    """Raise a ValueError naming the first bad argument; return prefix_starts (zeros when None)."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            layout = "[B, T, Hq, D]" if name == "q" else "[B, Hkv, S, D]"
            raise ValueError(f"{name}: expected a 4-d tensor {layout}, got {shape}")
    batch, nodes, q_heads, head_dim = q.shape
    if q.dtype not in FLOATS:
        raise ValueError(f"q: expected float32, float16 or bfloat16, got {q.dtype}")
    if not 1 <= nodes <= MAX_NODES:
        raise ValueError(f"q: expected 1 to {MAX_NODES} tree nodes T (one int64 ancestor word each), got T = {nodes}")
    for name, tensor in (("k", k), ("v", v)):
        if tensor.dtype != q.dtype:
            raise ValueError(f"{name}: expected q's dtype {q.dtype}, got {tensor.dtype}")
        if tensor.device != q.device:
            raise ValueError(f"{name}: expected a tensor on q's device {q.device}, got {tensor.device}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k: expected [B, Hkv, S, D] with B = {batch}, D = {head_dim}, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    kv_heads, num_slots = k.shape[1], k.shape[2]
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(f"q: the query heads Hq = {q_heads} must be a multiple of k's KV heads Hkv = {kv_heads}")
    if num_slots < nodes:
        raise ValueError(f"k: the cache of S = {num_slots} slots cannot hold the T = {nodes} tree nodes")
    _check_index(prefix_lengths, "prefix_lengths", batch, q.device, (torch.int64, torch.int32))
    if not isinstance(tree_mask, torch.Tensor) or tree_mask.shape != (batch, nodes):
        shape = tuple(tree_mask.shape) if isinstance(tree_mask, torch.Tensor) else type(tree_mask).__name__
        raise ValueError(f"tree_mask: expected shape [B, T] = [{batch}, {nodes}], got {shape}")
    _check_index(tree_mask.reshape(-1), "tree_mask", batch * nodes, q.device, (torch.int64,))
    if prefix_starts is None:
        prefix_starts = torch.zeros_like(prefix_lengths)
    else:
        _check_index(prefix_starts, "prefix_starts", batch, q.device, (torch.int64, torch.int32))
    if validate:
        _check_lengths(prefix_lengths, prefix_starts, nodes, num_slots)
    return prefix_starts


def _check_index(tensor, name: str, size: int, device, dtypes) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.shape != (size,):
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name}: expected shape [{size}], got {shape}")
    if tensor.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype {' or '.join(map(str, dtypes))}, got {tensor.dtype}")
    if tensor.device != device:
        raise ValueError(f"{name}: expected a tensor on q's device {device}, got {tensor.device}")


def _check_lengths(prefix_lengths, prefix_starts, nodes: int, num_slots: int) -> None:
    """Values, one host sync: 0 <= start <= L and L + T <= S in every row."""
    low, high = (int(x) for x in torch.aminmax(prefix_lengths))
    if low < 0 or high + nodes > num_slots:
        raise ValueError(
            f"prefix_lengths: expected 0 <= L and L + T <= S = {num_slots} (T = {nodes}), "
            f"got L in [{low}, {high}]")
    if bool(((prefix_starts < 0) | (prefix_starts > prefix_lengths)).any()):
        raise ValueError("prefix_starts: expected 0 <= prefix_starts[b] <= prefix_lengths[b] in every row")


def _resolve_backend(backend, device: torch.device) -> str:
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"backend: expected 'triton', 'torch' or None, got {backend!r}")
    triton_runs = has_triton() and (device.type == "cuda" or triton_interpreted())
    if backend == "triton" and not triton_runs:
        wanted = "pip install 'triton>=3.4'" if not has_triton() else f"CUDA tensors, got tensors on {device}"
        raise RuntimeError(f"backend 'triton' is not available for tree_attention: needs {wanted} "
                           "(or TRITON_INTERPRET=1 for tests)")
    if backend is None:
        # The interpreter is for tests only: on the CPU the default is the reference.
        if device.type == "cuda" and not has_triton():
            _warn_no_triton()
        return "triton" if device.type == "cuda" and has_triton() else "torch"
    return backend


@functools.lru_cache(maxsize=None)
def _warn_no_triton() -> None:
    warnings.warn("draftwise: triton is not installed; tree_attention uses the torch reference (slower). "
                  "To fix: pip install 'triton>=3.4'", RuntimeWarning, stacklevel=4)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def tree_attention_triton(q, k, v, prefix_lengths, tree_mask, scale=None, backend=None, *, prefix_starts=None,
                          num_splits=None, return_lse=False, validate=True):
    """The Triton kernels (same contract as :func:`tree_attention`)."""
    prefix_starts = _check_inputs(q, k, v, prefix_lengths, tree_mask, prefix_starts, validate)
    if num_splits is not None and not 1 <= int(num_splits) <= MAX_SPLITS:
        raise ValueError(f"num_splits: expected 1 to {MAX_SPLITS} or None, got {num_splits}")
    batch, nodes, q_heads, head_dim = q.shape
    kv_heads, num_slots = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    rows = nodes * group  # packed query rows per KV head
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = min(max(16, triton.next_power_of_2(rows)), MAX_BLOCK_M if block_d <= 64 else MAX_BLOCK_M // 2)
    m_tiles = triton.cdiv(rows, block_m)
    splits = int(num_splits) if num_splits is not None else _default_splits(q.device, batch * kv_heads * m_tiles,
                                                                             num_slots - nodes)
    out = q.new_empty(q.shape)
    lse = torch.empty(batch, nodes, q_heads, dtype=torch.float32, device=q.device) if return_lse else out
    common = dict(
        q_ptr=q, k_ptr=k, v_ptr=v, lengths_ptr=prefix_lengths, starts_ptr=prefix_starts,
        num_nodes=nodes, group=group, num_kv_heads=kv_heads, num_slots=num_slots, head_dim=head_dim,
        scale=_scale(scale, head_dim),
        stride_qb=q.stride(0), stride_qt=q.stride(1), stride_qh=q.stride(2), stride_qd=q.stride(3),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_ks=k.stride(2), stride_kd=k.stride(3),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vs=v.stride(2), stride_vd=v.stride(3),
        NUM_SPLITS=splits, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_N=BLOCK_N,
        UPCAST_DOT=triton_interpreted(), PRECISION=FP32_DOT_PRECISION if q.dtype == torch.float32 else "tf32",
        num_warps=4 if block_m * block_d <= 64 * 64 else 8,
    )
    part_out = part_lse = out  # placeholders, unread with one split
    if splits > 1:
        part_out = torch.empty(batch * kv_heads, splits, rows, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch * kv_heads, splits, rows, dtype=torch.float32, device=q.device)
        _prefix_split_kernel[(batch * kv_heads, m_tiles, splits)](
            part_out_ptr=part_out, part_lse_ptr=part_lse, **common)
    _tree_kernel[(batch * kv_heads, m_tiles)](
        mask_ptr=tree_mask, part_out_ptr=part_out, part_lse_ptr=part_lse, out_ptr=out, lse_ptr=lse,
        stride_mb=tree_mask.stride(0), stride_mt=tree_mask.stride(1),
        stride_ob=out.stride(0), stride_ot=out.stride(1), stride_oh=out.stride(2),
        BLOCK_T=max(16, triton.next_power_of_2(nodes)), STORE_LSE=return_lse, **common)
    return (out, lse) if return_lse else out


def _default_splits(device: torch.device, programs: int, max_prefix: int) -> int:
    """Enough prefix splits to give every SM a program, when the prefix capacity is long enough
    to share. The cache size bounds the prefix: no host sync to read the real lengths."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= sms:
        return 1
    return max(1, min(MAX_SPLITS, triton.cdiv(sms, programs), max_prefix // MIN_SPLIT_SLOTS))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@_jit()
def _dot(a, b, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """``a @ b`` accumulated in float32. The CPU interpreter gets bfloat16 dots wrong: it is
    given float32 operands (already rounded to the input dtype, so the math is the GPU's)."""
    if UPCAST_DOT:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


@_jit()
def _online_step(m, l, acc, s, v, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step over scores ``s [M, N]`` (−inf where masked) and values ``v [N, D]``:
    ``(m, l, acc)`` hold the running max, Σ exp(s − m) and Σ exp(s − m) · v of each row."""
    m_new = tl.maximum(m, tl.max(s, 1))
    # Shift by 0 while a row has seen only −inf: exp(−inf − 0) = 0 where exp(−inf + inf) is NaN.
    shift = tl.where(m_new == -float("inf"), 0.0, m_new)
    alpha = tl.exp(m - shift)
    p = tl.exp(s - shift[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST_DOT, PRECISION)
    return m_new, l, acc


@_jit()
def _attend_prefix(m, l, acc, q, k_row_ptr, v_row_ptr, lo, hi, stride_ks, stride_kd, stride_vs, stride_vd,
                   offs_d, head_dim, scale, BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr,
                   PRECISION: tl.constexpr):
    """Phase (a) over slots ``[lo, hi)``, no mask: each K/V tile is read once for the whole block."""
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < head_dim
    for n0 in range(lo, hi, BLOCK_N):
        slot = n0 + offs_n
        in_range = slot < hi
        kv_ok = in_range[:, None] & d_ok[None, :]
        k = tl.load(k_row_ptr + slot[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0)
        s = _dot(q, tl.trans(k), UPCAST_DOT, PRECISION) * scale
        s = tl.where(in_range[None, :], s, -float("inf"))
        v = tl.load(v_row_ptr + slot[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0)
        m, l, acc = _online_step(m, l, acc, s, v, UPCAST_DOT, PRECISION)
    return m, l, acc


@_jit()
def _load_block(q_ptr, k_ptr, v_ptr, lengths_ptr, starts_ptr, num_nodes, group, num_kv_heads, num_slots, head_dim,
                stride_qb, stride_qt, stride_qh, stride_qd, stride_kb, stride_kh, stride_vb, stride_vh,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The program's packed query block and where its row's cache starts.

    Row r of the block is node r // G and query head kvh · G + r % G: the G heads sharing a KV
    head and all T nodes read each K/V tile together."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // num_kv_heads).to(tl.int64)  # int64 before it multiplies the strides
    kvh = pid_bh % num_kv_heads
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_nodes * group
    node = rows // group
    head = kvh * group + rows % group
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = row_ok[:, None] & (offs_d < head_dim)[None, :]
    q = tl.load(q_ptr + b * stride_qb + node[:, None] * stride_qt + head[:, None] * stride_qh
                + offs_d[None, :] * stride_qd, mask=q_ok, other=0.0)
    length = tl.minimum(tl.load(lengths_ptr + b).to(tl.int64), num_slots)
    start = tl.maximum(tl.load(starts_ptr + b).to(tl.int64), 0)
    k_row_ptr = k_ptr + b * stride_kb + kvh.to(tl.int64) * stride_kh
    v_row_ptr = v_ptr + b * stride_vb + kvh.to(tl.int64) * stride_vh
    return b, rows, row_ok, node, head, offs_d, q, start, length, k_row_ptr, v_row_ptr


@_jit(do_not_specialize=["num_nodes"])
def _prefix_split_kernel(
    q_ptr, k_ptr, v_ptr,  # [B, T, Hq, D], [B, Hkv, S, D] x2
    lengths_ptr, starts_ptr,  # [B] prefix lengths L and first attended slots
    part_out_ptr, part_lse_ptr,  # [B * Hkv, NUM_SPLITS, T * G, D] / [..., T * G] float32 partials
    num_nodes, group, num_kv_heads, num_slots, head_dim, scale,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    NUM_SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    """Phase (a), split-K: program (b · Hkv + kvh, m tile, split) attends its split of the
    prefix, a range of whole tiles, and writes (o_s, lse_s). Bytes: the prefix K/V once per
    m tile, the partials [T · G, D] once per split."""
    b, rows, row_ok, node, head, offs_d, q, start, length, k_row_ptr, v_row_ptr = _load_block(
        q_ptr, k_ptr, v_ptr, lengths_ptr, starts_ptr, num_nodes, group, num_kv_heads, num_slots, head_dim,
        stride_qb, stride_qt, stride_qh, stride_qd, stride_kb, stride_kh, stride_vb, stride_vh, BLOCK_M, BLOCK_D)
    split = tl.program_id(2)
    per_split = tl.cdiv(length - start, NUM_SPLITS * BLOCK_N) * BLOCK_N
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, length)
    m = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m, l, acc = _attend_prefix(m, l, acc, q, k_row_ptr, v_row_ptr, lo, hi, stride_ks, stride_kd, stride_vs,
                               stride_vd, offs_d, head_dim, scale, BLOCK_N, UPCAST_DOT, PRECISION)
    seen = l > 0  # an empty split: o_s = 0, lse_s = −inf
    lse = tl.where(seen, m + tl.log(tl.where(seen, l, 1.0)), -float("inf"))
    o = acc / tl.where(seen, l, 1.0)[:, None]
    part = (tl.program_id(0).to(tl.int64) * NUM_SPLITS + split) * (num_nodes * group) + rows
    tl.store(part_lse_ptr + part, lse, mask=row_ok)
    tl.store(part_out_ptr + part[:, None] * head_dim + offs_d[None, :], o,
             mask=row_ok[:, None] & (offs_d < head_dim)[None, :])


@_jit(do_not_specialize=["num_nodes"])
def _tree_kernel(
    q_ptr, k_ptr, v_ptr,  # [B, T, Hq, D], [B, Hkv, S, D] x2
    lengths_ptr, starts_ptr,  # [B] prefix lengths L and first attended slots
    mask_ptr,  # [B, T] int64 ancestor words
    part_out_ptr, part_lse_ptr,  # phase (a)'s partials when NUM_SPLITS > 1
    out_ptr, lse_ptr,  # [B, T, Hq, D] q's dtype, [B, T, Hq] float32 contiguous (when STORE_LSE)
    num_nodes, group, num_kv_heads, num_slots, head_dim, scale,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb, stride_mt, stride_ob, stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr, STORE_LSE: tl.constexpr, UPCAST_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    """Phase (b): program (b · Hkv + kvh, m tile) attends the T × T tree block under the
    ancestor bits, after the prefix itself (one split) or merging the split partials by lse.
    Bytes: the tree's K/V [T, D] once, q and the output once, the partials once."""
    b, rows, row_ok, node, head, offs_d, q, start, length, k_row_ptr, v_row_ptr = _load_block(
        q_ptr, k_ptr, v_ptr, lengths_ptr, starts_ptr, num_nodes, group, num_kv_heads, num_slots, head_dim,
        stride_qb, stride_qt, stride_qh, stride_qd, stride_kb, stride_kh, stride_vb, stride_vh, BLOCK_M, BLOCK_D)
    d_ok = offs_d < head_dim
    m = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if NUM_SPLITS == 1:
        m, l, acc = _attend_prefix(m, l, acc, q, k_row_ptr, v_row_ptr, start, length, stride_ks, stride_kd,
                                   stride_vs, stride_vd, offs_d, head_dim, scale, BLOCK_N, UPCAST_DOT, PRECISION)

    # The tree block: slots L + j; node i sees node j iff bit j of its word is set.
    word = tl.load(mask_ptr + b * stride_mb + node * stride_mt, mask=row_ok, other=0)  # [BLOCK_M] int64
    j = tl.arange(0, BLOCK_T)
    slot = length + j
    j_ok = (j < num_nodes) & (slot < num_slots)
    allowed = (((word[:, None] >> j[None, :].to(tl.int64)) & 1) != 0) & j_ok[None, :]
    kv_ok = j_ok[:, None] & d_ok[None, :]
    k = tl.load(k_row_ptr + slot[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0)
    v = tl.load(v_row_ptr + slot[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0)
    # A padding node's slot may hold anything: a value nobody attends must not meet 0 · NaN.
    v = tl.where((tl.max(allowed.to(tl.int32), 0) > 0)[:, None], v, 0.0)
    s = tl.where(allowed, _dot(q, tl.trans(k), UPCAST_DOT, PRECISION) * scale, -float("inf"))
    m, l, acc = _online_step(m, l, acc, s, v, UPCAST_DOT, PRECISION)

    if NUM_SPLITS > 1:
        # Merge each prefix part (o_s, lse_s) as one more "tile" of weight exp(lse_s − shift).
        stride_split = num_nodes * group
        for split in tl.static_range(NUM_SPLITS):
            part = (tl.program_id(0).to(tl.int64) * NUM_SPLITS + split) * stride_split + rows
            lse_s = tl.load(part_lse_ptr + part, mask=row_ok, other=-float("inf"))
            o_s = tl.load(part_out_ptr + part[:, None] * head_dim + offs_d[None, :],
                          mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            m_new = tl.maximum(m, lse_s)
            shift = tl.where(m_new == -float("inf"), 0.0, m_new)
            alpha = tl.exp(m - shift)
            beta = tl.exp(lse_s - shift)
            acc = acc * alpha[:, None] + o_s * beta[:, None]
            l = l * alpha + beta
            m = m_new

    keep = (word != 0) & (l > 0)  # padding nodes and rows with nothing to attend give 0
    out = acc / tl.where(keep, l, 1.0)[:, None]
    out = tl.where(keep[:, None], out, 0.0)
    tl.store(out_ptr + b * stride_ob + node[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if STORE_LSE:
        lse = tl.where(keep, m + tl.log(tl.where(keep, l, 1.0)), -float("inf"))
        q_heads = num_kv_heads * group
        tl.store(lse_ptr + (b * num_nodes + node) * q_heads + head, lse, mask=row_ok)
