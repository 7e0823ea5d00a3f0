"""Tier 4: the draft policy seam. Rows of one batch may use different drafters, or none, in the
same step; the output stays the target's own (greedy: token for token; sampled: its law)."""

from __future__ import annotations

import pytest
import torch

import draftwise
from draftwise.engine import NO_DRAFT, AdaptivePolicy, DraftPolicy, FixedPolicy, PromptLookupDrafter, StepChoice
from draftwise.engine.policy import CostModel, StepTrace

from oracles import ALPHA, chi_square
from oracles import PAD, first_two_token_law, left_padded_prompts
from tiny_models import tiny_model


class ScriptedPolicy(DraftPolicy):
    """Row r at step s takes arm ``arms[(r + s) % len(arms)]`` with γ ``1 + (r + s) % 4``: every
    mix of drafters and draft lengths inside one batch."""

    def __init__(self, arms):
        self.arms, self.step = list(arms), 0
        self.original_rows = None

    def start(self, num_drafters, batch, context=None):
        super().start(num_drafters, batch, context)
        self.original_rows, self.step = list(range(batch)), 0

    def choose(self):
        self.step += 1
        picks = [self.arms[(r + self.step) % len(self.arms)] for r in self.original_rows]
        gammas = [0 if a == NO_DRAFT else 1 + (r + self.step) % 4 for a, r in zip(picks, self.original_rows)]
        return StepChoice(picks, gammas)

    def select_rows(self, rows):
        self.original_rows = [self.original_rows[i] for i in rows]
        self.batch = len(rows)


@pytest.fixture(scope="module")
def models():
    return tiny_model("llama", seed=0), tiny_model("llama", layers=1, seed=1)


@pytest.mark.parametrize("batch", [1, 4])
def test_rows_with_different_drafters_give_the_target_greedy_output(models, batch):
    target, draft = models
    ids, mask = left_padded_prompts(batch)
    want = target.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=PAD,
                           max_new_tokens=24, eos_token_id=None)
    policy = ScriptedPolicy([0, 1, NO_DRAFT, 2])
    out = draftwise.generate(target, ids, mask, drafts=[draft, PromptLookupDrafter(), target], selector=policy,
                             do_sample=False, pad_token_id=PAD, max_new_tokens=24, eos_token_id=None,
                             return_dict_in_generate=True)
    assert torch.equal(out.sequences, want)
    used = {arm for step in out.spec_stats.trace for arm in step.drafter}
    assert used == {0, 1, 2, NO_DRAFT}
    if batch > 1:
        assert any(len(set(step.drafter)) > 1 for step in out.spec_stats.trace), "rows mixed drafters in a step"


@pytest.mark.parametrize("arm", [0, 1])
def test_a_policy_that_always_picks_one_arm_equals_that_arm_alone(models, arm):
    target, draft = models
    ids, mask = left_padded_prompts(3)
    drafters = [draft, PromptLookupDrafter()]
    common = dict(do_sample=False, pad_token_id=PAD, max_new_tokens=20, eos_token_id=None,
                  num_assistant_tokens=3, return_dict_in_generate=True)
    alone = draftwise.generate(target, ids, mask, assistant_model=drafters[arm], **common)
    chosen = draftwise.generate(target, ids, mask, drafts=drafters, selector=FixedPolicy(arm, gamma=3), **common)
    assert torch.equal(alone.sequences, chosen.sequences)
    assert (alone.spec_stats.drafted, alone.spec_stats.accepted, alone.spec_stats.target_calls) == (
        chosen.spec_stats.drafted, chosen.spec_stats.accepted, chosen.spec_stats.target_calls)


def test_no_draft_arm_is_plain_decoding(models):
    target, draft = models
    ids, mask = left_padded_prompts(2)
    out = draftwise.generate(target, ids, mask, assistant_model=draft, selector=FixedPolicy(NO_DRAFT),
                             do_sample=False, pad_token_id=PAD, max_new_tokens=10, eos_token_id=None,
                             return_dict_in_generate=True)
    stats = out.spec_stats
    assert stats.drafted == 0 and stats.target_calls == 9 and stats.tau == 1.0  # the prefill emits the first


