"""The engine on a CUDA device (skipped without one): the target's own greedy output, and a
loop that times its sections with events instead of synchronising the device."""

from __future__ import annotations

import pytest
import torch

import draftwise

from oracles import PAD, left_padded_prompts
from tiny_models import tiny_model

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_pair():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return tiny_model("llama", layers=2, seed=0).cuda(), tiny_model("llama", layers=1, seed=1).cuda()


@pytest.mark.parametrize("drafts", ["one-draft", "draft-and-lookup"])
def test_greedy_equals_hf_generate_without_device_syncs(cuda_pair, drafts, monkeypatch):
    target, draft = cuda_pair
    ids, mask = (t.cuda() for t in left_padded_prompts(3))
    want = target.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=PAD,
                           max_new_tokens=24, eos_token_id=None)
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: syncs.append(args))
    pool = [draft] if drafts == "one-draft" else [draft, draftwise.PromptLookupDrafter(3)]
    out = draftwise.generate(target, ids, mask, drafts=pool, max_new_tokens=24, do_sample=False, pad_token_id=PAD,
                             eos_token_id=None, return_dict_in_generate=True)
    assert torch.equal(out.sequences, want)
    assert syncs == [], "the loop synchronised the device"
    stats = out.spec_stats
    assert stats.time_target > 0 and stats.time_draft > 0 and stats.target_calls > 0
    assert all(step.target_seconds > 0 for step in stats.trace)


@pytest.mark.parametrize("tree_attention", ["sdpa", "triton"])
def test_tree_steps_on_the_device_give_the_target_greedy_output(cuda_pair, tree_attention, monkeypatch):
    """Token trees on CUDA, their attention in SDPA with the tree mask (the default) or in the
    Triton tree-attention kernel."""
    from draftwise.engine import attention
    from draftwise.engine.models import tree_attention_backend

    monkeypatch.setenv("DRAFTWISE_TREE_ATTENTION", tree_attention)
    calls = []
    kernel = attention.tree_attention
    monkeypatch.setattr(attention, "tree_attention", lambda *args, **kw: calls.append(args[-1]) or kernel(*args, **kw))
    target, draft = cuda_pair
    assert tree_attention_backend(torch.device("cuda")) == (None if tree_attention == "sdpa" else "triton")
    ids, mask = (t.cuda() for t in left_padded_prompts(3))
    want = target.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=PAD,
                           max_new_tokens=24, eos_token_id=None)
    got = draftwise.generate(target, ids, mask, assistant_model=draft, tree_budget=10, do_sample=False,
                             pad_token_id=PAD, max_new_tokens=24, eos_token_id=None)
    assert torch.equal(got, want)
    assert bool(calls) == (tree_attention == "triton")
