"""Data preparation: the teacher's pass over the fixed corpus runs only for a spec that reads it
(tiny model; the text, prompts and corpus are stubs, no real corpus is built)."""

import dataclasses
import json

import pytest
import torch
from tiny_models import tiny_model

from draftwise.distill import recipe
from draftwise.distill.data import Example
from draftwise.distill.recipe import DataSpec, prepare_data

VOCAB = 101


def _token_rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (6,), generator=g) for _ in range(n)]


class _Tokenizer:
    eos_token_id = 2
    all_special_ids = [2]

    def get_vocab(self):
        return {}


@pytest.fixture
def teacher_calls(monkeypatch):
    """Stubbed text and tokenization; returns the sizes of the fixed-corpus teacher passes."""
    return stub_the_recipe(monkeypatch)


def stub_the_recipe(monkeypatch) -> list:
    """Stub the recipe's text and tokenization; the returned list gets the size of every
    fixed-corpus teacher pass."""
    monkeypatch.setattr(recipe, "training_requests", lambda count, *args: ["request"] * count)
    monkeypatch.setattr(recipe, "heldout_requests", lambda source, count, seed: ["held-out"] * count)
    monkeypatch.setattr(recipe, "chat_prompts", lambda tokenizer, requests, max_tokens: _token_rows(len(requests), 0))

    monkeypatch.setattr(recipe, "corpus_texts", lambda count, seed: [f"text {i}" for i in range(count)])
    monkeypatch.setattr(recipe, "corpus_examples",
                        lambda tokenizer, texts, length: [Example(t, 1) for t in _token_rows(len(texts), 1)])
    calls, real = [], recipe.teacher_log_probs

    def counting(target, examples, vocab_ids, **kwargs):
        calls.append(len(examples))
        return real(target, examples, vocab_ids, **kwargs)

    monkeypatch.setattr(recipe, "teacher_log_probs", counting)
    return calls


SPEC = DataSpec(train_prompts=4, corpus_texts=5, max_new_tokens=3, heldout_prompts=2, heldout_source="stdlib",
                vocab_size=40, teacher_top_k=0)


def test_a_spec_that_never_reads_the_corpus_does_not_prepare_it(teacher_calls, tmp_path):
    target = tiny_model("llama", vocab=VOCAB, seed=1)
    spec = dataclasses.replace(SPEC, reads_fixed_corpus=False)
    unread = prepare_data(target, _Tokenizer(), spec, cache_dir=tmp_path, progress=False)
    assert teacher_calls == [] and unread.fixed_teacher is None
    assert len(unread.fixed) == 5  # its tokens still count for the draft vocabulary
    assert len(unread.target) == 4 and len(unread.heldout) == 2

    read = prepare_data(target, _Tokenizer(), SPEC, cache_dir=tmp_path, progress=False)  # the same cache file
    assert teacher_calls == [5] and len(read.fixed_teacher) == 5
    assert read.fixed_teacher[0].shape == (5, 40)  # 5 predicted tokens over the draft's 40 ids
    assert torch.equal(read.vocab_ids, unread.vocab_ids)
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(read.target, unread.target))

    again = prepare_data(target, _Tokenizer(), SPEC, cache_dir=tmp_path, progress=False)
    assert teacher_calls == [5]  # saved with the teacher's pass
    assert all(torch.equal(a, b) for a, b in zip(again.fixed_teacher, read.fixed_teacher))
    assert len(list(tmp_path.iterdir())) == 1


def test_reading_the_corpus_does_not_rename_the_data():
    assert dataclasses.replace(SPEC, reads_fixed_corpus=False).key() == SPEC.key()


def test_a_prompt_file_replaces_the_built_in_requests_and_names_the_data(tmp_path):
    """``--prompts FILE``: every prompt of the file (requests and conversations), and a data name
    that follows the file's content, not its path."""
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    conversation = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                    {"role": "user", "content": "and now?"}]
    first.write_text('"one"\n{"prompt": "two"}\n' + json.dumps({"messages": conversation}) + "\n")
    second.write_text(first.read_text())
    spec = DataSpec(prompts_file=str(first), train_prompts=1)
    assert recipe.requests_for(spec) == ["one", "two", conversation]
    assert spec.key() == DataSpec(prompts_file=str(second), train_prompts=1).key() != DataSpec().key()
    second.write_text('"one"\n')
    assert DataSpec(prompts_file=str(second)).key() != DataSpec(prompts_file=str(first)).key()


def test_a_held_out_prompt_file_replaces_the_built_in_held_out_requests(tmp_path):
    held = tmp_path / "held.txt"
    held.write_text("first\nsecond\nthird\n")
    spec = DataSpec(heldout_file=str(held), heldout_prompts=2)
    assert recipe.heldout_requests_for(spec) == ["first", "second"]
    assert spec.key() != DataSpec(heldout_prompts=2).key()


def test_chat_prompts_take_conversations():
    from draftwise.distill.data import chat_prompts

    class Template:  # the least a tokenizer with a chat template does here
        chat_template = "yes"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "|".join(m["content"] for m in messages) + "|>"

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord("^")] * add_special_tokens + [ord(c) for c in text]}

    ids = chat_prompts(Template(), [[{"role": "user", "content": "ab"}], "c"], max_tokens=10)
    assert ["".join(map(chr, p.tolist())) for p in ids] == ["ab|>", "c|>"]  # the template holds its specials

    Template.chat_template = None  # a raw prompt gets the tokenizer's special tokens, as tokenizer(text) does
    ids = chat_prompts(Template(), ["c"], max_tokens=10)
    assert ["".join(map(chr, p.tolist())) for p in ids] == ["^c\n\n"]
