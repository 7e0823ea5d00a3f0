"""Tier 1: every backend gives exactly the float64 reference's tokens and accept counts."""

from __future__ import annotations

import pytest
import torch

from draftwise.kernels import available_backends, get_implementation, normalize_inputs
from draftwise.kernels.reference import chain_reference

from cases import make_case, make_uniforms

BACKENDS = [
    pytest.param(name, id=name, marks=[] if name in available_backends("cpu") else
                 pytest.mark.skip(reason=f"backend {name!r} is not available here"))
    for name in ("torch", "cpp", "triton")
]

# (batch, k, vocab, regime, ragged): the shapes and (p, q) regimes TESTING.md lists.
SHAPES = [
    pytest.param(1, 4, 111, "random", False, id="B1-K4-V111-random"),
    pytest.param(3, 1, 111, "equal", False, id="B3-K1-V111-equal"),
    pytest.param(5, 16, 111, "random", True, id="B5-K16-V111-ragged"),
    pytest.param(4, 0, 111, "random", False, id="B4-K0-V111"),
    pytest.param(3, 4, 1, "random", False, id="B3-K4-V1"),
    pytest.param(3, 5, 111, "onehot", True, id="B3-K5-V111-onehot-ragged"),
    pytest.param(7, 3, 257, "peaked", True, id="B7-K3-V257-peaked-ragged"),
    pytest.param(2, 4, 32000, "disjoint", False, id="B2-K4-V32000-disjoint"),
    pytest.param(2, 2, 70001, "peaked", False, id="B2-K2-V70001-peaked"),
]

MODES = [
    pytest.param(dict(temperature=1.0), id="T1"),
    pytest.param(dict(temperature=0.0), id="greedy"),
    pytest.param("mixed", id="mixed-rows"),
    pytest.param(dict(temperature=0.7, lenience=0.5), id="lenient-power"),
]


def _mode_kwargs(mode, batch: int) -> dict:
    if mode != "mixed":
        return dict(mode)
    # Greedy and sampled rows in one batch, each row with its own temperature / top-k / top-p.
    temperature = torch.tensor([0.0, 1.0, 0.6, 1.3] * batch)[:batch]
    top_k = torch.tensor([0, 5, 0, 40] * batch)[:batch]
    top_p = torch.tensor([1.0, 1.0, 0.8, 0.9] * batch)[:batch]
    return dict(temperature=temperature, top_k=top_k, top_p=top_p)


def _assert_matches_reference(backend: str, case, noise: str, **kwargs) -> None:
    tokens, draft_probs, logits = case
    batch, k = tokens.shape
    if noise == "injected":
        kwargs["uniforms"] = make_uniforms(batch, k, logits.shape[-1])
    else:
        kwargs["seed"] = torch.arange(batch, dtype=torch.int64) * 1_000_003 + 17
    inputs = normalize_inputs(tokens, draft_probs, logits, return_accept_probs=True, **kwargs)
    got = get_implementation(backend)(inputs)
    want = chain_reference(inputs, torch.float64)
    torch.testing.assert_close(got.num_accepted, want.num_accepted, rtol=0, atol=0)
    torch.testing.assert_close(got.output_tokens, want.output_tokens, rtol=0, atol=0)
    torch.testing.assert_close(got.accept_probs, want.accept_probs, rtol=1e-4, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch,k,vocab,regime,ragged", SHAPES)
def test_matches_reference_with_injected_noise(backend, batch, k, vocab, regime, ragged, mode):
    if backend == "triton" and vocab * (k + 1) * batch > 400_000 and mode == "mixed":
        pytest.skip("top-k/top-p over a large vocabulary is too slow for the Triton interpreter")
    case = make_case(batch, k, vocab, regime, ragged=ragged, seed=batch * 100 + k)
    _assert_matches_reference(backend, case, "injected", **_mode_kwargs(mode, batch))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,k,vocab,regime,ragged", SHAPES[:7])
def test_matches_reference_with_seeded_noise(backend, batch, k, vocab, regime, ragged):
    case = make_case(batch, k, vocab, regime, ragged=ragged, seed=7)
    _assert_matches_reference(backend, case, "seeded", **_mode_kwargs("mixed", batch))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_input_dtypes(backend, dtype):
    case = make_case(3, 4, 300, "random", seed=3, dtype=dtype)
    _assert_matches_reference(backend, case, "injected", temperature=torch.tensor([1.0, 0.0, 0.8]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "square", "power"])
def test_lenience_kinds(backend, kind):
    from draftwise.kernels import Lenience

    case = make_case(5, 4, 64, "random", seed=11)
    _assert_matches_reference(backend, case, "injected", lenience=Lenience(kind, 0.6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rows(backend):
    """NaN, -inf and +inf rows still give ids in [0, V) and match the reference."""
    tokens, draft_probs, logits = make_case(4, 2, 50, "random", seed=5)
    logits[0, 0] = float("nan")
    logits[1, :] = -torch.inf
    logits[2, 1, [3, 17]] = torch.inf
    logits[3, 0, :25] = float("nan")
    for temperature in (1.0, 0.0):
        _assert_matches_reference(backend, (tokens, draft_probs, logits), "injected", temperature=temperature)
