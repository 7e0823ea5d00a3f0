"""Tier 1: every chain-verification backend gives exactly the float64 reference's tokens and accept
counts, with accept_probs close, under injected uniforms and under the backends' own Philox noise.

Each backend runs through the dispatch, ``get_implementation(name)(normalize_inputs(...))``, on
its device: Triton on CUDA, or in its CPU interpreter without CUDA (see conftest.py), where the
cases too slow for the interpreter are skipped. A backend missing here is skipped.
"""

from __future__ import annotations

import pytest
import torch

from draftwise.kernels import (
    PAD_TOKEN, Lenience, get_implementation, normalize_inputs,
)
from draftwise.kernels.backend import triton_interpreted
from draftwise.kernels.reference import chain_reference

from cases import BACKENDS, device_of, make_case, make_residual_case, make_uniforms, on

NOISE = ["injected", "seeded"]


def skip_in_interpreter(backend: str, why: str) -> None:
    """Skip Triton for this case when it runs in the (slow) CPU interpreter."""
    if backend == "triton" and triton_interpreted():
        pytest.skip(f"too slow for the Triton interpreter: {why}")


def rows(batch: int, values) -> torch.Tensor:
    """``values`` repeated over ``batch`` rows."""
    return torch.tensor((list(values) * batch)[:batch])


def mixed_rows(batch: int, vocab: int) -> dict:
    """Sampled and greedy rows in one batch, each row with its own temperature / top-k / top-p."""
    return dict(
        temperature=rows(batch, [1.0, 0.0, 0.6, 1.3, 0.9]),
        top_k=rows(batch, [3, 0, 0, min(20, vocab), 1]),
        top_p=rows(batch, [1.0, 1.0, 0.5, 0.8, 0.5]),
    )


def noise_options(noise: str, batch: int, k: int, vocab: int) -> dict:
    """Injected uniforms, or one Philox seed per row (negative ones included)."""
    if noise == "injected":
        return dict(uniforms=make_uniforms(batch, k, vocab))
    return dict(seed=torch.arange(batch, dtype=torch.int64) * 1_000_003 - 2**40)


def run(backend: str, tokens, draft_probs, logits, **options):
    """``backend`` through the dispatch on its device; returns ``(inputs, output)``."""
    device = device_of(backend)
    inputs = normalize_inputs(on(device, tokens), on(device, draft_probs), on(device, logits),
                              **{name: on(device, value) for name, value in options.items()})
    return inputs, get_implementation(backend)(inputs)


def assert_matches_reference(backend: str, case, noise: str = "injected", *, accept_probs: bool = True,
                             **options):
    """``backend`` against ``chain_reference(float64)``: identical tokens and accept counts,
    accept_probs close (float32, NaN past the drafts); emitted ids in ``[0, V)``. Returns the output."""
    tokens, draft_probs, logits = case
    batch, k, vocab = *tokens.shape, logits.shape[-1]
    inputs, got = run(backend, tokens, draft_probs, logits, return_accept_probs=accept_probs,
                      **noise_options(noise, batch, k, vocab), **options)
    want = chain_reference(inputs, torch.float64)
    assert torch.equal(got.num_accepted, want.num_accepted), (got.num_accepted, want.num_accepted)
    assert torch.equal(got.output_tokens, want.output_tokens), (got.output_tokens, want.output_tokens)
    if accept_probs:
        assert got.accept_probs.dtype == torch.float32 and got.accept_probs.shape == (batch, k)
        torch.testing.assert_close(got.accept_probs, want.accept_probs, rtol=2e-5, atol=1e-6, equal_nan=True)
    else:
        assert got.accept_probs is None
    out = got.output_tokens
    assert bool(((out >= 0) & (out < vocab) | (out == PAD_TOKEN)).all())
    assert bool((out.gather(1, got.num_accepted.view(-1, 1)) >= 0).all())
    return got


