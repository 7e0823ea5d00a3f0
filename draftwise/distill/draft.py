"""Draft construction from a target: some of its decoder layers (copied or fresh), its embeddings
shared and frozen, and optionally a reduced vocabulary."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from draftwise.engine.draft_model import DRAFT_KEY, VocabSubsetHead, attach_shared


def _layer_indices(total: int, num_layers: int | None, layers: Sequence[int] | None) -> list[int]:
    if (num_layers is None) == (layers is None):
        raise TypeError("build_draft takes exactly one of num_layers and layers")
    if layers is None:
        if not isinstance(num_layers, int) or not 1 <= num_layers <= total:
            raise ValueError(f"num_layers must be an int in [1, {total}], got {num_layers!r}")
        layers = range(num_layers)
    layers = [int(i) for i in layers]
    if not layers or any(not 0 <= i < total for i in layers):
        raise ValueError(f"layers must be a non-empty list of indices in [0, {total}), got {layers}")
    return layers


def build_draft(target: nn.Module, num_layers: int | None = None, *, layers: Sequence[int] | None = None,
                fresh: bool = False, vocab_ids: torch.Tensor | Sequence[int] | None = None,
                train_head: bool = False, seed: int = 0) -> nn.Module:
    """A draft of the target's architecture made of ``num_layers`` (the first k) or ``layers``
    (any of the target's layer indices, in order) decoder layers.

    - ``fresh=False``: the layers and the final norm start as copies of the target's;
      ``fresh=True``: they start from the model's own random initialisation (``seed``).
    - The input embeddings and the rotary embedding are the target's modules, shared (and the
      embeddings frozen): a draft stores nothing of them.
    - ``vocab_ids=None``: the LM head is the target's, shared and frozen. With ``vocab_ids`` the
      draft predicts only those ids (:class:`VocabSubsetHead`) from the target's rows for them:
      frozen and not stored unless ``train_head``.

    The draft is in training mode with only its own parameters requiring grad; save it with
    :func:`draftwise.engine.draft_model.save_draft`.
    """
    decoder = target.get_decoder()
    stack = getattr(decoder, "layers", None)
    if not isinstance(stack, nn.ModuleList):
        raise TypeError(f"build_draft needs a decoder with a `layers` ModuleList, got {type(decoder).__name__}")
    layers = _layer_indices(len(stack), num_layers, layers)
    embeddings = target.get_input_embeddings()
    vocab_size = embeddings.weight.shape[0]

    config = copy.deepcopy(target.config)
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in layers]
    decoder_name = next(n for n, m in target.named_children() if m is decoder)
    shared = [f"{decoder_name}.{name}" for name, _ in decoder.named_children() if name not in ("layers", "norm")]
    if vocab_ids is None:
        shared.append("lm_head")
    setattr(config, DRAFT_KEY, {"source_layers": None if fresh else layers, "shared": shared,
                                "draft_vocab_size": None if vocab_ids is None else len(vocab_ids)})
    with torch.device("meta"):
        draft = type(target)._from_config(config, dtype=target.dtype)
    attach_shared(draft, target, {"shared": shared})
    draft_decoder = draft.get_decoder()
    draft_decoder.norm = copy.deepcopy(decoder.norm)
    if fresh:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            new = [type(stack[0])(config, layer_idx=i).to(target.device, target.dtype) for i in range(len(layers))]
            for layer in new:
                layer.apply(draft._init_weights)
            nn.init.ones_(draft_decoder.norm.weight)
    else:
        new = []
        for new_index, i in enumerate(layers):
            layer = copy.deepcopy(stack[i])
            for sub in layer.modules():  # the KV cache is indexed by the layer's position in the stack
                if hasattr(sub, "layer_idx"):
                    sub.layer_idx = new_index
            new.append(layer)
    draft_decoder.layers = nn.ModuleList(new)
    if vocab_ids is not None:
        ids = torch.as_tensor(vocab_ids, dtype=torch.long, device=embeddings.weight.device)
        rows = embeddings.weight.detach()[ids].clone()
        draft.set_output_embeddings(VocabSubsetHead(rows, ids, vocab_size, trainable=train_head))
    elif train_head:
        raise ValueError("train_head: the full-vocabulary head is the target's, shared; pass vocab_ids to train one")
    if target.generation_config is not None:
        draft.generation_config = copy.deepcopy(target.generation_config)
    left = [name for name, t in [*draft.named_parameters(), *draft.named_buffers()] if t.is_meta]
    assert not left, f"draft tensors left unset: {left}"
    frozen = {id(p) for p in target.parameters()}
    for p in draft.parameters():
        p.requires_grad_(id(p) not in frozen)
    return draft.train()


def trainable_parameters(draft: nn.Module) -> list[nn.Parameter]:
    return [p for p in draft.parameters() if p.requires_grad]
