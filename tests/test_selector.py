"""Tier 4: context-aware draft selection. The offline selector (features, network, folder), the
collection that trains it (its simulated runs equal the engine's), and the offline and online
policies: whatever they choose, the output is the target's own."""

from __future__ import annotations

import json

import pytest
import torch

import draftwise
from draftwise.distill.selection import (
    Collection, TrainConfig, chain_run, collect, policy_quality, train_selector,
)
from draftwise.engine import NO_DRAFT, FixedPolicy, ModelDrafter, PromptLookupDrafter
from draftwise.engine.policy import PolicyContext
from draftwise.engine.selector import (
    NO_DRAFT_ARM, OfflinePolicy, OnlinePolicy, Selector, resolve_selector, target_fingerprint, token_features,
)

from oracles import PAD, left_padded_prompts
from tiny_models import tiny_model

COMMON = dict(do_sample=False, pad_token_id=PAD, eos_token_id=None, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def models():
    target = tiny_model("llama", seed=0)
    return target, tiny_model("llama", layers=1, seed=1)


def _pool(target, draft):
    return [ModelDrafter(draft, name="weak"), PromptLookupDrafter(name="lookup"), ModelDrafter(target, name="self")]


def _forced_selector(arms, arm: int, feature="tokens") -> Selector:
    """A selector whose choice is always ``arm`` (an index into ``arms``)."""
    in_dim = len(token_features([1, 2]))
    selector = Selector(arms, feature, in_dim, hidden=4)
    with torch.no_grad():
        selector.net[2].weight.zero_()
        selector.net[2].bias.zero_()
        selector.net[2].bias[arm] = 5.0
    return selector


def _hf(target, ids, mask, n):
    return target.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=PAD,
                           max_new_tokens=n, eos_token_id=None)


# ---------------------------------------------------------------------------------------------- policies


@pytest.mark.parametrize("batch", [1, 3])
def test_online_policy_gives_the_target_greedy_output(models, batch):
    target, draft = models
    ids, mask = left_padded_prompts(batch)
    out = draftwise.generate(target, ids, mask, drafts=_pool(target, draft), selector=OnlinePolicy(),
                             max_new_tokens=24, **COMMON)
    assert torch.equal(out.sequences, _hf(target, ids, mask, 24))


def test_online_policy_switches_a_row_to_the_drafter_that_serves_it(models):
    """The row starts on a drafter that is mostly refused; the scores of the others (never
    drafted for this row) move it to one that is mostly accepted (the target's own copy, or
    prompt lookup on this self-repeating output) for good."""
    target, draft = models
    ids, mask = left_padded_prompts(1)
    pool = _pool(target, draft)
    arms = [d.name for d in pool] + [NO_DRAFT_ARM]
    policy = OnlinePolicy(_forced_selector(arms, 0), schedule="constant", initial=3)
    out = draftwise.generate(target, ids, mask, drafts=pool, selector=policy, max_new_tokens=40, **COMMON)
    assert torch.equal(out.sequences, _hf(target, ids, mask, 40))
    used = [step.drafter[0] for step in out.spec_stats.trace]
    assert used[0] == 0 and used[-1] in (1, 2), used
    switch = min(i for i, arm in enumerate(used) if arm != 0)
    assert switch <= 16 and 0 not in used[switch:], used


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("feature", ["tokens", "hidden"])
def test_offline_policy_gives_the_target_greedy_output(models, batch, feature):
    target, draft = models
    ids, mask = left_padded_prompts(batch)
    pool = _pool(target, draft)
    in_dim = len(token_features([1])) if feature == "tokens" else target.config.hidden_size
    torch.manual_seed(batch)
    selector = Selector([d.name for d in pool] + [NO_DRAFT_ARM], feature, in_dim)
    policy = OfflinePolicy(selector)
    out = draftwise.generate(target, ids, mask, drafts=pool, selector=policy, max_new_tokens=24, **COMMON)
    assert torch.equal(out.sequences, _hf(target, ids, mask, 24))
    for step in out.spec_stats.trace:
        for row, arm in zip(step.rows, step.drafter):
            assert arm in (policy.chosen[row], NO_DRAFT, 1), "a row drafts with its chosen arm or prompt lookup"


