"""The speculative loop: draft -> verify -> accept -> commit, for a batch of rows.

Invariant between steps: every row's committed tokens are in the :class:`TokenBuffer`; the
target's KV cache holds all of them but the last (the one emitted by the previous step); a
drafter's cache holds some prefix of them and catches up when it next drafts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable, Optional, Sequence

import torch

from draftwise.kernels.spec import ChainInputs, LenienceKind, VerifyOutput

from .drafters import Draft
from .models import ModelRunner
from .sampling import Sampling
from .sequence import TokenBuffer
from .stats import SpecStats

VerifyImpl = Callable[[ChainInputs], VerifyOutput]


class GammaSchedule:
    """How many tokens to draft next.

    constant: always ``initial``. heuristic (Hugging Face's): +2 after a step where every row
    accepted everything, else -1. adaptive: the gamma in [1, maximum] that maximises the expected
    tokens per second, ``(1 - a**(g+1)) / (1 - a) / (g * t_draft + t_target(g))``, from running
    averages of the acceptance a and the draft time per token, and a line fitted through the
    target's measured time per call at each gamma used (until two gammas are measured, each
    verified token is assumed to add ``PRIOR_SLOPE`` of a call); it moves one step at a time
    towards that optimum.
    """

    PRIOR_SLOPE = 0.1  # extra target time per verified token, as a fraction of one decode step

    def __init__(self, kind: str = "adaptive", initial: int = 4, maximum: int = 12):
        if kind not in ("constant", "heuristic", "adaptive"):
            raise ValueError(f"num_assistant_tokens_schedule: expected 'constant', 'heuristic' or 'adaptive', got {kind!r}")
        if not 1 <= initial <= maximum:
            raise ValueError(f"num_assistant_tokens: expected 1 <= value <= {maximum}, got {initial}")
        self.kind, self.gamma, self.maximum = kind, initial, maximum
        self.alpha = self.time_draft = None  # running averages
        self.time_target: dict[int, float] = {}  # gamma -> running average of one target call

    def update(self, drafted: int, accepted: int, time_draft: float, time_target: float) -> None:
        if drafted == 0:
            return
        average = lambda old, new: new if old is None else 0.8 * old + 0.2 * new  # noqa: E731
        self.alpha = average(self.alpha, accepted / drafted)
        self.time_draft = average(self.time_draft, time_draft / drafted)
        self.time_target[self.gamma] = average(self.time_target.get(self.gamma), time_target)
        if self.kind == "heuristic":
            self.gamma = min(self.maximum, self.gamma + 2) if accepted == drafted else max(1, self.gamma - 1)
        elif self.kind == "adaptive":
            best = max(range(1, self.maximum + 1), key=self.expected_rate)
            self.gamma += (best > self.gamma) - (best < self.gamma)

    def target_time(self, gamma: int) -> float:
        """The fitted time of one target call that verifies ``gamma`` drafts."""
        points = list(self.time_target.items())
        if len(points) >= 2:
            n = len(points)
            mean_g = sum(g for g, _ in points) / n
            mean_t = sum(t for _, t in points) / n
            spread = sum((g - mean_g) ** 2 for g, _ in points)
            slope = max(0.0, sum((g - mean_g) * (t - mean_t) for g, t in points) / spread)
            return mean_t + slope * (gamma - mean_g)
        g0, t0 = points[0]
        step = t0 / (1 + self.PRIOR_SLOPE * g0)
        return step * (1 + self.PRIOR_SLOPE * gamma)

    def expected_tokens(self, gamma: int) -> float:
        a = min(self.alpha, 0.999)
        return (1 - a ** (gamma + 1)) / (1 - a)

    def expected_rate(self, gamma: int | None = None) -> float:
        """Expected tokens per second at ``gamma`` (the current one by default)."""
        gamma = self.gamma if gamma is None else gamma
        if self.alpha is None:
            return float("inf")  # not measured yet: worth trying
        return self.expected_tokens(gamma) / (gamma * self.time_draft + self.target_time(gamma))


@dataclasses.dataclass
class StopCriteria:
    """When a row is done: an EOS id, ``max_new_tokens``, or a stop string (needs a tokenizer)."""

    max_new_tokens: int
    eos_token_ids: Optional[torch.Tensor] = None  # [E] int64
    stop_strings: Sequence[str] = ()
    tokenizer: object = None

    def cut(self, buffer: TokenBuffer, emitted: torch.Tensor, counts: torch.Tensor,
            produced: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shorten each row's emitted run at its first stop; returns ``(counts, finished)``."""
        finished = torch.zeros_like(counts, dtype=torch.bool)
        if self.eos_token_ids is not None:
            valid = torch.arange(emitted.shape[1], device=counts.device).view(1, -1) < counts.view(-1, 1)
            is_eos = torch.isin(emitted, self.eos_token_ids) & valid
            hit = is_eos.any(-1)
            counts = torch.where(hit, is_eos.int().argmax(-1) + 1, counts)
            finished |= hit
        room = self.max_new_tokens - produced
        finished |= counts >= room
        counts = torch.minimum(counts, room)
        if self.stop_strings:
            counts, finished = self._cut_stop_strings(buffer, emitted, counts, finished)
        return counts, finished

    def _cut_stop_strings(self, buffer, emitted, counts, finished):
        """Decode each row's new tokens one at a time until a stop string appears (bookkeeping on
        the host, only when stop strings are asked for)."""
        counts, finished = counts.tolist(), finished.tolist()
        longest = max(len(s) for s in self.stop_strings)
        for row, count in enumerate(counts):
            start = int(buffer.prompt_length)
            history = buffer.tokens[row, start: int(buffer.lengths[row])].tolist()
            for c in range(1, count + 1):
                text = self.tokenizer.decode(history + emitted[row, :c].tolist())
                if any(s in text[-(longest + 64):] for s in self.stop_strings):
                    counts[row], finished[row] = c, True
                    break
        return torch.tensor(counts, device=emitted.device), torch.tensor(finished, device=emitted.device)


