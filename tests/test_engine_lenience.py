"""Lossy speculative sampling through ``generate(lenience=...)``: epsilon 1 is the exact path,
smaller epsilon accepts more drafts, greedy decoding is untouched, bad values are named."""

from __future__ import annotations

import math

import pytest
import torch

import draftwise
from draftwise import Lenience
from draftwise.engine import SpeculativeEngine

from tiny_models import make_pair

PAD = 2


@pytest.fixture(scope="module")
def pair():
    return make_pair("llama")


def _prompts(batch: int = 8, width: int = 6):
    return torch.randint(3, 100, (batch, width), generator=torch.Generator().manual_seed(0))


# A sampled run with every draft token proposed (no confidence cut) and no top-k filter, so that
# acceptance depends on p and q alone; temperature 0.2 sharpens the tiny models' near-uniform
# distributions so that exact sampling rejects often.
SAMPLED = dict(max_new_tokens=32, do_sample=True, temperature=0.2, top_k=0, num_assistant_tokens=4,
               assistant_confidence_threshold=0.0, seed=3, eos_token_id=None, pad_token_id=PAD,
               return_dict_in_generate=True)


def _sampled(target, draft, lenience=None):
    return draftwise.generate(target, _prompts(), assistant_model=draft, lenience=lenience, **SAMPLED)


@pytest.fixture(scope="module")
def exact(pair):
    return _sampled(*pair)


@pytest.mark.parametrize("lenience", [
    pytest.param(1.0, id="float"),
    pytest.param(Lenience("power", 1.0), id="power"),
    pytest.param(Lenience("linear", 1), id="linear"),
])
def test_epsilon_one_is_the_exact_path(pair, exact, lenience):
    got = _sampled(*pair, lenience=lenience)
    assert torch.equal(got.sequences, exact.sequences)
    assert (got.spec_stats.drafted, got.spec_stats.accepted) == (exact.spec_stats.drafted, exact.spec_stats.accepted)
    assert got.spec_stats.analytic_alpha == exact.spec_stats.analytic_alpha


@pytest.mark.parametrize("lenience", [
    pytest.param(0.1, id="float"),
    pytest.param(Lenience("linear", 0.1), id="linear"),
    pytest.param(Lenience("square", 0.3), id="square"),
])
def test_small_epsilon_raises_acceptance(pair, exact, lenience):
    """8 rows x 32 tokens, 4 drafts a step: a few hundred acceptance tests each way; exact sampling
    accepts about one draft in three here, a lenient f(p, eps) >> p nearly all of them."""
    lossy = _sampled(*pair, lenience=lenience).spec_stats
    exact = exact.spec_stats
    assert exact.drafted >= 200 and lossy.drafted >= 100
    assert exact.alpha < 0.5
    assert lossy.alpha > exact.alpha + 0.3, f"alpha: exact {exact.alpha:.3f}, lenient {lossy.alpha:.3f}"
    assert lossy.analytic_alpha > exact.analytic_alpha
    assert lossy.tau > exact.tau


def test_float_means_the_default_kind(pair):
    """A bare epsilon is ``Lenience(epsilon=...)``, whose default kind is power (p ** eps, more
    lenient here than linear p / eps at the same epsilon)."""
    bare = _sampled(*pair, lenience=0.3)
    assert torch.equal(bare.sequences, _sampled(*pair, lenience=Lenience(epsilon=0.3)).sequences)
    assert Lenience(epsilon=0.3) == Lenience("power", 0.3)
    linear = _sampled(*pair, lenience=Lenience("linear", 0.3))
    assert bare.spec_stats.alpha > linear.spec_stats.alpha


def test_engine_binds_lenience_per_call(pair, exact):
    """A lenient call on a reused engine leaves the next call exact."""
    target, draft = pair
    engine = SpeculativeEngine(target, [draft])
    lossy = engine.generate(_prompts(), lenience=0.1, **SAMPLED)
    after = engine.generate(_prompts(), **SAMPLED)
    assert lossy.spec_stats.alpha > exact.spec_stats.alpha
    assert torch.equal(after.sequences, exact.sequences)


@pytest.mark.parametrize("lenience", [0.1, Lenience("linear", 0.05)], ids=["float", "linear"])
def test_greedy_ignores_lenience(pair, lenience):
    """Greedy rows accept a draft only when it is the target's argmax, lenient or not."""
    target, draft = pair
    ids = _prompts(3)
    want = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                           do_sample=False, eos_token_id=None, pad_token_id=PAD)
    kwargs = dict(assistant_model=draft, max_new_tokens=16, eos_token_id=None, pad_token_id=PAD)
    assert torch.equal(draftwise.generate(target, ids, do_sample=False, lenience=lenience, **kwargs), want)
    assert torch.equal(draftwise.generate(target, ids, do_sample=True, temperature=0.0, lenience=lenience,
                                          **kwargs), want)


@pytest.mark.parametrize("value,error", [
    pytest.param(0.0, ValueError, id="zero"),
    pytest.param(-0.5, ValueError, id="negative"),
    pytest.param(1.5, ValueError, id="above-one"),
    pytest.param(math.nan, ValueError, id="nan"),
    pytest.param(math.inf, ValueError, id="inf"),
    pytest.param("power", TypeError, id="string"),
    pytest.param(True, TypeError, id="bool"),
    pytest.param(("linear", 0.5), TypeError, id="tuple"),
])
def test_bad_lenience_is_named(pair, value, error):
    target, draft = pair
    with pytest.raises(error, match="lenience"):
        draftwise.generate(target, _prompts(1), assistant_model=draft, max_new_tokens=4, do_sample=True,
                           lenience=value)


def test_bad_lenience_object_is_named():
    with pytest.raises(ValueError, match="lenience"):
        Lenience("linear", 0.0)
    with pytest.raises(ValueError, match="lenience"):
        Lenience("cubic", 0.5)