def test_offline_policy_moves_a_row_to_prompt_lookup_on_its_scores_only(models):
    """A row chosen for a drafter that is mostly refused moves to prompt lookup, scored every step
    at no forward's cost, on this self-repeating output; the other draft model is never read
    (only the chosen arm and the free drafters are scored). Without free drafters the row keeps
    its arm."""
    target, draft = models
    ids, mask = left_padded_prompts(1)
    pool = _pool(target, draft)
    arms = [d.name for d in pool] + [NO_DRAFT_ARM]
    reads = []
    pool[2].score = lambda buffer: reads.append(buffer)  # an idle draft model's catch-up read
    for free in (True, False):
        policy = OfflinePolicy(_forced_selector(arms, 0), free_drafters=free, schedule="constant", initial=3)
        out = draftwise.generate(target, ids, mask, drafts=pool, selector=policy, max_new_tokens=40, **COMMON)
        assert torch.equal(out.sequences, _hf(target, ids, mask, 40))
        used = [step.drafter[0] for step in out.spec_stats.trace]
        assert 2 not in used and not reads, used
        if free:
            assert used[0] == 0 and used[-1] == 1, used
        else:
            assert set(used) == {0}, used


@pytest.mark.parametrize("arm", [0, 1, 2, NO_DRAFT])
def test_a_selector_that_always_picks_arm_k_equals_that_arm_alone(models, arm):
    target, draft = models
    ids, mask = left_padded_prompts(3)
    pool = _pool(target, draft)
    arms = [d.name for d in pool] + [NO_DRAFT_ARM]
    fixed = dict(num_assistant_tokens=3, max_new_tokens=20, **COMMON)
    policy = OfflinePolicy(_forced_selector(arms, arm if arm != NO_DRAFT else len(pool)), free_drafters=False,
                           schedule="constant", initial=3)
    chosen = draftwise.generate(target, ids, mask, drafts=pool, selector=policy, **fixed)
    alone = draftwise.generate(target, ids, mask, drafts=pool, selector=FixedPolicy(arm, gamma=3), **fixed)
    assert torch.equal(chosen.sequences, alone.sequences)
    a, c = alone.spec_stats, chosen.spec_stats
    assert (a.drafted, a.accepted, a.target_calls) == (c.drafted, c.accepted, c.target_calls)


def test_model_drafter_score_counts_its_teacher_forced_predictions(models):
    """``score`` reads the committed tokens it has not seen and counts its right predictions: the
    target scoring itself gets them all right, another model some."""
    target, draft = models
    ids, mask = left_padded_prompts(2)
    out = _hf(target, ids, mask, 12)
    from draftwise.engine.sequence import TokenBuffer

    buffer = TokenBuffer.from_prompt(out, torch.cat([mask, torch.ones(2, 12, dtype=mask.dtype)], 1), 40)
    buffer.lengths = torch.tensor([ids.shape[1] + 12, ids.shape[1] + 9])
    for model, perfect in ((target, True), (draft, False)):
        drafter = ModelDrafter(model)
        prompt_buffer = TokenBuffer.from_prompt(ids, mask, 40)
        drafter.start(prompt_buffer, mask, 101)
        read, matched = drafter.score(buffer)
        assert read == [11, 8]  # all but the last committed token
        assert (matched == read) == perfect or not perfect
        assert all(0 <= m <= r for m, r in zip(matched, read))
        assert drafter.runner.lengths.tolist() == [ids.shape[1] + 11, ids.shape[1] + 8]


# ---------------------------------------------------------------------------------------------- folder and errors


def test_selector_saves_and_loads_as_a_folder(tmp_path, models):
    target, _ = models
    torch.manual_seed(0)
    selector = Selector(["a", "b", NO_DRAFT_ARM], "tokens", len(token_features([1])), target=target_fingerprint(target))
    folder = selector.save(tmp_path / "sel")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder left"
    loaded = Selector.load(folder)
    x = torch.randn(5, selector.in_dim)
    assert torch.equal(loaded(x), selector(x))
    assert loaded.arms == selector.arms and loaded.target == selector.target
    selector.save(folder)  # overwriting is atomic too
    assert Selector.load(folder).arms == selector.arms


