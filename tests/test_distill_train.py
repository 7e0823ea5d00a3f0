"""Data sources, mixtures, the trainer (α rises, checkpoints resume) on tiny models."""

import json

import pytest
import torch
from tiny_models import tiny_model

from draftwise.distill import DistillConfig, DistillTrainer, build_draft, load_draft
from draftwise.distill.trainer import OBJECTIVES
from draftwise.distill.data import Example, collate, frequent_tokens, sample_continuations, teacher_log_probs
from draftwise.distill.sources import Item, Mixture, OnPolicySource, StaticSource, Teacher

VOCAB = 101


@pytest.fixture(scope="module")
def target():
    model = tiny_model("llama", layers=3, vocab=VOCAB, seed=3)
    with torch.no_grad():  # sharper distributions than a random init gives: something to learn
        model.lm_head.weight.mul_(8)
    return model.requires_grad_(False)


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(torch.randint(3, 10, (1,), generator=g)),), generator=g) for _ in range(n)]


class Counting:
    def __init__(self, name):
        self.name, self.taken = name, 0

    def take(self, n):
        self.taken += n
        return [Item(Example(torch.tensor([1, 2]), 1), None, self.name)] * n


def test_mixture_fractions_hold_at_every_step():
    sources = [Counting("a"), Counting("b"), Counting("c")]
    mixture = Mixture(sources, [0.5, 0.3, 0.2])
    for step in range(1, 11):
        items = mixture.take(8)
        assert len(items) == 8
        for source, fraction in zip(sources, (0.5, 0.3, 0.2)):
            assert abs(source.taken - fraction * 8 * step) <= 1
    with pytest.raises(ValueError, match="fractions"):
        Mixture(sources, [0.5, 0.6, 0.1])


def test_static_source_visits_every_example_once_per_epoch():
    examples = [Example(torch.tensor([i, i + 1]), 1) for i in range(7)]
    source = StaticSource("s", examples, None, seed=1)
    first = [int(i.example.tokens[0]) for i in source.take(7)]
    assert sorted(first) == list(range(7))
    state = source.state_dict()
    after = [int(i.example.tokens[0]) for i in source.take(5)]
    source.load_state_dict(state)
    assert [int(i.example.tokens[0]) for i in source.take(5)] == after
    known = [torch.full((1, 3), float(i)) for i in range(7)]  # teacher log-probs computed earlier
    items = StaticSource("k", examples, None, known=known).take(7)
    assert all(float(i.teacher[0, 0]) == float(i.example.tokens[0]) for i in items)
    with pytest.raises(ValueError, match="known"):
        StaticSource("k", examples, None, known=known[:3])


def test_unprepared_fixed_text_gets_the_teacher_only_when_the_objective_needs_it(target):
    from draftwise.distill.recipe import PreparedData, make_sources

    examples = [Example(p, 1) for p in _prompts(6, 4)]
    data = PreparedData(None, [], examples, None, [], [], [], [], [])
    scored = make_sources(data, target, None, {"fixed": 1.0}).take(6)
    expected = Teacher(target, None)([i.example for i in scored])
    assert all(torch.equal(i.teacher, t) for i, t in zip(scored, expected))
    assert all(i.teacher is None for i in make_sources(data, target, None, {"fixed": 1.0}, needs_teacher=False).take(6))
    # Only cross-entropy trains without the teacher's log-probs.
    assert [o for o in OBJECTIVES if not DistillConfig(objective=o).needs_teacher] == ["ce"]


def test_corpus_documentation_share_is_checked():
    from draftwise.distill.data import corpus_texts

    with pytest.raises(ValueError, match="docs_share"):
        corpus_texts(10, docs_share=1.5)


DOCUMENTED = 'def halve(x):\n    """Half of x.\n\n    >>> halve(4)\n    2.0\n    """\n    y = x / 2\n    return y'
UNDOCUMENTED = "def double(x):\n    y = x * 2\n    return y\n"


