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

from draftwise.kernels import PAD_TOKEN, Lenience, resolve_backend
from draftwise.kernels.spec import ChainInputs, LenienceKind, VerifyOutput
from draftwise.kernels.tree import tree_implementation

from .distributed import agreed
from .drafters import Draft
from .models import ModelRunner
from .policy import MAX_GAMMA, NO_DRAFT, DraftPolicy, PolicyContext, StepChoice, StepShapes, StepTrace
from .processing import ScoreRecord
from .sampling import Sampling
from .sequence import TokenBuffer
from .stats import SpecStats
from .stopping import StopCriteria
from .tree import DraftTree

VerifyImpl = Callable[[ChainInputs], VerifyOutput]


class _Clock:
    """Times of a step's sections, read after the step's one host transfer. On CUDA a section is
    a pair of events recorded on the stream (no host synchronisation; the device's time from the
    first to the last of its work); elsewhere the wall clock. Disabled (nothing the times would
    feed): every section reads 0."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.cuda = device.type == "cuda"
        self.enabled = enabled

    @contextlib.contextmanager
    def __call__(self, into: list):
        if not self.enabled:
            yield
            into.append(0.0)
            return
        if not self.cuda:
            start = time.perf_counter()
            yield
            into.append(time.perf_counter() - start)
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        into.append((start, end))

    @staticmethod
    def seconds(section) -> float:
        if isinstance(section, float):
            return section
        start, end = section
        end.synchronize()  # at once after the step's host transfer
        return start.elapsed_time(end) / 1000.0


@dataclasses.dataclass
class StepValues:
    """A step's per-row results on the host, read in one transfer at the end of its commit."""

    rows: list[int]  # original row ids
    drafted: list[int]
    accepted: list[int]
    emitted: list[int]
    finished: list[bool]
    accept_prob_sums: Optional[list[float]] = None  # per row, when acceptance probabilities were measured
    accept_prob_counts: Optional[list[int]] = None


