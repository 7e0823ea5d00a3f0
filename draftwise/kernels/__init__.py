"""Kernels of the verification step, with plain-tensor APIs.

The leaf layer: nothing here imports from ``draftwise.engine`` or ``draftwise.distill``.
"""

from __future__ import annotations

from .backend import BACKENDS, available_backends, get_implementation, resolve_backend
from .op import op_arguments, tree_attention_op, verify_chain_op, verify_tree_op
from .ragged import verify_chain_ragged
from .reference import seeded_uniforms, verify_chain_ref
from .spec import PAD_TOKEN, ChainInputs, Lenience, Uniforms, VerifyOutput, normalize_inputs
from .tree import TreeVerifyOutput, verify_tree, verify_tree_ref
from .tree_attention import tree_attention, tree_attention_ref

__all__ = [
    "BACKENDS",
    "PAD_TOKEN",
    "ChainInputs",
    "Lenience",
    "TreeVerifyOutput",
    "Uniforms",
    "VerifyOutput",
    "available_backends",
    "get_implementation",
    "normalize_inputs",
    "op_arguments",
    "resolve_backend",
    "seeded_uniforms",
    "tree_attention",
    "tree_attention_op",
    "tree_attention_ref",
    "verify_chain",
    "verify_chain_op",
    "verify_chain_ragged",
    "verify_chain_ref",
    "verify_tree",
    "verify_tree_op",
    "verify_tree_ref",
]


def verify_chain(
    draft_tokens,
    draft_probs,
    target_logits,
    *,
    temperature=1.0,
    top_k=None,
    top_p=None,
    lenience=None,
    seed=None,
    uniforms=None,
    return_accept_probs: bool = False,
    backend: str | None = None,
) -> VerifyOutput:
    """Verify a batch of drafted chains against the target in one fused step.

    Args:
        draft_tokens: ``[B, K]`` int64 or int32 drafted ids; ``PAD_TOKEN`` (-1) pads rows with
            fewer drafts (any id outside ``[0, V)`` ends a row's drafts the same way).
        draft_probs: ``[B, K, V]``, the distribution each drafted token was drawn from, or
            ``None`` for one-hot drafts (prompt lookup, greedy drafts): accept x with
            probability p(x), else sample p without x.
        target_logits: ``[B, K+1, V]`` logits of the target at every drafted position plus one.
        temperature, top_k, top_p: a scalar or one value per row, applied to the target inside the
            kernel. Temperature 0 is greedy for that row; ``top_k`` 0/None and ``top_p`` 1/None are off.
        lenience: DistillSpec's lossy mode: a :class:`Lenience` or a float epsilon (f = p**epsilon).
        seed: an int (row b uses ``seed + b``) or an int64 ``[B]`` tensor of row seeds; None draws one.
        uniforms: :class:`Uniforms` to inject the noise instead (tests).
        return_accept_probs: also return ``sum_v min(p, q)`` per drafted position.
        backend: "triton", "cpp" or "torch"; None picks the best for the device.

    Returns:
        :class:`VerifyOutput` ``(output_tokens [B, K+1], num_accepted [B], accept_probs [B, K] | None)``.
    """
    inputs = normalize_inputs(
        draft_tokens, draft_probs, target_logits, temperature=temperature, top_k=top_k,
        top_p=top_p, lenience=lenience, seed=seed, uniforms=uniforms,
        return_accept_probs=return_accept_probs,
    )
    implementation = get_implementation(resolve_backend(backend, target_logits.device))
    return implementation(inputs)
