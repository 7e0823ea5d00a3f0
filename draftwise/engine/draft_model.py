"""Draft models that share their target's embeddings: their construction from the target's
layers, the reduced-vocabulary LM head, and the ``save_pretrained``-format folders they are
stored in.

A draft built from a target (:func:`build_draft`) is the target's architecture with a few
decoder layers. Its input embeddings (and, by default, its LM head rows) are the target's,
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
from typing import Sequence

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
    :func:`save_draft`.
    """
    decoder, decoder_name, stack_name, norm_name = _decoder_layout(target)
    stack = getattr(decoder, stack_name)
    layers = _layer_indices(len(stack), num_layers, layers)
    embeddings = target.get_input_embeddings()
    vocab_size = embeddings.weight.shape[0]

    config = copy.deepcopy(target.config)
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in layers]
    shared = [f"{decoder_name}.{name}" for name, _ in decoder.named_children() if name not in (stack_name, norm_name)]
    if vocab_ids is None:
        shared.append("lm_head")
    setattr(config, DRAFT_KEY, {"source_layers": None if fresh else layers, "shared": shared,
                                "draft_vocab_size": None if vocab_ids is None else len(vocab_ids)})
    with torch.device("meta"):
        draft = type(target)._from_config(config, dtype=target.dtype)
    attach_shared(draft, target, {"shared": shared})
    draft_decoder = draft.get_submodule(decoder_name)
    setattr(draft_decoder, norm_name, copy.deepcopy(getattr(decoder, norm_name)))
    if fresh:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            new = [type(stack[0])(config, layer_idx=i).to(target.device, target.dtype) for i in range(len(layers))]
            for layer in new:
                layer.apply(draft._init_weights)
            norm = getattr(draft_decoder, norm_name)  # a fresh norm: scale 1, shift 0
            nn.init.ones_(norm.weight)
            if getattr(norm, "bias", None) is not None:
                nn.init.zeros_(norm.bias)
    else:
        new = []
        for new_index, i in enumerate(layers):
            layer = copy.deepcopy(stack[i])
            for sub in layer.modules():  # the KV cache is indexed by the layer's position in the stack
                if hasattr(sub, "layer_idx"):
                    sub.layer_idx = new_index
            new.append(layer)
    setattr(draft_decoder, stack_name, nn.ModuleList(new))
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


LAYER_STACKS = ("layers", "h")  # the decoder's layer list: Llama, Qwen2, Gemma, GPT-NeoX, OPT ...; GPT-2
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm")


def _decoder_layout(target: nn.Module) -> tuple[nn.Module, str, str, str]:
    """``(decoder, its path in the target, its layer list's name, its final norm's name)``."""
    decoder = target.get_decoder()
    path = next((name for name, module in target.named_modules() if module is decoder and name), None)
    stack = next((n for n in LAYER_STACKS if isinstance(getattr(decoder, n, None), nn.ModuleList)), None)
    norm = next((n for n in FINAL_NORMS if isinstance(getattr(decoder, n, None), nn.Module)), None)
    if path is None or stack is None or norm is None:
        raise TypeError(f"build_draft: {type(target).__name__} has no decoder with a layer list "
                        f"({' or '.join(LAYER_STACKS)}) and a final norm ({', '.join(FINAL_NORMS)})")
    return decoder, path, stack, norm


def final_norm_name(target: nn.Module) -> str:
    """The name of the decoder's final norm (``norm``, ``ln_f`` or ``final_layer_norm``)."""
    return _decoder_layout(target)[3]


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
