"""Token-tree verification in Triton (same contract as :func:`~draftwise.kernels.tree.verify_tree_ref`).

One launch, one program per row, the whole walk inside the kernel. The row's structure (which
nodes are valid, the depth of the deepest, for the output width) is a loop over its T nodes in
registers. Then, from the root, at each visited node:

1. one pass over its logits gives the online max, sum of exp((l - max) / t) and first argmax
   (FILTER: the chain kernel's top-k and top-p threshold search, then the kept mass);
2. greedy rows step to the first child whose token is the argmax;
3. sampled rows try the children in index order: the child of rank i, token x, passes when
   ``u * q(x) < r(x)`` with u the Philox draw of counter (i, depth, accept). r is p until a child
   fails; a failure writes ``max(0, r - q)`` to the row's scratch [V] in one pass, and its sum
   normalises it (r is p again when that sum is 0);
4. when no child passes, one pass races ``argmax_v r(v) / E_v`` over the draws (v, depth, race).

Bytes per visited node: the logits row once (FILTER: up to 19 times), and per failed child one
more pass over logits, q and the scratch, plus one for the race; the scratch row [B, V] float32 is
the only memory of size V written. Math is float32 for any input dtype.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .tree import TreeVerifyOutput, trim_outputs
from .chain_triton import (
    _contiguous_last, _filtered, _logits, _max_sum_argmax, _probs, _race_exponential, _race_key, _readable_float,
    philox_uniform, philox_word,
)

# Tuning knobs: vocabulary tile per loop step, and the tile of the top-k / top-p threshold search.
BLOCK_V = 2048
FILTER_BLOCK_V = 512

@triton.jit
def _deepest_valid(own, par, nodes, num_nodes):
    """Depth of the deepest valid node: a node is valid when its own token and parent are
    (``own``) and its parent is valid; one step per node, parents first."""
    valid = nodes == 0
    depth = tl.zeros_like(nodes)
    for s in range(1, num_nodes):
        at = nodes == s
        parent = tl.sum(tl.where(at, par, 0), 0)
        parent_valid = tl.max(tl.where(nodes == parent, valid.to(tl.int32), 0), 0) > 0
        ok = (tl.max(tl.where(at, own.to(tl.int32), 0), 0) > 0) & parent_valid
        valid = tl.where(at, ok, valid)
        depth = tl.where(at, tl.sum(tl.where(nodes == parent, depth, 0), 0) + 1, depth)
    return tl.max(tl.where(valid, depth, 0), 0)


@triton.jit
def _target_law(row_ptr, vocab, t, k, top_p, greedy, FILTER: tl.constexpr, BLOCK_V: tl.constexpr,
                FILTER_BLOCK_V: tl.constexpr):
    """``(max, kept weight s, first argmax, threshold)`` of one logits row: p(v) = [l >= threshold]
    exp((l - max) / t) / s, as the chain's statistics kernel computes it."""
    m, s, arg = _max_sum_argmax(row_ptr, 0, vocab, vocab, t, BLOCK_V)
    threshold = tl.full([], -float("inf"), tl.float32)
    if FILTER:  # greedy rows skip the searches (empty key ranges)
        threshold, s = _filtered(row_ptr, vocab, m, t, k, top_p, (k > 0) & (k < vocab) & ~greedy,
                                 (top_p < 1.0) & ~greedy, BLOCK_V, FILTER_BLOCK_V)
    return m, s, arg, threshold


@triton.jit
def _target_p(row_ptr, v, mask, m, s, t, threshold):
    """p(v) from the row's law; 0 off the mask."""
    l = _logits(row_ptr + v, mask)
    return tl.exp(tl.where(mask & (l >= threshold), (l - m) / t, -float("inf"))) / s