def test_mismatched_pool_or_target_is_a_clear_error(tmp_path, models):
    target, draft = models
    ids, mask = left_padded_prompts(1)
    pool = _pool(target, draft)
    selector = Selector(["weak", "self", "lookup", NO_DRAFT_ARM], "tokens", len(token_features([1])),
                        target=target_fingerprint(target))
    folder = selector.save(tmp_path / "sel")
    with pytest.raises(ValueError, match=r"selector: trained for the drafts \['weak', 'self', 'lookup'\]"):
        draftwise.generate(target, ids, mask, drafts=pool, selector=folder, max_new_tokens=4, **COMMON)
    other = Selector([d.name for d in pool] + [NO_DRAFT_ARM], "tokens", len(token_features([1])),
                     target=target_fingerprint(draft))
    with pytest.raises(ValueError, match="selector: trained for another target"):
        draftwise.generate(target, ids, mask, drafts=pool, selector=OfflinePolicy(other), max_new_tokens=4, **COMMON)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a selector folder"):
        Selector.load(tmp_path / "empty")
    with pytest.raises(ValueError, match="arms"):
        Selector(["a", "b"], "tokens", 3)


def test_selector_values_resolve_to_policies(tmp_path, models):
    target, draft = models
    pool = _pool(target, draft)
    assert resolve_selector(None, pool[:1], target) is None  # one drafter: the engine's default
    assert isinstance(resolve_selector(None, pool, target), OnlinePolicy)
    assert isinstance(resolve_selector("online", pool, target), OnlinePolicy)
    folder = _forced_selector([d.name for d in pool] + [NO_DRAFT_ARM], 1).save(tmp_path / "s")
    assert isinstance(resolve_selector(str(folder), pool, target), OfflinePolicy)
    with pytest.raises(TypeError, match="selector"):
        resolve_selector(1.5, pool, target)


def test_token_features_see_repetition():
    repeated = token_features([5, 6, 7] * 10)
    varied = token_features(list(range(30)))
    assert repeated[-1] > 0.8 and varied[-1] == 0
    context = PolicyContext(torch.tensor([[PAD, 5, 6], [4, 5, 6]]), torch.tensor([1, 0]), 3)
    assert context.prompt_ids() == [[5, 6], [4, 5, 6]]


# ---------------------------------------------------------------------------------------------- collection and training


class _Tokenizer:
    """Text of space-separated ids <-> ids (the tiny models have no tokenizer)."""

    pad_token_id = PAD

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = [int(t) for t in text.split()]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


def _texts(count, seed=0):
    g = torch.Generator().manual_seed(seed)
    texts = []
    for i in range(count):
        ids = torch.randint(3, 100, (6 + i % 3,), generator=g).tolist()
        texts.append(dict(text=" ".join(map(str, ids * (1 + i % 2))), kind="repeat" if i % 2 else "plain"))
    return texts


def test_collected_runs_equal_the_engine_runs(tmp_path, models):
    """The reward's runs are simulated from one forward per draft; they equal, step for step
    counts, what the engine does with that drafter at that fixed γ."""
    target, draft = models
    target.generation_config.eos_token_id = None
    pool = _pool(target, draft)
    prompts = _texts(3)
    collection = collect(target, _Tokenizer(), pool, prompts, tmp_path / "c", max_new_tokens=16, progress=False)
    assert len(collection.records) == 3
    for prompt, record in zip(prompts, collection.records):
        ids = _Tokenizer()(prompt["text"], return_tensors="pt")["input_ids"]
        for arm, drafter in enumerate(pool):
            for gamma in (1, 3, 5):
                out = draftwise.generate(target, ids, drafts=pool, selector=FixedPolicy(arm, gamma=gamma),
                                         max_new_tokens=16, **COMMON)
                stats, run = out.spec_stats, record["arms"][drafter.name][str(gamma)]
                # drafts accepted past max_new_tokens are cut from the output: not counted here
                accepted = sum(min(step.accepted[0], step.emitted[0] - 1) for step in stats.trace)
                assert (stats.target_calls, accepted) == (run["steps"], run["accepted"]), (drafter.name, gamma)
                if drafter.draft_model is not None:
                    assert stats.drafted == run["drafted"]


