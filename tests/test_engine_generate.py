"""Tier 4: draftwise.generate gives the target's own output (greedy: token for token; sampling:
the target's distribution), on tiny random models of several architectures."""

from __future__ import annotations

import pytest
import torch

import draftwise
from draftwise.engine import PromptLookupDrafter, SpeculativeEngine

from oracles import ALPHA, PAD, chi_square, first_two_token_law, left_padded_prompts
from tiny_models import ARCHS, tiny_model



@pytest.fixture(scope="module", params=ARCHS)
def pair(request):
    return request.param, tiny_model(request.param, layers=2, seed=0), tiny_model(request.param, layers=1, seed=1)


def _hf(model, ids, mask, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, **kwargs)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("drafts", ["one-draft", "two-drafts", "prompt-lookup", "self-draft"])
def test_greedy_equals_hf_generate(pair, batch, drafts):
    arch, target, draft = pair
    ids, mask = left_padded_prompts(batch)
    want = _hf(target, ids, mask, max_new_tokens=24, eos_token_id=None)
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    if drafts == "one-draft":
        got = draftwise.generate(target, ids, mask, assistant_model=draft, **kwargs)
    elif drafts == "two-drafts":
        got = draftwise.generate(target, ids, mask, drafts=[draft, target], **kwargs)
    elif drafts == "prompt-lookup":
        got = draftwise.generate(target, ids, mask, prompt_lookup_num_tokens=4, **kwargs)
    else:
        got = draftwise.generate(target, ids, mask, assistant_model=target, **kwargs)
    assert torch.equal(got, want), f"{arch}: speculative greedy output differs from model.generate"


@pytest.mark.parametrize("max_new_tokens", [1, 2, 7])
def test_max_new_tokens_reached_mid_block(pair, max_new_tokens):
    _, target, _ = pair
    ids, mask = left_padded_prompts(3)
    want = _hf(target, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=None)
    got = draftwise.generate(target, ids, mask, assistant_model=target, num_assistant_tokens=6,
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    assert torch.equal(got, want)


def test_eos_inside_an_accepted_run(pair):
    """The target drafting for itself accepts every token: an EOS in the middle of a run cuts it."""
    _, target, _ = pair
    ids, mask = left_padded_prompts(3)
    free = _hf(target, ids, mask, max_new_tokens=16, eos_token_id=None)
    eos = int(free[1, ids.shape[1] + 5])  # a token row 1 emits in the middle of its output
    want = _hf(target, ids, mask, max_new_tokens=16, eos_token_id=eos)
    got = draftwise.generate(target, ids, mask, assistant_model=target, num_assistant_tokens=8,
                             max_new_tokens=16, do_sample=False, pad_token_id=PAD, eos_token_id=eos,
                             return_dict_in_generate=True)
    assert torch.equal(got.sequences, want)
    assert got.spec_stats.tau > 1.5  # the run really was accepted in blocks


def test_engine_is_reusable_and_stats_add_up(pair):
    _, target, draft = pair
    engine = SpeculativeEngine(target, [draft])
    ids, mask = left_padded_prompts(3)
    want = _hf(target, ids, mask, max_new_tokens=12, eos_token_id=None)
    for _ in range(2):
        out = engine.generate(ids, mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD,
                              eos_token_id=None, return_dict_in_generate=True,
                              tree_budget=0)  # chain steps, which the per-position counters count
        assert torch.equal(out.sequences, want)
    stats = out.spec_stats
    assert stats.new_tokens == 3 * 12
    assert stats.emitted == stats.new_tokens - 3  # the prefill emits each row's first token
    assert 0 <= stats.alpha <= 1 and stats.tau >= 1
    assert stats.accepted == sum(stats.accepted_at) and stats.drafted == sum(stats.drafted_at)
    assert 0 <= stats.analytic_alpha <= 1


def test_prompt_lookup_proposes_the_continuation_of_the_latest_match():
    from draftwise.engine.sequence import TokenBuffer

    ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 3, 4, 5, 6]])
    buffer = TokenBuffer.from_prompt(ids, torch.ones_like(ids), capacity=20)
    draft = PromptLookupDrafter(max_ngram=2).propose(buffer, 3, sampling=None)
    assert draft.tokens.tolist() == [[3, 4, 5]]  # "5 6" last seen before "3 4 5 6"
    buffer = TokenBuffer.from_prompt(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.int64), capacity=8)
    assert PromptLookupDrafter().propose(buffer, 3, sampling=None).tokens.tolist() == [[-1, -1, -1]]


