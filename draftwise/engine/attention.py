"""The runner's SDPA attention: transformers' own, with grouped-query attention kept inside SDPA.

With a mask and more than one query, transformers' ``sdpa`` attention copies every key/value head
once per query head it serves (``repeat_kv``: for SmolLM2, 3 heads to 9, the whole context, in
every layer, on every verification forward). PyTorch's SDPA takes the grouped heads as they are
(``enable_gqa=True``) and gives the same numbers; on the CPU it is also the faster path (the
default target's 3-token verification: ~1.3 ms less per forward). On CUDA, SDPA with a mask and
``enable_gqa`` would fall back to its math kernel, so there, and for every other case, this
function hands over to transformers' ``sdpa_attention_forward`` unchanged.

:func:`using` switches a model to it for the duration of a forward (the name is registered with
transformers' ``AttentionInterface``; the model's 4-D mask is passed through unchanged, so no mask
function is needed).
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "draftwise_sdpa"
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


@contextlib.contextmanager
def using(model):
    """Inside, ``model`` runs its attention through :func:`sdpa_attention`; then it is put back."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