def test_completion_requests_show_the_signature_and_docstring_only():
    from draftwise.prompts import signature_and_docstring

    assert signature_and_docstring(DOCUMENTED) == DOCUMENTED.split("\n    y =")[0]
    assert signature_and_docstring(UNDOCUMENTED) is None
    assert signature_and_docstring('def f():\n    """Only a docstring."""') is None  # nothing to write
    assert signature_and_docstring("x = 1") is None


def test_training_requests_add_one_completion_per_documented_function(monkeypatch):
    from draftwise.distill import data

    monkeypatch.setattr(data, "stdlib_functions", lambda methods: [DOCUMENTED, UNDOCUMENTED])
    monkeypatch.setattr(data, "doc_passages", lambda: ["A passage."])
    plain = data.training_requests(8, completions=False)
    with_completions = data.training_requests(8, completions=True)
    added = [r for r in with_completions if r.split("\n")[0] in data.COMPLETION_REQUESTS]
    assert len(plain) == 3 and len(with_completions) == 4 and len(added) == 1
    assert "return y" not in added[0] and '"""Half of x.' in added[0]
    assert sorted(set(with_completions) - set(added)) == sorted(plain)


def test_data_spec_key_names_the_completions_only_when_on():
    from draftwise.distill.recipe import DataSpec

    # The name of data prepared without completion prompts does not change with the field.
    assert DataSpec(train_prompts=3467, methods=True, teacher_top_k=0).key() == "bb0b78aed866"
    assert DataSpec(completions=True).key() != DataSpec().key()


def test_generated_log_probs_equal_a_teacher_pass(target):
    ids = torch.arange(0, VOCAB, 2)
    examples, recorded = sample_continuations(target, _prompts(5), 8, temperature=1.0, record_ids=ids,
                                              generator=torch.Generator().manual_seed(0), batch_size=3)
    assert len(examples) == 5 and all(e.num_predicted == 8 for e in examples)
    for got, want in zip(recorded, teacher_log_probs(target, examples, ids)):
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=1e-2)


def test_sampling_stops_rows_at_eos(target):
    prompts = _prompts(6)
    greedy = sample_continuations(target, prompts, 10)
    eos = int(greedy[0].tokens[greedy[0].start + 2])  # row 0's third token
    cut = sample_continuations(target, prompts, 10, eos_token_id=eos)
    first = cut[0].tokens[cut[0].start:]
    assert int(first[-1]) == eos and len(first) <= 3


def test_collate_marks_the_predicting_positions():
    examples = [Example(torch.tensor([5, 6, 7, 8]), 2), Example(torch.tensor([9, 10, 11]), 1)]
    ids, mask, positions = collate(examples, "cpu")
    assert ids.tolist() == [[5, 6, 7, 8], [9, 10, 11, 0]] and mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert positions.tolist() == [1, 2, 4, 5]  # tokens 7, 8 and 10, 11 are predicted


def test_frequent_tokens_keeps_the_required_ids():
    examples = [Example(torch.tensor([4, 4, 4, 5, 5, 6]), 1)]
    assert frequent_tokens(examples, 3, 10, always=[9]).tolist() == [4, 5, 9]


def _trainer(target, tmp_path, objective="fkl", steps=30, lmbda=0.5):
    ids = frequent_tokens(sample_continuations(target, _prompts(32, 1), 16, temperature=1.0,
                                               generator=torch.Generator().manual_seed(1)), 60, VOCAB)
    teacher = Teacher(target, ids)
    prompts = _prompts(48)
    data = sample_continuations(target, prompts, 16, temperature=1.0, generator=torch.Generator().manual_seed(2))
    held = sample_continuations(target, _prompts(8, 5), 16, temperature=1.0, generator=torch.Generator().manual_seed(3))
    heldout = [Item(e, t, "held") for e, t in zip(held, teacher(held))]
    draft = build_draft(target, 1, vocab_ids=ids)
    torch.manual_seed(0)
    mix = Mixture([StaticSource("target", data, teacher), OnPolicySource(draft, prompts, teacher, max_new_tokens=8)],
                  [1 - lmbda, lmbda])
    config = DistillConfig(objective=objective, steps=steps, batch_size=8, lr=3e-3, warmup_steps=3, eval_every=10,
                           checkpoint_every=10)
    return DistillTrainer(draft, mix, config, tmp_path, heldout=heldout)


