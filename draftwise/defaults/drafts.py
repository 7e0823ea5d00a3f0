"""The default target's drafts: the default draft, the pool of drafts with its shipped selector,
and drafts made of the target's own decoder layers.

The default draft is described once, in :data:`DEFAULT_DRAFT`: a draft distilled from the target
(``draftwise distill``, README "The default draft") that ships with the package as a small fp16
folder and shares the target's embeddings. :data:`MODEL_DRAFT` is the best draft made of the
target's own layers without training, for comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .target import DEFAULT_TARGET, known_target, load_target

_PACKAGE = Path(__file__).parent.parent  # the draftwise package, which holds drafts/ and selectors/


@dataclass(frozen=True)
class LayerDraftSpec:
    """A draft made of the target's decoder layers ``layers`` (indices into the target's stack),
    run on the target's shared embeddings, final norm and LM head."""

    layers: tuple[int, ...]

    def build(self, target: nn.Module) -> nn.Module:
        return layer_draft(target, layers=self.layers)


@dataclass(frozen=True)
class DistilledDraftSpec:
    """A draft distilled from the target (``draftwise distill``), stored as a draft folder."""

    folder: Path

    def build(self, target: nn.Module) -> nn.Module:
        from draftwise.engine.draft_model import load_draft

        return load_draft(self.folder, target)


def shipped_draft(name: str = DEFAULT_TARGET) -> DistilledDraftSpec:
    """The draft distilled for the known target ``name`` that ships with the package."""
    return DistilledDraftSpec(_PACKAGE / "drafts" / known_target(name).draft)


# The draft distilled from SmolLM2 that ships with the package (README, "The default draft"):
# the target's first layers on its shared embeddings, predicting its 8192 most frequent tokens.
# Gemma-3-270M's (docs/distillation.md) is the same shape on Gemma's first two layers.
DISTILLED_DRAFT = shipped_draft(DEFAULT_TARGET)
# The best draft made of the target's own layers without training (bench/draft_candidates.py):
# the first layer agrees most (3% on the target's answers, 9% on documentation text) at the
# lowest cost; no undistilled layer draft reaches the break-even acceptance.
MODEL_DRAFT = LayerDraftSpec(layers=(0,))
# The default draft: the distilled one.
DEFAULT_DRAFT = DISTILLED_DRAFT

# The default pool (README, "Choosing the draft"): drafts with different strengths, in the order
# its selector knows them, then prompt lookup; each named as the selector knows it.
POOL_DRAFTS = {
    "code": DISTILLED_DRAFT,  # distilled on code and documentation prompts
    "prose": DistilledDraftSpec(_PACKAGE / "drafts" / "smollm2-135m-instruct-prose"),  # on prose prompts
    "small": DistilledDraftSpec(_PACKAGE / "drafts" / "smollm2-135m-instruct-small"),  # one layer, on prose prompts
}
POOL_LOOKUP = "prompt-lookup"
POOL_SELECTOR = _PACKAGE / "selectors" / "smollm2-135m-instruct-pool"


# ----------------------------------------------------------------------------------------------
# The default draft and the pool


def load_default(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 cache_dir: str | Path | None = None, name: str = DEFAULT_TARGET):
    """``(target, tokenizer, draft)``: the known target ``name`` (the default one unless given)
    and its shipped draft built on it (a draft model: ``draftwise.generate`` and Hugging Face's
    assisted generation both take it)."""
    target, tokenizer = load_target(device, dtype, cache_dir, name=name)
    return target, tokenizer, default_draft(target, name)


def default_draft(target: nn.Module, name: str = DEFAULT_TARGET) -> nn.Module:
    """The shipped draft of the known target ``name`` (:data:`DEFAULT_DRAFT` for the default
    target) built on ``target``, that target's model, in eval mode."""
    spec = DEFAULT_DRAFT if name == DEFAULT_TARGET else shipped_draft(name)
    return spec.build(target).eval()


def pool_drafters(target: nn.Module) -> list:
    """The default pool's drafters on ``target``: :data:`POOL_DRAFTS` then prompt lookup."""
    from draftwise.engine import ModelDrafter, PromptLookupDrafter

    drafters = [ModelDrafter(spec.build(target).eval(), name=name) for name, spec in POOL_DRAFTS.items()]
    return drafters + [PromptLookupDrafter(name=POOL_LOOKUP)]


def load_pool(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              cache_dir: str | Path | None = None):
    """``(target, tokenizer, drafts, selector)``: the default target, its shipped pool of drafters
    (:func:`pool_drafters`) and the policy that picks among them per row (the shipped selector,
    an :class:`~draftwise.engine.selector.OfflinePolicy`), so that::

        draftwise.generate(target, **inputs, drafts=drafts, selector=selector)

    is the whole main job."""
    from draftwise.engine.selector import pool_policy

    target, tokenizer = load_target(device, dtype, cache_dir)
    drafts = pool_drafters(target)
    return target, tokenizer, drafts, pool_policy(POOL_SELECTOR, drafts, target)


# ----------------------------------------------------------------------------------------------
# Drafts made of the target's own layers


def load_model_draft(target: nn.Module) -> nn.Module:
    """:data:`MODEL_DRAFT` built on ``target``: the best undistilled draft made of its layers."""
    return MODEL_DRAFT.build(target).eval()


def layer_draft(target: nn.Module, num_layers: int | None = None, *,
                layers: Sequence[int] | None = None) -> nn.Module:
    """A model of the target's architecture made of some of its decoder layers, untrained.

    ``num_layers=k`` takes the first k layers; ``layers=[...]`` takes any of them, in order
    (e.g. the last k, or every n-th). The layers are copies; the embeddings, the final norm, the
    rotary embedding and the LM head hold the target's own weights (shared memory, not copied;
    converting the draft leaves the target as it is).
    (:func:`~draftwise.engine.draft_model.build_draft` builds the same for training, with its own norm.)
    """
    from draftwise.engine.draft_model import build_draft, final_norm_name, sharing_copy

    draft = build_draft(target, num_layers, layers=layers)
    norm = final_norm_name(target)
    setattr(draft.get_decoder(), norm, sharing_copy(getattr(target.get_decoder(), norm)))
    return draft.train(target.training)
