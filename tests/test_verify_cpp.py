"""The C++ CPU kernel ``draftwise._C``: Philox bit-exactness and exact agreement with the float64
reference (identical tokens and accept counts; accept_probs to float32 rounding)."""

from __future__ import annotations

import pytest
import torch

_C = pytest.importorskip("draftwise._C", reason="the C++ extension draftwise._C is not built")

from draftwise.kernels import Lenience, normalize_inputs, seeded_uniforms  # noqa: E402
from draftwise.kernels import chain_cpp  # noqa: E402
from draftwise.kernels.backend import REBUILD_HINT  # noqa: E402
from draftwise.kernels.chain_cpp import verify_chain_cpp  # noqa: E402
from draftwise.kernels.reference import chain_reference, philox_uniform  # noqa: E402

from cases import make_case, make_uniforms  # noqa: E402


def _philox_cpp(seed: int, c0_start: int, c1: int, c2: int, n: int) -> torch.Tensor:
    out = torch.empty(n, dtype=torch.float32)
    _C.philox_uniforms(seed, c0_start, c1, c2, n, out.data_ptr())
    return out


def _noise_kwargs(noise: str, batch: int, k: int, vocab: int) -> dict:
    if noise == "injected":
        return dict(uniforms=make_uniforms(batch, k, vocab))
    return dict(seed=torch.arange(batch, dtype=torch.int64) * 7_919 + 11)


def _check(tokens, draft_probs, logits, num_threads=None, **kwargs):
    """The C++ kernel against chain_reference(float64); returns the kernel's output."""
    inputs = normalize_inputs(tokens, draft_probs, logits, return_accept_probs=True, **kwargs)
    got = verify_chain_cpp(inputs, num_threads=num_threads)
    want = chain_reference(inputs, torch.float64)
    assert torch.equal(got.num_accepted, want.num_accepted), (got.num_accepted, want.num_accepted)
    assert torch.equal(got.output_tokens, want.output_tokens), (got.output_tokens, want.output_tokens)
    assert got.accept_probs.dtype == torch.float32
    assert torch.equal(got.accept_probs.isnan(), want.accept_probs.isnan())
    torch.testing.assert_close(got.accept_probs, want.accept_probs, rtol=2e-5, atol=1e-6, equal_nan=True)
    vocab = logits.shape[-1]
    assert bool(((got.output_tokens >= -1) & (got.output_tokens < vocab)).all())
    return got


def _rows(batch: int, values) -> torch.Tensor:
    return torch.tensor((list(values) * batch)[:batch])


def _mixed_rows(batch: int, vocab: int) -> dict:
    """Greedy and sampled rows in one batch, each row with its own temperature / top-k / top-p."""
    return dict(
        temperature=_rows(batch, [0.0, 1.0, 0.6, 1.3, 0.9]),
        top_k=_rows(batch, [0, 5, 0, min(40, vocab), 1]),
        top_p=_rows(batch, [1.0, 1.0, 0.8, 0.9, 0.5]),
    )


# ------------------------------------------------------------------------------------------------
# Philox.

@pytest.mark.parametrize(
    "seed",
    [0, 1, -1, 2**62 + 12_345, -(2**63), 2**63 - 1],
    ids=["seed0", "seed1", "seed-1", "seed2^62+", "seed-2^63", "seed2^63-1"],
)
@pytest.mark.parametrize(
    "c0_start,c1,c2",
    [
        pytest.param(0, 0, 0, id="accept-pos0"),
        pytest.param(0, 5, 1, id="race-pos5"),
        pytest.param(2**32 - 300, 16, 1, id="race-c0-near-2^32"),
        pytest.param(123_456, 2**31 + 3, 0, id="large-position"),
    ],
)
def test_philox_bit_exact(seed, c0_start, c1, c2):
    n = 257
    got = _philox_cpp(seed, c0_start, c1, c2, n)
    want = philox_uniform(torch.tensor(seed, dtype=torch.int64), torch.arange(c0_start, c0_start + n), c1, c2)
    assert torch.equal(got.double(), want)


