"""LookupThenModelDrafter: prompt lookup where the context repeats, the draft model elsewhere."""

import pytest
import torch
from oracles import ALPHA, chi_square, first_two_token_law
from tiny_models import tiny_model

import draftwise
from draftwise.engine import LookupThenModelDrafter, ModelDrafter, PromptLookupDrafter

PAD = 2


def _repetitive_prompts():
    """Row 0 ends with a bigram seen before (lookup copies), rows 1-2 do not (the model drafts)."""
    rows = [[5, 9, 12, 40, 41, 42, 43, 7, 9, 12], [3, 4, 5, 6, 7, 8, 10, 11, 13, 14], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]]
    return torch.tensor(rows), torch.ones(3, 10, dtype=torch.long)


def test_greedy_output_is_the_target_s_with_rows_copying_and_drafting():
    target, draft = tiny_model("llama", layers=2, seed=0), tiny_model("llama", layers=1, seed=1)
    ids, mask = _repetitive_prompts()
    drafter = LookupThenModelDrafter(ModelDrafter(draft), PromptLookupDrafter(max_ngram=3, min_ngram=2))
    out = draftwise.generate(target, ids, mask, assistant_model=drafter, max_new_tokens=24, do_sample=False,
                             eos_token_id=None, pad_token_id=PAD, num_assistant_tokens=3, return_dict_in_generate=True)
    want = target.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=None,
                           pad_token_id=PAD)
    assert torch.equal(out.sequences, want)
    assert out.spec_stats.drafted > 0


def test_sampling_keeps_the_target_distribution():
    """Half the rows copy (their prompt ends with a bigram seen before), half draft with the model:
    both halves follow the target's law of the first two tokens."""
    target = tiny_model("llama", layers=2, vocab=16, seed=0)
    target.generation_config.eos_token_id = None
    draft = tiny_model("llama", layers=1, vocab=16, seed=3)
    prompts = torch.tensor([[3, 7, 5, 9, 3, 7], [3, 7, 5, 9, 4, 6]])
    drafter = LookupThenModelDrafter(ModelDrafter(draft), PromptLookupDrafter(max_ngram=2, min_ngram=2))
    out = draftwise.generate(target, prompts.repeat(10_000, 1), assistant_model=drafter, num_assistant_tokens=2,
                             max_new_tokens=2, do_sample=True, temperature=1.0, top_k=0, seed=5, pad_token_id=0,
                             return_dict_in_generate=True)
    for row, prompt in enumerate(prompts):
        sequences = out.sequences[row::2]
        pairs = sequences[:, -2] * 16 + sequences[:, -1]
        fit = chi_square(torch.bincount(pairs, minlength=256), first_two_token_law(target, prompt[None], 1.0).flatten())
        assert fit.pvalue > ALPHA, f"prompt {row}: joint law of the first two tokens: {fit}"
    assert 0 < out.spec_stats.alpha < 1


def test_min_ngram_limits_lookup_to_longer_matches():
    from draftwise.engine.sequence import TokenBuffer

    ids = torch.tensor([[1, 2, 3, 9, 8, 3]])  # "3" occurs before, "8 3" does not
    buffer = TokenBuffer.from_prompt(ids, torch.ones_like(ids), capacity=12)
    assert PromptLookupDrafter(max_ngram=2).propose(buffer, 2, sampling=None).tokens.tolist() == [[9, 8]]
    assert PromptLookupDrafter(max_ngram=2, min_ngram=2).propose(buffer, 2, sampling=None).tokens.tolist() == [[-1, -1]]


def test_a_wrapped_draft_with_another_vocabulary_is_refused():
    target = tiny_model("llama", layers=2, seed=0)
    drafter = LookupThenModelDrafter(ModelDrafter(tiny_model("llama", layers=1, vocab=120, seed=1)))
    ids, mask = _repetitive_prompts()
    with pytest.raises(ValueError, match="vocabulary"):
        draftwise.generate(target, ids, mask, assistant_model=drafter, max_new_tokens=4)


def test_copying_rows_propose_copy_extra_more_tokens_than_gamma():
    from draftwise.engine.sequence import TokenBuffer

    ids = torch.tensor([[5, 9, 12, 40, 41, 42, 43, 44, 45, 7, 9, 12]])  # "9 12" occurred before
    buffer = TokenBuffer.from_prompt(ids, torch.ones_like(ids), capacity=20)
    model = ModelDrafter(tiny_model("llama", layers=1, seed=1))
    for extra in (0, 3):
        drafter = LookupThenModelDrafter(model, PromptLookupDrafter(max_ngram=2, min_ngram=2), copy_extra=extra)
        assert drafter.propose(buffer, 2, sampling=None).tokens.tolist() == [[40, 41, 42, 43, 44][: 2 + extra]]
    with pytest.raises(ValueError, match="copy_extra"):
        LookupThenModelDrafter(model, copy_extra=-1)


class _Greedy(PromptLookupDrafter):
    """Proposes 20 tokens more than asked for (lookup tokens, or padding where nothing matches)."""

    def propose(self, buffer, gamma, sampling):
        return super().propose(buffer, gamma + 20, sampling)


def test_a_drafter_proposing_more_than_the_cache_s_room_is_cut_to_the_maximum_gamma():
    target = tiny_model("llama", layers=2, seed=0)
    ids, mask = _repetitive_prompts()
    out = draftwise.generate(target, ids, mask, assistant_model=_Greedy(), max_new_tokens=30, do_sample=False,
                             eos_token_id=None, pad_token_id=PAD, num_assistant_tokens=12,
                             num_assistant_tokens_schedule="constant", return_dict_in_generate=True)
    want = target.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=None,
                           pad_token_id=PAD)
    assert torch.equal(out.sequences, want)
    assert max(out.spec_stats.gammas) == 12


def test_a_lookup_step_without_a_match_verifies_no_padding():
    """Prompt lookup on text that never repeats proposes nothing: each step is then a plain decode
    (the target's call one token wide), not a call over columns of padding."""
    target = tiny_model("llama", seed=0)
    prompt = torch.arange(3, 11).view(1, -1)  # 8 distinct ids
    out = draftwise.generate(target, prompt, assistant_model=PromptLookupDrafter(), num_assistant_tokens=4,
                             do_sample=False, max_new_tokens=6, pad_token_id=0, eos_token_id=None,
                             return_dict_in_generate=True)
    steps = out.spec_stats.trace
    empty = [step for step in steps if step.drafted == [0]]
    assert empty and all(step.width == 1 for step in empty)
