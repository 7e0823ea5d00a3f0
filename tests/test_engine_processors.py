"""Tier 4: Hugging Face's generation settings inside speculative decoding.

Every logits processor runs on each verified position with the ids ``model.generate`` would have
had there, so greedy output equals ``model.generate`` with the same settings token for token and
sampled output follows the processed law; every setting that is not reproduced is refused.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

import draftwise
from draftwise.engine.processing import ScoreProcessing
from draftwise.engine.settings import UnsupportedSetting

from oracles import ALPHA, PAD, chi_square, left_padded_prompts
from tiny_models import tiny_model

AUTO_EOS = "the second token row 0 generates without the setting"

# Token ids below occur in the unconstrained greedy output of the first prompt, so each setting bites.
SETTINGS = [
    pytest.param(dict(repetition_penalty=1.5), id="repetition_penalty"),
    pytest.param(dict(min_new_tokens=10, eos_token_id=AUTO_EOS), id="min_new_tokens"),
    pytest.param(dict(min_length=14, eos_token_id=AUTO_EOS), id="min_length"),
    pytest.param(dict(no_repeat_ngram_size=2), id="no_repeat_ngram_size"),
    pytest.param(dict(bad_words_ids=[[44], [85, 95], [40, 41, 42]]), id="bad_words_ids"),
    pytest.param(dict(sequence_bias={(85,): -4.0, (22, 57): 3.0}), id="sequence_bias"),
    pytest.param(dict(suppress_tokens=[85], begin_suppress_tokens=[15]), id="suppress_tokens"),
    pytest.param(dict(forced_eos_token_id=1, eos_token_id=1), id="forced_eos_token_id"),
    pytest.param(dict(exponential_decay_length_penalty=(1, 1.5), eos_token_id=44), id="length_penalty_decay"),
    pytest.param(dict(repetition_penalty=1.3, no_repeat_ngram_size=3, bad_words_ids=[[9]]), id="combined"),
]


class BanAfterEvenLength(LogitsProcessor):
    """A user processor: bans tokens 92 and 95 wherever the ids so far have an even length."""

    def __call__(self, input_ids, scores):
        even = (torch.full((scores.shape[0],), input_ids.shape[1]) % 2 == 0).view(-1, 1)
        banned = torch.zeros_like(scores, dtype=torch.bool)
        banned[:, [92, 95]] = True
        return scores.masked_fill(even & banned, -torch.inf)


@pytest.fixture(scope="module")
def models():
    return tiny_model("llama", seed=0), tiny_model("llama", layers=1, seed=1)


def _prompts(batch: int):
    """Left-padded prompts with repeats inside (so that the penalties and bans bite)."""
    return left_padded_prompts(batch, high=40)


def _both(target, ids, mask, *, drafts, **settings):
    want = target.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=PAD,
                           max_new_tokens=20, **settings)
    got = draftwise.generate(target, ids, mask, **drafts, do_sample=False, pad_token_id=PAD,
                             max_new_tokens=20, num_assistant_tokens=4, **settings)
    return want, got


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_with_processors_equals_hf_generate(models, settings, batch):
    target, draft = models
    ids, mask = _prompts(batch)
    if settings.get("eos_token_id") == AUTO_EOS:  # an EOS the unconstrained output reaches early
        plain = target.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=PAD,
                                max_new_tokens=2, eos_token_id=None)
        settings = dict(settings, eos_token_id=int(plain[0, -1]))
    want, got = _both(target, ids, mask, drafts=dict(assistant_model=draft), **settings)
    assert torch.equal(got, want)
    plain = target.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, max_new_tokens=20,
                            eos_token_id=settings.get("eos_token_id"))
    assert not torch.equal(want, plain), "the setting should change this output (else the test proves nothing)"


@pytest.mark.parametrize("drafts", [
    pytest.param(dict(prompt_lookup_num_tokens=4), id="prompt-lookup"),
    pytest.param(dict(assistant_model="self"), id="self-draft"),
    pytest.param(dict(), id="no-draft"),
])
def test_greedy_with_processors_other_drafters(models, drafts):
    target, _ = models
    drafts = {k: (target if v == "self" else v) for k, v in drafts.items()}
    ids, mask = _prompts(2)
    want, got = _both(target, ids, mask, drafts=drafts, repetition_penalty=1.4, no_repeat_ngram_size=3)
    assert torch.equal(got, want)


def test_user_logits_processor(models):
    target, draft = models
    ids, mask = _prompts(2)
    processors = LogitsProcessorList([BanAfterEvenLength()])
    want, got = _both(target, ids, mask, drafts=dict(assistant_model=draft), logits_processor=processors)
    assert torch.equal(got, want)
    assert not torch.equal(want, _both(target, ids, mask, drafts={})[0]), "the processor should change this output"


@pytest.mark.parametrize("where", ["generation_config", "model_generation_config"])
def test_settings_in_a_config_are_honoured(models, where):
    """Settings set in a GenerationConfig (passed, or the model's own) are applied, not dropped."""
    target, draft = models
    ids, mask = _prompts(2)
    config = GenerationConfig(repetition_penalty=1.5, no_repeat_ngram_size=2, max_new_tokens=20,
                              do_sample=False, pad_token_id=PAD, return_dict_in_generate=True)
    want = target.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    if where == "generation_config":
        got = draftwise.generate(target, ids, mask, assistant_model=draft, generation_config=config)
    else:
        saved = target.generation_config
        target.generation_config = config
        try:
            got = draftwise.generate(target, ids, mask, assistant_model=draft)
        finally:
            target.generation_config = saved
    assert isinstance(got, draftwise.engine.SpeculativeOutput), "return_dict_in_generate in a config is honoured"
    assert torch.equal(got.sequences, want.sequences)


@pytest.mark.parametrize("name,value", [
    ("num_beams", 2), ("penalty_alpha", 0.6), ("guidance_scale", 1.5), ("encoder_repetition_penalty", 1.2),
    ("output_attentions", True), ("max_time", 5.0), ("num_beam_groups", 2),
])
@pytest.mark.parametrize("where", ["call", "generation_config", "model_generation_config"])
def test_unsupported_settings_are_refused_wherever_set(models, name, value, where):
    target, _ = models
    ids, mask = _prompts(1)
    saved = target.generation_config
    kwargs = dict(max_new_tokens=4)
    if where == "call":
        kwargs[name] = value
    elif where == "generation_config":
        kwargs["generation_config"] = GenerationConfig(**{name: value})
    else:
        target.generation_config = GenerationConfig(**{name: value})
    try:
        with pytest.raises(UnsupportedSetting, match=name):
            draftwise.generate(target, ids, mask, **kwargs)
    finally:
        target.generation_config = saved


def test_unknown_arguments_are_refused(models):
    target, _ = models
    ids, mask = _prompts(1)
    with pytest.raises(TypeError, match="prefix_allowed_tokens_fn"):
        draftwise.generate(target, ids, mask, max_new_tokens=4, prefix_allowed_tokens_fn=lambda b, s: [3])
    with pytest.raises(ValueError, match="num_return_sequences"):
        draftwise.generate(target, ids, mask, max_new_tokens=4, num_return_sequences=2, do_sample=False)


def test_max_length_counts_the_prompt_as_in_hf(models):
    target, draft = models
    ids, mask = _prompts(2)
    want = target.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, max_length=15)
    got = draftwise.generate(target, ids, mask, assistant_model=draft, do_sample=False, pad_token_id=PAD, max_length=15)
    assert torch.equal(got, want)


