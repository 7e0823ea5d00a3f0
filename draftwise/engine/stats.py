"""SpecStats: what a speculative generation did, per call and per draft."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class SpecStats:
    """Counters of verification steps (the prefill that emits the first token is not a step).

    ``alpha`` (acceptance rate) = accepted / drafted; ``tau`` (block efficiency) = tokens emitted
    per row per target call; ``analytic_alpha`` = mean of sum_v min(p, q) over drafted positions,
    when it was measured. Times are seconds of wall clock.
    """

    target_calls: int = 0  # verification forwards of the target
    row_steps: int = 0  # rows verified, summed over steps
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0  # tokens emitted by verification steps
    new_tokens: int = 0  # every generated token, the prefill's first one included
    drafted_at: list[int] = dataclasses.field(default_factory=list)  # per draft position, chain steps only
    accepted_at: list[int] = dataclasses.field(default_factory=list)
    accept_prob_sum: float = 0.0
    accept_prob_count: int = 0
    time_draft: float = 0.0
    time_target: float = 0.0
    time_verify: float = 0.0
    time_total: float = 0.0
    gammas: list[int] = dataclasses.field(default_factory=list)  # draft length of every step
    tree_steps: int = 0  # steps that verified a token tree (``tree_budget``)
    tree_nodes: int = 0  # drafted nodes those steps verified, summed over rows
    # every step's StepTrace (per row: drafter, drafted, accepted, emitted); in the total only
    trace: list = dataclasses.field(default_factory=list, repr=False)
    per_draft: dict[str, "SpecStats"] = dataclasses.field(default_factory=dict)

    COUNTERS = ("target_calls", "row_steps", "drafted", "accepted", "emitted", "new_tokens", "accept_prob_sum",
                "accept_prob_count", "time_draft", "time_target", "time_verify", "time_total", "tree_steps",
                "tree_nodes")

    @classmethod
    def total(cls, parts) -> "SpecStats":
        """Several generations' statistics summed: their α, τ and times are the pooled ones
        (accepted over drafted, tokens over row steps), not an average of ratios."""
        out = cls()
        for part in parts:
            for name in cls.COUNTERS:
                setattr(out, name, getattr(out, name) + getattr(part, name))
            out._grow(len(part.drafted_at))
            for i, (drafted, accepted) in enumerate(zip(part.drafted_at, part.accepted_at)):
                out.drafted_at[i] += drafted
                out.accepted_at[i] += accepted
        return out

    @property
    def alpha(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tau(self) -> float:
        return self.emitted / self.row_steps if self.row_steps else float("nan")

    @property
    def analytic_alpha(self) -> float:
        return self.accept_prob_sum / self.accept_prob_count if self.accept_prob_count else float("nan")

    @property
    def acceptance_per_position(self) -> list[float]:
        return [a / d if d else float("nan") for a, d in zip(self.accepted_at, self.drafted_at)]

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.time_total if self.time_total else float("nan")

    @property
    def time_other(self) -> float:
        return max(0.0, self.time_total - self.time_draft - self.time_target - self.time_verify)

    def record_step(self, width: int, drafted: list[int], accepted: list[int], emitted: list[int],
                    accept_prob_sum: float | None = None, accept_prob_count: int = 0) -> None:
        """Count one verification step of ``width`` draft columns from its per-row host values:
        the tokens each row drafted (a prefix of the columns), accepted and emitted, and the sum
        and count of the drafted positions' acceptance probabilities when they were measured."""
        self._grow(width)
        for count, at in ((drafted, self.drafted_at), (accepted, self.accepted_at)):
            for n in count:
                for i in range(n):
                    at[i] += 1
        self.drafted += sum(drafted)
        self.accepted += sum(accepted)
        self.emitted += sum(emitted)
        if accept_prob_sum is not None:
            self.accept_prob_sum += accept_prob_sum
            self.accept_prob_count += accept_prob_count
        self.target_calls += 1
        self.row_steps += len(drafted)
        self.gammas.append(width)

    def record_tree_step(self, drafted: list[int], accepted: list[int], emitted: list[int]) -> None:
        """Count one token-tree step: per row, the drafted nodes, the accepted depth and the
        emitted tokens (``alpha`` is then accepted nodes over verified nodes)."""
        self.tree_steps += 1
        self.tree_nodes += sum(drafted)
        self.drafted += sum(drafted)
        self.accepted += sum(accepted)
        self.emitted += sum(emitted)
        self.target_calls += 1
        self.row_steps += len(drafted)
        self.gammas.append(max(drafted, default=0))

    def _grow(self, size: int) -> None:
        while len(self.drafted_at) < size:
            self.drafted_at.append(0)
            self.accepted_at.append(0)

    def as_dict(self) -> dict:
        """Every counter and derived figure, JSON-ready."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("per_draft", "trace")}
        out["trace"] = [dataclasses.asdict(step) for step in self.trace]
        out.update(alpha=self.alpha, tau=self.tau, analytic_alpha=self.analytic_alpha,
                   acceptance_per_position=self.acceptance_per_position,
                   tokens_per_second=self.tokens_per_second, time_other=self.time_other)
        out["per_draft"] = {name: stats.as_dict() for name, stats in self.per_draft.items()}
        return out

    def summary(self) -> str:
        return (f"alpha {self.alpha:.3f}  tau {self.tau:.2f}  {self.tokens_per_second:.1f} tok/s  "
                f"(draft {self.time_draft:.2f}s, target {self.time_target:.2f}s, verify {self.time_verify:.3f}s, "
                f"other {self.time_other:.2f}s)")