@triton.jit(do_not_specialize=["num_nodes"])
def _tree_verify_kernel(
    tokens_ptr,  # [B, T] int64, ids outside [0, V) pad
    parents_ptr,  # [B, T] int64, -1 for the root
    draft_probs_ptr,  # [B, T, V] float (HAS_Q), unit stride along V
    logits_ptr,  # [B, T, V] float (any), unit stride along V
    temperature_ptr,  # [B] float32, 0 = greedy
    top_k_ptr,  # [B] int64
    top_p_ptr,  # [B] float32
    seeds_ptr,  # [B] int64
    residual_ptr,  # [B, V] float32 scratch: the residual law, up to its sum
    path_ptr,  # [B, T] int64 out
    output_tokens_ptr,  # [B, T] int64 out
    num_accepted_ptr,  # [B] int64 out
    max_depth_ptr,  # [B] int64 out
    num_nodes,
    vocab,
    stride_tb, stride_pb, stride_qb, stride_qt, stride_lb, stride_lt,
    FILTER: tl.constexpr, HAS_Q: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, FILTER_BLOCK_V: tl.constexpr,
):
    # Recursive rejection down the tree (SpecInfer's multi-draft rule). With r the target's law
    # at the node, child c (token x, law q_c) passes with probability min(1, r(x) / q_c(x)); on a
    # failure r <- norm(max(0, r - q_c)). r is kept as the scratch row divided by `scale`
    # (scale = 0: r = p, recomputed from the logits).
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    t = tl.load(temperature_ptr + b)
    greedy = t == 0
    t = tl.where(greedy, 1.0, t)
    k = tl.load(top_k_ptr + b)
    top_p = tl.load(top_p_ptr + b)
    seed = tl.load(seeds_ptr + b)
    res_ptr = residual_ptr + b64 * vocab

    nodes = tl.arange(0, BLOCK_T)
    in_tree = nodes < num_nodes
    tok = tl.load(tokens_ptr + b64 * stride_tb + nodes, mask=in_tree, other=-1)
    par = tl.load(parents_ptr + b64 * stride_pb + nodes, mask=in_tree, other=-1).to(tl.int32)
    # Children of a node the walk reached are valid exactly when their own token is.
    own = in_tree & (tok >= 0) & (tok < vocab) & (par >= 0)
    max_depth = _deepest_valid(own, par, nodes, num_nodes)

    offs = tl.arange(0, BLOCK_V)
    path = tl.where(nodes == 0, 0, -1).to(tl.int64)
    out = tl.full([BLOCK_T], -1, tl.int64)
    node = tl.full([], 0, tl.int32)
    depth = tl.full([], 0, tl.int32)
    going = node == 0
    while going:
        row_ptr = logits_ptr + b64 * stride_lb + node.to(tl.int64) * stride_lt
        m, s, arg, thr = _target_law(row_ptr, vocab, t, k, top_p, greedy, FILTER, BLOCK_V, FILTER_BLOCK_V)
        kids = own & (par == node)
        rank = tl.cumsum(kids.to(tl.int32), 0) - 1
        greedy_next = tl.min(tl.where(kids & (tok == arg), nodes, BLOCK_T), 0)

        # Sampled rows: the children in index order until one passes.
        tries = tl.where(greedy, 0, tl.sum(kids.to(tl.int32), 0))
        i = tl.full([], 0, tl.int32)
        chosen = tl.full([], BLOCK_T, tl.int32)
        scale = tl.full([], 0.0, tl.float32)
        while (i < tries) & (chosen == BLOCK_T):
            c = tl.min(tl.where(kids & (rank == i), nodes, BLOCK_T), 0)
            x = tl.sum(tl.where(nodes == c, tok, 0), 0)
            q_row = draft_probs_ptr + b64 * stride_qb + c.to(tl.int64) * stride_qt
            if HAS_Q:
                q_x = _probs(q_row + x, x >= 0)
            else:
                q_x = 1.0
            held = scale > 0
            divisor = tl.where(held, scale, 1.0)
            held_end = tl.where(held, vocab, 0)  # the scratch is read only while it holds r
            r_x = tl.where(held, tl.load(res_ptr + x, mask=x < held_end, other=0.0) / divisor,
                           _target_p(row_ptr, x, x >= 0, m, s, t, thr))
            passed = philox_uniform(seed, i, depth, 0) * q_x < r_x
            chosen = tl.where(passed, c, chosen)
            tl.debug_barrier()  # every thread has read r(x) before the pass below rewrites it
            acc = tl.zeros([BLOCK_V], tl.float32)
            for v0 in range(0, tl.where(passed, 0, vocab), BLOCK_V):  # r <- max(0, r - q)
                v = v0 + offs
                mask = v < vocab
                r = tl.where(held, tl.load(res_ptr + v, mask=v < held_end, other=0.0) / divisor,
                             _target_p(row_ptr, v, mask, m, s, t, thr))
                if HAS_Q:
                    q = _probs(q_row + v, mask)
                else:
                    q = tl.where(v == x, 1.0, 0.0)
                r = tl.where(mask, tl.maximum(r - q, 0.0), 0.0)
                tl.store(res_ptr + v, r, mask=mask)
                acc += r
            tl.debug_barrier()  # the pass is done before other threads read the scratch
            scale = tl.where(passed, scale, tl.sum(acc, 0))  # 0: empty residual, r = p again
            i += 1

        # No child passed: the race over r (the scratch's scale does not change the winner).
        race = (chosen == BLOCK_T) & ~greedy
        has_r = scale > 0
        r_end = tl.where(has_r, vocab, 0)
        best = tl.full([BLOCK_V], -1.0, tl.float32)
        best_arg = tl.zeros([BLOCK_V], tl.int32)
        for v0 in range(0, tl.where(race, vocab, 0), BLOCK_V):
            v = v0 + offs
            mask = v < vocab
            w = tl.where(has_r, tl.load(res_ptr + v, mask=v < r_end, other=0.0),
                         _target_p(row_ptr, v, mask, m, s, t, thr))
            draw = (philox_word(seed, v, depth, 1) | 1).to(tl.float32) * 2.3283064365386963e-10
            score = tl.where(mask, w / _race_exponential(draw), -1.0)
            best_arg = tl.where(score > best, v, best_arg)
            best = tl.maximum(best, score)
        raced = 0x7FFFFFFF - (_race_key(best, best_arg, vocab) & 0xFFFFFFFF)

        next_node = tl.where(greedy, greedy_next, chosen)
        accepted = next_node < BLOCK_T
        drafted = tl.sum(tl.where(nodes == next_node, tok, 0), 0)
        emitted = tl.where(greedy, arg.to(tl.int64), tl.minimum(tl.maximum(raced, 0), vocab - 1))
        out = tl.where(nodes == depth, tl.where(accepted, drafted, emitted), out)
        path = tl.where(accepted & (nodes == depth + 1), next_node.to(tl.int64), path)
        node = tl.where(accepted, next_node, node)
        depth += accepted.to(tl.int32)
        going = accepted

    tl.store(path_ptr + b64 * num_nodes + nodes, path, mask=in_tree)
    tl.store(output_tokens_ptr + b64 * num_nodes + nodes, out, mask=in_tree)
    tl.store(num_accepted_ptr + b, depth.to(tl.int64))
    tl.store(max_depth_ptr + b, max_depth.to(tl.int64))


