"""Measuring generations side by side: wall time, new tokens and the pooled speculative statistics.

One home for what the demo (``draftwise demo``), the draft evaluation
(:mod:`draftwise.distill.evaluate`) and the benches measure: a :class:`Tally` per run sums the
seconds, the new tokens (padding excluded) and each call's ``SpecStats``; α and τ are pooled by
:meth:`SpecStats.total` (ratios of sums, not means of ratios). Repeats whose times spread more
than :data:`TIMING_SPREAD_LIMIT` were slowed by something else on the machine.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import torch

from draftwise.engine.stats import SpecStats

# On an idle 2-core CPU the demo's figures move by a few percent between runs; beside a test run
# on the other core its runs took ~40 s instead of ~2.5 s.
TIMING_SPREAD_LIMIT = 0.10


def timed(fn):
    """``(seconds, fn())``."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def warm_up(runs: dict, inputs, progress: bool = False) -> None:
    """One untimed call of every run (name -> ``run(inputs)``): thread pools, allocator, first-call
    set-up, compilation."""
    from tqdm.auto import tqdm

    for name, run in tqdm(runs.items(), desc="warm-up", unit="run", disable=not progress):
        run(inputs)


def sequences_of(out) -> torch.Tensor:
    """The token ids of a ``generate`` result (a tensor or an output with ``sequences``)."""
    return out.sequences if hasattr(out, "sequences") else out


def new_tokens(out, width: int, pad: int | None) -> int:
    """How many tokens ``out`` generated past the prompt's ``width`` over all rows, padding excluded."""
    new = sequences_of(out)[:, width:]
    return int((new != pad).sum()) if pad is not None else new.numel()


@dataclasses.dataclass
class Tally:
    """One run's totals over several calls: seconds, new tokens and the calls' ``SpecStats``."""

    seconds: float = 0.0
    tokens: int = 0
    stats: list = dataclasses.field(default_factory=list)

    def add(self, seconds: float, out, width: int, pad: int | None) -> None:
        self.seconds += seconds
        self.tokens += new_tokens(out, width, pad)
        if getattr(out, "spec_stats", None) is not None:
            self.stats.append(out.spec_stats)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")

    @property
    def pooled(self) -> SpecStats:
        """The calls' statistics summed (α, τ, times pooled over every call)."""
        return SpecStats.total(self.stats)


def relative_spread(seconds: Sequence[float]) -> float:
    """(slowest - fastest) / fastest of repeated timings of the same work (0 for one timing)."""
    if not seconds or min(seconds) <= 0:
        raise ValueError(f"seconds: expected positive timings, got {list(seconds)}")
    return (max(seconds) - min(seconds)) / min(seconds)


def unreliable_timings(repeats: dict[str, Sequence[float]], limit: float = TIMING_SPREAD_LIMIT) -> dict[str, float]:
    """The relative spread of each entry of ``repeats`` (name -> seconds of each repeat of the
    same work) whose spread exceeds ``limit``, in the order given."""
    spreads = {name: relative_spread(seconds) for name, seconds in repeats.items()}
    return {name: spread for name, spread in spreads.items() if spread > limit}
