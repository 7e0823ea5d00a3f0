"""Context-aware draft selection: a small network that picks, from a prompt, the arm of a draft
pool (a drafter, or no draft) that serves it best, and the policies that use it.

A :class:`Selector` maps a context feature to one score per arm. Two features are supported:
``"hidden"``, the mean over the prompt of the target's last hidden state (the engine's prefill
computes it anyway), and ``"tokens"``, statistics of the prompt's token ids (hashed counts,
length, repetition) that need no model at all. Selectors are trained offline by
``draftwise selector train`` (:mod:`draftwise.distill.selection`) and saved as an ordinary folder:
``config.json`` (the pool's arm names, the target it was trained for, the feature) and
``model.safetensors``.

:class:`OfflinePolicy` chooses once per row, before the first step, as in the paper
(Huang et al., 2024); the row then drafts with that arm at an adaptive γ (and still falls back to
no draft where drafting loses). :class:`OnlinePolicy` starts from the selector's choice (or the
first drafter) and keeps learning during the generation: after each step it scores what every
other drafter would have had accepted on the tokens just committed (prompt lookup re-proposes;
a draft model reads the new tokens when it catches up, which it must do before it drafts
anyway), so it learns every arm's rate without exploring, and a row switches drafter when
another now serves it better. Neither changes the output: only who drafts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .policy import NO_DRAFT, AdaptivePolicy, PolicyContext

FORMAT = "draftwise-selector"
FEATURES = ("hidden", "tokens")
NO_DRAFT_ARM = "no-draft"  # the arm name of decoding with the target alone
TOKEN_BUCKETS = 256


# ----------------------------------------------------------------------------------------------
# Features


def token_features(ids: Sequence[int]) -> torch.Tensor:
    """Statistics of one prompt's token ids: counts of ids hashed into :data:`TOKEN_BUCKETS`
    buckets (as frequencies), the log length, the share of distinct ids and the share of bigrams
    seen earlier in the prompt (text that repeats itself is text prompt lookup can copy)."""
    ids = [int(i) for i in ids]
    counts = torch.zeros(TOKEN_BUCKETS)
    for i in ids:
        counts[(i * 2654435761) % TOKEN_BUCKETS] += 1
    n = max(len(ids), 1)
    seen, repeated = set(), 0
    for pair in zip(ids, ids[1:]):
        repeated += pair in seen
        seen.add(pair)
    extra = torch.tensor([math.log1p(len(ids)) / 8, len(set(ids)) / n, repeated / max(len(ids) - 1, 1)])
    return torch.cat([counts / n, extra])


def hidden_features(target, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H]: the mean over each prompt's tokens of the target's last hidden state (one forward)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with torch.inference_mode():
        hidden = target.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return masked_mean(hidden, attention_mask)


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float()


def target_fingerprint(target) -> str:
    """A short id of the target's architecture and weights (a selector is trained for one)."""
    config = target.config
    embed = target.get_input_embeddings().weight
    probe = float(embed[: min(64, embed.shape[0])].detach().double().sum())
    fields = [config.model_type, config.hidden_size, config.num_hidden_layers, embed.shape[0], round(probe, 3)]
    return hashlib.sha1(json.dumps(fields).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# The network and its folder


def _readable(folder: Path) -> None:
    """Give a folder made by ``mkdtemp`` (owner-only) and its files the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


class Selector(nn.Module):
    """Feature -> one score per arm (``arms[i]`` names drafter i of the pool; the last arm is
    :data:`NO_DRAFT_ARM`). Scores are logits of the policy; the highest is chosen."""

    def __init__(self, arms: Sequence[str], feature: str, in_dim: int, hidden: int = 64,
                 target: str = "", info: dict | None = None):
        super().__init__()
        if feature not in FEATURES:
            raise ValueError(f"feature: expected one of {FEATURES}, got {feature!r}")
        if not arms or arms[-1] != NO_DRAFT_ARM:
            raise ValueError(f"arms: expected the pool's drafter names followed by {NO_DRAFT_ARM!r}, got {list(arms)}")
        self.arms, self.feature, self.in_dim, self.hidden = list(arms), feature, in_dim, hidden
        self.target, self.info = target, dict(info or {})
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, len(arms)))

    @property
    def drafters(self) -> list[str]:
        return self.arms[:-1]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features.float() - self.mean) / self.std)

    def choose(self, features: torch.Tensor) -> list[int]:
        """Per row: a drafter index, or ``NO_DRAFT``."""
        with torch.no_grad():
            best = self(features).argmax(-1).tolist()
        return [NO_DRAFT if a == len(self.arms) - 1 else a for a in best]

    def features_of(self, context: PolicyContext) -> torch.Tensor:
        if self.feature == "hidden":
            if context.hidden is None:
                raise ValueError("selector: this selector reads the target's hidden state, which the engine did not pass")
            return context.hidden.cpu()
        return torch.stack([token_features(ids) for ids in context.prompt_ids()])

    def features_for(self, target, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The feature of left-padded prompts outside a generation (one target forward for "hidden")."""
        if self.feature == "hidden":
            return hidden_features(target, input_ids, attention_mask)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return torch.stack([token_features(ids[m.bool()].tolist()) for ids, m in zip(input_ids, mask)])

    def check(self, drafter_names: Sequence[str], target=None) -> None:
        """Raise ``ValueError`` unless the pool (and the target, when given) are the ones trained for."""
        if list(drafter_names) != self.drafters:
            raise ValueError(f"selector: trained for the drafts {self.drafters} (in this order), "
                             f"but the pool is {list(drafter_names)}; pass the same drafts or train a selector for them")
        if target is not None and self.target and target_fingerprint(target) != self.target:
            raise ValueError(f"selector: trained for another target (fingerprint {self.target}, "
                             f"this one is {target_fingerprint(target)})")

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into ``folder`` atomically (a temporary
        folder renamed into place: a crash leaves the old folder or none, never half of one)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
        try:
            config = dict(format=FORMAT, version=1, arms=self.arms, feature=self.feature, in_dim=self.in_dim,
                          hidden=self.hidden, target=self.target, info=self.info)
            (staging / "config.json").write_text(json.dumps(config, indent=1))
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(staging / "model.safetensors"))
            _readable(staging)
            if folder.exists():
                shutil.rmtree(folder)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Selector":
        from safetensors.torch import load_file

        folder = Path(folder)
        config_path = folder / "config.json"
        if not config_path.is_file() or not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(f"selector: {folder} is not a selector folder (config.json + model.safetensors)")
        config = json.loads(config_path.read_text())
        if config.get("format") != FORMAT:
            raise ValueError(f"selector: {config_path} is not a draftwise selector (format {config.get('format')!r})")
        selector = cls(config["arms"], config["feature"], config["in_dim"], config["hidden"],
                       config.get("target", ""), config.get("info"))
        selector.load_state_dict(load_file(str(folder / "model.safetensors")))
        return selector.eval()