class DraftPicker:
    """Which drafter drafts the next step: each is tried twice, then the one with the best expected
    tokens per second wins, with the others retried every ``explore_every`` steps."""

    def __init__(self, drafters: Sequence, schedules: Sequence[GammaSchedule], explore_every: int = 16):
        self.drafters, self.schedules, self.explore_every = list(drafters), list(schedules), explore_every
        self.uses = [0] * len(self.drafters)
        self.step = 0

    def pick(self) -> int:
        self.step += 1
        untried = [i for i, n in enumerate(self.uses) if n < 2]
        if untried:
            choice = untried[0]
        elif self.step % self.explore_every == 0:
            choice = min(range(len(self.uses)), key=self.uses.__getitem__)
        else:
            choice = max(range(len(self.uses)), key=lambda i: self.schedules[i].expected_rate())
        self.uses[choice] += 1
        return choice


class ScoreRecord:
    """Each row's logits and processed scores at every emitted position (``output_logits`` /
    ``output_scores``), assembled into Hugging Face's per-step tuples at the end."""

    def __init__(self, batch: int, scores: bool, logits: bool):
        self.want_scores, self.want_logits = scores, logits
        self.scores: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        self.logits: list[list[torch.Tensor]] = [[] for _ in range(batch)]

    def add(self, rows: torch.Tensor, counts: torch.Tensor, logits: torch.Tensor, scores: torch.Tensor) -> None:
        for row, original, count in zip(range(len(rows)), rows.tolist(), counts.tolist()):
            if self.want_scores:
                self.scores[original].append(scores[row, :count].float())
            if self.want_logits:
                self.logits[original].append(logits[row, :count].float())

    def steps(self, which: str) -> tuple[torch.Tensor, ...] | None:
        """``(step_0 [B, V], step_1, ...)`` as Hugging Face returns them; a row that has ended
        holds zeros in the steps after its last token (Hugging Face pads it with its pad token)."""
        if not getattr(self, f"want_{which}"):
            return None
        per_row = [torch.cat(chunks) for chunks in getattr(self, which)]
        steps = max(len(r) for r in per_row)
        padded = [torch.nn.functional.pad(r, (0, 0, 0, steps - len(r))) for r in per_row]
        return tuple(torch.stack(padded, 0).unbind(1))