def test_seeded_noise_is_the_philox_noise():
    """Seeds and the same noise injected as uniforms give the same result."""
    tokens, draft_probs, logits = make_case(6, 5, 3001, "peaked", seed=3)
    seeds = torch.tensor([0, -1, 2**40 + 3, 77, -(2**62), 5], dtype=torch.int64)
    seeded = verify_chain_cpp(normalize_inputs(tokens, draft_probs, logits, seed=seeds))
    injected = verify_chain_cpp(
        normalize_inputs(tokens, draft_probs, logits, uniforms=seeded_uniforms(seeds, 5, 3001))
    )
    assert torch.equal(seeded.output_tokens, injected.output_tokens)
    assert torch.equal(seeded.num_accepted, injected.num_accepted)


def test_rows_do_not_depend_on_the_batch():
    tokens, draft_probs, logits = make_case(5, 6, 2000, "random", ragged=True, seed=4)
    seeds = torch.arange(5, dtype=torch.int64) * 1_000_003
    whole = verify_chain_cpp(normalize_inputs(tokens, draft_probs, logits, seed=seeds, temperature=0.8))
    for b in (0, 3):
        alone = verify_chain_cpp(normalize_inputs(
            tokens[b:b + 1], draft_probs[b:b + 1], logits[b:b + 1], seed=seeds[b:b + 1], temperature=0.8
        ))
        assert torch.equal(alone.output_tokens[0], whole.output_tokens[b])


# ------------------------------------------------------------------------------------------------
# Exact agreement with the reference.

# (batch, k, vocab, regime, ragged)
SHAPES = [
    pytest.param(1, 4, 111, "random", False, id="B1-K4-V111-random"),
    pytest.param(3, 1, 111, "equal", False, id="B3-K1-V111-equal"),
    pytest.param(5, 16, 111, "random", True, id="B5-K16-V111-ragged"),
    pytest.param(4, 0, 111, "random", False, id="B4-K0-V111"),
    pytest.param(3, 4, 1, "random", False, id="B3-K4-V1"),
    pytest.param(3, 5, 111, "onehot", True, id="B3-K5-V111-onehot-ragged"),
    pytest.param(7, 3, 257, "peaked", True, id="B7-K3-V257-peaked-ragged"),
    pytest.param(5, 3, 32000, "disjoint", False, id="B5-K3-V32000-disjoint"),
    pytest.param(8, 2, 32000, "equal", True, id="B8-K2-V32000-equal-ragged"),
    pytest.param(2, 2, 70001, "peaked", False, id="B2-K2-V70001-peaked"),
]

MODES = [
    pytest.param("T1", id="T1"),
    pytest.param("greedy", id="greedy"),
    pytest.param("mixed", id="mixed-rows-topk-topp"),
    pytest.param("lenient", id="T0.7-lenient-power"),
]


def _mode_kwargs(mode: str, batch: int, vocab: int) -> dict:
    if mode == "T1":
        return dict(temperature=1.0)
    if mode == "greedy":
        return dict(temperature=0.0)
    if mode == "lenient":
        return dict(temperature=0.7, lenience=0.5)
    return _mixed_rows(batch, vocab)


