"""``torch.ops.draftwise.verify_chain``: chain verification as a custom op for ``torch.compile``.

The op takes the normalised tensors of :class:`~draftwise.kernels.spec.ChainInputs` (per-row
parameters as ``[B]`` tensors, seeds or injected uniforms) and a backend name, and returns
``(output_tokens, num_accepted, accept_probs)``; ``accept_probs`` is empty (shape ``[0]``) unless
asked for. Before any kernel reads a byte, the op checks the backend name and every argument's
type, shape, dtype and device (int32 draft ids are widened to int64) without reading tensor
contents; the backend then checks the per-row values where it reads them. Its fake
implementation runs the same checks and only allocates, so graphs can hold it.
"""

from __future__ import annotations

from typing import Optional

import torch

from .backend import BACKENDS, get_implementation, resolve_backend
from .spec import ChainInputs, Uniforms


def _chain_inputs(draft_tokens, draft_probs, target_logits, temperature, top_k, top_p, lenience_kind,
                  lenience_epsilon, seeds, accept_uniforms, race_uniforms, return_accept_probs,
                  backend, *, check_device: bool = False) -> ChainInputs:
    """The op's arguments, checked, as :class:`ChainInputs`. ``check_device``: also raise when the
    backend cannot run on the logits' device (a real call learns that from the backend itself)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    no_uniforms = accept_uniforms is None and race_uniforms is None
    inputs = ChainInputs(
        draft_tokens=draft_tokens, draft_probs=draft_probs, target_logits=target_logits,
        temperature=temperature, top_k=top_k, top_p=top_p, lenience_kind=lenience_kind,
        lenience_epsilon=lenience_epsilon, seeds=seeds,
        uniforms=None if no_uniforms else Uniforms(accept_uniforms, race_uniforms),
        return_accept_probs=return_accept_probs,
    )
    if check_device:
        resolve_backend(backend, inputs.target_logits.device)
    return inputs


@torch.library.custom_op("draftwise::verify_chain", mutates_args=())
def verify_chain_op(
    draft_tokens: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    target_logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    lenience_kind: int,
    lenience_epsilon: float,
    seeds: Optional[torch.Tensor],
    accept_uniforms: Optional[torch.Tensor],
    race_uniforms: Optional[torch.Tensor],
    return_accept_probs: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    inputs = _chain_inputs(draft_tokens, draft_probs, target_logits, temperature, top_k, top_p, lenience_kind,
                           lenience_epsilon, seeds, accept_uniforms, race_uniforms, return_accept_probs, backend)
    out = get_implementation(backend)(inputs)
    accept_probs = out.accept_probs if return_accept_probs else target_logits.new_empty(0, dtype=torch.float32)
    return out.output_tokens, out.num_accepted, accept_probs


@verify_chain_op.register_fake
def _(*args):
    inputs = _chain_inputs(*args, check_device=True)
    batch, k, _ = inputs.shape
    logits = inputs.target_logits
    output_tokens = logits.new_empty((batch, k + 1), dtype=torch.int64)
    num_accepted = logits.new_empty((batch,), dtype=torch.int64)
    accept_probs = logits.new_empty((batch, k) if inputs.return_accept_probs else (0,), dtype=torch.float32)
    return output_tokens, num_accepted, accept_probs


def op_arguments(inputs: ChainInputs, backend: str) -> tuple:
    """The positional arguments of ``verify_chain_op`` for validated inputs."""
    accept, race = inputs.uniforms if inputs.uniforms is not None else (None, None)
    return (
        inputs.draft_tokens, inputs.draft_probs, inputs.target_logits, inputs.temperature,
        inputs.top_k, inputs.top_p, int(inputs.lenience_kind), inputs.lenience_epsilon,
        inputs.seeds, accept, race, inputs.return_accept_probs, backend,
    )


# ---------------------------------------------------------------------------------------------
# ``torch.ops.draftwise.verify_tree``


@torch.library.custom_op("draftwise::verify_tree", mutates_args=())
def verify_tree_op(
    tree_tokens: torch.Tensor,
    parents: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    target_logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-tree verification (:func:`~draftwise.kernels.verify_tree`) as a custom op: per-row
    ``[B]`` parameters and seeds, and ``(path, output_tokens, num_accepted)`` at the tree's full
    width ``[B, T]`` (-1 past each row's path; the width does not depend on the data)."""
    from .tree import verify_tree

    _tree_op_checks(tree_tokens, parents, draft_probs, target_logits, backend)
    out = verify_tree(tree_tokens, parents, draft_probs, target_logits, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=seeds, backend=backend)
    pad = tree_tokens.shape[1] - out.path.shape[1]
    return (torch.nn.functional.pad(out.path, (0, pad), value=-1),
            torch.nn.functional.pad(out.output_tokens, (0, pad), value=-1), out.num_accepted)


@verify_tree_op.register_fake
def _(tree_tokens, parents, draft_probs, target_logits, temperature, top_k, top_p, seeds, backend):
    _tree_op_checks(tree_tokens, parents, draft_probs, target_logits, backend, check_device=True)
    batch, nodes = tree_tokens.shape
    return (tree_tokens.new_empty((batch, nodes), dtype=torch.int64),
            tree_tokens.new_empty((batch, nodes), dtype=torch.int64),
            tree_tokens.new_empty((batch,), dtype=torch.int64))


def _tree_op_checks(tree_tokens, parents, draft_probs, target_logits, backend, *, check_device=False) -> None:
    """Shapes, dtypes and the backend, without reading tensor contents."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    for name, value in (("tree_tokens", tree_tokens), ("parents", parents)):
        if value.dim() != 2 or value.is_floating_point():
            raise ValueError(f"{name}: expected an integer tensor [B, T]")
    if target_logits.dim() != 3 or target_logits.shape[:2] != tree_tokens.shape:
        raise ValueError(f"target_logits: expected [B, T, V] with [B, T] = {tuple(tree_tokens.shape)}")
    if draft_probs is not None and draft_probs.shape != target_logits.shape:
        raise ValueError(f"draft_probs: expected the shape of target_logits {tuple(target_logits.shape)}")
    if check_device:
        resolve_backend(backend, target_logits.device)


# ---------------------------------------------------------------------------------------------
# ``torch.ops.draftwise.tree_attention``


@torch.library.custom_op("draftwise::tree_attention", mutates_args=())
def tree_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_lengths: torch.Tensor,
    tree_mask: torch.Tensor,
    prefix_starts: Optional[torch.Tensor],
    scale: float,
    backend: str,
) -> torch.Tensor:
    """Tree attention (:func:`~draftwise.kernels.tree_attention`) as a custom op, for graphs:
    ``[B, T, Hq, D]`` in q's dtype. No host sync: the values of ``prefix_lengths`` and
    ``prefix_starts`` are not validated (loads stay inside the cache whatever they hold)."""
    from .tree_attention import tree_attention

    return tree_attention(q, k, v, prefix_lengths, tree_mask, scale, backend, prefix_starts=prefix_starts,
                          validate=False)


@tree_attention_op.register_fake
def _(q, k, v, prefix_lengths, tree_mask, prefix_starts, scale, backend):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError("q, k, v: expected q [B, T, Hq, D] and k, v [B, Hkv, S, D] of one shape")
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend: expected 'torch' or 'triton', got {backend!r}")
    return torch.empty_like(q)