@pytest.mark.parametrize("arch,top_k,top_p", [
    pytest.param("llama", 0, 1.0, id="llama"),
    pytest.param("gpt2", 0, 1.0, id="gpt2"),
    pytest.param("llama", 8, 0.75, id="llama-top_k-top_p"),
])
def test_sampling_follows_the_target_distribution(arch, top_k, top_p):
    """Each row of a 20k-row batch is one trial (row b is seeded seed + b). With top-k / top-p the
    drafts are drawn from the filtered draft distribution, and the target's is filtered too."""
    target = tiny_model(arch, layers=2, vocab=16, seed=0)
    target.generation_config.eos_token_id = None  # no stop: every row samples two tokens
    draft = tiny_model(arch, layers=1, vocab=16, seed=3)
    prompt = torch.tensor([[3, 7, 5, 9]])
    trials = 20_000
    law = first_two_token_law(target, prompt, 0.8, top_k, top_p)
    out = draftwise.generate(target, prompt.repeat(trials, 1), assistant_model=draft, num_assistant_tokens=3,
                             max_new_tokens=2, do_sample=True, temperature=0.8, top_k=top_k, top_p=top_p,
                             seed=11, pad_token_id=0, return_dict_in_generate=True)
    pairs = out.sequences[:, -2] * 16 + out.sequences[:, -1]
    fit = chi_square(torch.bincount(pairs, minlength=256), law.flatten())
    assert fit.pvalue > ALPHA, f"joint law of the first two tokens: {fit}"
    assert 0 < out.spec_stats.alpha < 1  # drafts were both accepted and rejected


def test_same_seed_same_output():
    """With a fixed gamma (draft lengths that do not follow timings) a seed fixes the tokens."""
    target, draft = tiny_model("llama", seed=0), tiny_model("llama", layers=1, seed=1)
    ids, mask = left_padded_prompts(3)
    kwargs = dict(assistant_model=draft, max_new_tokens=16, do_sample=True, temperature=1.0, eos_token_id=None,
                  pad_token_id=PAD, num_assistant_tokens=3, num_assistant_tokens_schedule="constant")
    first = draftwise.generate(target, ids, mask, seed=5, **kwargs)
    assert torch.equal(first, draftwise.generate(target, ids, mask, seed=5, **kwargs))
    assert not torch.equal(first, draftwise.generate(target, ids, mask, seed=6, **kwargs))


def test_streamer_receives_every_token():
    target = tiny_model("llama", seed=0)

    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    ids, mask = left_padded_prompts(1)
    streamer = Collect()
    out = draftwise.generate(target, ids, mask, assistant_model=target, max_new_tokens=10, do_sample=False,
                             eos_token_id=None, pad_token_id=PAD, streamer=streamer)
    assert streamer.chunks[0] == ids[0].tolist() and streamer.ended
    assert sum(streamer.chunks[1:], []) == out[0, ids.shape[1]:].tolist()