# (batch, k, vocab, regime, ragged): odd and one-row batches, K of 0, 1 and 16, ragged rows, vocabularies
# from 1 to past 65536, and the five (p, q) regimes of cases.make_case.
SHAPES = [
    pytest.param(1, 4, 111, "random", False, id="B1-K4-V111-random"),
    pytest.param(3, 1, 111, "equal", False, id="B3-K1-V111-equal"),
    pytest.param(2, 16, 111, "random", True, id="B2-K16-V111-ragged"),
    pytest.param(4, 0, 111, "random", False, id="B4-K0-V111"),
    pytest.param(3, 4, 1, "random", False, id="B3-K4-V1"),
    pytest.param(3, 5, 111, "onehot", True, id="B3-K5-V111-onehot-ragged"),
    pytest.param(5, 3, 257, "peaked", True, id="B5-K3-V257-peaked-ragged"),
    pytest.param(3, 3, 300, "disjoint", False, id="B3-K3-V300-disjoint"),
    pytest.param(2, 2, 3001, "random", False, id="B2-K2-V3001-random"),
    pytest.param(2, 2, 32000, "disjoint", False, id="B2-K2-V32000-disjoint"),
    pytest.param(8, 2, 32000, "equal", True, id="B8-K2-V32000-equal-ragged"),
    pytest.param(1, 2, 70001, "peaked", False, id="B1-K2-V70001-peaked"),
]

# (mode, noise): greedy rows draw no noise, so all-greedy batches run with injected noise only.
MODES = [
    pytest.param("T1", "injected", id="T1-injected"),
    pytest.param("T1", "seeded", id="T1-seeded"),
    pytest.param("greedy", "injected", id="greedy"),
    pytest.param("mixed", "injected", id="mixed-rows-injected"),
    pytest.param("mixed", "seeded", id="mixed-rows-seeded"),
    pytest.param("lenient", "injected", id="T0.7-lenient-power-injected"),
    pytest.param("lenient", "seeded", id="T0.7-lenient-power-seeded"),
]


def mode_options(mode: str, batch: int, vocab: int) -> dict:
    if mode == "T1":
        return dict(temperature=1.0)
    if mode == "greedy":
        return dict(temperature=0.0)
    if mode == "lenient":
        return dict(temperature=0.7, lenience=0.5)
    return mixed_rows(batch, vocab)


def skip_large_in_interpreter(backend: str, batch: int, k: int, vocab: int, mode: str, noise: str) -> None:
    """The interpreter runs large vocabularies without top-k/top-p, and their Philox noise at T = 1."""
    if batch * (k + 1) * vocab > 500_000:
        skip_in_interpreter(backend, "more than 500k logits")
    if vocab > 30_000 and mode == "mixed":
        skip_in_interpreter(backend, "top-k/top-p over a large vocabulary")
    if vocab > 30_000 and noise == "seeded" and mode != "T1":
        skip_in_interpreter(backend, "Philox over a large vocabulary (checked there at T = 1)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,noise", MODES)
@pytest.mark.parametrize("batch,k,vocab,regime,ragged", SHAPES)
def test_matches_reference(backend, batch, k, vocab, regime, ragged, mode, noise):
    """Every shape and regime in every sampling mode; q = p at T = 1 accepts every draft."""
    skip_large_in_interpreter(backend, batch, k, vocab, mode, noise)
    case = make_case(batch, k, vocab, regime, ragged=ragged, seed=batch * 100 + k)
    got = assert_matches_reference(backend, case, noise, **mode_options(mode, batch, vocab))
    if regime == "equal" and mode == "T1":
        drafted = (case[0] >= 0) & (case[0] < vocab)
        assert torch.equal(got.num_accepted.cpu(), drafted.long().cumprod(-1).sum(-1))


