"""Draft models that share their target's embeddings: the reduced-vocabulary LM head, and the
``save_pretrained``-format folders they are stored in.

A draft built from a target (``draftwise.distill.build_draft``) is the target's architecture with
a few decoder layers. Its input embeddings (and, by default, its LM head rows) are the target's,
shared and frozen, so a saved draft holds only what it does not share: its layers, its final
norm and, with a reduced vocabulary, the ids it predicts. :func:`load_draft` puts it back
together on a target.

With a reduced vocabulary the draft predicts only ``vocab_ids`` (the most frequent tokens):
its logits are ``-inf`` elsewhere, so q = 0 there, which verification handles exactly (a token
the draft cannot propose is simply never accepted from it, and the residual max(0, p - q) = p
keeps the target's mass).

Sharing is by memory, not by module: the draft's shared modules are its own copies holding the
target's tensors (:func:`attach_shared`), so converting the draft (``draft.half()``,
``draft.to(dtype)``) converts its copies and leaves the target as it was. A draft may run in
another float dtype than its target (its probabilities are computed in float32); it must be on
the target's device (:func:`check_draft_placement`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
from pathlib import Path

import torch
from torch import nn

DRAFT_KEY = "draftwise_draft"  # the config attribute that marks a draft and says what it shares
WEIGHTS_NAME = "model.safetensors"


class VocabSubsetHead(nn.Module):
    """LM head over ``vocab_ids``, a subset of a ``vocab_size``-wide vocabulary.

    ``forward`` returns logits at the full width with ``-inf`` outside the subset (what the engine
    and Hugging Face's generation expect); inside :func:`subset_logits` it returns only the
    subset's columns, in the order of ``vocab_ids`` (what training uses).
    """

    def __init__(self, weight: torch.Tensor, vocab_ids: torch.Tensor, vocab_size: int, trainable: bool = False):
        super().__init__()
        if weight.ndim != 2 or weight.shape[0] != vocab_ids.numel():
            raise ValueError(f"VocabSubsetHead: weight {tuple(weight.shape)} needs one row per id ({vocab_ids.numel()})")
        if vocab_ids.numel() == 0 or int(vocab_ids.min()) < 0 or int(vocab_ids.max()) >= vocab_size:
            raise ValueError(f"VocabSubsetHead: vocab_ids must be non-empty ids in [0, {vocab_size})")
        if torch.unique(vocab_ids).numel() != vocab_ids.numel():
            raise ValueError("VocabSubsetHead: vocab_ids has repeated ids")
        if trainable:
            self.subset_weight = nn.Parameter(weight)
        else:  # the target's rows: rebuilt from the target on load, never saved
            self.register_buffer("subset_weight", weight, persistent=False)
        self.register_buffer("vocab_ids", vocab_ids.long())
        self.vocab_size = int(vocab_size)
        self.full_width = True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = nn.functional.linear(hidden, self.subset_weight)
        if not self.full_width:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.vocab_size), -torch.inf)
        return full.index_copy_(-1, self.vocab_ids, logits)


def draft_vocab_ids(model: nn.Module) -> torch.Tensor | None:
    """The ids a reduced-vocabulary draft predicts, or ``None`` for a full-vocabulary model."""
    head = model.get_output_embeddings()
    return head.vocab_ids if isinstance(head, VocabSubsetHead) else None


@contextlib.contextmanager
def subset_logits(model: nn.Module):
    """Inside this context a reduced-vocabulary draft returns logits over its own ids only
    (``[..., len(vocab_ids)]``); a full-vocabulary model is unchanged."""
    head = model.get_output_embeddings()
    if not isinstance(head, VocabSubsetHead):
        yield
        return
    head.full_width = False
    try:
        yield
    finally:
        head.full_width = True


def _shared_prefixes(model: nn.Module) -> list[str]:
    """State-dict prefixes of the modules a draft takes from its target (never saved)."""
    return [name + "." for name in getattr(model.config, DRAFT_KEY)["shared"]]


def save_draft(model: nn.Module, folder: str | Path, dtype: torch.dtype | None = torch.float16) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (everything the draft does not share with
    its target, floats cast to ``dtype``; None keeps them). Written under a temporary name and
    renamed when complete."""
    from safetensors.torch import save_file

    if getattr(model.config, DRAFT_KEY, None) is None:
        raise ValueError("save_draft: the model is not a draft built by draftwise.distill.build_draft "
                         "(a plain model saves with model.save_pretrained)")
    folder = Path(folder)
    shared = _shared_prefixes(model)
    state = {}
    for key, tensor in model.state_dict().items():
        if any(key.startswith(p) for p in shared):
            continue
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.contiguous()
    staging = folder.with_name(f".{folder.name}.partial")
    staging.mkdir(parents=True, exist_ok=True)
    config = model.config
    saved_dtype = getattr(config, "dtype", None)
    if dtype is not None:
        config.dtype = dtype
    try:
        config.save_pretrained(staging)
    finally:
        config.dtype = saved_dtype
    save_file(state, staging / WEIGHTS_NAME, metadata={"format": "pt"})
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)
    return folder