def test_bad_arguments_are_named():
    target = tiny_model("llama", seed=0)
    ids, mask = left_padded_prompts(1)
    with pytest.raises(TypeError, match="num_beams"):
        draftwise.generate(target, ids, mask, max_new_tokens=4, num_beams=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        draftwise.generate(target, ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        draftwise.generate(target, ids, mask, max_new_tokens=4, do_sample=True, temperature=-1.0)
    with pytest.raises(ValueError, match="attention_mask"):
        draftwise.generate(target, ids, torch.ones(1, 3, dtype=torch.int64), max_new_tokens=4)
    with pytest.raises(ValueError, match="vocabulary"):
        draftwise.generate(target, ids, mask, assistant_model=tiny_model("llama", vocab=120), max_new_tokens=4)


def test_confidence_threshold_drafts_less_and_changes_nothing(pair):
    """A weak draft stops early below assistant_confidence_threshold; the output is the same."""
    _, target, draft = pair
    ids, mask = left_padded_prompts(3)
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=PAD, eos_token_id=None,
                  num_assistant_tokens=6, return_dict_in_generate=True)
    full = draftwise.generate(target, ids, mask, assistant_model=draft, assistant_confidence_threshold=0.0, **kwargs)
    early = draftwise.generate(target, ids, mask, assistant_model=draft, assistant_confidence_threshold=0.9, **kwargs)
    assert torch.equal(full.sequences, early.sequences)
    assert early.spec_stats.drafted < full.spec_stats.drafted
    assert full.spec_stats.drafted == 6 * full.spec_stats.row_steps
    # Below every draft probability: each row proposes one token per step (kept, as in Hugging
    # Face's assisted generation) and the step stops there, so every verification is 2 tokens wide.
    widths = []
    hook = target.register_forward_pre_hook(lambda _, args, kw: widths.append(kw["input_ids"].shape[1]),
                                            with_kwargs=True)
    try:
        doubtful = draftwise.generate(target, ids, mask, assistant_model=draft,
                                      assistant_confidence_threshold=0.999, **kwargs)
    finally:
        hook.remove()
    assert torch.equal(full.sequences, doubtful.sequences)
    assert doubtful.spec_stats.drafted == doubtful.spec_stats.row_steps
    assert widths[0] == ids.shape[1] and set(widths[1:]) == {2}  # the prefill, then the verifications
    with pytest.raises(ValueError, match="assistant_confidence_threshold"):
        draftwise.generate(target, ids, mask, assistant_model=draft, assistant_confidence_threshold=1.5, **kwargs)


def test_pooled_statistics_are_ratios_of_sums():
    from draftwise.engine.stats import SpecStats

    first = SpecStats(drafted=4, accepted=2, emitted=5, row_steps=2, drafted_at=[2, 2], accepted_at=[2, 0])
    second = SpecStats(drafted=6, accepted=6, emitted=9, row_steps=2, drafted_at=[2, 2, 2], accepted_at=[2, 2, 2])
    pooled = SpecStats.total([first, second])
    assert pooled.alpha == 8 / 10 and pooled.tau == 14 / 4  # not the mean of 0.5 and 1.0, 2.5 and 4.5
    assert pooled.drafted_at == [4, 4, 2] and pooled.accepted_at == [4, 2, 2]


def test_step_counters_add_up_per_drafter(pair):
    """The per-step host values feed the totals, every drafter's share and the trace alike."""
    _, target, draft = pair
    ids, mask = left_padded_prompts(3)
    out = draftwise.generate(target, ids, mask, drafts=[draft, PromptLookupDrafter(3)], max_new_tokens=16,
                             do_sample=False, pad_token_id=PAD, eos_token_id=None, return_dict_in_generate=True)
    stats = out.spec_stats
    assert stats.drafted == sum(sum(step.drafted) for step in stats.trace) == sum(stats.drafted_at)
    assert stats.emitted == sum(sum(step.emitted) for step in stats.trace)
    parts = stats.per_draft.values()
    assert sum(p.drafted for p in parts) == stats.drafted and sum(p.accepted for p in parts) == stats.accepted
    assert sum(p.accept_prob_count for p in parts) == stats.accept_prob_count == stats.drafted
    assert all(0 <= p.analytic_alpha <= 1 for p in parts if p.accept_prob_count)
