"""The reference's own building blocks: the generator, and the target distribution vs transformers."""

from __future__ import annotations

import warnings

import pytest
import torch

from draftwise.kernels import backend
from draftwise.kernels.reference import philox_race_uniform, philox_uniform, sanitize_logits, target_probs


def _philox_word0(key: int, counter: tuple[int, int, int, int]) -> int:
    """Philox4x32-10 written out on Python ints, straight from the paper's round function."""
    mask = 0xFFFFFFFF
    k0, k1 = key & mask, (key >> 32) & mask
    c0, c1, c2, c3 = counter
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & mask, (p0 >> 32) ^ c3 ^ k1, p0 & mask
        k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
    return c0


def test_philox_known_answer_and_scalar_model():
    """Random123's vector (counter 0, key 0 -> 0x6627e8d5), then random keys and counters."""
    assert _philox_word0(0, (0, 0, 0, 0)) == 0x6627E8D5
    g = torch.Generator().manual_seed(0)
    seeds = torch.randint(-(2**63), 2**63 - 1, (64,), generator=g)
    counters = torch.randint(0, 2**32, (3, 64), generator=g)
    u = philox_uniform(seeds, counters[0], counters[1], counters[2])
    for i in range(64):
        word = _philox_word0(int(seeds[i]) & (2**64 - 1), (*counters[:, i].tolist(), 0))
        assert u[i].item() == ((word >> 9) + 0.5) * 2.0**-23


def test_philox_uniforms_are_uniform_and_inside_the_open_interval():
    u = philox_uniform(torch.arange(4).view(-1, 1), torch.arange(50_000), 3, 1)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 5 * (1 / 12 / u.numel()) ** 0.5
    assert (u.float().double() == u).all()  # exact in float32


def _hf_probs(logits, temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, -1)


@pytest.mark.parametrize("temperature,top_k,top_p", [
    pytest.param(1.0, 0, 1.0, id="plain"),
    pytest.param(0.75, 10, 1.0, id="top_k"),
    pytest.param(1.25, 0, 0.8125, id="top_p"),
    pytest.param(0.875, 50, 0.625, id="top_k-then-top_p"),
])
def test_target_distribution_matches_transformers_warpers(temperature, top_k, top_p):
    logits = (torch.randn(6, 500) * 2).double()  # float32 values: the kernels round to float32
    want = _hf_probs(logits, temperature, top_k, top_p)
    got = target_probs(sanitize_logits(logits, torch.float64).unsqueeze(1), torch.full((6,), temperature),
                       torch.full((6,), top_k), torch.full((6,), top_p)).squeeze(1)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_top_k_keeps_ties_at_the_kth_value():
    logits = torch.tensor([[[3.0, 1.0, 2.0, 2.0, 0.0]]], dtype=torch.float64)
    probs = target_probs(logits, torch.ones(1), torch.tensor([2]), torch.ones(1))
    assert (probs[0, 0] > 0).tolist() == [True, False, True, True, False]


def test_top_p_keeps_or_drops_ties_together():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.125, 0.125]]], dtype=torch.float64))

    def kept(top_p):
        probs = target_probs(logits, torch.ones(1), torch.zeros(1, dtype=torch.int64), torch.tensor([top_p]))
        return (probs[0, 0] > 0).tolist()

    assert kept(0.5) == [True, False, False, False]  # 0.5 above the 0.25: not below top_p
    assert kept(0.75) == [True, True, False, False]  # the tied 0.125s go together
    assert kept(0.875) == [True, True, True, True]  # ... and stay together


def test_fallback_is_reported_once(monkeypatch):
    monkeypatch.setattr(backend, "has_cpp", lambda: False)
    monkeypatch.delenv("DRAFTWISE_BACKEND", raising=False)
    backend._warn_fallback.cache_clear()
    with pytest.warns(RuntimeWarning, match="draftwise._C"):
        assert backend.resolve_backend(None, "cpu") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.resolve_backend(None, "cpu") == "torch"


def test_race_draws_keep_full_precision_near_zero():
    """The race is decided by the smallest draws: they must not sit on a coarse grid, or equally
    likely tokens would tie and the lowest id would win too often."""
    t = philox_race_uniform(torch.tensor([3]), torch.arange(2**20), 0, 1)
    smallest = t.sort().values[:1000]
    assert 0 < smallest[0] and t.max() <= 1
    # 32-bit draws: ~0.25 repeats expected among these; a 2**-23 grid would give ~60.
    assert smallest.unique().numel() >= 995