@pytest.mark.parametrize("objective", ["fkl", "tvd"])
def test_distillation_raises_the_acceptance_rate(target, tmp_path, objective):
    trainer = _trainer(target, tmp_path, objective)
    history = trainer.train(progress=False)
    before, after = history[0], history[-1]
    assert after["acceptance"] > before["acceptance"] + 0.02, (before, after)
    assert after["divergence"] < before["divergence"]
    saved = json.loads((tmp_path / "training.json").read_text())
    assert saved["history"][-1]["step"] == 30
    loaded = load_draft(tmp_path / "draft", target)  # the output loads as a draft
    assert loaded.config.num_hidden_layers == 1


def test_checkpoint_resume_continues_exactly(target, tmp_path):
    straight = _trainer(target, tmp_path / "a", steps=20)
    straight.train(progress=False)
    _trainer(target, tmp_path / "b", steps=20).train(progress=False, until=10)  # interrupted half-way
    assert not (tmp_path / "b" / "draft").exists()
    resumed = _trainer(target, tmp_path / "b", steps=20)
    assert resumed.resume() and resumed.step == 10
    resumed.train(progress=False)
    for a, b in zip(straight.params, resumed.params):
        torch.testing.assert_close(a, b)
    assert [r["step"] for r in resumed.history if "loss" in r] == list(range(1, 21))


def test_resume_refuses_another_config(target, tmp_path):
    _trainer(target, tmp_path, steps=10).train(progress=False)
    other = _trainer(target, tmp_path, objective="rkl", steps=10)
    with pytest.raises(ValueError, match="objective"):
        other.resume()


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="objective"):
        DistillConfig(objective="kl")
    with pytest.raises(ValueError, match="steps"):
        DistillConfig(steps=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        DistillConfig(steps=5, warmup_steps=9)
    config = DistillConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert config.lr_factor(0) == pytest.approx(0.1) and config.lr_factor(9) == pytest.approx(1.0)
    assert config.lr_factor(99) == pytest.approx(0.1, abs=1e-3)


class _IdTokenizer:
    """Text of space-separated ids -> ids (what evaluate_drafts needs of a tokenizer)."""

    pad_token_id, eos_token_id = 0, None

    def __call__(self, text, return_tensors="pt", add_special_tokens=False):
        ids = torch.tensor([[int(t) for t in text.split()]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_evaluate_drafts_rows(target):
    from draftwise.distill.evaluate import evaluate_drafts

    prompts = [" ".join(str(int(t)) for t in p) for p in _prompts(3, seed=5)]
    drafts = {"itself": target, "other": tiny_model("llama", layers=1, vocab=VOCAB, seed=9)}
    rows = evaluate_drafts(target, _IdTokenizer(), drafts, prompts, gammas=(1, 3), modes=("greedy", "T=1"),
                           max_new_tokens=6, progress=False)
    assert [(r["mode"], r["draft"], r["gamma"]) for r in rows] == [
        (m, d, g) for m in ("greedy", "T=1") for d in ("itself", "other") for g in (1, 3)]
    for row in rows:
        assert row["speedup"] == pytest.approx(row["tokens_per_s"] / row["target_tokens_per_s"])
        assert 1.0 <= row["tau"] <= row["gamma"] + 1
        if row["draft"] == "itself":  # the target drafting for itself is accepted (up to float noise at T=1)
            assert row["alpha"] == 1.0 if row["mode"] == "greedy" else row["alpha"] > 0.9
    with pytest.raises(ValueError, match="modes"):
        evaluate_drafts(target, _IdTokenizer(), drafts, prompts, modes=("beam",))
