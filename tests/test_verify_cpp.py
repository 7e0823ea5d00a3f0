"""What only the C++ CPU kernel ``draftwise._C`` has: its Philox generator, its own half-precision
conversion, its threads, and the rebuild hint when the extension is missing.

The contract it shares with every backend is in test_verify_chain.py.
"""

from __future__ import annotations

import re

import pytest
import torch

_C = pytest.importorskip("draftwise._C", reason="the C++ extension draftwise._C is not built")

from draftwise.kernels import normalize_inputs, seeded_uniforms  # noqa: E402
from draftwise.kernels import chain_cpp  # noqa: E402
from draftwise.kernels.backend import REBUILD_HINT  # noqa: E402
from draftwise.kernels.chain_cpp import verify_chain_cpp  # noqa: E402
from draftwise.kernels.reference import chain_reference, philox_uniform  # noqa: E402

from cases import make_case, make_uniforms  # noqa: E402


def _philox_cpp(seed: int, c0_start: int, c1: int, c2: int, n: int) -> torch.Tensor:
    out = torch.empty(n, dtype=torch.float32)
    _C.philox_uniforms(seed, c0_start, c1, c2, n, out.data_ptr())
    return out


def assert_matches_reference(tokens, draft_probs, logits, **options) -> None:
    """``verify_chain_cpp`` gives the reference's tokens and accept counts."""
    inputs = normalize_inputs(tokens, draft_probs, logits, **options)
    got = verify_chain_cpp(inputs)
    want = chain_reference(inputs, torch.float64)
    assert torch.equal(got.num_accepted, want.num_accepted), (got.num_accepted, want.num_accepted)
    assert torch.equal(got.output_tokens, want.output_tokens), (got.output_tokens, want.output_tokens)


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
    """The C++ generator's uniforms equal the reference's bit for bit, across counter wrap-arounds."""
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


def test_half_precision_specials():
    """fp16/bf16 subnormals, signed zeros, inf and NaN convert exactly."""
    specials = [0.0, -0.0, 6e-8, -6e-8, 3e-5, 65504.0, -65504.0, float("inf"), float("-inf"), float("nan"), 1.5, -2.25]
    tokens = torch.empty(1, 0, dtype=torch.int64)
    for dtype in (torch.float16, torch.bfloat16):
        values = torch.tensor(specials, dtype=torch.float32).to(dtype)
        for position in range(len(specials)):
            logits = torch.full((1, 1, len(specials)), -1.0, dtype=dtype)
            logits[0, 0, position] = values[position]
            logits[0, 0, -1] = values[position]  # a tie with the last entry
            assert_matches_reference(tokens, None, logits, temperature=0.0, seed=0)
            assert_matches_reference(tokens, None, logits, temperature=1.0,
                                     uniforms=make_uniforms(1, 0, len(specials), seed=position))


@pytest.mark.parametrize(
    "batch,k,vocab",
    [
        pytest.param(8, 8, 32000, id="whole-rows-B8-V32000"),
        pytest.param(3, 6, 70001, id="lock-step-B3-V70001"),
    ],
)
def test_threads_do_not_change_the_result(batch, k, vocab):
    """1, 2 or 3 threads (whole rows per thread, or positions in lock step) give the same output."""
    tokens, draft_probs, logits = make_case(batch, k, vocab, "peaked", ragged=True, seed=14)
    options = dict(
        temperature=torch.tensor(([0.0, 1.0, 0.6, 1.3, 0.9] * batch)[:batch]),
        top_k=torch.tensor(([0, 5, 0, 40, 1] * batch)[:batch]),
        top_p=torch.tensor(([1.0, 1.0, 0.8, 0.9, 0.5] * batch)[:batch]),
        seed=torch.arange(batch, dtype=torch.int64) + 99,
    )
    inputs = normalize_inputs(tokens, draft_probs, logits, **options)
    outs = [verify_chain_cpp(inputs, num_threads=n) for n in (1, 2, 3)]
    for out in outs[1:]:
        assert torch.equal(out.output_tokens, outs[0].output_tokens)
        assert torch.equal(out.num_accepted, outs[0].num_accepted)


def test_missing_extension_names_the_rebuild_command(monkeypatch):
    """Without the extension the kernel raises with the exact command that rebuilds it."""
    monkeypatch.setattr(chain_cpp, "_C", None)
    tokens, draft_probs, logits = make_case(1, 2, 10, seed=0)
    with pytest.raises(RuntimeError, match="Rebuild with: " + re.escape(REBUILD_HINT)):
        verify_chain_cpp(normalize_inputs(tokens, draft_probs, logits, seed=0))
