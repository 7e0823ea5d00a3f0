"""Token-tree verification by the C++ CPU kernel ``draftwise._C`` (``csrc/verify_tree.cpp``).

As :mod:`draftwise.kernels.chain_cpp` does for chains, this module owns every buffer: each input a
contiguous buffer of a dtype the kernel reads, the outputs allocated here, addresses, sizes and
dtype codes passed. The kernel writes ``[B, T]`` outputs and each row's deepest valid depth; they
are cut to the batch's deepest node as :func:`~draftwise.kernels.tree.verify_tree_ref` returns them.
"""

from __future__ import annotations

from typing import Optional

import torch

from .chain_cpp import FLOAT32, FLOAT_DTYPES, INT64, _address, _buffer, _extension, _law_pointers
from .tree import TreeVerifyOutput, trim_outputs


def verify_tree_cpp(
    tree_tokens: torch.Tensor, parents: torch.Tensor, draft_probs: Optional[torch.Tensor],
    target_logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    seeds: torch.Tensor, *, num_threads: Optional[int] = None,
) -> TreeVerifyOutput:
    """Tree verification of a checked batch on CPU tensors: shapes as
    :func:`~draftwise.kernels.tree.verify_tree`'s, per-row ``temperature``, ``top_k``, ``top_p``
    and ``seeds`` ``[B]``. The kernel releases the GIL and runs rows on ``torch.get_num_threads()``
    OpenMP threads (or ``num_threads``)."""
    ext = _extension()
    if target_logits.device.type != "cpu":
        raise ValueError(f"target_logits: the cpp backend needs CPU tensors, got a tensor on {target_logits.device}")
    batch, nodes, vocab = target_logits.shape
    logits = _buffer(target_logits, FLOAT_DTYPES)
    probs = None if draft_probs is None else _buffer(draft_probs, FLOAT_DTYPES)
    tokens = _buffer(tree_tokens, INT64)
    parents = _buffer(parents, INT64)
    temperature, top_p = _buffer(temperature, FLOAT32), _buffer(top_p, FLOAT32)
    top_k, seeds = _buffer(top_k, INT64), _buffer(seeds, INT64)

    path = torch.empty(batch, nodes, dtype=torch.int64)
    output_tokens = torch.empty(batch, nodes, dtype=torch.int64)
    num_accepted = torch.empty(batch, dtype=torch.int64)
    max_depth = torch.zeros(batch, dtype=torch.int64)
    ext.verify_tree(
        tree_tokens_ptr=_address(tokens),
        parents_ptr=_address(parents),
        **_law_pointers(logits, probs, temperature, top_k, top_p, seeds),
        batch=batch,
        num_nodes=nodes,
        vocab=vocab,
        path_ptr=_address(path),
        output_tokens_ptr=_address(output_tokens),
        num_accepted_ptr=_address(num_accepted),
        max_depth_ptr=_address(max_depth),
        num_threads=torch.get_num_threads() if num_threads is None else int(num_threads),
    )
    return trim_outputs(path, output_tokens, num_accepted, max_depth)
