"""The distillation trainer: AdamW, linear warm-up then cosine decay, gradient accumulation,
checkpoints that resume, held-out divergence and acceptance every ``eval_every`` steps."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from draftwise.engine.draft_model import draft_vocab_ids, save_draft, subset_logits

from .compact import TopKLogProbs, column_index, dense_teacher
from .data import hidden_at
from .losses import DIVERGENCES, acceptance_rate, cross_entropy, divergence
from .sources import Item

OBJECTIVES = (*DIVERGENCES, "ce")  # "ce": plain next-token cross-entropy, the undistilled baseline
CHECKPOINT = "checkpoint.pt"
HISTORY = "training.json"


def trainable_parameters(draft: nn.Module) -> list[nn.Parameter]:
    """The draft's own parameters, which training updates (what it shares with its target is frozen)."""
    return [p for p in draft.parameters() if p.requires_grad]


@dataclasses.dataclass
class DistillConfig:
    """What to optimise and how. ``objective``: a divergence of :mod:`draftwise.distill.losses`
    or ``"ce"``; ``beta``: JSD(β) interpolation (0 = forward KL, 1 = reverse KL, as in TRL);
    ``temperature``: of both distributions in the divergence. These defaults are also
    ``draftwise distill``'s."""

    objective: str = "fkl"  # with cross-entropy, the best greedy objective at the default draft's scale (docs/distillation.md)
    beta: float = 0.5
    temperature: float = 1.0
    steps: int = 200  # a short run: under two minutes of training on a 2-core CPU (the default draft: 1800)
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # the rate of the study, default draft and baselines in docs/distillation.md
    weight_decay: float = 0.0
    warmup_steps: int | None = None  # None: a tenth of steps
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0
    eval_every: int = 50
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self):
        if self.warmup_steps is None and isinstance(self.steps, int):
            self.warmup_steps = self.steps // 10
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {OBJECTIVES}, got {self.objective!r}")
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps: expected an int in [0, steps={self.steps}], got {self.warmup_steps}")
        if self.lr <= 0 or self.temperature <= 0 or not 0 <= self.beta <= 1:
            raise ValueError("lr and temperature must be > 0 and beta in [0, 1]")

    @property
    def needs_teacher(self) -> bool:
        """Whether training reads the teacher's log-probs (every objective but ``"ce"``, which
        reads only the next tokens)."""
        return self.objective != "ce"

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class DistillTrainer:
    """Trains ``draft`` on ``data`` (a source or :class:`~draftwise.distill.sources.Mixture` with
    ``take(n) -> [Item]``) and writes ``output_dir``: the draft (``config.json`` +
    ``model.safetensors``, loadable by ``draftwise.generate``), ``training.json`` (config and
    history) and ``checkpoint.pt`` (everything needed to resume)."""

    def __init__(self, draft, data, config: DistillConfig, output_dir: str | Path, *,
                 heldout: Sequence[Item] = (), save_dtype: torch.dtype | None = torch.float16):
        self.draft, self.data, self.config = draft, data, config
        self.output_dir, self.heldout, self.save_dtype = Path(output_dir), list(heldout), save_dtype
        self.device = next(draft.parameters()).device
        self.params = trainable_parameters(draft)
        if not self.params:
            raise ValueError("draft: no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, config.lr_factor)
        self.step, self.history, self.seconds = 0, [], 0.0
        ids = self.vocab_ids = draft_vocab_ids(draft)
        self._columns = None  # full id -> draft column, for compact teacher records (built on first use)
        width = draft.get_input_embeddings().weight.shape[0]
        # full id -> index in the draft's vocabulary (-1 outside it), for cross-entropy labels
        self.to_draft_index = torch.arange(width, device=self.device)
        if ids is not None:
            self.to_draft_index = torch.full((width,), -1, dtype=torch.long, device=self.device)
            self.to_draft_index[ids] = torch.arange(len(ids), device=self.device)

    # ------------------------------------------------------------------ losses

    def _logits(self, items: Sequence[Item]) -> torch.Tensor:
        with subset_logits(self.draft):
            return self.draft.get_output_embeddings()(hidden_at(self.draft, [i.example for i in items], self.device))

    def _labels(self, items: Sequence[Item]) -> torch.Tensor:
        tokens = torch.cat([i.example.tokens[i.example.start:] for i in items]).to(self.device)
        return self.to_draft_index[tokens]

    def _teacher(self, items: Sequence[Item]) -> torch.Tensor:
        """The items' teacher log-probabilities over the draft's vocabulary, float32 ``[N, V_draft]``."""
        compact = next((i.teacher for i in items if isinstance(i.teacher, TopKLogProbs)), None)
        if compact is not None and self.vocab_ids is not None and self._columns is None:  # once per run
            self._columns = column_index(self.vocab_ids, compact.vocab)
        return torch.cat([dense_teacher(i.teacher, self.vocab_ids, self._columns) for i in items]).to(
            self.device, torch.float32)

    def loss(self, items: Sequence[Item]) -> torch.Tensor:
        logits = self._logits(items)
        c = self.config
        if not c.needs_teacher:
            return cross_entropy(logits, self._labels(items))
        teacher = self._teacher(items)
        return divergence(logits, teacher, c.objective, beta=c.beta, temperature=c.temperature)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out divergence (the configured one; forward KL for ``ce``), acceptance Σ min(p, q)
        at the training temperature, and top-1 agreement with the next token (the target's own
        greedy token when the held-out continuations are the target's greedy output)."""
        if not self.heldout:
            return {}
        was_training = self.draft.training
        self.draft.eval()
        kind = "fkl" if self.config.objective == "ce" else self.config.objective
        totals, count = {"divergence": 0.0, "acceptance": 0.0, "top1": 0.0}, 0
        for first in range(0, len(self.heldout), self.config.batch_size):
            items = self.heldout[first:first + self.config.batch_size]
            logits = self._logits(items)
            teacher = self._teacher(items)
            n = len(logits)
            t = self.config.temperature
            totals["divergence"] += n * float(divergence(logits, teacher, kind, beta=self.config.beta, temperature=t))
            totals["acceptance"] += n * float(acceptance_rate(logits, teacher, temperature=t))
            totals["top1"] += float((logits.argmax(-1) == self._labels(items)).sum())
            count += n
        self.draft.train(was_training)
        return {k: v / count for k, v in totals.items()}

    # ------------------------------------------------------------------ loop

    def train(self, progress: bool = True, until: int | None = None) -> list[dict]:
        """Train to ``config.steps`` (or stop after step ``until``, checkpointed, to go on later
        with :meth:`resume`); the draft is saved to ``output_dir/draft`` when the run completes."""
        from tqdm.auto import tqdm

        c = self.config
        self.draft.train()
        bar = tqdm(total=c.steps, initial=self.step, desc=f"distilling ({c.objective})", unit="step",
                   disable=not progress)
        if self.step == 0 and self.heldout:
            self._log({"step": 0, **self.evaluate()}, bar)
        stop = c.steps if until is None else min(until, c.steps)
        while self.step < stop:
            start = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(c.grad_accum):
                loss = self.loss(self.data.take(c.batch_size)) / c.grad_accum
                loss.backward()
                total += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            self.seconds += time.perf_counter() - start
            record = {"step": self.step, "loss": total, "lr": self.scheduler.get_last_lr()[0], "seconds": self.seconds}
            if self.step % c.eval_every == 0 or self.step == c.steps:
                record.update(self.evaluate())
            self._log(record, bar)
            if self.step % c.checkpoint_every == 0 or self.step in (c.steps, stop):
                self.save_checkpoint()
        bar.close()
        if self.step == c.steps:
            save_draft(self.draft, self.output_dir / "draft", dtype=self.save_dtype)
        return self.history

    def _log(self, record: dict, bar) -> None:
        self.history.append(record)
        shown = {k: f"{v:.3f}" for k, v in record.items() if k in ("loss", "acceptance", "top1")}
        bar.set_postfix(shown, refresh=False)
        bar.update(record["step"] - bar.n)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint.pt`` and ``training.json`` atomically (temporary name, then rename)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step, "seconds": self.seconds, "history": self.history,
            "config": dataclasses.asdict(self.config),
            "params": [p.detach().cpu() for p in self.params],
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "data": self.data.state_dict() if hasattr(self.data, "state_dict") else None,
            "rng": torch.get_rng_state(),
        }
        path = self.output_dir / CHECKPOINT
        torch.save(state, path.with_suffix(".partial"))
        path.with_suffix(".partial").replace(path)
        info = {"config": dataclasses.asdict(self.config), "history": self.history}
        (self.output_dir / HISTORY).write_text(json.dumps(info, indent=1))
        return path

    def resume(self) -> bool:
        """Load ``checkpoint.pt`` from ``output_dir`` if there is one; True if it did. The config
        must match except for ``steps`` (a finished run can be extended)."""
        path = self.output_dir / CHECKPOINT
        if not path.is_file():
            return False
        state = torch.load(path, weights_only=False)
        saved = dict(state["config"], steps=self.config.steps)
        if saved != dataclasses.asdict(self.config):
            changed = sorted(k for k, v in saved.items() if dataclasses.asdict(self.config)[k] != v)
            raise ValueError(f"resume: {path} was written with a different config ({', '.join(changed)})")
        if len(state["params"]) != len(self.params):
            raise ValueError(f"resume: {path} holds {len(state['params'])} tensors, the draft has {len(self.params)}")
        with torch.no_grad():
            for p, saved_p in zip(self.params, state["params"]):
                p.copy_(saved_p)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["data"] is not None and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"])
        self.step, self.seconds, self.history = state["step"], state["seconds"], state["history"]
        return True