def is_draft_folder(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    return DRAFT_KEY in json.loads(config.read_text())


def load_draft(folder: str | Path, target: nn.Module) -> nn.Module:
    """A draft saved by :func:`save_draft`, rebuilt on ``target`` (whose embeddings it shares),
    in eval mode, on the target's device and dtype."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not is_draft_folder(folder):
        raise FileNotFoundError(f"load_draft: {folder} holds no draftwise draft (config.json with '{DRAFT_KEY}')")
    config = AutoConfig.from_pretrained(folder)
    info = getattr(config, DRAFT_KEY)
    target_vocab = target.get_input_embeddings().weight.shape[0]
    if config.vocab_size != target_vocab:
        raise ValueError(f"load_draft: the draft in {folder} was built for a vocabulary of {config.vocab_size} "
                         f"tokens, the target has {target_vocab}")
    param = next(target.parameters())
    config.dtype = param.dtype
    with torch.device("meta"):
        draft = AutoModelForCausalLM.from_config(config, dtype=param.dtype)
    attach_shared(draft, target, info)
    state = load_file(folder / WEIGHTS_NAME, device=str(param.device))
    state = {k: (v.to(param.dtype) if v.is_floating_point() else v) for k, v in state.items()}
    if "lm_head.vocab_ids" in state:
        ids = state["lm_head.vocab_ids"]
        weight = state.pop("lm_head.subset_weight", None)
        trainable = weight is not None
        if weight is None:
            weight = target.get_input_embeddings().weight.detach()[ids].clone()
        draft.set_output_embeddings(VocabSubsetHead(weight, ids, target_vocab, trainable=trainable))
        state.pop("lm_head.vocab_ids")
    missing, unexpected = draft.load_state_dict(state, strict=False, assign=True)
    left = [n for n, t in [*draft.named_parameters(), *draft.named_buffers()] if t.is_meta]
    if unexpected or left:
        raise ValueError(f"load_draft: {folder} does not match its config (unexpected {unexpected}, missing {left})")
    return draft.eval()


def attach_shared(draft: nn.Module, target: nn.Module, info: dict) -> None:
    """Give the draft the target's shared modules (``info['shared']``: names such as
    ``model.embed_tokens``, ``lm_head``) as copies that hold the target's tensors (no new memory;
    see :func:`sharing_copy`)."""
    for name in info.get("shared", []):
        owner_name, _, attr = name.rpartition(".")
        owner_t = target.get_submodule(owner_name) if owner_name else target
        owner_d = draft.get_submodule(owner_name) if owner_name else draft
        setattr(owner_d, attr, sharing_copy(getattr(owner_t, attr)))


def sharing_copy(module: nn.Module) -> nn.Module:
    """A new module of ``module``'s class and settings (submodules copied the same way) whose
    parameters and buffers are ``module``'s own tensors, all held as buffers.

    Why buffers: ``nn.Module.to`` / ``half`` / ``cuda`` convert a parameter in place
    (``param.data = converted``), so a parameter, or a module, shared with the target would be
    converted for the target too; a buffer is replaced in its own module's dict only. A
    conversion that changes nothing (same dtype and device) returns the tensor itself, so the
    memory stays shared until the copy really changes dtype or device. The parameters come
    detached: the copy never trains them.

    A module that accelerate dispatches (``_hf_hook``: its weights are moved or loaded by the
    hook) is returned as it is: its hook owns its placement.
    """
    if hasattr(module, "_hf_hook"):
        return module
    clone = copy.copy(module)
    # copy.copy shares the module's dicts (parameters, buffers, submodules, hooks): one of each of its own
    for key, value in vars(module).items():
        if isinstance(value, (dict, set)):
            object.__setattr__(clone, key, copy.copy(value))
    clone._parameters.clear()
    for name, child in module.named_children():
        clone._modules[name] = sharing_copy(child)
    for name, param in module._parameters.items():  # with the unset ones (a Linear's bias=None)
        clone.register_buffer(name, None if param is None else param.detach())
    return clone


def _placement(model: nn.Module) -> torch.device:
    """The device a runner of ``model`` works on (that of its first parameter, else buffer)."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    if tensor is None:
        raise ValueError(f"{type(model).__name__} holds no tensors")
    return tensor.device


def check_draft_placement(target: nn.Module, draft_model: nn.Module, argument: str = "assistant_model") -> None:
    """Refuse, before anything runs, a draft model that is not on its target's device.

    The engine feeds the draft the tokens it keeps beside the target, so both must be on one
    device; any float dtype works for the draft. ``argument`` names the draft in the message
    (``"assistant_model"``, ``"drafts[1]"``, ...).
    """
    target_device, draft_device = _placement(target), _placement(draft_model)
    if draft_device != target_device:
        raise ValueError(
            f"`{argument}`: the draft model is on {draft_device}, the target on {target_device}; a draft "
            f"must be on its target's device: move it with `{argument}.to({str(target_device)!r})`"
        )