def test_collection_resumes_and_refuses_another_pool(tmp_path, models):
    target, draft = models
    target.generation_config.eos_token_id = None
    pool = _pool(target, draft)
    folder = tmp_path / "c"
    collect(target, _Tokenizer(), pool, _texts(2), folder, max_new_tokens=8, progress=False)
    log = folder / "records.jsonl"
    first_two = log.read_text().splitlines()
    with open(log, "a") as f:
        f.write('{"text": "cut by a cra')  # a crash in the middle of a line
    again = collect(target, _Tokenizer(), pool, _texts(4), folder, max_new_tokens=8, progress=False)
    lines = log.read_text().splitlines()
    assert lines[:2] == first_two and len(lines) == 4 and len(again.records) == 4
    assert all(json.loads(line) for line in lines)
    with pytest.raises(ValueError, match="collection: .* was collected with"):
        collect(target, _Tokenizer(), pool[:2], _texts(4), folder, max_new_tokens=8, progress=False)


def test_chain_run_counts_steps_like_the_engine():
    answer = [9, 1, 2, 3, 4, 5, 6]
    run = chain_run([True, True, True, False, True, True, True], None, answer, gamma=2)
    # p=1: matches 1,2 -> accept 2, emit 3 (p=4); p=4: matches 4,5 -> accept 2, emit 3 (p=7)
    # (a draft that would end past the answer is cut there: its last token is emitted, not accepted)
    assert run == dict(steps=2, drafted=4, accepted=4, emitted=6)
    run = chain_run(None, lambda p, g: [], answer, gamma=3)
    assert run == dict(steps=6, drafted=0, accepted=0, emitted=6)


@pytest.mark.parametrize("method", ["reinforce", "full"])
def test_training_learns_which_arm_serves_which_context(tmp_path, method):
    """Synthetic records: contexts of two kinds, each served best by another arm; the trained
    selector picks the right one for held-out contexts of both kinds."""
    g = torch.Generator().manual_seed(0)
    records = []
    for i in range(120):
        kind = i % 2
        hidden = (torch.randn(8, generator=g) + 3 * kind).tolist()
        runs = {"a": {"2": dict(steps=10, drafted=20, accepted=18 if kind == 0 else 2, emitted=28 if kind == 0 else 12)},
                "b": {"2": dict(steps=10, drafted=20, accepted=2 if kind == 0 else 18, emitted=12 if kind == 0 else 28)}}
        records.append(dict(text=str(i), kind=str(kind), arms=runs, features={"hidden": hidden, "tokens": hidden}))
    costs = {"target": {"1": 0.01, "3": 0.012}, "draft": {"a": 0.001, "b": 0.001}}
    meta = dict(arms=["a", "b", NO_DRAFT_ARM], target="", costs=costs)
    train = Collection(tmp_path, meta, records[:80])
    heldout = Collection(tmp_path, meta, records[80:])
    selector = train_selector(train, TrainConfig(method=method, epochs=300), progress=False)
    quality = policy_quality(selector, heldout)
    assert quality["selector"] > 0.95 * quality["oracle"] > quality["best_single"]
    assert quality["choices"][NO_DRAFT_ARM] == 0


def test_the_engine_passes_each_prompts_mean_hidden_state(models):
    """The hidden feature read from the engine's prefill (no extra forward) is each prompt's own,
    padding or not: the same as one forward over the unpadded prompt."""
    from draftwise.engine.selector import hidden_features

    target, draft = models
    ids, mask = left_padded_prompts(3)
    seen = {}

    class Recording(OfflinePolicy):
        def start(self, num_drafters, batch, context=None):
            seen["hidden"] = context.hidden.clone()
            super().start(num_drafters, batch, context)

    pool = _pool(target, draft)
    torch.manual_seed(0)
    selector = Selector([d.name for d in pool] + [NO_DRAFT_ARM], "hidden", target.config.hidden_size)
    draftwise.generate(target, ids, mask, drafts=pool, selector=Recording(selector), max_new_tokens=2, **COMMON)
    for row in range(3):
        alone = ids[row][mask[row].bool()].view(1, -1)
        torch.testing.assert_close(seen["hidden"][row], hidden_features(target, alone)[0], atol=1e-4, rtol=1e-4)
