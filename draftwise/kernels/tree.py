"""Token-tree verification, torch reference: the oracle for tree kernels to come.

A tree step drafts several continuations at once. Per row, nodes are in topological order
(every parent before its children); node 0 is the last committed token (the root), and
``parents[b, t]`` is node t's parent (-1 for the root). For example, the root "The" with two
drafted continuations "cat sat" and "dog"::

    node      0     1     2     3
    token    The   cat   sat   dog
    parent   -1     0     1     0

    The ─┬─ cat ── sat
         └─ dog

``target_logits[b, t]`` is the target's next-token logits after node t (one forward reads every
node with a tree mask); ``draft_probs[b, t]`` the law node t's token was drawn from, given its
ancestors (``None``: every node deterministic, i.e. one-hot, as prompt lookup or greedy drafts).

Verification walks down from the root. Greedy rows (temperature 0) go to the first child whose
token is the target's argmax. Sampled rows try the children of the current node in index order
by recursive rejection (SpecInfer's multi-draft rule): with r the target's law at the node, child
c with token x passes with probability ``min(1, r(x) / q_c(x))``; when it fails,
``r <- norm(max(0, r - q_c))`` and the next child is tried. A deterministic child is the one-hot
case (r loses the tried token). When a child passes, the walk continues below it with the
target's law there; when none does, the step emits a token drawn from the final r; at a leaf, a
bonus token from the target's law after it. The emitted tokens follow the target's law exactly
when sibling tokens were drawn independently from their laws.

The noise is the chain's, with one clause more: child c of rank i among its siblings, at depth d
below the root, takes the acceptance draw of counter ``(i, d, accept)``, and the token emitted at
depth d the race draws ``(v, d, race)``. A chain is the tree whose every node has one child, so it
gets exactly :func:`~draftwise.kernels.verify_chain`'s tokens for the same seed.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .backend import resolve_backend
from .reference import (
    STREAM_ACCEPT, STREAM_RACE, _race, philox_race_uniform, philox_uniform, sanitize_logits, target_probs,
)
from .spec import PAD_TOKEN


class TreeVerifyOutput(NamedTuple):
    """Result of :func:`verify_tree_ref`, per row, ``D`` the deepest node of the batch.

    path: ``[B, D+1]`` int64, the root (0) then the accepted nodes, then -1.
    output_tokens: ``[B, D+1]`` int64, the accepted nodes' tokens then the recovered or bonus token, then -1.
    num_accepted: ``[B]`` int64.
    """

    path: torch.Tensor
    output_tokens: torch.Tensor
    num_accepted: torch.Tensor


def verify_tree_ref(tree_tokens: torch.Tensor, parents: torch.Tensor, draft_probs: Optional[torch.Tensor],
                    target_logits: torch.Tensor, *, temperature=1.0, top_k=None, top_p=None, seed=None,
                    lenience=None, compute_dtype: torch.dtype = torch.float64) -> TreeVerifyOutput:
    """Verify one token tree per row (see the module docstring); arguments as
    :func:`~draftwise.kernels.verify_chain`'s, with ``tree_tokens [B, T]`` (node 0 the root, -1
    pads) and ``parents [B, T]`` in place of the chain's drafts. Lenience is not supported."""
    if lenience is not None:
        raise ValueError("lenience: tree verification is exact only; pass lenience=None")
    batch, nodes, vocab = _check(tree_tokens, parents, draft_probs, target_logits)
    device = target_logits.device
    temperature, top_k, top_p, seeds = _per_row(batch, device, temperature, top_k, top_p, seed)
    logits = sanitize_logits(target_logits, compute_dtype)
    probs = target_probs(logits, temperature, top_k, top_p)
    valid, depth = tree_structure(tree_tokens, parents, vocab)
    width = int(depth[valid].max()) + 1
    path = torch.full((batch, width), -1, dtype=torch.int64, device=device)
    output = torch.full((batch, width), PAD_TOKEN, dtype=torch.int64, device=device)
    accepted = torch.zeros(batch, dtype=torch.int64, device=device)
    for b in range(batch):
        walk, token = _walk_row(b, tree_tokens, parents, valid, draft_probs, logits, probs,
                                bool(temperature[b] == 0), seeds[b:b + 1])
        path[b, : len(walk)] = torch.tensor(walk, device=device)
        drafted = [int(tree_tokens[b, n]) for n in walk[1:]]
        output[b, : len(walk)] = torch.tensor(drafted + [token], device=device)
        accepted[b] = len(walk) - 1
    return TreeVerifyOutput(path, output, accepted)