# ----------------------------------------------------------------------------------------------
# Policies


class OfflinePolicy(AdaptivePolicy):
    """One choice per row from the prompt, before the first step (the paper's method); the row
    then drafts with that arm, at an adaptive γ, and stops drafting where it loses.

    ``free_drafters`` (default True): the row may also take the drafters without a model (prompt
    lookup), which the engine scores every step on the committed tokens at the cost of a search,
    no forward; the row switches to one only on that evidence. With False, the row drafts with its
    chosen arm alone, as in the paper."""

    scores_idle_models = False  # the chosen arm is not second-guessed by other draft models

    def __init__(self, selector: Selector, free_drafters: bool = True, **adaptive):
        super().__init__(**adaptive)
        self.selector = selector
        self.wants_hidden = selector.feature == "hidden"
        self.free_drafters = self.full_information = free_drafters

    def check_pool(self, names: Sequence[str], target=None) -> None:
        self.selector.check(names, target)

    def start(self, num_drafters: int, batch: int, context: PolicyContext | None = None) -> None:
        super().start(num_drafters, batch, context)
        if context is None:
            raise ValueError("selector: an offline policy needs the prompts (the engine passes them)")
        self.free = [i for i in range(num_drafters) if not self._runs_model(i)] if self.free_drafters else []
        self.chosen = self.selector.choose(self.selector.features_of(context))
        for row, arm in zip(self.rows, self.chosen):
            row.allowed = [] if arm == NO_DRAFT else [arm]

    def _candidates(self, row) -> list[int]:
        """The chosen arm, and the free drafters once their scores say something."""
        return row.allowed + [i for i in self.free if i not in row.allowed and row.arms[i].alpha is not None]