@pytest.mark.parametrize("noise", ["injected", "seeded"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch,k,vocab,regime,ragged", SHAPES)
def test_matches_reference(batch, k, vocab, regime, ragged, mode, noise):
    tokens, draft_probs, logits = make_case(batch, k, vocab, regime, ragged=ragged, seed=batch + k + vocab)
    _check(tokens, draft_probs, logits, **_mode_kwargs(mode, batch, vocab), **_noise_kwargs(noise, batch, k, vocab))


@pytest.mark.parametrize(
    "logits_dtype,probs_dtype",
    [
        pytest.param(torch.float16, torch.float16, id="fp16"),
        pytest.param(torch.bfloat16, torch.bfloat16, id="bf16"),
        pytest.param(torch.float64, torch.float64, id="fp64"),
        pytest.param(torch.float16, torch.float32, id="fp16-logits-fp32-probs"),
        pytest.param(torch.bfloat16, torch.float64, id="bf16-logits-fp64-probs"),
        pytest.param(torch.float32, torch.bfloat16, id="fp32-logits-bf16-probs"),
    ],
)
@pytest.mark.parametrize("noise", ["injected", "seeded"])
def test_input_dtypes(logits_dtype, probs_dtype, noise):
    batch, k, vocab = 6, 5, 3001
    tokens, draft_probs, logits = make_case(batch, k, vocab, "peaked", ragged=True, seed=11)
    logits = logits.to(logits_dtype)
    draft_probs = draft_probs.to(probs_dtype)
    _check(tokens, draft_probs, logits, **_mixed_rows(batch, vocab), **_noise_kwargs(noise, batch, k, vocab))
    _check(tokens, None, logits, temperature=0.9, **_noise_kwargs(noise, batch, k, vocab))


def test_half_precision_specials():
    """fp16/bf16 subnormals, signed zeros, inf and NaN convert exactly."""
    specials = [0.0, -0.0, 6e-8, -6e-8, 3e-5, 65504.0, -65504.0, float("inf"), float("-inf"), float("nan"), 1.5, -2.25]
    for dtype in (torch.float16, torch.bfloat16):
        values = torch.tensor(specials, dtype=torch.float32).to(dtype)
        for position in range(len(specials)):
            logits = torch.full((1, 1, len(specials)), -1.0, dtype=dtype)
            logits[0, 0, position] = values[position]
            logits[0, 0, -1] = values[position]  # a tie with the last entry
            tokens = torch.empty(1, 0, dtype=torch.int64)
            _check(tokens, None, logits, temperature=0.0, seed=0)
            _check(tokens, None, logits, temperature=1.0, uniforms=make_uniforms(1, 0, len(specials), seed=position))


@pytest.mark.parametrize("kind", ["linear", "square", "power"])
@pytest.mark.parametrize("epsilon", [0.3, 1.0], ids=["eps0.3", "eps1"])
def test_lenience_kinds(kind, epsilon):
    batch, k, vocab = 9, 6, 500
    tokens, draft_probs, logits = make_case(batch, k, vocab, "random", ragged=True, seed=5)
    lenience = Lenience(kind, epsilon)
    _check(tokens, draft_probs, logits, lenience=lenience, uniforms=make_uniforms(batch, k, vocab, seed=2))
    _check(tokens, None, logits, lenience=lenience, temperature=1.2, seed=3)


def test_non_finite_rows():
    """NaN / +-inf logits and NaN / negative / inf draft probabilities."""
    batch, k, vocab = 7, 3, 300
    tokens, draft_probs, logits = make_case(batch, k, vocab, "random", seed=6)
    logits[0] = float("nan")  # all NaN: uniform
    logits[1] = float("-inf")  # all -inf: uniform
    logits[2, :, 10] = float("inf")  # +inf entries share the mass
    logits[2, :, 20] = float("inf")
    logits[3, :, ::3] = float("nan")  # NaN is the lowest value
    logits[4, 1, 5] = float("inf")
    logits[4, 1, 6] = float("nan")
    logits[5, :, :] = torch.finfo(torch.float32).max  # a row of ties at the top of the range
    logits[6, :, 7] = -float("inf")
    draft_probs[2, 0, :50] = float("nan")
    draft_probs[3, :, 100:110] = -1.0
    draft_probs[4, :, 3] = float("inf")
    draft_probs[6, :, 7] = 0.5  # q where p is 0
    tokens[4, 0] = 3
    tokens[6, :] = 7
    for mode in ("T1", "greedy", "mixed"):
        kwargs = _mode_kwargs(mode, batch, vocab)
        _check(tokens, draft_probs, logits, uniforms=make_uniforms(batch, k, vocab, seed=7), **kwargs)
        _check(tokens, draft_probs, logits, seed=8, **kwargs)
        _check(tokens, None, logits, seed=9, **kwargs)


def test_filter_ties_and_edges():
    """Top-k / top-p with many tied logits (ties at the k-th value are kept; top-p keeps or drops
    a tie group together), k = 1, k = V - 1, k >= V (off), tiny and almost-1 top-p."""
    batch, k, vocab = 10, 4, 700
    tokens, draft_probs, logits = make_case(batch, k, vocab, "random", ragged=True, seed=10)
    logits = (logits * 2).round() / 2  # about 30 distinct values: ties everywhere
    kwargs = dict(
        temperature=torch.tensor([1.0, 0.5, 1.0, 2.0, 1.0, 0.7, 1.0, 1.0, 0.3, 1.0]),
        top_k=torch.tensor([1, 3, vocab - 1, vocab, vocab + 5, 50, 0, 0, 20, 2]),
        top_p=torch.tensor([1.0, 1.0, 1.0, 0.9, 1.0, 0.6, 0.05, 0.999, 0.95, 0.5]),
    )
    for noise in ("injected", "seeded"):
        _check(tokens, draft_probs, logits, **kwargs, **_noise_kwargs(noise, batch, k, vocab))
        _check(tokens, None, logits, **kwargs, **_noise_kwargs(noise, batch, k, vocab))


def test_top_p_on_a_large_vocabulary():
    """Top-p without top-k sorts the candidates in growing steps; V > 65536."""
    batch, k, vocab = 3, 2, 70001
    tokens, draft_probs, logits = make_case(batch, k, vocab, "random", seed=12)
    logits[1] = (logits[1] * 4).round() / 4  # large tie groups straddle the sorted prefix
    _check(tokens, draft_probs, logits, top_p=torch.tensor([0.9, 0.97, 0.3]), temperature=0.8, seed=1)


def test_accept_probs_greedy_and_one_hot():
    batch, k, vocab = 5, 6, 64
    tokens, draft_probs, logits = make_case(batch, k, vocab, "peaked", ragged=True, seed=13)
    tokens[:, :3] = torch.where(tokens[:, :3] >= 0, logits[:, :3].argmax(-1), tokens[:, :3])  # accepted
    got = _check(tokens, draft_probs, logits, temperature=0.0, seed=0)
    assert bool((got.num_accepted >= 0).all())
    _check(tokens, None, logits, temperature=0.0, seed=0)
    _check(tokens, None, logits, temperature=torch.tensor([0.0, 1.0, 0.0, 0.5, 1.0]), seed=0)


def test_empty_batch():
    tokens = torch.empty(0, 3, dtype=torch.int64)
    out = verify_chain_cpp(normalize_inputs(tokens, None, torch.randn(0, 4, 10), seed=0, return_accept_probs=True))
    assert out.output_tokens.shape == (0, 4) and out.num_accepted.shape == (0,) and out.accept_probs.shape == (0, 3)


# ------------------------------------------------------------------------------------------------
# Threads.

@pytest.mark.parametrize(
    "batch,k,vocab",
    [
        pytest.param(8, 8, 32000, id="whole-rows-B8-V32000"),
        pytest.param(3, 6, 70001, id="lock-step-B3-V70001"),
    ],
)
def test_threads_do_not_change_the_result(batch, k, vocab):
    tokens, draft_probs, logits = make_case(batch, k, vocab, "peaked", ragged=True, seed=14)
    kwargs = dict(_mixed_rows(batch, vocab), seed=torch.arange(batch, dtype=torch.int64) + 99, return_accept_probs=True)
    outs = [verify_chain_cpp(normalize_inputs(tokens, draft_probs, logits, **kwargs), num_threads=n) for n in (1, 2, 3)]
    for out in outs[1:]:
        assert torch.equal(out.output_tokens, outs[0].output_tokens)
        assert torch.equal(out.num_accepted, outs[0].num_accepted)
        assert torch.equal(out.accept_probs.nan_to_num(-1.0), outs[0].accept_probs.nan_to_num(-1.0))


def test_missing_extension_names_the_rebuild_command(monkeypatch):
    monkeypatch.setattr(chain_cpp, "_C", None)
    tokens, draft_probs, logits = make_case(1, 2, 10, seed=0)
    with pytest.raises(RuntimeError, match="Rebuild with"):
        verify_chain_cpp(normalize_inputs(tokens, draft_probs, logits, seed=0))
    assert REBUILD_HINT