def _walk_row(b, tokens, parents, valid, draft_probs, logits, probs, greedy: bool, seed) -> tuple[list[int], int]:
    """Row b's accepted path from the root and the token emitted after it."""
    children = {}
    for t in range(1, tokens.shape[1]):
        if valid[b, t]:
            children.setdefault(int(parents[b, t]), []).append(t)
    node, walk = 0, [0]
    vocab = logits.shape[-1]
    while True:
        kids, depth = children.get(node, []), len(walk) - 1
        if greedy:
            best = int(logits[b, node].argmax())
            nxt = next((c for c in kids if int(tokens[b, c]) == best), None)
            if nxt is None:
                return walk, best
            node = nxt
            walk.append(node)
            continue
        target = probs[b, node]
        r = target
        nxt = None
        for rank, c in enumerate(kids):
            x = int(tokens[b, c])
            q = (torch.nn.functional.one_hot(torch.tensor(x, device=r.device), vocab).to(r.dtype)
                 if draft_probs is None else draft_probs[b, c].to(r.dtype).nan_to_num(0.0).clamp_min(0.0))
            u = philox_uniform(seed, rank, depth, STREAM_ACCEPT).to(r.dtype)[0]
            if u * q[x] < r[x]:
                nxt = c
                break
            residual = (r - q).clamp_min(0.0)
            r = residual / residual.sum() if residual.sum() > 0 else target  # empty: fall back to p
        if nxt is None:
            noise = philox_race_uniform(seed.view(-1, 1), torch.arange(vocab, device=r.device), depth, STREAM_RACE)
            return walk, int(_race(r.view(1, -1), noise.to(r.dtype))[0])
        node = nxt
        walk.append(node)


def _check(tree_tokens, parents, draft_probs, target_logits) -> tuple[int, int, int]:
    check_parents(tree_tokens, parents, "tree_tokens")
    batch, nodes = tree_tokens.shape
    if not isinstance(target_logits, torch.Tensor) or target_logits.shape[:2] != (batch, nodes):
        raise ValueError(f"target_logits: expected [B, T, V] = [{batch}, {nodes}, V] with T >= 1")
    if draft_probs is not None and draft_probs.shape != target_logits.shape:
        raise ValueError(f"draft_probs: expected the shape of target_logits {tuple(target_logits.shape)}, "
                         f"got {tuple(draft_probs.shape)}")
    return batch, nodes, target_logits.shape[-1]


def check_parents(tokens, parents, name: str = "tokens") -> None:
    """Raise ``ValueError`` unless ``tokens`` and ``parents`` are integer ``[B, T]`` tensors, T >= 1,
    node 0 the root (parent -1) and every parent before its child."""
    for argument, value in ((name, tokens), ("parents", parents)):
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.is_floating_point():
            raise ValueError(f"{argument}: expected an integer tensor [B, T]")
    if parents.shape != tokens.shape:
        raise ValueError(f"parents: expected the shape of {name} {tuple(tokens.shape)}, got {tuple(parents.shape)}")
    if tokens.shape[1] < 1:
        raise ValueError(f"{name}: expected at least the root node")
    index = torch.arange(tokens.shape[1], device=parents.device).view(1, -1)
    if bool((parents[:, 0] != -1).any()):
        raise ValueError("parents: node 0 is the root, its parent must be -1")
    if bool(((parents[:, 1:] < -1) | (parents[:, 1:] >= index[:, 1:])).any()):
        raise ValueError("parents: expected every parent before its child (topological order), -1 for none")


