"""The teacher's compact records: top-k ids of the full vocabulary, the rest spread evenly.
Exact where kept, exact in total; recorded during generation as a separate pass would; a recipe
that keeps them chooses the draft's vocabulary from the answers and trains on them."""

import dataclasses

import pytest
import torch
from test_distill_data import SPEC, VOCAB, _Tokenizer, stub_the_recipe
from tiny_models import tiny_model

from draftwise.distill.compact import TopKLogProbs, column_index, dense_teacher, readable_size, record_bytes
from draftwise.distill.data import sample_continuations, teacher_log_probs
from draftwise.distill.recipe import DataSpec, distill, prepare_data
from draftwise.distill.trainer import DistillConfig


def _log_probs(n=5, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(3 * torch.randn(n, vocab, generator=g), -1)


@pytest.fixture
def teacher_calls(monkeypatch):
    return stub_the_recipe(monkeypatch)


def test_the_kept_ids_are_exact_and_the_rest_holds_the_missing_mass_evenly():
    full = _log_probs()
    record = TopKLogProbs.from_log_probs(full, 8)
    dense = record.dense()
    kept = full.topk(8, -1).indices
    torch.testing.assert_close(dense.gather(1, kept), full.gather(1, kept), atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(dense.exp().sum(-1), torch.ones(5), atol=5e-3, rtol=0)  # the total is exact
    outside = torch.ones_like(full, dtype=torch.bool).scatter(1, kept, False)
    tail = dense[outside].view(5, -1)
    assert torch.equal(tail, tail[:, :1].expand_as(tail))  # one value per row outside the kept ids
    assert record.nbytes == record_bytes(5, 8) == 5 * 8 * 6


def test_a_reduced_vocabulary_takes_its_columns_of_the_full_record():
    full = _log_probs(vocab=64, seed=1)
    record = TopKLogProbs.from_log_probs(full, 10)
    ids = torch.tensor([0, 3, 7, 20, 41, 63])
    assert torch.equal(record.dense(ids), record.dense()[:, ids])
    assert torch.equal(dense_teacher(record, ids), record.dense(ids))
    assert torch.equal(dense_teacher(record, ids, column_index(ids, 64)), record.dense(ids))  # a kept index
    dense = torch.randn(3, 6).half()
    assert torch.equal(dense_teacher(dense, ids), dense.float())  # a dense record as it is


def test_keeping_every_id_keeps_the_distribution():
    full = _log_probs(vocab=12)
    torch.testing.assert_close(TopKLogProbs.from_log_probs(full, 12).dense(), full, atol=5e-3, rtol=1e-3)


@pytest.mark.parametrize("k", [0, 13, -1])
def test_k_out_of_range_is_refused(k):
    with pytest.raises(ValueError, match="k:"):
        TopKLogProbs.from_log_probs(_log_probs(vocab=12), k)


def test_split_keeps_the_vocabulary():
    parts = TopKLogProbs.from_log_probs(_log_probs(n=6), 4).split([2, 4])
    assert [len(p) for p in parts] == [2, 4] and all(p.vocab == 50 for p in parts)


def test_readable_sizes():
    assert readable_size(512) == "0.5 KiB" and readable_size(3 * 2**20) == "3.0 MiB"
    assert readable_size(5 * 2**30) == "5.0 GiB"


def test_records_made_while_generating_equal_a_teacher_pass():
    target = tiny_model("llama", vocab=VOCAB, seed=1)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (5,), generator=g) for _ in range(4)]
    examples, recorded = sample_continuations(target, prompts, 6, temperature=1.0, record_top_k=7,
                                              generator=torch.Generator().manual_seed(0), batch_size=3)
    again = teacher_log_probs(target, examples, None, top_k=7)
    for got, want in zip(recorded, again):
        assert got.vocab == want.vocab == VOCAB and got.ids.dtype == torch.int32
        torch.testing.assert_close(got.dense(), want.dense(), atol=3e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="record_ids and record_top_k"):
        sample_continuations(target, prompts, 2, record_ids=torch.arange(5), record_top_k=3)


def test_a_top_k_recipe_chooses_the_vocabulary_from_the_answers_and_trains(teacher_calls, tmp_path, capsys):
    target = tiny_model("llama", vocab=VOCAB, seed=1)
    spec = dataclasses.replace(SPEC, teacher_top_k=8, reads_fixed_corpus=False)
    data = prepare_data(target, _Tokenizer(), spec, cache_dir=tmp_path)
    said = capsys.readouterr().out
    assert "will take at most" in said and "top-8" in said and "KiB" in said
    assert teacher_calls == [] and all(isinstance(t, TopKLogProbs) for t in data.target_teacher)
    answered = torch.cat([a.tokens[a.start:] for a in data.target]).unique()
    assert len(data.vocab_ids) == 40 and torch.isin(answered, data.vocab_ids).all()  # every answer token kept
    trainer = distill(target, _Tokenizer(), data, tmp_path / "run", progress=False,
                      config=DistillConfig(steps=3, batch_size=2, eval_every=3, checkpoint_every=3))
    assert (tmp_path / "run" / "draft" / "config.json").is_file()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in trainer.history if "loss" in r)
    assert 0 < trainer.history[-1]["acceptance"] <= 1


def test_dense_records_keep_their_data_names():
    dense = DataSpec(teacher_top_k=0)
    assert DataSpec().teacher_top_k == 64 and DataSpec().key() != dense.key()
    assert dataclasses.replace(dense, train_prompts=3467, methods=True).key() == "bb0b78aed866"  # the shipped draft's
    assert DataSpec(precision="bfloat16").key() != DataSpec().key()
    with pytest.raises(ValueError, match="teacher_top_k"):
        DataSpec(teacher_top_k=-1)


def test_the_corpus_records_are_compact_too(teacher_calls, tmp_path):
    target = tiny_model("llama", vocab=VOCAB, seed=1)
    data = prepare_data(target, _Tokenizer(), dataclasses.replace(SPEC, teacher_top_k=5), cache_dir=tmp_path,
                        progress=False)
    assert teacher_calls == [5]
    assert all(isinstance(t, TopKLogProbs) and t.ids.shape[1] == 5 for t in data.fixed_teacher)
    assert [len(t) for t in data.fixed_teacher] == [e.num_predicted for e in data.fixed]
