"""The transformers API the engine drives: the KV cache's argument name across releases, and no
deprecation warning from the project's own calls (runs under every supported release: `make test-compat`)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import transformers
from packaging.version import Version
from tiny_models import ARCHS, make_pair, tiny_model

import draftwise
from draftwise.distill import build_draft, load_draft, save_draft
from draftwise.distill.data import Example, sample_continuations, teacher_log_probs
from draftwise.engine.models import CACHE_ARGUMENT_SINCE, ModelRunner, cache_argument

VOCAB = 101
INSTALLED = Version(Version(transformers.__version__).base_version)
RELEASE_CACHE_ARGUMENT = "cache" if INSTALLED >= CACHE_ARGUMENT_SINCE else "past_key_values"
DEPRECATIONS = (FutureWarning, DeprecationWarning, PendingDeprecationWarning)


def deprecations(caught) -> list[str]:
    return [f"{w.category.__name__} ({w.filename}:{w.lineno}): {w.message}" for w in caught
            if issubclass(w.category, DEPRECATIONS)]


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_argument_is_the_release_name(arch):
    model = tiny_model(arch)
    name = cache_argument(model)
    assert name == RELEASE_CACHE_ARGUMENT
    assert name in inspect.signature(model.forward).parameters


class _ForwardOfKwargs(torch.nn.Module):
    def forward(self, *args, **kwargs):
        return kwargs


def test_cache_argument_of_a_forward_that_names_neither():
    assert cache_argument(_ForwardOfKwargs()) == RELEASE_CACHE_ARGUMENT


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_calls_raise_no_deprecation_warning(arch):
    target, draft = make_pair(arch, vocab=VOCAB)
    prompts = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompts)
    mask[1, :2] = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner = ModelRunner(target, batch_size=2, capacity=16)
        runner.prefill(prompts, mask)
        runner.extend(torch.tensor([[5, 6], [7, 8]]))
        draftwise.generate(target, input_ids=prompts, attention_mask=mask, assistant_model=draft, max_new_tokens=5)
        draftwise.generate(target, input_ids=prompts, attention_mask=mask, assistant_model=draft, max_new_tokens=5,
                           do_sample=True, seed=0)
        draftwise.generate(target, input_ids=prompts, attention_mask=mask, prompt_lookup_num_tokens=3,
                           max_new_tokens=5)
    assert not deprecations(caught), "\n".join(deprecations(caught))


def test_draft_and_distillation_calls_raise_no_deprecation_warning(tmp_path):
    target = tiny_model("llama", layers=2, vocab=VOCAB)
    prompts = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (4, 6)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        draft = load_draft(save_draft(build_draft(target, 1), tmp_path / "draft"), target)
        examples = sample_continuations(draft, prompts, 4)
        teacher_log_probs(target, examples + [Example(torch.arange(3, 9), 3)], torch.arange(0, VOCAB, 2))
        draftwise.generate(target, input_ids=torch.stack(prompts[:1]), assistant_model=draft, max_new_tokens=5)
    assert not deprecations(caught), "\n".join(deprecations(caught))