def tree_structure(tokens, parents, vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(valid, depth)`` per node: valid nodes have a token >= 0 (below ``vocab`` when given)
    and only valid ancestors (the root always is); invalid nodes get depth 0."""
    valid = (tokens >= 0) & (parents >= 0)
    if vocab is not None:
        valid &= tokens < vocab
    valid[:, 0] = True
    depth = torch.zeros_like(parents)
    for t in range(1, tokens.shape[1]):
        parent = parents[:, t].clamp(min=0).view(-1, 1)
        valid[:, t] &= valid.gather(1, parent).squeeze(1)
        depth[:, t] = depth.gather(1, parent).squeeze(1) + 1
    return valid, torch.where(valid, depth, 0)


def _per_row(batch, device, temperature, top_k, top_p, seed):
    def column(value, default, dtype, name):
        value = default if value is None else value
        tensor = torch.as_tensor(value, dtype=dtype, device=device)
        if tensor.dim() == 0:
            tensor = tensor.expand(batch)
        if tensor.shape != (batch,):
            raise ValueError(f"{name}: expected a number or a tensor of shape [{batch}]")
        return tensor

    temperature = column(temperature, 1.0, torch.float64, "temperature")
    if not bool((temperature >= 0).all()):
        raise ValueError("temperature: expected values >= 0 (0 means greedy)")
    if seed is None:
        seed = torch.randint(0, 2**62, (batch,))
    elif isinstance(seed, int):  # row b is keyed by seed + b, as in verify_chain
        seed = seed + torch.arange(batch)
    return (temperature, column(top_k, 0, torch.int64, "top_k"), column(top_p, 1.0, torch.float64, "top_p"),
            column(seed, 0, torch.int64, "seed"))


# ---------------------------------------------------------------------------------------------
# The public op: the same verification on the backend that suits the device.

def verify_tree(tree_tokens: torch.Tensor, parents: torch.Tensor, draft_probs: Optional[torch.Tensor],
                target_logits: torch.Tensor, *, temperature=1.0, top_k=None, top_p=None, seed=None,
                backend: Optional[str] = None) -> TreeVerifyOutput:
    """Verify one token tree per row (see the module docstring) in one fused step.

    Args:
        tree_tokens: ``[B, T]`` integer ids in topological order, node 0 the root (the last
            committed token); ids outside ``[0, V)`` pad, and so do the nodes below them.
        parents: ``[B, T]`` integer, each node's parent (before it), -1 for the root.
        draft_probs: ``[B, T, V]``, the law each node's token was drawn from, or ``None`` for
            deterministic (one-hot) nodes.
        target_logits: ``[B, T, V]``, the target's logits after each node (any float dtype).
        temperature, top_k, top_p: a scalar or one value per row, as :func:`verify_tree_ref`'s.
        seed: an int (row b uses ``seed + b``, as in :func:`~draftwise.kernels.verify_chain`) or an
            int64 ``[B]`` tensor of row seeds; None draws them.
        backend: "triton", "cpp" or "torch"; None picks the best for the device, like
            :func:`~draftwise.kernels.verify_chain` (``$DRAFTWISE_BACKEND`` overrides).

    Returns:
        :class:`TreeVerifyOutput`, the tokens of :func:`verify_tree_ref` for the same seeds.
    """
    batch, _, _ = _check(tree_tokens, parents, draft_probs, target_logits)
    _check_tensors(tree_tokens, parents, draft_probs, target_logits)
    rows = _per_row(batch, target_logits.device, temperature, top_k, top_p, seed)
    _check_filters(*rows[1:3])
    name = resolve_backend(backend, target_logits.device)
    if batch == 0:
        empty = torch.empty((0, 1), dtype=torch.int64, device=target_logits.device)
        return TreeVerifyOutput(empty, empty.clone(), empty.new_empty((0,)))
    return tree_implementation(name)(tree_tokens, parents, draft_probs, target_logits, *rows)


def trim_outputs(path: torch.Tensor, output_tokens: torch.Tensor, num_accepted: torch.Tensor,
                 max_depth: torch.Tensor) -> TreeVerifyOutput:
    """A kernel's ``[B, T]`` outputs cut to the deepest valid node of the batch (one host sync)."""
    width = int(max_depth.max()) + 1 if max_depth.numel() else 1
    return TreeVerifyOutput(path[:, :width].contiguous(), output_tokens[:, :width].contiguous(), num_accepted)


def tree_implementation(name: str):
    """The tree-verification function of backend ``name``, with the signature
    ``(tree_tokens, parents, draft_probs, target_logits, temperature, top_k, top_p, seeds)``
    (per-row ``[B]`` tensors). It checks nothing: :func:`verify_tree` checks its inputs first;
    a caller whose trees are valid by construction (the engine's) calls it directly."""
    if name == "triton":
        from .tree_triton import verify_tree_triton

        return verify_tree_triton
    if name == "cpp":
        from .tree_cpp import verify_tree_cpp

        return verify_tree_cpp
    return _verify_tree_torch


def _verify_tree_torch(tree_tokens, parents, draft_probs, target_logits, temperature, top_k, top_p, seeds):
    return verify_tree_ref(tree_tokens, parents, draft_probs, target_logits, temperature=temperature,
                           top_k=top_k, top_p=top_p, seed=seeds, compute_dtype=torch.float32)


def _check_tensors(tree_tokens, parents, draft_probs, target_logits) -> None:
    """Float inputs and one device for all."""
    if not target_logits.is_floating_point():
        raise TypeError(f"target_logits: expected a float tensor, got {target_logits.dtype}")
    if draft_probs is not None and not draft_probs.is_floating_point():
        raise TypeError(f"draft_probs: expected a float tensor or None, got {draft_probs.dtype}")
    device = target_logits.device
    for name, value in (("tree_tokens", tree_tokens), ("parents", parents), ("draft_probs", draft_probs)):
        if value is not None and value.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} (the device of target_logits), got {value.device}")


def _check_filters(top_k: torch.Tensor, top_p: torch.Tensor) -> None:
    bad_k, bad_p = torch.stack([(top_k < 0).any(), ~((top_p > 0) & (top_p <= 1)).all()]).tolist()
    if bad_k:
        raise ValueError("top_k: expected values >= 0 (0 or None switches it off), got a negative value")
    if bad_p:
        raise ValueError("top_p: expected values in (0, 1] (1 or None switches it off), got a value outside")
