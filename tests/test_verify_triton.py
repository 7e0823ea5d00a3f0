"""The Triton chain-verification kernels against the float64 reference (CPU interpreter without CUDA).

Identical tokens and accept counts under injected uniforms and under the kernels' own Philox
noise; accept probabilities close. Shapes stay small: the interpreter runs every program in Python.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from draftwise.kernels.reference import chain_reference, philox_uniform  # noqa: E402
from draftwise.kernels.spec import PAD_TOKEN, Lenience, Uniforms, normalize_inputs  # noqa: E402
from draftwise.kernels.chain_triton import philox_uniform as kernel_philox  # noqa: E402
from draftwise.kernels.chain_triton import verify_chain_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Several vocabulary chunks per program grid even at V = 111: exercises the cross-chunk combine.
SMALL_CHUNKS = dict(block_v=32, stats_chunk=32, sample_chunk=64)


def make_case(batch, k, vocab, regime="random", *, ragged=False, dtype=torch.float32, seed=0):
    """``(draft_tokens, draft_probs | None, target_logits)`` on DEVICE for a (p, q) regime.

    random: independent p and q; equal: q = p; disjoint: q's support is where p is 0;
    onehot: no draft_probs; peaked: p and q concentrated on the same few tokens.
    """
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, k + 1, vocab, generator=g, dtype=torch.float64) * 2.0
    draft_logits = torch.randn(batch, k, vocab, generator=g, dtype=torch.float64) * 2.0
    if regime == "peaked":
        logits = logits * 6.0
        draft_logits = logits[:, :k] + 0.5 * torch.randn(batch, k, vocab, generator=g, dtype=torch.float64)
    elif regime == "equal":
        draft_logits = logits[:, :k].to(dtype).double()
    elif regime == "disjoint" and vocab > 1:
        logits[..., vocab // 2:] = -torch.inf
        draft_logits[..., : vocab // 2] = -torch.inf
    q = torch.softmax(draft_logits, -1)
    if k > 0:
        tokens = torch.multinomial(q.reshape(-1, vocab), 1, generator=g).view(batch, k)
    else:
        tokens = torch.empty(batch, 0, dtype=torch.int64)
    if ragged and k > 0:
        lengths = torch.randint(0, k + 1, (batch,), generator=g)
        tokens[torch.arange(k).view(1, -1) >= lengths.view(-1, 1)] = PAD_TOKEN
        tokens[0, k // 2] = vocab + 3  # any id outside [0, V) ends the row's drafts
    draft_probs = None if regime == "onehot" else q.to(dtype).to(DEVICE)
    return tokens.to(DEVICE), draft_probs, logits.to(dtype).to(DEVICE)


def make_uniforms(batch, k, vocab, seed=1):
    """Noise strictly inside (0, 1), exact in float32 (the kernels read uniforms as float32)."""
    g = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return ((torch.randint(0, 2**23, shape, generator=g).double() + 0.5) * 2.0**-23).to(DEVICE)

    return Uniforms(accept=draw(batch, k), race=draw(batch, k + 1, vocab))


def noise_kwargs(noise, batch, k, vocab):
    if noise == "injected":
        return dict(uniforms=make_uniforms(batch, k, vocab))
    return dict(seed=torch.arange(batch, dtype=torch.int64, device=DEVICE) * 1_000_003 - 2**40)


def assert_matches_reference(case, tuning=None, **kwargs):
    inp = normalize_inputs(*case, **kwargs)
    want = chain_reference(inp, torch.float64)
    got = verify_chain_triton(inp, **(tuning or {}))
    torch.testing.assert_close(got.num_accepted, want.num_accepted, rtol=0, atol=0)
    torch.testing.assert_close(got.output_tokens, want.output_tokens, rtol=0, atol=0)
    if inp.return_accept_probs:
        assert got.accept_probs.dtype == torch.float32
        torch.testing.assert_close(got.accept_probs, want.accept_probs, rtol=2e-5, atol=1e-6, equal_nan=True)
    else:
        assert got.accept_probs is None
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


# (batch, k, vocab, regime, ragged)
SHAPES = [
    pytest.param(1, 4, 111, "random", False, id="B1-K4-V111-random"),
    pytest.param(3, 0, 111, "random", False, id="B3-K0-V111"),
    pytest.param(5, 1, 111, "equal", False, id="B5-K1-V111-equal"),
    pytest.param(3, 12, 111, "random", True, id="B3-K12-V111-ragged"),
    pytest.param(3, 4, 1, "random", False, id="B3-K4-V1"),
    pytest.param(3, 5, 111, "onehot", True, id="B3-K5-V111-onehot-ragged"),
    pytest.param(5, 3, 257, "peaked", True, id="B5-K3-V257-peaked-ragged"),
    pytest.param(3, 3, 300, "disjoint", False, id="B3-K3-V300-disjoint"),
    pytest.param(2, 2, 3001, "random", False, id="B2-K2-V3001-random"),
    pytest.param(1, 1, 70001, "peaked", False, id="B1-K1-V70001-peaked"),
]
NOISE = [pytest.param("injected", id="uniforms"), pytest.param("seeded", id="philox")]


@pytest.mark.parametrize("noise", NOISE)
@pytest.mark.parametrize("batch,k,vocab,regime,ragged", SHAPES)
def test_matches_reference(batch, k, vocab, regime, ragged, noise):
    case = make_case(batch, k, vocab, regime, ragged=ragged)
    got = assert_matches_reference(case, **noise_kwargs(noise, batch, k, vocab))
    if regime == "equal":  # q = p: every draft passes
        assert torch.equal(got.num_accepted, torch.full((batch,), k, device=DEVICE))
    tokens = got.output_tokens
    assert ((tokens >= 0) & (tokens < vocab) | (tokens == PAD_TOKEN)).all()


def _rows(*values, batch):
    return torch.tensor((list(values) * batch)[:batch], device=DEVICE)


MODES = [
    pytest.param(dict(temperature=0.0), id="greedy"),
    pytest.param(dict(temperature=0.4), id="T0.4"),
    pytest.param("mixed", id="greedy-and-sampled-rows-topk-topp"),
    pytest.param(dict(top_k=3), id="top-k3"),
    pytest.param(dict(top_k=1, temperature=2.0), id="top-k1"),
    pytest.param(dict(top_p=0.5, temperature=0.7), id="top-p0.5"),
    pytest.param(dict(top_k=20, top_p=0.9), id="top-k20-top-p0.9"),
    pytest.param(dict(lenience=Lenience("linear", 0.5)), id="lenient-linear"),
    pytest.param(dict(lenience=Lenience("square", 0.7)), id="lenient-square"),
    pytest.param(dict(lenience=0.3), id="lenient-power"),
]


@pytest.mark.parametrize("regime,noise", [
    pytest.param("random", "injected", id="draft-probs-uniforms"), pytest.param("onehot", "seeded", id="onehot-philox"),
])
@pytest.mark.parametrize("mode", MODES)
def test_sampling_modes(mode, regime, noise):
    batch, k, vocab = 5, 3, 111
    if mode == "mixed":
        mode = dict(temperature=_rows(0.0, 1.0, 0.6, 1.3, 0.0, batch=batch),
                    top_k=_rows(0, 5, 0, 40, 7, batch=batch), top_p=_rows(1.0, 1.0, 0.8, 0.9, 0.5, batch=batch))
    case = make_case(batch, k, vocab, regime, ragged=True, seed=3)
    assert_matches_reference(case, **mode, **noise_kwargs(noise, batch, k, vocab))


@pytest.mark.parametrize("dtype", [
    pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float64, id="fp64"),
])
@pytest.mark.parametrize("noise", NOISE)
def test_input_dtypes(dtype, noise):
    batch, k, vocab = 3, 3, 200
    case = make_case(batch, k, vocab, "random", dtype=dtype, seed=4)
    temperature = _rows(1.0, 0.0, 0.8, batch=batch)
    assert_matches_reference(case, temperature=temperature, return_accept_probs=True,
                             **noise_kwargs(noise, batch, k, vocab))


def _nonfinite_case(dtype=torch.float32):
    """Rows of NaN, -inf, a few +inf, NaN mixed with values; draft probs with NaN and inf."""
    batch, k, vocab = 5, 2, 37
    tokens, draft_probs, logits = make_case(batch, k, vocab, "random", dtype=dtype, seed=6)
    logits[0] = float("nan")
    logits[1] = -float("inf")
    logits[2, :, [3, 17, 30]] = float("inf")
    logits[3, :, ::2] = float("nan")
    logits[4, 0, :5] = -float("inf")
    draft_probs[3, 0, ::3] = float("nan")
    draft_probs[4, 1, 4] = float("inf")
    return tokens, draft_probs, logits


@pytest.mark.parametrize("onehot", [pytest.param(False, id="draft-probs"), pytest.param(True, id="onehot")])
@pytest.mark.parametrize("temperature", [pytest.param(1.0, id="sampled"), pytest.param(0.0, id="greedy")])
@pytest.mark.parametrize("noise", NOISE)
def test_nan_and_inf_rows_give_ids_in_vocab(onehot, temperature, noise):
    tokens, draft_probs, logits = _nonfinite_case()
    case = (tokens, None if onehot else draft_probs, logits)
    got = assert_matches_reference(case, temperature=temperature, return_accept_probs=True,
                                   **noise_kwargs(noise, *tokens.shape, logits.shape[-1]))
    emitted = got.output_tokens.gather(1, got.num_accepted.view(-1, 1))
    assert ((emitted >= 0) & (emitted < logits.shape[-1])).all()


ACCEPT_PROB_CASES = [
    pytest.param(5, 4, 111, "random", id="draft-probs"),
    pytest.param(5, 4, 111, "onehot", id="onehot"),
    pytest.param(4, 6, 64, "peaked", id="peaked"),
    pytest.param(3, 0, 50, "random", id="K0"),
]


@pytest.mark.parametrize("batch,k,vocab,regime", ACCEPT_PROB_CASES)
def test_accept_probs(batch, k, vocab, regime):
    case = make_case(batch, k, vocab, regime, ragged=True, seed=7)
    got = assert_matches_reference(
        case, temperature=_rows(1.0, 0.0, 0.5, 0.0, 2.0, batch=batch), top_k=_rows(0, 0, 0, 9, 30, batch=batch),
        return_accept_probs=True, **noise_kwargs("injected", batch, k, vocab))
    assert got.accept_probs.shape == (batch, k)


MULTI_CHUNK = [
    pytest.param(3, 4, 111, "random", {}, id="V111-random"),
    pytest.param(3, 4, 111, "onehot", {}, id="V111-onehot"),
    pytest.param(4, 3, 300, "disjoint", {}, id="V300-disjoint"),
    pytest.param(3, 2, 200, "peaked", dict(temperature=_rows(0.0, 1.0, 0.5, batch=3)), id="V200-greedy-rows"),
    pytest.param(3, 3, 111, "random", dict(top_k=_rows(0, 10, 50, batch=3), top_p=_rows(0.7, 1.0, 0.9, batch=3)),
                 id="V111-topk-topp"),
]


@pytest.mark.parametrize("noise", NOISE)
@pytest.mark.parametrize("batch,k,vocab,regime,mode", MULTI_CHUNK)
def test_vocabulary_split_across_programs(batch, k, vocab, regime, mode, noise):
    case = make_case(batch, k, vocab, regime, ragged=True, seed=8)
    assert_matches_reference(case, tuning=SMALL_CHUNKS, return_accept_probs=True, **mode,
                             **noise_kwargs(noise, batch, k, vocab))


@pytest.mark.parametrize("tuning", [pytest.param({}, id="one-chunk"), pytest.param(SMALL_CHUNKS, id="chunks")])
def test_empty_residual_falls_back_to_target(tuning):
    """p = q exactly (uniform over 4 tokens); drafts outside the support are rejected (0 < 0 fails)
    and leave max(0, p - q) all zero: the emitted token is sampled from p."""
    batch, k, vocab = 6, 3, 100
    support = torch.tensor([5, 40, 41, 97])
    logits = torch.full((batch, k + 1, vocab), -torch.inf)
    logits[..., support] = 0.0
    draft_probs = torch.zeros(batch, k, vocab)
    draft_probs[..., support] = 0.25
    tokens = torch.tensor([[5, 40, 60], [3, 5, 5], [97, 41, 2], [41, 0, 0], [6, 7, 8], [5, 97, 41]])
    case = (tokens.to(DEVICE), draft_probs.to(DEVICE), logits.to(DEVICE))
    for noise in ("injected", "seeded"):
        got = assert_matches_reference(case, tuning=tuning, **noise_kwargs(noise, batch, k, vocab))
        assert got.num_accepted.tolist() == [2, 0, 2, 1, 0, 3]
        emitted = got.output_tokens.gather(1, got.num_accepted.view(-1, 1)).cpu()
        assert torch.isin(emitted, support).all()


def test_rows_do_not_depend_on_the_batch():
    batch, k, vocab = 6, 3, 111
    tokens, draft_probs, logits = make_case(batch, k, vocab, "random", seed=9)
    seeds = torch.arange(batch, dtype=torch.int64, device=DEVICE) + 123
    whole = verify_chain_triton(normalize_inputs(tokens, draft_probs, logits, seed=seeds))
    part = verify_chain_triton(normalize_inputs(tokens[3:], draft_probs[3:], logits[3:], seed=seeds[3:]))
    assert torch.equal(whole.output_tokens[3:], part.output_tokens)
    assert torch.equal(whole.num_accepted[3:], part.num_accepted)


def test_strided_inputs():
    """Views with padded rows (strides that are not the packed ones) read the right elements."""
    batch, k, vocab = 3, 3, 111
    tokens, draft_probs, logits = make_case(batch, k, vocab + 9, "random", seed=10)
    tokens = tokens.clamp(max=vocab - 1)
    wide = torch.cat([tokens, tokens], 1)
    case = (wide[:, ::2], draft_probs[..., :vocab], logits[..., :vocab])
    assert_matches_reference(case, temperature=_rows(1.0, 0.0, 0.5, batch=batch), top_k=_rows(0, 0, 7, batch=batch),
                             **noise_kwargs("seeded", batch, k, vocab))


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
