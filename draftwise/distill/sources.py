"""Where a training batch comes from: static examples (fixed corpus, target-generated), the
draft's own samples (on-policy), or a mixture of them with set fractions."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from .data import Example, sample_continuations, teacher_log_probs


@dataclasses.dataclass
class Item:
    example: Example
    teacher: torch.Tensor | None  # [num_predicted, V_draft] log-probs, or None (cross-entropy)
    source: str


class Teacher:
    """The target's side of an example: log-probabilities over the draft's ids at ``temperature``."""

    def __init__(self, target, vocab_ids: torch.Tensor | None, temperature: float = 1.0, batch_size: int = 8):
        self.target, self.vocab_ids = target, vocab_ids
        self.temperature, self.batch_size = temperature, batch_size

    def __call__(self, examples: Sequence[Example]) -> list[torch.Tensor]:
        return teacher_log_probs(self.target, examples, self.vocab_ids, temperature=self.temperature,
                                 batch_size=self.batch_size)


class StaticSource:
    """A fixed list of examples, visited in a seeded shuffled order, epoch after epoch. Teacher
    log-probs: ``known`` (one per example, computed earlier), else computed by ``teacher`` on an
    example's first visit and kept; neither: none (cross-entropy)."""

    def __init__(self, name: str, examples: Sequence[Example], teacher: Teacher | None, seed: int = 0,
                 known: Sequence[torch.Tensor] | None = None):
        if not examples:
            raise ValueError(f"data source {name!r} has no examples")
        if known is not None and len(known) != len(examples):
            raise ValueError(f"known: {len(known)} teacher tensors for {len(examples)} examples of {name!r}")
        self.name, self.examples, self.teacher = name, list(examples), teacher
        self.cache: dict[int, torch.Tensor] = dict(enumerate(known)) if known is not None else {}
        self.seed, self.epoch, self.cursor = seed, 0, 0
        self.order = self._order()

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def take(self, n: int) -> list[Item]:
        picked = []
        for _ in range(n):
            if self.cursor == len(self.order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self.order = self._order()
            picked.append(self.order[self.cursor])
            self.cursor += 1
        todo = [i for i in dict.fromkeys(picked) if i not in self.cache]
        if self.teacher is not None and todo:
            self.cache.update(zip(todo, self.teacher([self.examples[i] for i in todo])))
        return [Item(self.examples[i], self.cache.get(i), self.name) for i in picked]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.order = self._order()


class OnPolicySource:
    """The draft's own continuations of ``prompts`` (sampled at ``temperature`` through a KV
    cache, with the draft as it is at that step), scored by the teacher."""

    def __init__(self, draft, prompts: Sequence[torch.Tensor], teacher: Teacher, *, max_new_tokens: int = 48,
                 temperature: float = 1.0, eos_token_id=None, seed: int = 0, name: str = "on-policy"):
        if not prompts:
            raise ValueError("on-policy data needs prompts")
        self.name, self.draft, self.prompts, self.teacher = name, draft, list(prompts), teacher
        self.max_new_tokens, self.temperature, self.eos_token_id = max_new_tokens, temperature, eos_token_id
        self.generator = torch.Generator().manual_seed(seed)

    def take(self, n: int) -> list[Item]:
        rows = torch.randint(len(self.prompts), (n,), generator=self.generator).tolist()
        was_training = self.draft.training
        self.draft.eval()
        try:
            examples = sample_continuations(self.draft, [self.prompts[i] for i in rows], self.max_new_tokens,
                                            temperature=self.temperature, eos_token_id=self.eos_token_id,
                                            batch_size=n, generator=self.generator)
        finally:
            self.draft.train(was_training)
        return [Item(e, t, self.name) for e, t in zip(examples, self.teacher(examples))]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class Mixture:
    """Sources drawn with set ``fractions`` (summing to 1). Each example goes to the source furthest
    below its share so far, so the fractions hold exactly up to rounding at every step."""

    def __init__(self, sources: Sequence, fractions: Sequence[float]):
        if len(sources) != len(fractions) or not sources:
            raise ValueError("fractions: one fraction per source is needed")
        if any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
            raise ValueError(f"fractions: expected non-negative fractions summing to 1, got {list(fractions)}")
        self.sources, self.fractions = list(sources), [float(f) for f in fractions]
        self.counts = [0] * len(sources)

    def take(self, n: int) -> list[Item]:
        wanted = [0] * len(self.sources)
        for _ in range(n):
            total = sum(self.counts) + 1
            deficits = [f * total - c for f, c in zip(self.fractions, self.counts)]
            best = max(range(len(deficits)), key=lambda i: (deficits[i], -i))
            self.counts[best] += 1
            wanted[best] += 1
        items = []
        for source, k in zip(self.sources, wanted):
            if k:
                items += source.take(k)
        return items

    def state_dict(self) -> dict:
        return {"counts": list(self.counts), "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        self.counts = list(state["counts"])
        for source, s in zip(self.sources, state["sources"]):
            source.load_state_dict(s)
