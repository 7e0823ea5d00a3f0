"""What only the Triton chain-verification kernels have: their in-kernel Philox, the vocabulary split
across programs (the chunk tuning of ``verify_chain_triton``), and offsets past int32 on a GPU.

The contract they share with every backend is in test_verify_chain.py. Without CUDA the kernels run
in the CPU interpreter (see conftest.py), so the shapes stay small.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from draftwise.kernels import normalize_inputs  # noqa: E402
from draftwise.kernels.chain_triton import philox_uniform as kernel_philox  # noqa: E402
from draftwise.kernels.chain_triton import verify_chain_triton  # noqa: E402
from draftwise.kernels.reference import chain_reference, philox_uniform  # noqa: E402

from cases import make_case, make_residual_case, make_uniforms  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Several vocabulary chunks per program grid even at V = 111: exercises the cross-chunk combine.
SMALL_CHUNKS = dict(block_v=32, stats_chunk=32, sample_chunk=64)
NOISE = [pytest.param("injected", id="uniforms"), pytest.param("seeded", id="philox")]


def noise_options(noise: str, batch: int, k: int, vocab: int) -> dict:
    if noise == "injected":
        return dict(uniforms=make_uniforms(batch, k, vocab, device=DEVICE))
    return dict(seed=torch.arange(batch, dtype=torch.int64, device=DEVICE) * 1_000_003 - 2**40)


def rows(*values, batch: int) -> torch.Tensor:
    return torch.tensor((list(values) * batch)[:batch], device=DEVICE)


def assert_matches_reference(case, tuning: dict, **options):
    """``verify_chain_triton`` with ``tuning`` gives the reference's tokens and accept counts."""
    inputs = normalize_inputs(*case, **options)
    got = verify_chain_triton(inputs, **tuning)
    want = chain_reference(inputs, torch.float64)
    assert torch.equal(got.num_accepted, want.num_accepted), (got.num_accepted, want.num_accepted)
    assert torch.equal(got.output_tokens, want.output_tokens), (got.output_tokens, want.output_tokens)
    return got


@triton.jit
def _philox_kernel(seed_ptr, c0_ptr, c1_ptr, c2_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    u = kernel_philox(
        tl.load(seed_ptr + offs, mask=mask), tl.load(c0_ptr + offs, mask=mask),
        tl.load(c1_ptr + offs, mask=mask), tl.load(c2_ptr + offs, mask=mask),
    )
    tl.store(out_ptr + offs, u, mask=mask)


def test_philox_is_bit_exact_with_the_reference():
    """The kernels' Philox uniforms equal the reference's bit for bit, extreme seeds and counters included."""
    g = torch.Generator().manual_seed(5)
    n = 3000
    seeds = torch.randint(-(2**63), 2**63 - 1, (n,), generator=g, dtype=torch.int64)
    seeds[:4] = torch.tensor([0, -1, 2**63 - 1, -(2**63)])
    c0 = torch.randint(0, 2**31 - 1, (n,), generator=g, dtype=torch.int64).int()
    c0[:8] = torch.tensor([0, 1, 2**31 - 1, 0, 5, 128255, 70000, 2**16])
    c1 = torch.randint(0, 64, (n,), generator=g, dtype=torch.int32)
    c2 = torch.randint(0, 2, (n,), generator=g, dtype=torch.int32)
    out = torch.empty(n, dtype=torch.float32, device=DEVICE)
    args = [x.to(DEVICE) for x in (seeds, c0, c1, c2)]
    _philox_kernel[(triton.cdiv(n, 1024),)](*args, out, n, BLOCK=1024)
    want = philox_uniform(seeds, c0.long(), c1.long(), c2.long())
    assert torch.equal(out.cpu().double(), want)
    assert 0.0 < want.min() and want.max() < 1.0


MULTI_CHUNK = [
    pytest.param(2, 3, 111, "random", {}, id="V111-random"),
    pytest.param(2, 3, 111, "onehot", {}, id="V111-onehot"),
    pytest.param(2, 3, 300, "disjoint", {}, id="V300-disjoint"),
    pytest.param(3, 2, 200, "peaked", dict(temperature=(0.0, 1.0, 0.5)), id="V200-greedy-rows"),
    pytest.param(3, 2, 111, "random", dict(top_k=(0, 10, 50), top_p=(0.3, 1.0, 0.6)), id="V111-topk-topp"),
]


@pytest.mark.parametrize("noise", NOISE)
@pytest.mark.parametrize("batch,k,vocab,regime,mode", MULTI_CHUNK)
def test_vocabulary_split_across_programs(batch, k, vocab, regime, mode, noise):
    """Small chunks: every (row, position) and every race spans several programs and filter tiles."""
    case = make_case(batch, k, vocab, regime, ragged=True, seed=8, device=DEVICE)
    options = {name: rows(*values, batch=batch) for name, values in mode.items()}
    assert_matches_reference(case, SMALL_CHUNKS, **options, **noise_options(noise, batch, k, vocab))


@pytest.mark.parametrize("noise", NOISE)
def test_empty_residual_falls_back_to_target_across_chunks(noise):
    """p = q: no chunk sees a positive residual, so the winner over p is emitted."""
    (tokens, draft_probs, logits), support, accepted = make_residual_case()
    case = (tokens.to(DEVICE), draft_probs.to(DEVICE), logits.to(DEVICE))
    got = assert_matches_reference(case, SMALL_CHUNKS, **noise_options(noise, *tokens.shape, logits.shape[-1]))
    assert got.num_accepted.tolist() == accepted
    assert torch.isin(got.output_tokens.gather(1, got.num_accepted.view(-1, 1)).cpu(), support).all()


@pytest.mark.gpu
def test_offsets_past_int32():
    """B * (K+1) * V > 2**31 elements: the last rows, whose offsets overflow int32, are still right."""
    batch, k, vocab = 17_000, 0, 128_256
    logits = torch.empty(batch, k + 1, vocab, dtype=torch.float16, device=DEVICE).normal_(0, 3)
    tokens = torch.empty(batch, 0, dtype=torch.int64, device=DEVICE)
    seeds = torch.arange(batch, dtype=torch.int64, device=DEVICE) * 7919
    got = verify_chain_triton(normalize_inputs(tokens, None, logits, seed=seeds, temperature=0.8))
    tail = slice(batch - 4, batch)
    want = chain_reference(normalize_inputs(tokens[tail], None, logits[tail], seed=seeds[tail], temperature=0.8))
    assert torch.equal(got.output_tokens[tail], want.output_tokens)