@pytest.mark.parametrize("policy", ["scripted", "online"])
def test_sampled_law_with_rows_on_different_drafters(policy):
    """A 20k-row batch, every row on its own mix of a sampled draft model, prompt lookup and no
    draft (scripted, or chosen online from each row's scores): the joint law of the first two
    tokens is the target's."""
    from draftwise.engine import OnlinePolicy

    target = tiny_model("llama", layers=2, vocab=16, seed=0)
    target.generation_config.eos_token_id = None
    draft = tiny_model("llama", layers=1, vocab=16, seed=3)
    prompt = torch.tensor([[3, 7, 5, 3, 7]])
    trials = 20_000
    law = first_two_token_law(target, prompt, 0.8)
    selector = ScriptedPolicy([0, 1, NO_DRAFT]) if policy == "scripted" else OnlinePolicy()
    out = draftwise.generate(target, prompt.repeat(trials, 1), drafts=[draft, PromptLookupDrafter()],
                             selector=selector, max_new_tokens=3, do_sample=True, temperature=0.8, top_k=0,
                             seed=5, pad_token_id=0, return_dict_in_generate=True)
    pairs = out.sequences[:, -3] * 16 + out.sequences[:, -2]
    fit = chi_square(torch.bincount(pairs, minlength=256), law.flatten())
    assert fit.pvalue > ALPHA, f"joint law of the first two tokens: {fit}"
    assert 0 < out.spec_stats.alpha < 1


def _trace(drafter, drafted, accepted, draft_seconds, target_seconds, width):
    n = len(drafter)
    return StepTrace(rows=list(range(n)), drafter=drafter, drafted=drafted, accepted=accepted,
                     emitted=[a + 1 for a in accepted], draft_seconds=draft_seconds,
                     target_seconds=target_seconds, width=width)


def _simulate(policy: AdaptivePolicy, accepts: list[bool], steps: int = 100) -> list:
    """Runs ``policy`` on rows whose drafts are always (True) or never (False) accepted, with a
    target call of 40 ms + 8 ms per drafted token per row and 2 ms per draft forward."""
    policy.start(1, len(accepts))
    choices = []
    for _ in range(steps):
        choice = policy.choose()
        choices.append(choice)
        gamma = max(choice.gamma)
        accepted = [g if ok else 0 for g, ok in zip(choice.gamma, accepts)]
        policy.observe(_trace(choice.drafter, list(choice.gamma), accepted, {0: 0.002 * gamma} if gamma else {},
                              0.040 + 0.008 * gamma, gamma + 1))
    return choices


def _tries(arms: list[int]) -> list[int]:
    """The gaps between the steps that drafted after the first; asserts they grow."""
    tries = [i for i, arm in enumerate(arms) if arm == 0 and i > 0]
    assert len(tries) >= 3
    gaps = [b - a for a, b in zip(tries, tries[1:])]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0], f"the pause grows: {gaps}"
    return gaps


@pytest.mark.parametrize("plan_batches", [False, True])
def test_adaptive_policy_stops_drafting_where_it_loses_and_tries_again(plan_batches):
    """A row whose drafts are never accepted stops drafting and tries again after a pause that
    doubles while it keeps losing: alone, or (row by row) beside a row whose drafts always are.
    Planned for the batch, a batch where every row loses does the same as a whole."""
    policy = AdaptivePolicy("adaptive", initial=3, maximum=8)
    policy.plan_batches = plan_batches
    rows = [True, False] if not plan_batches else [False, False]
    choices = _simulate(policy, rows)
    losing = [c.drafter[1] for c in choices]
    assert losing[0] == 0 and losing.count(NO_DRAFT) > 80
    _tries(losing)
    if not plan_batches:
        assert all(c.drafter[0] == 0 for c in choices)
        assert choices[-1].gamma[0] > 3, "the winning row's γ grows"
    alone = [c.drafter[0] for c in _simulate(AdaptivePolicy("adaptive", initial=3, maximum=8), [False])]
    assert alone.count(NO_DRAFT) > 80
    _tries(alone)