def verify_tree_triton(
    tree_tokens: torch.Tensor, parents: torch.Tensor, draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    seeds: torch.Tensor, *, block_v: int | None = None,
) -> TreeVerifyOutput:
    """Tree verification of a checked batch in one Triton launch: shapes as
    :func:`~draftwise.kernels.tree.verify_tree`'s, per-row ``temperature``, ``top_k``, ``top_p``
    and ``seeds`` ``[B]`` on the logits' device; ``block_v`` overrides the vocabulary tile."""
    device = target_logits.device
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"target_logits: the triton backend needs CUDA tensors (or TRITON_INTERPRET=1), "
                         f"got tensors on {device}")
    batch, nodes, vocab = target_logits.shape
    path = torch.empty((batch, nodes), dtype=torch.int64, device=device)
    output_tokens = torch.empty_like(path)
    num_accepted = torch.empty((batch,), dtype=torch.int64, device=device)
    max_depth = torch.zeros_like(num_accepted)
    if batch == 0:
        return trim_outputs(path, output_tokens, num_accepted, max_depth)

    logits = _readable_float(target_logits)
    has_q = draft_probs is not None
    probs = _readable_float(draft_probs) if has_q else logits
    tokens = _contiguous_last(tree_tokens.to(torch.int64))
    parents = _contiguous_last(parents.to(torch.int64))
    temperature = temperature.to(device=device, dtype=torch.float32).contiguous()
    top_k = top_k.to(device=device, dtype=torch.int64).contiguous()
    top_p = top_p.to(device=device, dtype=torch.float32).contiguous()
    seeds = seeds.to(device=device, dtype=torch.int64).contiguous()
    sampled = temperature > 0
    filtered = bool((sampled & (((top_k > 0) & (top_k < vocab)) | (top_p < 1))).any())  # one host sync
    residual = torch.empty((batch, vocab), dtype=torch.float32, device=device)

    block = max(16, min(block_v or BLOCK_V, triton.next_power_of_2(vocab)))
    _tree_verify_kernel[(batch,)](
        tokens_ptr=tokens, parents_ptr=parents, draft_probs_ptr=probs, logits_ptr=logits,
        temperature_ptr=temperature, top_k_ptr=top_k, top_p_ptr=top_p, seeds_ptr=seeds,
        residual_ptr=residual, path_ptr=path, output_tokens_ptr=output_tokens,
        num_accepted_ptr=num_accepted, max_depth_ptr=max_depth,
        num_nodes=nodes, vocab=vocab,
        stride_tb=tokens.stride(0), stride_pb=parents.stride(0),
        stride_qb=probs.stride(0), stride_qt=probs.stride(1),
        stride_lb=logits.stride(0), stride_lt=logits.stride(1),
        FILTER=filtered, HAS_Q=has_q, BLOCK_T=max(2, triton.next_power_of_2(nodes)), BLOCK_V=block,
        FILTER_BLOCK_V=min(block, FILTER_BLOCK_V), num_warps=8 if block >= 2048 else 4,
    )
    return trim_outputs(path, output_tokens, num_accepted, max_depth)
