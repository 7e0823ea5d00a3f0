"""The runner's SDPA attention: transformers' own, with grouped-query attention kept inside SDPA.

With a mask and more than one query, transformers' ``sdpa`` attention copies every key/value head
once per query head it serves (``repeat_kv``: for SmolLM2, 3 heads to 9, the whole context, in
every layer, on every verification forward). PyTorch's SDPA takes the grouped heads as they are
(``enable_gqa=True``) and gives the same numbers; on the CPU it is also the faster path
(``python bench/step_costs.py``). On CUDA, SDPA with a mask and
``enable_gqa`` would fall back to its math kernel, so there, and for every other case, this
function hands over to transformers' ``sdpa_attention_forward`` unchanged.

:func:`using` switches a model to it for the duration of a forward (the name is registered with
transformers' ``AttentionInterface``; the model's 4-D mask is passed through unchanged, so no mask
function is needed).

:func:`using_tree` switches a model, for one token-tree forward, to the fused tree-attention
kernel (:func:`draftwise.kernels.tree_attention`): each node attends to its row's committed
prefix and its ancestors from the cache's lengths and the tree's ancestor words, with no dense
mask read (the runner uses it for ``sdpa`` models on CUDA). The kernel knows no sliding window: the runner names its
sliding layers (``masked_layers``), and those, with any layer that passes a ``sliding_window`` or
what else the kernel does not know (attention bias, soft-capping, sinks), take SDPA with the
layer's own 4-D mask, which carries the window.

A decode step of one row whose every cached key is valid (the runner's mask is all true) runs SDPA
without the mask (``using(model, unmasked=True)``), as transformers' own decoding does: PyTorch's
SDPA then keeps grouped heads inside and takes its unmasked path.

What reaches the fast path is exact: SDPA with the runner's mask, the layer's own ``scaling``
(Gemma's ``query_pre_attn_scalar``) and nothing else; a layer that passes soft-capping, a position
bias or attention sinks goes to transformers' own function (``sdpa`` refuses soft-capping: such
models, Gemma 2, run with ``eager``).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from draftwise.kernels.tree_attention import tree_attention

NAME = "draftwise_sdpa"
UNMASKED_NAME = "draftwise_sdpa_unmasked"
TREE_NAME = "draftwise_tree"
_UNHANDLED = ("position_bias", "s_aux", "softcap", "cache")  # extras only transformers' path knows


def sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                   **kwargs):
    groups = getattr(module, "num_key_value_groups", 1)
    if (groups > 1 and query.shape[2] > 1 and query.device.type == "cpu" and attention_mask is not None
            and all(kwargs.get(name) is None for name in _UNHANDLED)):
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


AttentionInterface.register(NAME, sdpa_attention)


def unmasked_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            **kwargs):
    """A forward whose one query per row sees every key it is given (the runner's mask is all true):
    SDPA without the mask, grouped heads inside it."""
    if query.shape[2] != 1 or any(kwargs.get(name) is not None for name in _UNHANDLED + ("sliding_window",)):
        return sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                              is_causal=is_causal, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, dropout_p=dropout, scale=scaling, enable_gqa=getattr(module, "num_key_value_groups", 1) > 1)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(UNMASKED_NAME, unmasked_sdpa_attention)


@contextlib.contextmanager
def using(model, unmasked: bool = False):
    """Inside, ``model`` runs its attention through :func:`sdpa_attention`; then it is put back.
    ``unmasked``: the forward's single query per row sees every key (its mask is all true), so
    SDPA runs without it (:func:`unmasked_sdpa_attention`), as transformers' own decoding does."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = UNMASKED_NAME if unmasked else NAME
    try:
        yield
    finally:
        config._attn_implementation = previous


# (prefix_lengths [B], ancestors [B, T], prefix_starts [B], backend, masked_layers) of the tree
# forward running now
_tree = contextvars.ContextVar("draftwise_tree", default=None)


def tree_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                           **kwargs):
    """``query [B, Hq, T, D]`` of the tree's nodes over the cache's ``key`` / ``value [B, Hkv, S, D]``
    (the nodes' own K/V already written at slots ``[L_b, L_b + T)``)."""
    tree = _tree.get()
    if (tree is None or getattr(module, "layer_idx", None) in tree[4] or kwargs.get("sliding_window") is not None
            or any(kwargs.get(n) is not None for n in _UNHANDLED)):
        return sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                              is_causal=is_causal, **kwargs)
    lengths, ancestors, starts, backend, _ = tree
    out = tree_attention(query.transpose(1, 2), key, value, lengths, ancestors, scaling, backend,
                         prefix_starts=starts, validate=False)
    return out, None


AttentionInterface.register(TREE_NAME, tree_attention_forward)


@contextlib.contextmanager
def using_tree(model, prefix_lengths: torch.Tensor, ancestors: torch.Tensor, prefix_starts: torch.Tensor,
               backend: str = "triton", masked_layers: frozenset = frozenset()):
    """Inside, ``model`` runs its attention through the tree-attention kernel for a tree whose
    nodes sit after ``prefix_lengths`` committed slots (from ``prefix_starts``), with ``ancestors``
    as in :class:`~draftwise.engine.tree.DraftTree`; the layers whose ``layer_idx`` is in
    ``masked_layers`` (sliding-window layers) run SDPA with their mask instead. Then it is put back."""
    config = model.config
    previous = config._attn_implementation
    token = _tree.set((prefix_lengths, ancestors, prefix_starts, backend, frozenset(masked_layers)))
    config._attn_implementation = TREE_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
        _tree.reset(token)