class _Timer:
    """Wall-clock sections; synchronises CUDA first so that times are real."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    @contextlib.contextmanager
    def __call__(self, into: list):
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        into.append(time.perf_counter() - start)


@dataclasses.dataclass
class Decoder:
    """One generation over a batch; ``run`` returns each row's generated tokens."""

    target: ModelRunner
    drafters: Sequence  # ModelDrafter / PromptLookupDrafter
    schedules: Sequence[GammaSchedule]
    verify: VerifyImpl
    sampling: Sampling
    stop: StopCriteria
    stats: SpecStats
    streamer: object = None
    measure_accept_probs: bool = False
    lenience_kind: LenienceKind = LenienceKind.NONE  # lossy acceptance f(p, epsilon); NONE: exact
    lenience_epsilon: float = 1.0
    record: Optional["ScoreRecord"] = None  # output_scores / output_logits

    def run(self, buffer: TokenBuffer, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        start = time.perf_counter()
        device = buffer.tokens.device
        self.timer = _Timer(device)
        self.rows = torch.arange(len(buffer.lengths), device=device)  # original row ids of the batch
        self.produced = torch.zeros_like(buffer.lengths)
        self.results: dict[int, torch.Tensor] = {}
        picker = DraftPicker(self.drafters, self.schedules) if self.drafters else None
        for name in {d.name for d in self.drafters} if len(self.drafters) > 1 else ():
            self.stats.per_draft[name] = SpecStats()

        self._prefill(buffer, attention_mask)
        while len(self.rows) > 0:
            choice = picker.pick() if picker else None
            self._step(buffer, choice)
        self.stats.time_total = time.perf_counter() - start
        return [self.results[i] for i in range(len(self.results))]

    def _prefill(self, buffer: TokenBuffer, attention_mask: torch.Tensor) -> None:
        """The target reads the prompts and emits each row's first token (a step with no drafts)."""
        times: list[float] = []
        prompt = buffer.tokens[:, : buffer.prompt_length].clamp(min=0)
        with self.timer(times):
            logits = self.target.prefill(prompt, attention_mask, last_only=True)
        with self.timer(times):
            for drafter in self.drafters:
                drafter.start(buffer, attention_mask, self.target.vocab_size)
        no_drafts = torch.empty(len(self.rows), 0, dtype=torch.int64, device=prompt.device)
        with self.timer(times):
            scores = self._scores(buffer, no_drafts, logits)
            out = self.verify(self._chain_inputs(no_drafts, None, scores, accept_probs=False))
        self._commit(buffer, out, logits, scores)
        self.stats.time_target += times[0]
        self.stats.time_draft += times[1]
        self.stats.time_verify += times[2]

    def _step(self, buffer: TokenBuffer, choice: int | None) -> None:
        stats = self.stats
        times: list[float] = []
        with self.timer(times):  # draft
            if choice is None:
                draft = Draft(torch.empty(len(self.rows), 0, dtype=torch.int64, device=buffer.tokens.device), None)
            else:
                schedule = self.schedules[choice]
                # a drafter may propose more than gamma (copies are free), never past the cache's room
                draft = self.drafters[choice].propose(buffer, schedule.gamma, self.sampling).truncated(schedule.maximum)
        with self.timer(times):  # target: the last emitted token, then the drafts
            last = buffer.tokens.gather(1, (buffer.lengths - 1).view(-1, 1))
            logits = self.target.extend(torch.cat([last, draft.tokens.clamp(min=0)], 1))
        with self.timer(times):  # verify
            scores = self._scores(buffer, draft.tokens, logits)
            out = self.verify(self._chain_inputs(draft.tokens, draft.probs, scores, self.measure_accept_probs))
        emitted = self._commit(buffer, out, logits, scores)  # accept + commit
        records = [stats] + ([stats.per_draft[self.drafters[choice].name]] if stats.per_draft else [])
        for record in records:
            drafted, accepted = record.record_step(draft.tokens, out.num_accepted, emitted, out.accept_probs)
            record.time_draft += times[0]
            record.time_target += times[1]
            record.time_verify += times[2]
        if choice is not None:
            self.schedules[choice].update(drafted, accepted, time_draft=times[0], time_target=times[1])

    def _chain_inputs(self, tokens, probs, logits, accept_probs: bool) -> ChainInputs:
        s = self.sampling
        return ChainInputs(
            draft_tokens=tokens, draft_probs=probs, target_logits=logits, temperature=s.temperature,
            top_k=s.top_k, top_p=s.top_p, lenience_kind=self.lenience_kind,
            lenience_epsilon=self.lenience_epsilon,
            seeds=s.step_seeds(self.produced), uniforms=None, return_accept_probs=accept_probs,
        )

    def _scores(self, buffer: TokenBuffer, proposals: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The target's logits, processed per position when the call has logits processors."""
        processing = self.sampling.processing
        return logits if processing is None else processing(buffer, proposals, logits)

    def _commit(self, buffer: TokenBuffer, out: VerifyOutput, logits: torch.Tensor,
                scores: torch.Tensor) -> torch.Tensor:
        """Append the emitted tokens (cut at stops), roll every cache back to what was committed,
        and retire finished rows. Returns the number of tokens each row emitted."""
        before = buffer.lengths.clone()
        counts, finished = self.stop.cut(buffer, out.output_tokens, out.num_accepted + 1, self.produced)
        if self.record is not None:
            self.record.add(self.rows, counts, logits, scores)
        buffer.append(out.output_tokens, counts)
        self.produced += counts
        self.stats.new_tokens += int(counts.sum())
        if self.streamer is not None:
            self.streamer.put(out.output_tokens[0, : int(counts[0])].cpu())
        # Valid cache slots: the previous tokens plus the accepted drafts (the emitted token is new).
        valid = before + out.num_accepted
        self.target.rollback(torch.minimum(self.target.lengths, valid))
        for drafter in self.drafters:
            drafter.rollback(valid)
        self._retire(buffer, finished)
        return counts

    def _retire(self, buffer: TokenBuffer, finished: torch.Tensor) -> None:
        """Finished rows leave the batch, so they cost no more work."""
        done = finished.nonzero().flatten().tolist()
        if not done:
            return
        for i in done:
            self.results[int(self.rows[i])] = buffer.tokens[i, buffer.prompt_length: buffer.lengths[i]].clone()
        keep = (~finished).nonzero().flatten()
        if len(keep) == 0:
            self.rows = keep
            return
        self.rows, self.produced = self.rows[keep], self.produced[keep]
        buffer.select_rows(keep)
        self.target.select_rows(keep)
        for drafter in self.drafters:
            drafter.select_rows(keep)
        self.sampling.select_rows(keep)
