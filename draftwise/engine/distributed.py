"""A target that transformers split over processes (tensor parallelism: ``tp_plan="auto"`` under
``torchrun``): what the processes must agree on so that they all run the same forwards.

Every process runs the whole engine: the same drafts, the same verification, the same tokens.
The target's forwards are collective (its layers all-reduce across the processes), so every
process must call them with the same tokens and shapes, in the same order. Tokens, drafts and
verification agree by construction: the target's logits come out whole and equal on every
process, drafts run whole on each, and draft sampling and verification noise are keyed by the
call's seed. Three things would not agree by themselves: the seed drawn when a call gives none
(each process's own random state), and two choices made from measured times, each step's
drafters and draft lengths and whether it drafts a chain or a tree. The first process of the
target's group makes those and the others follow (:func:`agreed`).

Each process's KV cache holds the key/value heads of its own share of the attention
(:func:`local_kv_heads`).
"""

from __future__ import annotations

import torch

__all__ = ["agreed", "local_kv_heads", "tensor_parallel_group"]


def tensor_parallel_group(model):
    """The process group over which transformers split ``model`` (tensor parallelism), or None
    for a model that each process holds whole."""
    if (getattr(model, "_tp_size", None) or 1) <= 1:
        return None
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    mesh = getattr(model, "_device_mesh", None)
    if mesh is not None and mesh.mesh_dim_names and "tp" in mesh.mesh_dim_names:
        mesh = mesh["tp"]
    if mesh is None or mesh.ndim != 1:
        return torch.distributed.group.WORLD
    return mesh.get_group()


def agreed(group, value):
    """``value`` as the first process of ``group`` has it (a host object, broadcast); ``value``
    itself when ``group`` is None. Every process of the group must call it at the same point."""
    if group is None:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, group=group, group_src=0)
    return box[0]


def local_kv_heads(model, kv_heads: int, cache_argument: str) -> int:
    """The key/value heads of each layer that this process holds: ``kv_heads`` (the config's),
    unless transformers split the attention over processes, where each holds its share; a
    one-token forward (collective: every process of the group runs it) shows that share."""
    if tensor_parallel_group(model) is None:
        return kv_heads
    from transformers import DynamicCache

    probe = DynamicCache()
    device = next(model.parameters()).device
    with torch.inference_mode():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=True,
              **{cache_argument: probe})
    return int(probe.layers[0].keys.shape[1])