DTYPES = [
    pytest.param(torch.float16, torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16"),
    pytest.param(torch.float64, torch.float64, id="fp64"),
    pytest.param(torch.float16, torch.float32, id="fp16-logits-fp32-probs"),
    pytest.param(torch.bfloat16, torch.float64, id="bf16-logits-fp64-probs"),
    pytest.param(torch.float32, torch.bfloat16, id="fp32-logits-bf16-probs"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noise", NOISE)
@pytest.mark.parametrize("logits_dtype,probs_dtype", DTYPES)
def test_input_dtypes(backend, logits_dtype, probs_dtype, noise):
    """Half, bfloat16 and double inputs, also logits and draft probabilities of different dtypes;
    one-hot drafts read the logits alone."""
    if logits_dtype != probs_dtype and noise == "seeded":
        skip_in_interpreter(backend, "mixed dtypes are checked there with injected noise")
    batch, k, vocab = 3, 2, 300
    tokens, draft_probs, logits = make_case(batch, k, vocab, "peaked", ragged=True, seed=11)
    logits, draft_probs = logits.to(logits_dtype), draft_probs.to(probs_dtype)
    assert_matches_reference(backend, (tokens, draft_probs, logits), noise, **mixed_rows(batch, vocab))
    if logits_dtype == probs_dtype:
        assert_matches_reference(backend, (tokens, None, logits), noise, temperature=rows(batch, [1.0, 0.0, 0.9]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "square", "power"])
@pytest.mark.parametrize("epsilon", [0.3, 1.0], ids=["eps0.3", "eps1"])
def test_lenience_kinds(backend, kind, epsilon):
    """DistillSpec's lossy acceptance f(p) of every kind, with draft probabilities and one-hot drafts."""
    batch, k, vocab = 3, 3, 111
    tokens, draft_probs, logits = make_case(batch, k, vocab, "random", ragged=True, seed=5)
    lenience = Lenience(kind, epsilon)
    assert_matches_reference(backend, (tokens, draft_probs, logits), "injected", lenience=lenience)
    assert_matches_reference(backend, (tokens, None, logits), "seeded", lenience=lenience, temperature=1.2)


def nonfinite_case():
    """Logits with all-NaN positions, an all -inf row, +inf entries, NaN mixed with values, a row of
    float32-max ties; draft probabilities with NaN, negative and inf entries, and q > 0 where p = 0."""
    tokens, draft_probs, logits = make_case(7, 2, 64, "random", seed=6)
    logits[0, :2] = float("nan")
    logits[1] = -float("inf")
    logits[2, :, [10, 20, 30]] = float("inf")
    logits[3, :, ::3] = float("nan")
    logits[4, 0, :5] = -float("inf")
    logits[4, 1, 5] = float("inf")
    logits[4, 1, 6] = float("nan")
    logits[5] = torch.finfo(torch.float32).max
    logits[6, :, 7] = -float("inf")
    draft_probs[2, 0, :50] = float("nan")
    draft_probs[3, :, 40:50] = -1.0
    draft_probs[4, :, 3] = float("inf")
    draft_probs[6, :, 7] = 0.5
    tokens[4, 0] = 3
    tokens[6] = 7
    return tokens, draft_probs, logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noise", NOISE)
@pytest.mark.parametrize("onehot", [False, True], ids=["draft-probs", "onehot"])
@pytest.mark.parametrize("mode", ["T1", "greedy", "mixed"])
def test_non_finite_rows(backend, mode, onehot, noise):
    """NaN / inf logits and draft probabilities still give ids in [0, V) and match the reference."""
    if mode == "mixed" and (onehot or noise == "seeded"):
        skip_in_interpreter(backend, "top-k/top-p on these rows is checked there with draft "
                                     "probabilities and injected noise")
    tokens, draft_probs, logits = nonfinite_case()
    case = (tokens, None if onehot else draft_probs, logits)
    assert_matches_reference(backend, case, noise, **mode_options(mode, 7, 64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noise", NOISE)
@pytest.mark.parametrize("onehot", [False, True], ids=["draft-probs", "onehot"])
def test_filter_ties_and_edges(backend, onehot, noise):
    """Top-k / top-p with many tied logits (ties at the k-th value are kept; top-p keeps or drops
    a tie group together), k = 1, k = V - 1, k >= V (off), tiny and almost-1 top-p."""
    if onehot or noise == "seeded":
        skip_in_interpreter(backend, "ties are checked there with draft probabilities and injected noise")
    batch, k, vocab = 10, 1, 700
    tokens, draft_probs, logits = make_case(batch, k, vocab, "random", ragged=True, seed=10)
    logits = (logits * 2).round() / 2  # about 30 distinct values: ties everywhere
    options = dict(
        temperature=torch.tensor([1.0, 0.5, 1.0, 2.0, 1.0, 0.7, 1.0, 1.0, 0.3, 1.0]),
        top_k=torch.tensor([1, 3, vocab - 1, vocab, vocab + 5, 50, 0, 0, 20, 2]),
        top_p=torch.tensor([1.0, 1.0, 1.0, 0.9, 1.0, 0.6, 0.05, 0.999, 0.95, 0.5]),
    )
    assert_matches_reference(backend, (tokens, None if onehot else draft_probs, logits), noise, **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_p_on_a_large_vocabulary(backend):
    """Top-p without top-k sorts the candidates in growing steps; V > 65536."""
    skip_in_interpreter(backend, "top-p over a large vocabulary")
    tokens, draft_probs, logits = make_case(3, 2, 70001, "random", seed=12)
    logits[1] = (logits[1] * 4).round() / 4  # large tie groups straddle the sorted prefix
    assert_matches_reference(backend, (tokens, draft_probs, logits), "seeded",
                             top_p=torch.tensor([0.9, 0.97, 0.3]), temperature=0.8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accept_probs_greedy_and_one_hot(backend):
    """Greedy rows: q(argmax p), or whether a one-hot draft is the argmax; with accepted drafts."""
    batch, k, vocab = 5, 6, 64
    tokens, draft_probs, logits = make_case(batch, k, vocab, "peaked", ragged=True, seed=13)
    tokens[:, :3] = torch.where(tokens[:, :3] >= 0, logits[:, :3].argmax(-1), tokens[:, :3])
    got = assert_matches_reference(backend, (tokens, draft_probs, logits), temperature=0.0)
    assert bool((got.num_accepted > 0).any())
    assert_matches_reference(backend, (tokens, None, logits), temperature=0.0)
    assert_matches_reference(backend, (tokens, None, logits), temperature=rows(batch, [0.0, 1.0, 0.0, 0.5, 1.0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_accept_probs_only_when_asked(backend):
    """Without ``return_accept_probs`` the output holds None."""
    assert_matches_reference(backend, make_case(3, 2, 50, seed=14), accept_probs=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    """B = 0 gives empty outputs of the right shapes."""
    _, out = run(backend, torch.empty(0, 3, dtype=torch.int64), None, torch.randn(0, 4, 10), seed=0,
                 return_accept_probs=True)
    assert out.output_tokens.shape == (0, 4) and out.num_accepted.shape == (0,)
    assert out.accept_probs.shape == (0, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_do_not_depend_on_the_batch(backend):
    """A row's seed alone decides its tokens: the same row alone or in a slice gives the same result."""
    tokens, draft_probs, logits = make_case(5, 4, 300, "random", ragged=True, seed=4)
    seeds = torch.arange(5, dtype=torch.int64) * 1_000_003

    def verify(part: slice):
        return run(backend, tokens[part], draft_probs[part], logits[part], seed=seeds[part], temperature=0.8)[1]

    whole = verify(slice(None))
    for part in (slice(0, 1), slice(3, 4), slice(2, None)):
        alone = verify(part)
        assert torch.equal(alone.output_tokens, whole.output_tokens[part])
        assert torch.equal(alone.num_accepted, whole.num_accepted[part])


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """Views with padded rows (strides that are not the packed ones) read the right elements."""
    batch, k, vocab = 3, 3, 111
    tokens, draft_probs, logits = make_case(batch, k, vocab + 9, "random", seed=10, device=device_of(backend))
    tokens = tokens.clamp(max=vocab - 1)
    wide = torch.cat([tokens, tokens], 1)
    case = (wide[:, ::2], draft_probs[..., :vocab], logits[..., :vocab])
    assert not any(x.is_contiguous() for x in case)
    assert_matches_reference(backend, case, "seeded", temperature=rows(batch, [1.0, 0.0, 0.5]),
                             top_k=rows(batch, [0, 0, 7]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noise", NOISE)
def test_empty_residual_falls_back_to_target(backend, noise):
    """p = q: drafts outside p's support are rejected and leave max(0, p - q) all zero; the
    emitted token is sampled from p."""
    case, support, accepted = make_residual_case()
    got = assert_matches_reference(backend, case, noise)
    assert got.num_accepted.tolist() == accepted
    assert torch.isin(got.output_tokens.gather(1, got.num_accepted.view(-1, 1)).cpu(), support).all()
