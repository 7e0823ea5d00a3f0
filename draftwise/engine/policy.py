"""Who drafts each row's next step, and how many tokens.

Before every verification step the decoder asks its :class:`DraftPolicy` for a
:class:`StepChoice`: for each row of the batch, the index of the drafter that drafts it, or
``NO_DRAFT`` (the row decodes with the target alone this step), and the row's draft length γ.
Rows of one batch may use different drafters in the same step; one target forward verifies them
all. After the step the policy observes a :class:`StepTrace` (per row: drafter, drafted,
accepted, emitted; per drafter: its time; the target's time and width).

:class:`AdaptivePolicy` is the default. It keeps, per row and drafter, a running acceptance
rate, and, for the batch, a :class:`CostModel` of measured times; each step every row takes the
arm with the best expected tokens per second, where not drafting is an arm too. A row that has
stopped drafting tries its best drafter again after a pause that doubles each time the try
loses, so a change in the text is noticed. Only the choice of drafts follows the measurements;
the output does not depend on them.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

NO_DRAFT = -1  # the arm "decode with the target alone"
DEFAULT_GAMMA = 3  # the draft length a generate() call starts from, unless it sets num_assistant_tokens
MAX_GAMMA = 12  # no row drafts more in one step, unless the call fixes a longer γ
SCHEDULES = ("constant", "heuristic", "adaptive")


@dataclasses.dataclass
class StepChoice:
    """One step's plan, per row of the batch as it is now."""

    drafter: list[int]  # index into the drafters, or NO_DRAFT
    gamma: list[int]  # draft length (0 with NO_DRAFT)


@dataclasses.dataclass
class StepTrace:
    """What one verification step did. Per-row lists follow the batch's current rows; ``rows``
    holds their positions in the original batch."""

    rows: list[int]
    drafter: list[int]
    drafted: list[int]
    accepted: list[int]
    emitted: list[int]
    draft_seconds: dict[int, float]  # drafter index -> seconds spent drafting its rows
    target_seconds: float  # the verification forward
    width: int  # tokens per row in that forward (1 + the longest draft)


@dataclasses.dataclass
class PolicyContext:
    """What a policy may read before the first step: the prompts (``tokens[b, starts[b]:width]``)
    and, when the policy asks for it (``wants_hidden``), the mean over each prompt of the target's
    last hidden state, from the prefill the engine runs anyway."""

    tokens: torch.Tensor  # [B, >= width] the committed tokens (left-padded prompts first)
    starts: torch.Tensor  # [B] where each prompt starts (its left padding before)
    width: int  # the padded prompt width
    hidden: Optional[torch.Tensor] = None  # [B, H] float32
    with_model: tuple = ()  # per drafter: whether it runs a model (drafting costs forwards)
    scorable: tuple = ()  # per drafter: whether it can be scored without drafting (a model's catch-up read)

    def prompt_ids(self) -> list[list[int]]:
        starts = self.starts.tolist()
        rows = self.tokens[:, : self.width].tolist()
        return [row[start:] for row, start in zip(rows, starts)]


class CostModel:
    """Measured costs: the target's time per call as a line in the number of drafted tokens it
    verifies, and each drafter's time per drafted token (running averages).

    Until two widths are measured, each verified draft token is assumed to add ``PRIOR_SLOPE`` of
    a plain decode step."""

    PRIOR_SLOPE = 0.1
    DECAY = 0.8  # weight of the old value in a running average

    def __init__(self):
        self.target: dict[int, float] = {}  # drafted tokens per row -> seconds per call
        self.draft: dict[int, float] = {}  # drafter -> seconds per drafted token
        self.scoring: dict[int, float] = {}  # drafter -> seconds per forward while it only scored rows

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else self.DECAY * old + (1 - self.DECAY) * new

    def observe(self, trace: StepTrace) -> None:
        gamma = trace.width - 1
        self.target[gamma] = self._average(self.target.get(gamma), trace.target_seconds)
        for index, seconds in trace.draft_seconds.items():
            tokens = max((d for d, i in zip(trace.drafted, trace.drafter) if i == index), default=0)
            if tokens:
                self.draft[index] = self._average(self.draft.get(index), seconds / tokens)

    @property
    def measured(self) -> bool:
        return bool(self.target)

    def target_time(self, gamma: int) -> float:
        """The fitted time of one target call verifying ``gamma`` drafted tokens per row."""
        points = list(self.target.items())
        if len(points) >= 2:
            n = len(points)
            mean_g = sum(g for g, _ in points) / n
            mean_t = sum(t for _, t in points) / n
            spread = sum((g - mean_g) ** 2 for g, _ in points)
            slope = max(0.0, sum((g - mean_g) * (t - mean_t) for g, t in points) / spread)
            return max(1e-9, mean_t + slope * (gamma - mean_g))
        g0, t0 = points[0]
        step = t0 / (1 + self.PRIOR_SLOPE * g0)
        return step * (1 + self.PRIOR_SLOPE * gamma)

    def observe_scoring(self, drafter: int, seconds_per_token: float) -> None:
        self.scoring[drafter] = self._average(self.scoring.get(drafter), seconds_per_token)

    def draft_time(self, drafter: int) -> float:
        """Measured while drafting; until then, while scoring (a forward per drafted token)."""
        return self.draft.get(drafter, self.scoring.get(drafter, 0.0))