def test_a_planned_batch_step_lets_losing_rows_ride_on_the_model():
    """At batch > 1 the step is planned for the batch: while one row's drafts pay, a row whose
    drafts never do still takes them (the model drafts every row anyway, and the target's call
    is as wide either way), at the γ that is best for the batch."""
    choices = _simulate(AdaptivePolicy("adaptive", initial=3, maximum=8), [True, False])
    assert all(c.drafter == [0, 0] for c in choices)
    assert choices[-1].gamma[0] == choices[-1].gamma[1] > 3


def test_adaptive_policy_constant_schedule_always_drafts():
    policy = AdaptivePolicy("constant", initial=4)
    policy.start(1, 1)
    for _ in range(10):
        choice = policy.choose()
        assert choice.drafter == [0] and choice.gamma == [4]
        policy.observe(_trace(choice.drafter, [4], [0], {0: 0.01}, 0.05, 5))


def test_cost_model_fits_the_target_time_per_width():
    costs = CostModel()
    for gamma, seconds in [(0, 0.04), (4, 0.06), (2, 0.05)]:
        costs.observe(_trace([NO_DRAFT if gamma == 0 else 0], [gamma], [0], {0: 0.004 * gamma} if gamma else {},
                             seconds, gamma + 1))
    assert costs.target_time(0) == pytest.approx(0.04)
    assert costs.target_time(8) == pytest.approx(0.08)
    assert costs.draft_time(0) == pytest.approx(0.004)


def test_bad_selector_and_schedule_are_named(models):
    target, draft = models
    ids, mask = left_padded_prompts(1)
    with pytest.raises(TypeError, match="selector"):
        draftwise.generate(target, ids, mask, assistant_model=draft, max_new_tokens=4, selector=3)
    with pytest.raises(FileNotFoundError, match="selector: fastest is not a selector folder"):
        draftwise.generate(target, ids, mask, assistant_model=draft, max_new_tokens=4, selector="fastest")
    with pytest.raises(ValueError, match="num_assistant_tokens_schedule"):
        draftwise.generate(target, ids, mask, assistant_model=draft, max_new_tokens=4,
                           num_assistant_tokens_schedule="greedy")
    with pytest.raises(ValueError, match="arm"):
        draftwise.generate(target, ids, mask, assistant_model=draft, max_new_tokens=4, selector=FixedPolicy(3))


def test_a_batch_step_drafts_with_one_model_at_most():
    """Rows that prefer different draft models: the step keeps the model most rows chose; the
    others take their best arm without the second model (here prompt lookup, arm 1)."""
    from draftwise.engine.policy import PolicyContext

    policy = AdaptivePolicy()
    context = PolicyContext(torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long), 4,
                            with_model=(True, False, True))
    policy.start(3, 3, context)
    policy.costs.observe(_trace([0, 0, 0], [3, 3, 3], [1, 1, 1], {0: 0.003}, 0.040, 4))
    policy.costs.draft[1], policy.costs.draft[2] = 0.0001, 0.003
    good, fair, bad = (20.0, 19.0), (20.0, 12.0), (20.0, 1.0)
    for row, (a0, a1, a2) in zip(policy.rows, [(good, fair, bad), (bad, fair, good), (good, fair, bad)]):
        for state, (drafted, accepted) in zip(row.arms, (a0, a1, a2)):
            state.drafted, state.accepted = drafted, accepted
    assert [policy._choose_row(row) for row in policy.rows] == [0, 2, 0]
    assert policy.choose().drafter == [0, 1, 0]


@pytest.mark.parametrize("lookup_proposes", [1.0, 0.1])
def test_a_batch_plan_counts_how_often_prompt_lookup_finds_a_match(lookup_proposes):
    """Two rows where prompt lookup (arm 1) is accepted more often than the draft model (arm 0)
    whenever it proposes: the plan takes lookup while it finds matches, and the model when it
    rarely does (a step where lookup proposes nothing emits one token)."""
    from draftwise.engine.policy import PolicyContext

    policy = AdaptivePolicy()
    context = PolicyContext(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, dtype=torch.long), 4,
                            with_model=(True, False))
    policy.start(2, 2, context)
    policy.costs.observe(_trace([0, 0], [3, 3], [1, 1], {0: 0.003}, 0.040, 4))
    policy.costs.draft[1] = 0.0001
    for row in policy.rows:
        model, lookup = row.arms
        model.drafted, model.accepted = 20.0, 12.0
        lookup.drafted, lookup.accepted = 20.0, 18.0
        lookup.offered, lookup.proposed = 20.0, 20.0 * lookup_proposes
    assert policy.choose().drafter == ([1, 1] if lookup_proposes == 1.0 else [0, 0])


