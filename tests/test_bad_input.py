"""Tier 5: the public entry point rejects bad input with errors that name the argument."""

from __future__ import annotations

import pytest
import torch

from draftwise.kernels import Lenience, Uniforms, verify_chain

from cases import make_case


@pytest.fixture
def case():
    return make_case(2, 3, 10, seed=0)


def _call(case, **overrides):
    tokens, draft_probs, logits = case
    args = dict(draft_tokens=tokens, draft_probs=draft_probs, target_logits=logits)
    args.update({name: value for name, value in overrides.items() if name in args})
    kwargs = {"backend": "torch"}
    kwargs.update({name: value for name, value in overrides.items() if name not in args})
    return verify_chain(args["draft_tokens"], args["draft_probs"], args["target_logits"], **kwargs)


BAD = [
    pytest.param(dict(target_logits=[[0.0]]), TypeError, "target_logits", id="logits-not-tensor"),
    pytest.param(dict(target_logits=torch.zeros(2, 4)), ValueError, "target_logits", id="logits-2d"),
    pytest.param(dict(target_logits=torch.zeros(2, 3, 10)), ValueError, "target_logits", id="logits-K-not-K+1"),
    pytest.param(dict(target_logits=torch.zeros(2, 4, 10, dtype=torch.int64)), TypeError, "target_logits",
                 id="logits-int"),
    pytest.param(dict(draft_tokens=torch.zeros(2, 3, dtype=torch.int16)), TypeError, "draft_tokens",
                 id="tokens-int16"),
    pytest.param(dict(draft_tokens=torch.zeros(2, 3)), TypeError, "draft_tokens", id="tokens-float"),
    pytest.param(dict(draft_tokens=torch.zeros(6, dtype=torch.int64)), ValueError, "draft_tokens", id="tokens-1d"),
    pytest.param(dict(draft_tokens=torch.zeros(3, 3, dtype=torch.int64)), ValueError, "target_logits",
                 id="batch-mismatch"),
    pytest.param(dict(draft_probs=torch.zeros(2, 3, 11)), ValueError, "V mismatch", id="vocab-mismatch"),
    pytest.param(dict(draft_probs=torch.zeros(2, 3, 10, dtype=torch.int64)), TypeError, "draft_probs",
                 id="probs-int"),
    pytest.param(dict(draft_probs=torch.zeros(2, 3, 10, device="meta")), ValueError, "draft_probs",
                 id="probs-other-device"),
    pytest.param(dict(temperature=-0.5), ValueError, "temperature", id="temperature-negative"),
    pytest.param(dict(temperature=torch.tensor([1.0, -1.0])), ValueError, "temperature", id="temperature-row-negative"),
    pytest.param(dict(temperature=torch.ones(3)), ValueError, "temperature", id="temperature-wrong-length"),
    pytest.param(dict(temperature="hot"), TypeError, "temperature", id="temperature-string"),
    pytest.param(dict(top_p=0.0), ValueError, "top_p", id="top_p-zero"),
    pytest.param(dict(top_p=1.5), ValueError, "top_p", id="top_p-above-one"),
    pytest.param(dict(top_p=torch.tensor([0.5, float("nan")])), ValueError, "top_p", id="top_p-nan"),
    pytest.param(dict(top_k=-1), ValueError, "top_k", id="top_k-negative"),
    pytest.param(dict(top_k=2.5), TypeError, "top_k", id="top_k-float"),
    pytest.param(dict(lenience=1.5), ValueError, "lenience", id="lenience-epsilon-above-one"),
    pytest.param(dict(lenience="p/eps"), TypeError, "lenience", id="lenience-string"),
    pytest.param(dict(seed=1.5), TypeError, "seed", id="seed-float"),
    pytest.param(dict(seed=torch.zeros(2, dtype=torch.int32)), ValueError, "seed", id="seed-int32-rows"),
    pytest.param(dict(seed=1, uniforms=Uniforms(torch.rand(2, 3), torch.rand(2, 4, 10))), ValueError, "seed",
                 id="seed-and-uniforms"),
    pytest.param(dict(uniforms=Uniforms(torch.rand(2, 3), torch.rand(2, 3, 10))), ValueError, "uniforms.race",
                 id="uniforms-race-shape"),
    pytest.param(dict(uniforms=torch.rand(2, 3)), TypeError, "uniforms", id="uniforms-not-pair"),
    pytest.param(dict(backend="cuda"), ValueError, "backend", id="backend-unknown"),
    pytest.param(dict(return_accept_probs="yes"), TypeError, "return_accept_probs", id="accept-probs-not-bool"),
]


@pytest.mark.parametrize("overrides,error,name", BAD)
def test_bad_input_names_the_argument(case, overrides, error, name):
    with pytest.raises(error, match=name):
        _call(case, **overrides)


def test_lenience_kind_is_checked():
    with pytest.raises(ValueError, match="lenience: kind"):
        Lenience("cubic", 0.5)


def test_forcing_a_missing_backend_says_how_to_get_it(monkeypatch, case):
    from draftwise.kernels import backend

    monkeypatch.setattr(backend, "has_cpp", lambda: False)
    with pytest.raises(RuntimeError, match="pip install"):
        _call(case, backend="cpp")
    monkeypatch.setenv("DRAFTWISE_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="draftwise._C"):
        verify_chain(*case)


def test_inputs_are_not_modified(case):
    tokens, draft_probs, logits = case
    copies = [t.clone() for t in case]
    _call(case, temperature=0.7, top_k=3, top_p=0.9)
    for before, after in zip(copies, (tokens, draft_probs, logits)):
        assert torch.equal(before, after)