@dataclasses.dataclass
class Decoder:
    """One generation over a batch; ``run`` returns each row's generated tokens."""

    target: ModelRunner
    drafters: Sequence  # ModelDrafter / PromptLookupDrafter / LookupThenModelDrafter
    policy: DraftPolicy  # each step: every row's drafter (or none) and draft length
    verify: VerifyImpl
    sampling: Sampling
    stop: StopCriteria
    stats: SpecStats
    max_draft: int = MAX_GAMMA  # no row drafts more (the caches' room past the longest output)
    streamer: object = None
    measure_accept_probs: bool = False  # the statistics are asked for (return_dict_in_generate)
    lenience: Optional[Lenience] = None  # lossy acceptance f(p, epsilon); None: exact
    record: Optional[ScoreRecord] = None  # output_scores / output_logits
    tree_budget: int = 0  # > 0: every step verifies a token tree of at most this many drafted nodes
    tree_gamma: int = 4  # with a tree, each drafter's chain length (a draft model's forwards per step)
    shapes: Optional[StepShapes] = None  # with a tree budget: chain or tree each step, from measured rates
    backend: Optional[str] = None  # the verification kernels' backend
    group: object = None  # the target's process group (tensor parallel): its first process makes the timed choices

    def run(self, buffer: TokenBuffer, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        start = time.perf_counter()
        device = buffer.tokens.device
        # times feed the policy, the chain-or-tree choice, and the statistics when they are asked for
        timed = self.policy.uses_times or self.shapes is not None or self.measure_accept_probs
        self.timer = _Clock(device, enabled=timed)
        self.rows = torch.arange(len(buffer.lengths), device=device)  # original row ids of the batch
        self.produced = torch.zeros_like(buffer.lengths)
        self.results: dict[int, torch.Tensor] = {}
        if self.tree_budget:  # trees are valid by construction: the backend's kernel without verify_tree's checks
            self.verify_tree = tree_implementation(resolve_backend(self.backend, device))
        for name in {d.name for d in self.drafters} if len(self.drafters) > 1 else ():
            self.stats.per_draft[name] = SpecStats()

        self._prefill(buffer, attention_mask)
        while len(self.rows) > 0:
            self._step(buffer)
        self.stats.time_total = time.perf_counter() - start
        return [self.results[i] for i in range(len(self.results))]

    def _prefill(self, buffer: TokenBuffer, attention_mask: torch.Tensor) -> None:
        """The target reads the prompts and emits each row's first token (a step with no drafts)."""
        times: list[float] = []
        prompt = buffer.tokens[:, : buffer.prompt_length].clamp(min=0)
        hidden = []
        with self.timer(times), _mean_hidden_state(self.target.model, attention_mask, hidden,
                                                   self.policy.wants_hidden):
            logits = self.target.prefill(prompt, attention_mask, last_only=True)
        with self.timer(times):
            for drafter in self.drafters:
                drafter.start(buffer, attention_mask, self.target.vocab_size)
        self.scorable = tuple(hasattr(d, "score") for d in self.drafters)  # draft models with a catch-up read
        context = PolicyContext(buffer.tokens, buffer.starts, buffer.prompt_length, hidden[0] if hidden else None,
                                tuple(d.draft_model is not None for d in self.drafters), self.scorable)
        self.policy.start(len(self.drafters), len(self.rows), context)
        no_drafts = torch.empty(len(self.rows), 0, dtype=torch.int64, device=prompt.device)
        with self.timer(times):
            scores = self._scores(buffer, no_drafts, logits)
            out = self.verify(self._chain_inputs(no_drafts, None, scores, accept_probs=False))
        values = self._commit(buffer, out, logits, scores, torch.zeros_like(self.rows))
        target, draft, verify = map(self.timer.seconds, times)
        self.stats.time_target += target
        self.stats.time_draft += draft
        self.stats.time_verify += verify
        self._retire(buffer, values)

    def _step(self, buffer: TokenBuffer) -> None:
        if self.tree_budget and self.shapes is None:
            return self._tree_step(buffer)
        choice = agreed(self.group, self.policy.choose())
        # chosen automatically, a tree is a shape of drafting: steps the policy keeps undrafted stay so
        if self.shapes is not None and _drafts(choice) and agreed(self.group, self.shapes.tree_next()):
            return self._tree_step(buffer, choice)
        times: list[float] = []
        with self.timer(times):
            draft, draft_seconds = self._draft(buffer, choice)
            draft = draft.truncated(_longest_proposal(draft.tokens))  # no column of padding only
            shadows = self._shadow_proposals(buffer) if self.policy.full_information else {}
        with self.timer(times):  # target: the last emitted token, then the drafts
            last = buffer.tokens.gather(1, (buffer.lengths - 1).view(-1, 1))
            logits = self.target.extend(torch.cat([last, draft.tokens.clamp(min=0)], 1))
        with self.timer(times):  # verify
            scores = self._scores(buffer, draft.tokens, logits)
            out = self.verify(self._chain_inputs(draft.tokens, draft.probs, scores, self.measure_accept_probs))
        drafted = (draft.tokens >= 0).long().cumprod(1).sum(1)
        values = self._commit(buffer, out, logits, scores, drafted)  # accept + commit
        self._record(choice, draft.tokens.shape[1], values, draft_seconds, times)
        if self.policy.full_information:
            self._shadow_feedback(buffer, choice, shadows, out, values)
        self._score_idle_models(buffer)
        self._retire(buffer, values)

    # ------------------------------------------------------------------ token trees

    def _tree_step(self, buffer: TokenBuffer, choice: StepChoice | None = None) -> None:
        """Draft a token tree per row, read every node in one target forward (tree mask), verify
        the tree, keep the accepted path in the target's cache and commit its tokens. With the
        policy's ``choice`` (trees chosen automatically), the policy learns from the step."""
        times: list[float] = []
        with self.timer(times):
            tree = self._draft_tree(buffer)
        with self.timer(times):
            logits = self.target.extend_tree(tree.tokens.clamp(min=0), tree.depth, tree.ancestors)
        with self.timer(times):
            s = self.sampling
            out = self.verify_tree(tree.tokens, tree.parents, tree.probs, logits, s.temperature, s.top_k, s.top_p,
                                   s.step_seeds(self.produced))
        path = out.path.clamp(min=0)  # entries past the accepted path: the root, never committed
        self.target.cache.commit_path(path, out.num_accepted + 1)  # the root and the accepted nodes
        path_logits = logits.gather(1, path.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        values = self._commit(buffer, VerifyOutput(out.output_tokens, out.num_accepted, None),
                              path_logits, path_logits, tree.valid.sum(1) - 1)
        self._record_tree(tree, values, times)
        if choice is not None:
            self.policy.observe_tree(values.drafted, values.accepted)
        self._retire(buffer, values)

    def _draft_tree(self, buffer: TokenBuffer) -> DraftTree:
        """One draft model alone: its dynamic tree (EAGLE-2's rule) under the node budget. Any other
        set of drafters: their proposals (prompt lookup: each distinct earlier match) merged into a
        trie, earlier drafters first while the budget lasts; a sampled draft's first-child nodes
        keep the laws their tokens were drawn from (see ``DraftTree.from_chains``)."""
        nodes = self.tree_budget + 1  # the root too
        if len(self.drafters) == 1 and hasattr(self.drafters[0], "propose_tree"):
            return self.drafters[0].propose_tree(buffer, nodes)
        chains, laws = [], []
        for drafter in self.drafters:
            if hasattr(drafter, "propose_branches"):
                branches = drafter.propose_branches(buffer, min(self.tree_budget, self.max_draft), branches=4)
                chains += branches
                laws += [None] * len(branches)
            else:
                draft = drafter.propose(buffer, self.tree_gamma, self.sampling)
                chains.append(draft.tokens)
                laws.append(draft.probs)  # sampled drafts: the laws their tokens were drawn from
        root = buffer.tokens.gather(1, (buffer.lengths - 1).view(-1, 1)).squeeze(1)
        return DraftTree.from_chains(root, chains, buffer.lengths - 1, max_nodes=nodes, laws=laws)

    def _record_tree(self, tree: DraftTree, values: StepValues, times: list) -> None:
        draft, target, verify = map(self.timer.seconds, times)
        if self.shapes is not None:
            self.shapes.observe(True, sum(values.emitted), draft + target + verify)
        self.stats.record_tree_step(values.drafted, values.accepted, values.emitted)
        self.stats.trace.append(StepTrace(rows=values.rows, drafter=[0] * len(values.rows), drafted=values.drafted,
                                          accepted=values.accepted, emitted=values.emitted,
                                          draft_seconds={0: draft}, target_seconds=target,
                                          width=tree.tokens.shape[1]))
        self.stats.time_draft += draft
        self.stats.time_target += target
        self.stats.time_verify += verify

    def _draft(self, buffer: TokenBuffer, choice: StepChoice) -> tuple[Draft, dict[int, object]]:
        """Each chosen drafter drafts (all rows; the rows that chose it keep its proposals, cut
        at their own γ); the proposals merge into one ragged block. Returns it and each
        drafter's timed section (see :class:`_Clock`)."""
        rows_of: dict[int, list[int]] = {}
        for row, arm in enumerate(choice.drafter):
            if arm != NO_DRAFT:
                rows_of.setdefault(arm, []).append(row)
        parts, seconds = [], {}
        for arm, rows in rows_of.items():
            gamma = max(choice.gamma[r] for r in rows)
            times: list[float] = []
            with self.timer(times):
                # a drafter may propose more than gamma (copies are free), never past the cache's room
                draft = self.drafters[arm].propose(buffer, gamma, self.sampling).truncated(self.max_draft)
            seconds[arm] = times[0]
            parts.append((rows, gamma, draft))
        self.proposals = {arm: draft for arm, (_, _, draft) in zip(rows_of, parts)}  # for full-information feedback
        return merge_drafts(parts, choice.gamma, len(choice.drafter), self.target.vocab_size,
                            buffer.tokens.device), seconds

    # ------------------------------------------------------------------ full-information feedback

    SHADOW_GAMMA = 4  # tokens a drafter that drafts no row proposes for scoring

    def _shadow_proposals(self, buffer: TokenBuffer) -> dict[int, tuple[Draft, float]]:
        """Proposals, for scoring only, of the drafters without a model that no row chose this
        step (prompt lookup: a search in the committed tokens, no forward)."""
        shadows = {}
        for arm, drafter in enumerate(self.drafters):
            if arm in self.proposals or drafter.draft_model is not None:
                continue
            start = time.perf_counter()
            shadows[arm] = (drafter.propose(buffer, self.SHADOW_GAMMA, self.sampling), time.perf_counter() - start)
        return shadows

    def _shadow_feedback(self, buffer: TokenBuffer, choice: StepChoice, shadows: dict, out: VerifyOutput,
                         values: StepValues) -> None:
        """Tell the policy what every drafter would have had accepted on each row it did not
        draft: a proposal is scored against the tokens the step emitted (the target's own); idle
        draft models as :meth:`_score_idle_models` says."""
        proposals = {arm: (draft, None) for arm, draft in self.proposals.items()} | shadows
        emitted = torch.tensor(values.emitted, device=out.output_tokens.device)
        chosen = torch.tensor(choice.drafter, device=emitted.device)
        counts = [torch.where(chosen == arm, -1, torch.stack(_agreement(draft.tokens, out.output_tokens, emitted)))
                  for arm, (draft, _) in proposals.items()]  # rows the step itself counted: -1
        counts = torch.stack(counts).tolist() if counts else []  # one host transfer for every drafter
        for (arm, (draft, seconds)), (drafted, accepted) in zip(proposals.items(), counts):
            per_token = None if seconds is None else seconds / max(1, draft.tokens.shape[1])
            self.policy.observe_shadow(arm, drafted, accepted, per_token)

    def _score_idle_models(self, buffer: TokenBuffer) -> None:
        """The idle draft models the policy asks about (:meth:`DraftPolicy.models_to_score`) read
        the committed tokens they have not seen, as they must before they draft again, and the
        policy learns how many of them each would have predicted."""
        idle = [arm for arm, scorable in enumerate(self.scorable) if scorable and arm not in self.proposals]
        for arm in agreed(self.group, self.policy.models_to_score(idle)) if idle else ():
            times: list[float] = []
            with self.timer(times):
                drafted, accepted = self.drafters[arm].score(buffer)
            seconds = self.timer.seconds(times[0])
            self.stats.time_draft += seconds
            self.policy.observe_shadow(arm, drafted, accepted, seconds)

    def _record(self, choice: StepChoice, width: int, values: StepValues, draft_sections: dict,
                times: list) -> None:
        """Counters of the step (in total and per drafter), its trace, and what the policy learns."""
        stats = self.stats
        draft_seconds = {arm: self.timer.seconds(section) for arm, section in draft_sections.items()}
        draft, target, verify = map(self.timer.seconds, times)
        if self.shapes is not None and _drafts(choice):  # chains against trees: drafting steps only
            self.shapes.observe(False, sum(values.emitted), draft + target + verify)
        trace = StepTrace(rows=values.rows, drafter=list(choice.drafter), drafted=values.drafted,
                          accepted=values.accepted, emitted=values.emitted, draft_seconds=draft_seconds,
                          target_seconds=target, width=width + 1)
        stats.trace.append(trace)
        parts = [(stats, range(len(values.rows)), draft)]
        if stats.per_draft:
            parts += [(stats.per_draft[self.drafters[arm].name],
                       [r for r, a in enumerate(choice.drafter) if a == arm], seconds)
                      for arm, seconds in draft_seconds.items()]
        for record, rows, seconds in parts:
            sums, counts = values.accept_prob_sums, values.accept_prob_counts
            record.record_step(width, [values.drafted[r] for r in rows], [values.accepted[r] for r in rows],
                               [values.emitted[r] for r in rows],
                               None if sums is None else sum(sums[r] for r in rows),
                               0 if counts is None else sum(counts[r] for r in rows))
            record.time_draft += seconds
            record.time_target += target
            record.time_verify += verify
        self.policy.observe(trace)

    def _chain_inputs(self, tokens, probs, logits, accept_probs: bool) -> ChainInputs:
        s = self.sampling
        return ChainInputs(
            draft_tokens=tokens, draft_probs=probs, target_logits=logits, temperature=s.temperature,
            top_k=s.top_k, top_p=s.top_p,
            lenience_kind=LenienceKind.NONE if self.lenience is None else self.lenience.code,
            lenience_epsilon=1.0 if self.lenience is None else float(self.lenience.epsilon),
            seeds=s.step_seeds(self.produced), uniforms=None, return_accept_probs=accept_probs,
        )

    def _scores(self, buffer: TokenBuffer, proposals: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The target's logits, processed per position when the call has logits processors."""
        processing = self.sampling.processing
        return logits if processing is None else processing(buffer, proposals, logits)

    def _commit(self, buffer: TokenBuffer, out: VerifyOutput, logits: torch.Tensor, scores: torch.Tensor,
                drafted: torch.Tensor) -> StepValues:
        """Append the emitted tokens (cut at stops) and roll every cache back to what was
        committed; then read the step's per-row values (``drafted`` tokens per row, accepted,
        emitted, finished) to the host in one transfer."""
        before = buffer.lengths.clone()
        counts, finished = self.stop.cut(buffer, out.output_tokens, out.num_accepted + 1, self.produced)
        if self.record is not None:
            self.record.add(self.rows, counts, logits, scores)
        buffer.append(out.output_tokens, counts)
        self.produced += counts
        # Valid cache slots: the previous tokens plus the accepted drafts (the emitted token is new).
        valid = before + out.num_accepted
        self.target.rollback(torch.minimum(self.target.lengths, valid))
        for drafter in self.drafters:  # each keeps what it wrote only as far as it was committed
            drafter.rollback(valid, buffer)
        values = self._read_values(drafted, out, counts, finished)
        self.stats.new_tokens += sum(values.emitted)
        if self.streamer is not None:
            self.streamer.put(out.output_tokens[0, : values.emitted[0]].cpu())
        return values

    def _read_values(self, drafted: torch.Tensor, out: VerifyOutput, counts: torch.Tensor,
                     finished: torch.Tensor) -> StepValues:
        columns = [self.rows, drafted, out.num_accepted, counts, finished]
        if out.accept_probs is not None:
            columns += [out.accept_probs.nan_to_num(0.0).sum(1), (~out.accept_probs.isnan()).sum(1)]
        host = torch.stack([c.double() for c in columns]).tolist()  # the step's one host transfer
        rows, drafted, accepted, emitted, done = ([int(x) for x in column] for column in host[:5])
        values = StepValues(rows, drafted, accepted, emitted, [bool(x) for x in done])
        if out.accept_probs is not None:
            values.accept_prob_sums, values.accept_prob_counts = host[5], [int(x) for x in host[6]]
        return values

    def _retire(self, buffer: TokenBuffer, values: StepValues) -> None:
        """Finished rows leave the batch, so they cost no more work."""
        if not any(values.finished):
            return
        for i, (row, done) in enumerate(zip(values.rows, values.finished)):
            if done:
                self.results[row] = buffer.tokens[i, buffer.prompt_length: buffer.lengths[i]].clone()
        keep = [i for i, done in enumerate(values.finished) if not done]
        if not keep:
            self.rows = self.rows[:0]
            return
        index = torch.tensor(keep, device=self.rows.device)
        self.rows, self.produced = self.rows[index], self.produced[index]
        buffer.select_rows(index)
        self.target.select_rows(index)
        for drafter in self.drafters:
            drafter.select_rows(index)
        self.sampling.select_rows(index)
        self.policy.select_rows(keep)


def _drafts(choice: StepChoice) -> bool:
    """Whether some row drafts this step."""
    return any(arm != NO_DRAFT for arm in choice.drafter)


def _longest_proposal(tokens: torch.Tensor) -> int:
    """The most proposals of a row (a row's proposals end at its first padding): prompt lookup
    without a match, or a drafter that stopped early, would widen the target's call for nothing."""
    if tokens.shape[1] == 0:
        return 0
    return int((tokens >= 0).long().cumprod(1).sum(1).max())


def _agreement(proposal: torch.Tensor, output: torch.Tensor, emitted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, as a chain step would count them: how many of ``proposal`` lead-match the emitted
    tokens (``accepted``), and ``drafted`` = accepted + 1 where a proposed token was refused.
    Only the emitted tokens are known, so a proposal that matches all of them counts as accepted
    that far. Returns ``(drafted [B], accepted [B])`` on the device."""
    width = min(proposal.shape[1], output.shape[1])
    known = torch.arange(width, device=emitted.device).view(1, -1) < emitted.view(-1, 1)
    proposed = (proposal[:, :width] >= 0) & known
    match = (proposal[:, :width] == output[:, :width]) & proposed
    accepted = match.long().cumprod(1).sum(1)
    refused = (accepted < proposed.sum(1)).long()
    return accepted + refused, accepted


@contextlib.contextmanager
def _mean_hidden_state(model, attention_mask: torch.Tensor, into: list, wanted: bool):
    """While a prefill runs: append to ``into`` the mean over each prompt of the model's last
    hidden state (the decoder's output, read by a forward hook: no extra forward)."""
    if not wanted:
        yield
        return
    from .selector import masked_mean

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        into.append(masked_mean(hidden, attention_mask))

    handle = model.get_decoder().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def merge_drafts(parts: list[tuple[list[int], int, Draft]], gammas: list[int], batch: int, vocab: int,
                 device) -> Draft:
    """One ``Draft`` for the batch from each drafter's ``(rows, gamma, draft)``: row r keeps its
    drafter's proposals up to its own γ (plus what the drafter proposes past gamma for free, such
    as copied tokens); rows no drafter serves propose nothing. Laws: one-hot where a drafter gave
    none, when another gave one."""
    if len(parts) == 1 and len(parts[0][0]) == batch and len(set(gammas)) == 1:
        return parts[0][2]  # the usual step: one drafter, every row, one γ
    width = max((d.tokens.shape[1] for _, _, d in parts), default=0)
    tokens = torch.full((batch, width), PAD_TOKEN, dtype=torch.int64, device=device)
    with_laws = any(d.probs is not None for _, _, d in parts)
    probs = torch.zeros(batch, width, vocab, device=device) if with_laws else None
    columns = torch.arange(width, device=device)
    for rows, gamma, draft in parts:
        index = torch.tensor(rows, device=device)
        own = draft.tokens[index]
        extra = own.shape[1] - gamma  # proposals past gamma: kept for every row of this drafter
        limit = torch.tensor([gammas[r] for r in rows], device=device).view(-1, 1) + extra
        own = torch.where(columns[: own.shape[1]] < limit, own, PAD_TOKEN)
        tokens[index, : own.shape[1]] = own
        if with_laws:
            law = draft.probs[index] if draft.probs is not None else _one_hot(own, vocab)
            probs[index, : own.shape[1]] = law.to(probs.dtype)
    return Draft(tokens, probs)


def _one_hot(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    law = torch.nn.functional.one_hot(tokens.clamp(min=0), vocab).float()
    return law * (tokens >= 0).unsqueeze(-1)