def test_a_stopped_row_scores_its_draft_model_instead_of_trying_it():
    """A row whose draft model (one that can be scored) keeps losing stops drafting and never
    drafts again on its own: after each pause the model is scored on the tokens it missed, the
    pause doubling while the scores stay bad; once they are good, the row drafts again."""
    from draftwise.engine.policy import PolicyContext

    policy = AdaptivePolicy("adaptive", initial=3, maximum=8)
    policy.start(1, 1, PolicyContext(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, dtype=torch.long), 4,
                                     with_model=(True,), scorable=(True,)))
    drafted_at, scored_at, unseen = [], [], 0
    for step in range(200):
        good = step >= 80  # the text changes: the model now predicts every token
        choice = policy.choose()
        gamma = choice.gamma[0]
        if choice.drafter[0] == 0:
            drafted_at.append(step)
            unseen = 0
        accepted = gamma if good else 0
        policy.observe(_trace(choice.drafter, [gamma], [accepted], {0: 0.002 * gamma} if gamma else {},
                              0.040 + 0.008 * gamma, gamma + 1))
        unseen += accepted + 1
        idle = [] if choice.drafter[0] == 0 else [0]
        for arm in policy.models_to_score(idle):
            scored_at.append(step)
            policy.observe_shadow(arm, [unseen], [unseen if good else 0], 0.003)
            unseen = 0
    assert drafted_at[0] == 0 and not [s for s in drafted_at if 0 < s < 80], "no tries while the scores are bad"
    early = [s for s in scored_at if s < 80]
    gaps = [b - a for a, b in zip(early, early[1:])]
    assert len(early) >= 3 and gaps == sorted(gaps) and gaps[-1] > gaps[0], f"the pause grows: {early}"
    assert drafted_at[-1] == 199 and len([s for s in drafted_at if s >= 80]) > 20, "drafts again once it would win"


def test_automatic_trees_run_only_on_steps_the_policy_drafts(models, monkeypatch):
    """tree_budget="auto" (the default with one drafter): a token tree is a shape of drafting, so
    a step the policy keeps undrafted never becomes a tree step; and a row that stopped drafting
    has its draft model scored (not tried). The output stays the target's greedy output."""
    from draftwise.engine import ModelDrafter
    from draftwise.engine.speculate import Decoder

    target, _ = models
    bad = tiny_model("llama", layers=1, seed=7)  # a draft model whose drafts the target rejects
    ids, mask = left_padded_prompts(1)
    expected = target.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, pad_token_id=PAD)
    seen, scores = {"choices": [], "trees": []}, []
    choose, tree_step, score = AdaptivePolicy.choose, Decoder._tree_step, ModelDrafter.score

    def recorded_choose(self):
        seen["choices"].append(choose(self))
        return seen["choices"][-1]

    def recorded_tree_step(self, buffer, choice=None):
        seen["trees"].append(choice)
        return tree_step(self, buffer, choice)

    def recorded_score(self, buffer):
        scores.append(len(seen["choices"]))
        return score(self, buffer)

    monkeypatch.setattr(AdaptivePolicy, "choose", recorded_choose)
    monkeypatch.setattr(Decoder, "_tree_step", recorded_tree_step)
    monkeypatch.setattr(ModelDrafter, "score", recorded_score)
    lookup = PromptLookupDrafter()  # the tiny target repeats itself: its copies are accepted
    for draft in (lookup, bad):
        seen["choices"].clear(), seen["trees"].clear(), scores.clear()
        out = draftwise.generate(target, ids, mask, assistant_model=draft, max_new_tokens=40, do_sample=False,
                                 pad_token_id=PAD, return_dict_in_generate=True)
        assert torch.equal(out.sequences, expected)
        assert all(c is not None and NO_DRAFT not in c.drafter for c in seen["trees"])
        if draft is lookup:  # drafting wins: trees are tried
            assert seen["trees"]
        else:
            undrafted = sum(c.drafter == [NO_DRAFT] for c in seen["choices"])
            assert undrafted > 20 and scores, (undrafted, scores)
            drafting = [i for i, c in enumerate(seen["choices"]) if c.drafter != [NO_DRAFT]]
            assert drafting[-1] < len(seen["choices"]) // 2, "the bad draft is scored, not tried again"