def expected_tokens(alpha: float, gamma: int) -> float:
    """Tokens emitted by a step that drafts ``gamma`` with per-token acceptance ``alpha``."""
    a = min(alpha, 0.999)
    return (1 - a ** (gamma + 1)) / (1 - a)


class DraftPolicy:
    """The seam: subclasses decide, each step, every row's drafter and γ.

    ``wants_hidden``: the engine computes :attr:`PolicyContext.hidden` for :meth:`start`.
    ``full_information``: after each step the engine also reports, through
    :meth:`observe_shadow`, what drafters that did not draft a row would have had accepted there.
    ``scores_idle_models``: with full information, idle draft models are scored too (a catch-up
    read every ``SCORE_EVERY`` steps, which costs a draft forward); without it only the drafters
    without a model are (prompt lookup: a search, no forward). Any policy may ask for more such
    reads through :meth:`models_to_score`.
    ``uses_times``: the policy learns from the measured times in each :class:`StepTrace` (else the
    engine times a step only when statistics are asked for).
    """

    wants_hidden = False
    full_information = False
    scores_idle_models = True
    uses_times = True
    SCORE_EVERY = 4  # steps between the catch-up reads of idle draft models, with full information

    def start(self, num_drafters: int, batch: int, context: PolicyContext | None = None) -> None:
        self.num_drafters, self.batch = num_drafters, batch
        self.steps_seen = 0

    def choose(self) -> StepChoice:
        raise NotImplementedError

    def observe(self, trace: StepTrace) -> None:
        pass

    def observe_shadow(self, drafter: int, drafted: Sequence[int], accepted: Sequence[int],
                       seconds_per_token: float | None = None) -> None:
        """Per row of the batch: of ``drafted`` tokens that ``drafter`` proposed or predicted
        without drafting the row, ``accepted`` would have been accepted (``drafted`` < 0: the row
        took that drafter this step and is counted by :meth:`observe`)."""

    def models_to_score(self, idle: Sequence[int]) -> list[int]:
        """Asked after each chain step: of the draft models that drafted no row (``idle``), those
        that read the committed tokens they have not seen now (as they must before they draft
        again) and are scored on them through :meth:`observe_shadow`. With full information and
        ``scores_idle_models``: one in turn every ``SCORE_EVERY`` steps."""
        self.steps_seen = getattr(self, "steps_seen", 0) + 1
        if not (self.full_information and self.scores_idle_models) or not idle or self.steps_seen % self.SCORE_EVERY:
            return []
        return [idle[(self.steps_seen // self.SCORE_EVERY) % len(idle)]]

    def observe_tree(self, drafted: Sequence[int], accepted: Sequence[int]) -> None:
        """After a token-tree step that the policy's choice let run (``tree_budget="auto"``: one
        drafter, every row drafted): per row, the nodes drafted and the depth accepted."""

    def select_rows(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (positions in the current batch), in that order."""

    def check_pool(self, names: Sequence[str], target=None) -> None:
        """Raise ``ValueError`` if this policy cannot choose among drafters of these names (for
        this target, when given)."""


class FixedPolicy(DraftPolicy):
    """Every row, every step: drafter ``arm`` (``NO_DRAFT`` for the target alone) with a fixed γ."""

    uses_times = False

    def __init__(self, arm: int, gamma: int = 4):
        if arm != NO_DRAFT and arm < 0:
            raise ValueError(f"arm: expected a drafter index >= 0 or NO_DRAFT ({NO_DRAFT}), got {arm}")
        if gamma < 1:
            raise ValueError(f"gamma: expected a positive int, got {gamma}")
        self.arm, self.fixed_gamma = arm, gamma

    def start(self, num_drafters: int, batch: int, context: PolicyContext | None = None) -> None:
        if self.arm >= num_drafters:
            raise ValueError(f"arm: drafter {self.arm} asked for, but there are {num_drafters} drafters")
        super().start(num_drafters, batch, context)

    def choose(self) -> StepChoice:
        gamma = 0 if self.arm == NO_DRAFT else self.fixed_gamma
        return StepChoice([self.arm] * self.batch, [gamma] * self.batch)

    def select_rows(self, rows: Sequence[int]) -> None:
        self.batch = len(rows)


@dataclasses.dataclass
class _RowArm:
    """What one row knows about one drafter: its γ, and decayed counts of drafted and accepted
    tokens. The acceptance estimate is their ratio under a weak prior (half an accepted and half
    a rejected pseudo-token, Jeffreys'), so that one unlucky step does not switch a drafter off,
    while a drafter that keeps failing is estimated near its true rate."""

    gamma: int
    drafted: float = 0.0
    accepted: float = 0.0
    offered: float = 0.0  # steps the drafter was asked to draft the row (counted for drafters without a model)
    proposed: float = 0.0  # of those, steps it proposed anything (prompt lookup needs a match)

    DECAY = 0.9  # weight of the older counts at each new step (about the last 10 steps count)

    @property
    def alpha(self) -> float | None:
        """The estimated acceptance rate; None before the row has drafted with this drafter."""
        return None if self.drafted == 0 else (self.accepted + 0.5) / (self.drafted + 1)

    @property
    def proposal_rate(self) -> float:
        """How often the drafter proposes anything when asked (a weak prior of always)."""
        return (self.proposed + 1) / (self.offered + 1)

    def count(self, drafted: int, accepted: int) -> None:
        self.drafted = self.DECAY * self.drafted + drafted
        self.accepted = self.DECAY * self.accepted + accepted

    def offer(self, proposed: bool) -> None:
        self.offered = self.DECAY * self.offered + 1
        self.proposed = self.DECAY * self.proposed + proposed


@dataclasses.dataclass
class _Row:
    arms: list[_RowArm]
    undrafted_steps: int = 0  # steps since the row last drafted
    pause: int = 4  # steps without drafts before the next look (a try, or a score of a draft model)
    trying: bool = False  # this step is a try after a pause
    wants_score: Optional[int] = None  # the draft model this step's look scores instead of a try
    allowed: Optional[list[int]] = None  # the drafters the row may use (None: all)
    prior: int = NO_DRAFT  # the drafter a selector chose for the row before the first step


class AdaptivePolicy(DraftPolicy):
    """The default policy: per row, the arm (a drafter at its γ, or no draft) with the best
    expected tokens per second, from the row's own acceptance (decayed counts with a weak prior)
    and the measured costs. A row that has stopped drafting looks again after a pause that
    doubles each time the look still says no: a draft model is scored on the tokens it missed
    (its catch-up read, owed before it drafts again anyway; no draft, no wider target call); a
    drafter without a model is tried.

    ``schedule`` sets how γ moves per row and drafter: "adaptive" (towards the γ in [1, maximum]
    that maximises the expected rate, one step at a time; not drafting is allowed), "heuristic"
    (Hugging Face's: +2 after a step where the row accepted everything, else -1) or "constant"
    (``initial`` always). With "heuristic" and "constant" a row always drafts (the call fixed the
    draft length); the drafter is still chosen by rate when there are several. ``no_draft=False``
    keeps every row drafting with the adaptive schedule too.
    """

    FIRST_PAUSE, LONGEST_PAUSE = 4, 64  # steps a row waits before it looks at drafting again
    retries = True  # a row that stopped drafting looks again after a pause (without other evidence)

    def __init__(self, schedule: str = "adaptive", initial: int = 4, maximum: int = MAX_GAMMA, no_draft: bool = True):
        if schedule not in SCHEDULES:
            raise ValueError(f"num_assistant_tokens_schedule: expected one of {', '.join(map(repr, SCHEDULES))}, "
                             f"got {schedule!r}")
        if not 1 <= initial <= maximum:
            raise ValueError(f"num_assistant_tokens: expected 1 <= value <= {maximum}, got {initial}")
        self.schedule, self.initial, self.maximum = schedule, initial, maximum
        self.no_draft = no_draft and schedule == "adaptive"
        self.costs = CostModel()

    def start(self, num_drafters: int, batch: int, context: PolicyContext | None = None) -> None:
        super().start(num_drafters, batch, context)
        self.with_model = tuple(context.with_model) if context is not None and context.with_model else ()
        self.scorable = tuple(context.scorable) if context is not None and context.scorable else ()
        self.rows = [_Row([_RowArm(self.initial) for _ in range(num_drafters)]) for _ in range(batch)]
        self.plan_idle, self.plan_pause, self.plan_trying = 0, self.FIRST_PAUSE, False  # batch planning

    # ------------------------------------------------------------------ choosing

    def choose(self) -> StepChoice:
        if self._plans_the_batch():
            return self._plan_batch()
        arms = [self._choose_row(row) if self.num_drafters else NO_DRAFT for row in self.rows]
        arms = self._one_model_per_step(arms)
        gammas = [0 if a == NO_DRAFT else row.arms[a].gamma for row, a in zip(self.rows, arms)]
        if self._first_batch_step and self.schedule == "adaptive":
            # a batch's first step verifies batch x (γ + 1) tokens before any cost is known: one
            # drafted token per row is the cheapest evidence (a wide call can cost several steps)
            gammas = [min(g, 1) for g in gammas]
        return StepChoice(arms, gammas)

    # ------------------------------------------------------------------ batches

    @property
    def _first_batch_step(self) -> bool:
        """A batch's step before any cost is measured (how wide a call may be is not known yet)."""
        return self.batch > 1 and not self.costs.measured

    plan_batches = True  # with several rows, plan each step for the batch (below); False: row by row

    def _plans_the_batch(self) -> bool:
        """Batch planning starts once a step's cost is measured (the first step, where rows take
        their first arms, is chosen row by row)."""
        return bool(self.plan_batches and self.batch > 1 and self.no_draft and self.num_drafters
                    and self.costs.measured)

    def _plan_batch(self) -> StepChoice:
        """One target forward verifies every row at the width of the longest draft, and a draft
        model drafts every row whichever rows take it; so at batch > 1 a row's own rate is the
        wrong question. The step is planned for the batch: at most one draft model and one draft
        length γ, every row taking its best arm among that model and the drafters without a model
        (a row with none of them rides on the step's model: its drafts cost nothing more), chosen
        to maximise the batch's expected tokens per second, with not drafting at all a plan too.
        When that plan has won for a while, the best drafting plan is tried again (the text may
        have changed), after a pause that doubles each time the try loses. An arm a row has no
        estimate for counts as no gain (the row still takes it when it has nothing better: it
        rides at no cost and learns); γ grows at most one past the widest call measured, so
        the cost of a wider call is never a guess far from the evidence."""
        widest = min(self.maximum, max(self.costs.target) + 1)
        plans = [self._plan(model, gamma) for model in self._plan_models() for gamma in range(1, widest + 1)]
        plans = [p for p in plans if p is not None]
        idle_rate = self.batch / self.costs.target_time(0)
        best = max(plans, key=lambda p: p[0], default=None)
        self.plan_trying = False
        if best is not None and best[0] > idle_rate:
            self.plan_pause = self.FIRST_PAUSE
        elif best is not None and self.retries and self.plan_idle >= self.plan_pause:
            self.plan_trying = True
            self.plan_pause = min(self.LONGEST_PAUSE, 2 * self.plan_pause)
        else:
            self.plan_idle += 1
            return StepChoice([NO_DRAFT] * self.batch, [0] * self.batch)
        self.plan_idle = 0
        _, arms, gamma = best
        return StepChoice(arms, [0 if a == NO_DRAFT else gamma for a in arms])

    def _plan_models(self) -> list[int | None]:
        """The draft models some row may take, and None (drafters without a model only)."""
        usable = {i for row in self.rows for i in self._candidates(row)}
        return [None] + sorted(i for i in usable if self._runs_model(i))

    def _plan(self, model: int | None, gamma: int):
        """``(expected tokens per second, arm per row, γ)`` of the step where ``model`` (None: no
        model) and the drafters without a model draft ``gamma`` tokens; None if no row drafts."""
        free = [i for i in range(self.num_drafters) if not self._runs_model(i)]
        arms, tokens = [], 0.0
        for row in self.rows:
            options = [i for i in self._candidates(row) if i == model or i in free]
            expected = {i: self._expected_emitted(row.arms[i], gamma) for i in options}
            arm = max(expected, key=expected.get) if expected else NO_DRAFT
            tokens += expected[arm] if expected else 1.0
            arms.append(arm)
        used = {a for a in arms if a != NO_DRAFT}
        if not used or (model is not None and model not in used):
            return None
        if model is not None:  # riders: rows with no arm of their own take the model's drafts
            arms = [model if a == NO_DRAFT else a for a in arms]
        seconds = self.costs.target_time(gamma) + gamma * sum(self.costs.draft_time(a) for a in used)
        return tokens / seconds, arms, gamma

    def _expected_emitted(self, state: _RowArm, gamma: int) -> float:
        """Tokens a row expects from a step on an arm at ``gamma``: a step where the drafter
        proposes nothing still emits one; an arm without an estimate counts as no gain."""
        alpha = self._alpha(state)
        if alpha is None:
            return 1.0
        return 1 + state.proposal_rate * (expected_tokens(alpha, gamma) - 1)

    def _one_model_per_step(self, arms: list[int]) -> list[int]:
        """A draft model drafts every row of the batch whichever rows take it, so a second one in
        the same step doubles the drafting: rows that chose another model than the most chosen
        one take their best arm without it (that model, a model-free drafter, or no draft).
        A batch's first step also reads every row's prompt into the model: a model fewer than
        half the rows chose does not run then."""
        models = [a for a in arms if a != NO_DRAFT and self.with_model and self.with_model[a]]
        if not models:
            return arms
        keep = max(set(models), key=models.count)
        if self._first_batch_step and 2 * models.count(keep) < len(arms):
            keep = None
        elif len(set(models)) == 1:
            return arms
        allowed = [i for i in range(self.num_drafters) if i == keep or not self.with_model[i]]
        out = []
        for row, arm in zip(self.rows, arms):
            if arm in allowed or arm == NO_DRAFT:
                out.append(arm)
                continue
            candidates = self._candidates(row)
            rates = {i: self.rate(i, self._alpha(row.arms[i]), row.arms[i].gamma) for i in allowed if i in candidates}
            best = max(rates, key=rates.get, default=NO_DRAFT)
            out.append(best if best != NO_DRAFT and rates[best] > self.rate(NO_DRAFT) else NO_DRAFT)
        return out

    def _alpha(self, state: _RowArm) -> float | None:
        """The acceptance estimate a choice uses."""
        return state.alpha

    def _candidates(self, row: _Row) -> list[int]:
        """The drafters the row may take this step."""
        return list(range(len(row.arms))) if row.allowed is None else row.allowed

    def _choose_row(self, row: _Row) -> int:
        row.wants_score = None
        candidates = self._candidates(row)
        if not candidates:
            return NO_DRAFT
        untried = [i for i in candidates if row.arms[i].alpha is None]
        if untried:
            return untried[0]
        best = max(candidates, key=lambda i: self.rate(i, self._alpha(row.arms[i]), row.arms[i].gamma))
        row.trying = False
        if not self.no_draft or not self.costs.measured:
            return best
        if self.rate(best, self._alpha(row.arms[best]), row.arms[best].gamma) > self.rate(NO_DRAFT):
            return best
        if self.retries and row.undrafted_steps >= row.pause:  # the text may have changed: look again
            if self.scorable and self.scorable[best]:
                row.wants_score = best
                return NO_DRAFT
            row.trying = True
            return best
        return NO_DRAFT

    def rate(self, arm: int, alpha: float | None = None, gamma: int = 0) -> float:
        """Expected tokens per second of one row on ``arm`` (``NO_DRAFT``: one token per plain
        decode step)."""
        if arm == NO_DRAFT:
            return 1.0 / self.costs.target_time(0) if self.costs.measured else 0.0
        if alpha is None or not self.costs.measured:
            return float("inf")  # not measured yet: worth trying
        return expected_tokens(alpha, gamma) / (gamma * self.costs.draft_time(arm) + self.costs.target_time(gamma))

    # ------------------------------------------------------------------ learning

    def observe(self, trace: StepTrace) -> None:
        self.costs.observe(trace)
        for row, arm, drafted, accepted in zip(self.rows, trace.drafter, trace.drafted, trace.accepted):
            if arm == NO_DRAFT:
                row.undrafted_steps += 1
                continue
            if not self._runs_model(arm):
                row.arms[arm].offer(drafted > 0)
            if drafted:
                self._learn(row.arms[arm], arm, drafted, accepted)
            self._after_drafting(row, arm)

    def observe_shadow(self, drafter: int, drafted: Sequence[int], accepted: Sequence[int],
                       seconds_per_token: float | None = None) -> None:
        if seconds_per_token is not None:
            self.costs.observe_scoring(drafter, seconds_per_token)
        for row, d, a in zip(self.rows, drafted, accepted):
            if d >= 0 and not self._runs_model(drafter):
                row.arms[drafter].offer(d > 0)
            if d > 0:
                self._learn(row.arms[drafter], drafter, d, a)
            if row.wants_score == drafter:
                self._after_look(row, drafter)

    def models_to_score(self, idle: Sequence[int]) -> list[int]:
        wanted = super().models_to_score(idle)
        asked = {row.wants_score for row in self.rows} & set(idle)
        return wanted + sorted(asked - set(wanted))

    def observe_tree(self, drafted: Sequence[int], accepted: Sequence[int]) -> None:
        """Each row's accepted path counts as a chain that drafted one token past it (the drafter
        of a tree chosen automatically is drafter 0, the only one)."""
        for row, nodes, depth in zip(self.rows, drafted, accepted):
            if nodes:
                self._learn(row.arms[0], 0, min(nodes, depth + 1), depth)
            self._after_drafting(row, 0)

    def _runs_model(self, drafter: int) -> bool:
        return bool(self.with_model and self.with_model[drafter])

    def _learn(self, state: _RowArm, arm: int, drafted: int, accepted: int) -> None:
        state.count(drafted, accepted)
        if self.schedule == "heuristic":
            state.gamma = min(self.maximum, state.gamma + 2) if accepted == drafted else max(1, state.gamma - 1)
        elif self.schedule == "adaptive":
            best = max(range(1, self.maximum + 1), key=lambda g: self.rate(arm, state.alpha, g))
            state.gamma += (best > state.gamma) - (best < state.gamma)

    def _after_drafting(self, row: _Row, arm: int) -> None:
        """A try that still loses doubles the next pause; a winning arm resets it."""
        if row.trying:
            self._after_look(row, arm)
        else:
            row.pause = self.FIRST_PAUSE
            row.undrafted_steps = 0

    def _after_look(self, row: _Row, arm: int) -> None:
        """After a try or a score: the next pause doubles if drafting still loses, else resets."""
        state = row.arms[arm]
        loses = self.rate(arm, state.alpha, state.gamma) <= self.rate(NO_DRAFT)
        row.pause = min(self.LONGEST_PAUSE, 2 * row.pause) if loses else self.FIRST_PAUSE
        row.undrafted_steps = 0
        row.trying, row.wants_score = False, None

    def select_rows(self, rows: Sequence[int]) -> None:
        self.rows = [self.rows[i] for i in rows]
        self.batch = len(self.rows)


AUTO_TREE_BUDGET = 4  # drafted nodes of a tree step when trees are chosen automatically (tree_budget="auto")


@dataclasses.dataclass
class StepShapes:
    """Chain steps or token-tree steps (``tree_budget="auto"``), from the measured tokens per
    second of each: the faster shape runs; the other is tried again after a pause that doubles
    each time it still loses (and resets when it wins). Rates are running averages over the
    steps each shape ran: tokens emitted by the batch over the step's draft, target and verify
    time. Both shapes are exact, so the choice changes only the speed."""

    first_tree_after: int = 2  # chain steps before the first tree step
    smoothing: float = 0.3
    FIRST_PAUSE, LONGEST_PAUSE = 4, 64

    def __post_init__(self):
        self.rate: dict[bool, float] = {}  # tree? -> tokens per second
        self.steps = 0
        self.pause = self.FIRST_PAUSE
        self.retry_at = self.first_tree_after
        self.trying = False

    @property
    def best(self) -> bool:
        return max(self.rate, key=self.rate.get) if self.rate else False

    def tree_next(self) -> bool:
        """Whether the next step drafts a token tree."""
        self.steps += 1
        self.trying = self.steps >= self.retry_at
        return (not self.best) if self.trying else self.best

    def observe(self, tree: bool, tokens: int, seconds: float) -> None:
        if seconds <= 0:
            return
        rate = tokens / seconds
        old = self.rate.get(tree)
        self.rate[tree] = rate if old is None else (1 - self.smoothing) * old + self.smoothing * rate
        if not self.trying:
            return
        self.trying = False
        self.pause = self.FIRST_PAUSE if self.best == tree else min(self.LONGEST_PAUSE, 2 * self.pause)
        self.retry_at = self.steps + self.pause
