"""Per-row sampling parameters, shared by the drafters (which sample) and the verifier."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from draftwise.kernels.reference import sanitize_logits, target_probs

from .processing import ScoreProcessing

# Odd 64-bit constant (the golden ratio): spreads a row's step counter over the seed's bits.
_STEP_MIX = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64


@dataclasses.dataclass
class Sampling:
    """Temperature (0 = greedy), top-k (0 = off), top-p (1 = off) and a seed for every row.

    The verifier's noise is Philox keyed by ``step_seeds``; the drafters draw from ``generator``,
    a separate stream, so drafter and verifier noise never coincide.
    """

    temperature: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64
    top_p: torch.Tensor  # [B] float32
    seeds: torch.Tensor  # [B] int64, one per request
    generator: torch.Generator
    all_greedy: bool  # known on the host once, so that greedy runs skip every distribution
    filtered: bool  # some row uses top-k or top-p (known once: no host sync per draft token)
    # Hugging Face processors applied to every position before sampling or verifying; with them
    # the processed scores already hold temperature, top-k and top-p, so those are neutral here.
    processing: Optional[ScoreProcessing] = None

    @classmethod
    def build(cls, batch: int, device, *, do_sample: bool, temperature: float, top_k: int | None,
              top_p: float | None, seed: int, processing: ScoreProcessing | None = None) -> Sampling:
        def rows(value, dtype):
            return torch.full((batch,), value, dtype=dtype, device=device)

        if processing is not None and do_sample and temperature != 0:
            temperature, top_k, top_p = 1.0, 0, 1.0

        generator = torch.Generator(device=device)
        generator.manual_seed(seed ^ 0x5DEECE66D)
        return cls(
            temperature=rows(temperature if do_sample else 0.0, torch.float32),
            top_k=rows(top_k or 0, torch.int64),
            top_p=rows(1.0 if top_p is None else top_p, torch.float32),
            seeds=torch.arange(batch, dtype=torch.int64, device=device) + seed,
            generator=generator,
            all_greedy=not do_sample or temperature == 0,
            filtered=bool(top_k) or (top_p is not None and top_p < 1),
            processing=processing,
        )

    @property
    def greedy_rows(self) -> torch.Tensor:
        return self.temperature == 0

    def step_seeds(self, produced: torch.Tensor) -> torch.Tensor:
        """The verifier's seed of each row for a step: the request seed mixed with how many tokens
        the row has produced, so that every step draws fresh noise (int64 arithmetic wraps)."""
        return self.seeds + produced * _STEP_MIX

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` logits -> the processed distribution each row samples from (float32)."""
        return target_probs(sanitize_logits(logits, torch.float32).unsqueeze(1), self.temperature,
                            self.top_k, self.top_p, filtered=self.filtered).squeeze(1)

    def draw(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One token per row from ``[B, V]`` logits: argmax for greedy rows, a sample of the
        processed distribution otherwise; returns ``(tokens [B], q [B, V] | None)``."""
        greedy = logits.argmax(-1)
        if self.all_greedy:
            return greedy, None
        q = self.probs(logits)
        sampled = torch.multinomial(q, 1, generator=self.generator).squeeze(1)
        return torch.where(self.greedy_rows, greedy, sampled), q

    def select_rows(self, rows: torch.Tensor) -> None:
        self.temperature, self.top_k = self.temperature[rows], self.top_k[rows]
        self.top_p, self.seeds = self.top_p[rows], self.seeds[rows]
        if self.processing is not None:
            self.processing.select_rows(rows)