def test_a_batch_first_step_drafts_one_token_per_row():
    """Before any cost is measured a batch's step drafts one token per row (its verification is
    batch x (γ + 1) tokens wide); a single row starts at the call's γ."""
    policy = AdaptivePolicy("adaptive", initial=4)
    policy.start(1, 3)
    assert policy.choose() == StepChoice([0, 0, 0], [1, 1, 1])
    policy.start(1, 1)
    assert policy.choose() == StepChoice([0], [4])
    constant = AdaptivePolicy("constant", initial=4)
    constant.start(1, 3)
    assert constant.choose().gamma == [4, 4, 4]


def _two_arm_policy(batch: int) -> AdaptivePolicy:
    """An adaptive policy over a draft model (arm 0) and prompt lookup (arm 1), started."""
    from draftwise.engine.policy import PolicyContext

    policy = AdaptivePolicy("adaptive", initial=3, maximum=8)
    policy.start(2, batch, PolicyContext(torch.zeros(batch, 4, dtype=torch.long),
                                         torch.zeros(batch, dtype=torch.long), 4, with_model=(True, False)))
    return policy


def test_a_batch_is_planned_as_soon_as_a_step_is_measured():
    """An arm a row has never drafted with does not hold the batch back: once costs are measured
    the step is planned for the batch, and where the known arms lose, no row drafts (row by row,
    each row would first try its untried prompt lookup, widening every row's call)."""
    policy = _two_arm_policy(3)
    for gamma, seconds in [(0, 0.040), (2, 0.080)]:  # each drafted token costs a fifth of a step more per row
        policy.costs.observe(_trace([NO_DRAFT if gamma == 0 else 0] * 3, [gamma] * 3, [0] * 3,
                                    {0: 0.003} if gamma else {}, seconds, gamma + 1))
    for row in policy.rows:
        row.arms[0].drafted, row.arms[0].accepted = 20.0, 4.0  # the model: 20% accepted
    assert policy.rows[0].arms[1].alpha is None
    assert policy.choose() == StepChoice([NO_DRAFT] * 3, [0] * 3)
    policy.plan_batches = False
    assert policy.choose().drafter == [1, 1, 1]


def test_a_batch_plan_widens_one_token_past_the_widest_measured_call():
    """The fitted cost of a call wider than any measured one is an extrapolation: a planned step
    drafts at most one token more per row than the widest call so far."""
    policy = _two_arm_policy(2)
    policy.costs.observe(_trace([0, 0], [1, 1], [1, 1], {0: 0.001}, 0.041, 2))
    for row in policy.rows:
        row.arms[0].drafted, row.arms[0].accepted = 20.0, 19.5  # the model is almost always right
    widths = []
    for _ in range(6):
        choice = policy.choose()
        widths.append(max(choice.gamma))
        policy.observe(_trace(choice.drafter, list(choice.gamma), list(choice.gamma), {0: 0.001 * widths[-1]},
                              0.040 + 0.001 * widths[-1], widths[-1] + 1))
    assert widths == [2, 3, 4, 5, 6, 7]


def test_a_batch_first_step_runs_a_draft_model_only_for_most_rows():
    """A draft model's first use reads every row's prompt: in a batch's first step, a model that
    fewer than half the rows chose does not run (those rows start without a draft); one that most
    rows chose does, and a single row starts on its choice."""
    policy = _two_arm_policy(3)
    for row, allowed in zip(policy.rows, ([0], [1], [1])):
        row.allowed = allowed
    assert policy.choose().drafter == [NO_DRAFT, 1, 1]
    for row, allowed in zip(policy.rows, ([0], [0], [1])):
        row.allowed = allowed
    assert policy.choose().drafter == [0, 0, 1]
    single = _two_arm_policy(1)
    single.rows[0].allowed = [0]
    assert single.choose().drafter == [0]