def test_output_scores_and_logits_have_hf_shapes_and_values(models):
    """Scores are the processed scores of each emitted token, logits the raw ones, as HF returns
    them; eos_token_id=None so that no row ends early (an ended row holds zeros)."""
    target, draft = models
    ids, mask = _prompts(3)
    kwargs = dict(do_sample=False, pad_token_id=PAD, max_new_tokens=9, eos_token_id=None, repetition_penalty=1.3,
                  output_scores=True, output_logits=True, return_dict_in_generate=True)
    want = target.generate(input_ids=ids, attention_mask=mask, **kwargs)
    got = draftwise.generate(target, ids, mask, assistant_model=draft, num_assistant_tokens=4, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for ours, theirs in ((got.scores, want.scores), (got.logits, want.logits)):
        assert len(ours) == len(theirs) == 9
        for a, b in zip(ours, theirs):
            assert a.shape == b.shape and a.dtype == b.dtype
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got.scores[3], got.logits[3]), "the penalty shows in the scores"


def _processed_law(target, prompt: torch.Tensor, processors: LogitsProcessorList, steps: int) -> torch.Tensor:
    """The exact law of the first ``steps`` sampled tokens, ``[V] * steps``, by enumeration with
    Hugging Face's processors (the oracle: independent of the engine's per-position pass)."""
    vocab = target.config.vocab_size
    law = torch.ones(1, dtype=torch.float64)
    prefixes = prompt
    with torch.no_grad():
        for _ in range(steps):
            logits = target(prefixes).logits[:, -1].float()
            scores = torch.stack([processors(prefixes[i: i + 1], logits[i: i + 1])[0] for i in range(len(prefixes))])
            probs = torch.softmax(scores.double(), -1)
            law = (law.view(-1, 1) * probs).flatten()
            prefixes = torch.cat([prefixes.repeat_interleave(vocab, 0), torch.arange(vocab).repeat(len(prefixes)).view(-1, 1)], 1)
    return law