class OnlinePolicy(AdaptivePolicy):
    """Starts each row on the selector's choice (or on drafter 0 without a selector) and learns
    every drafter's rate on the row's own text as it goes: the drafter that drafted a step is
    counted as usual, and every other one is scored on the committed tokens (full-information
    feedback, no exploration). Each step the row takes the arm with the best expected rate among
    those it has evidence for."""

    full_information = True
    retries = False  # every drafter is scored as the row goes: no tries needed
    CONFIDENCE = 1.0  # standard errors taken off each acceptance estimate before choosing

    def __init__(self, selector: Selector | None = None, **adaptive):
        super().__init__(**adaptive)
        self.selector = selector
        self.wants_hidden = selector is not None and selector.feature == "hidden"

    def check_pool(self, names: Sequence[str], target=None) -> None:
        if self.selector is not None:
            self.selector.check(names, target)

    def start(self, num_drafters: int, batch: int, context: PolicyContext | None = None) -> None:
        super().start(num_drafters, batch, context)
        first = [0 if num_drafters else NO_DRAFT] * batch
        if self.selector is not None and context is not None:
            first = self.selector.choose(self.selector.features_of(context))
        for row, arm in zip(self.rows, first):
            row.prior = arm

    def _alpha(self, state) -> float | None:
        """A cautious estimate: scores arrive for every drafter, so the best-looking of several
        noisy estimates would often be luck; a drafter wins on evidence, not on doubt."""
        alpha = state.alpha
        if alpha is None:
            return None
        return max(0.0, alpha - self.CONFIDENCE * math.sqrt(alpha * (1 - alpha) / (state.drafted + 1)))

    def _candidates(self, row) -> list[int]:
        """The selector's choice until the row has evidence, then every drafter it has evidence
        for (with a prior of no draft: none until the first scores come in)."""
        known = [i for i, arm in enumerate(row.arms) if arm.alpha is not None]
        if row.prior != NO_DRAFT and row.prior not in known:
            return [row.prior] + known
        return known


# ----------------------------------------------------------------------------------------------
# From ``selector=`` to a policy

SHIPPED = Path(__file__).resolve().parent.parent / "selectors"  # selector folders shipped with the package


@functools.lru_cache(maxsize=None)
def _shipped(folder: Path) -> Selector:
    return Selector.load(folder)


def shipped_selector(drafter_names: Sequence[str], target) -> Selector | None:
    """The shipped selector trained for exactly this pool (names, order) and target, if any."""
    for folder in sorted(SHIPPED.glob("*/config.json")):
        selector = _shipped(folder.parent)
        try:
            selector.check(drafter_names, target)
        except ValueError:
            continue
        return selector
    return None


def resolve_selector(value, drafters: Sequence, target, **adaptive):
    """``selector=`` of a call -> a policy, or None for the engine's default
    (:class:`~draftwise.engine.policy.AdaptivePolicy`). A ``DraftPolicy`` is used as it is; a
    folder is a trained selector, choosing once per row (:class:`OfflinePolicy`); ``"online"`` is
    an :class:`OnlinePolicy` whose prior is the shipped selector of this pool, if there is one.
    With no selector and several drafters, the default is the shipped selector of this pool
    (:class:`OfflinePolicy`) if there is one, else the online policy."""
    from .policy import DraftPolicy

    names = [d.name for d in drafters]
    if value is None:
        if len(drafters) <= 1:
            return None
        shipped = shipped_selector(names, target)
        return OfflinePolicy(shipped, **adaptive) if shipped is not None else OnlinePolicy(None, **adaptive)
    if isinstance(value, DraftPolicy):
        return value
    if value == "online":
        return OnlinePolicy(shipped_selector(names, target), **adaptive)
    if isinstance(value, (str, os.PathLike)):
        return OfflinePolicy(Selector.load(value), **adaptive)
    raise TypeError(f"selector: expected a selector folder, 'online' or a draftwise DraftPolicy, "
                    f"got {type(value).__name__}")


def pool_policy(folder: str | os.PathLike, drafters: Sequence, target) -> OfflinePolicy:
    """The selector in ``folder``, checked against the pool, as the pool's policy: one choice per
    row from the prompt, prompt lookup scored beside it (:class:`OfflinePolicy`)."""
    selector = Selector.load(folder)
    selector.check([d.name for d in drafters], target)
    return OfflinePolicy(selector)