def _sampled_fit(trials: int = 12_000):
    vocab = 8
    target = tiny_model("llama", layers=2, vocab=vocab, seed=0)
    target.generation_config.eos_token_id = None
    draft = tiny_model("llama", layers=1, vocab=vocab, seed=3)
    prompt = torch.tensor([[3, 7, 5, 3]])
    settings = dict(do_sample=True, temperature=0.9, top_k=0, min_p=0.05, repetition_penalty=3.0, no_repeat_ngram_size=2)
    processors = target._get_logits_processor(GenerationConfig(**settings), input_ids_seq_length=prompt.shape[1])
    law = _processed_law(target, prompt, processors, 3)
    out = draftwise.generate(target, prompt.repeat(trials, 1), assistant_model=draft, num_assistant_tokens=3,
                             max_new_tokens=3, seed=7, pad_token_id=0, return_dict_in_generate=True, **settings)
    triples = (out.sequences[:, -3] * vocab + out.sequences[:, -2]) * vocab + out.sequences[:, -1]
    return chi_square(torch.bincount(triples, minlength=vocab**3), law), out.spec_stats


def test_sampling_with_processors_follows_the_processed_law():
    fit, stats = _sampled_fit()
    assert fit.pvalue > ALPHA, f"joint law of the first three tokens: {fit}"
    assert 0 < stats.alpha < 1  # drafts were both accepted and rejected


def test_teeth_processing_only_the_first_position_fails(monkeypatch):
    """Processing only the first verified position of each step (the draft's later positions
    verified against unprocessed scores) must fail the same test."""
    full = ScoreProcessing.__call__

    def first_position_only(self, buffer, proposals, logits, first=0):
        scores = logits.float().clone()
        scores[:, :1] = full(self, buffer, proposals, logits[:, :1], first)
        return scores

    monkeypatch.setattr(ScoreProcessing, "__call__", first_position_only)
    fit, _ = _sampled_fit()
    assert fit.pvalue < ALPHA, f"a broken per-position pass went unnoticed: {fit}"


@pytest.mark.parametrize("count", [1, 3])
def test_num_return_sequences(models, count):
    target, draft = models
    ids, mask = _prompts(2)
    out = draftwise.generate(target, ids, mask, assistant_model=draft, do_sample=True, max_new_tokens=6,
                             num_return_sequences=count, seed=3, pad_token_id=PAD, eos_token_id=None)
    assert out.shape == (2 * count, ids.shape[1] + 6)
    assert torch.equal(out[:, : ids.shape[1]], ids.repeat_interleave(count, 0))
    if count > 1:
        assert not torch.equal(out[0], out[1]), "each sequence is sampled on its own"
