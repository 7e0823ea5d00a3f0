"""Edge cases checked from first principles on every backend (not against the reference)."""

from __future__ import annotations

import pytest
import torch

from draftwise.kernels import PAD_TOKEN, Uniforms, available_backends, seeded_uniforms
from draftwise.kernels import verify_chain as verify_chain_op

from cases import BACKENDS, device_of, make_case, make_uniforms, on


def verify_chain(*args, backend: str, **kwargs):
    """The op on ``backend``'s device (Triton on CUDA when there is one), its outputs on the CPU."""
    device = device_of(backend)
    out = verify_chain_op(*(on(device, a) for a in args), backend=backend,
                          **{name: on(device, v) for name, v in kwargs.items()})
    return type(out)(*(on("cpu", t) for t in out))
U_MIN, U_MAX = 0.5 * 2.0**-23, 1.0 - 0.5 * 2.0**-23  # the extreme values the generator can draw


def _uniforms(batch, k, vocab, accept_value=None, seed=1) -> Uniforms:
    noise = make_uniforms(batch, k, vocab, seed=seed)
    if accept_value is not None:
        noise = Uniforms(torch.full_like(noise.accept, accept_value), noise.race)
    return noise


def _race(weights: torch.Tensor, noise: torch.Tensor) -> int:
    return int((weights.double() / -torch.log1p(-noise.double())).argmax())


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_accepts_while_drafts_match_the_argmax(backend):
    logits = torch.randn(2, 4, 10)
    argmax = logits.argmax(-1)
    tokens = argmax[:, :3].clone()
    tokens[0, 2] = (argmax[0, 2] + 1) % 10  # row 0: third draft is wrong; row 1: all right
    out = verify_chain(tokens, None, logits, temperature=0.0, backend=backend)
    assert out.num_accepted.tolist() == [2, 3]
    assert out.output_tokens[0].tolist() == [*argmax[0, :3].tolist(), PAD_TOKEN]
    assert out.output_tokens[1].tolist() == argmax[1].tolist()  # three accepted + the bonus


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_probability_draft_is_never_accepted(backend):
    """p(x) = 0 is rejected even with the smallest uniform (u > 0, strict <)."""
    logits = torch.randn(3, 2, 8)
    logits[:, 0, 5] = -torch.inf
    tokens = torch.full((3, 1), 5)
    draft_probs = torch.full((3, 1, 8), 1 / 8)
    for probs in (draft_probs, None):
        noise = _uniforms(3, 1, 8, accept_value=U_MIN)
        out = verify_chain(tokens, probs, logits, uniforms=noise, backend=backend)
        assert out.num_accepted.tolist() == [0, 0, 0]
        assert (out.output_tokens[:, 0] != 5).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_draft_with_p_at_least_q_is_always_accepted(backend):
    logits = torch.zeros(2, 2, 4)
    logits[:, 0, 1] = 3.0  # p(1) ~ 0.87
    draft_probs = torch.full((2, 1, 4), 0.25)
    tokens = torch.ones(2, 1, dtype=torch.int64)
    out = verify_chain(tokens, draft_probs, logits, uniforms=_uniforms(2, 1, 4, U_MAX), backend=backend)
    assert out.num_accepted.tolist() == [1, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_residual_falls_back_to_p(backend):
    """q = 2p (not normalised) leaves max(0, p - q) = 0: the recovered token is drawn from p."""
    logits = torch.randn(4, 2, 16)
    p = torch.softmax(logits[:, 0].double(), -1)
    draft_probs = (2 * p).unsqueeze(1).float()
    tokens = p.argmax(-1, keepdim=True)
    noise = _uniforms(4, 1, 16, accept_value=0.75)  # 0.75 * 2p >= p: every row rejects
    out = verify_chain(tokens, draft_probs, logits, uniforms=noise, backend=backend)
    assert out.num_accepted.tolist() == [0, 0, 0, 0]
    for row in range(4):
        assert out.output_tokens[row, 0] == _race(p[row], noise.race[row, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_drafts_emits_a_bonus_sample(backend):
    logits = torch.randn(3, 1, 40)
    noise = _uniforms(3, 0, 40)
    out = verify_chain(torch.empty(3, 0, dtype=torch.int64), None, logits, uniforms=noise, backend=backend)
    assert out.output_tokens.shape == (3, 1) and out.num_accepted.tolist() == [0, 0, 0]
    for row in range(3):
        assert out.output_tokens[row, 0] == _race(torch.softmax(logits[row, 0].double(), -1), noise.race[row, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_row_takes_its_bonus_at_its_own_length(backend):
    logits = torch.randn(1, 5, 12)
    tokens = torch.tensor([[logits[0, 0].argmax(), logits[0, 1].argmax(), PAD_TOKEN, PAD_TOKEN]])
    out = verify_chain(tokens, None, logits, temperature=0.0, backend=backend)
    assert out.num_accepted.tolist() == [2]
    assert out.output_tokens[0].tolist() == [*tokens[0, :2].tolist(), int(logits[0, 2].argmax()), -1, -1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token_vocabulary(backend):
    tokens, draft_probs, logits = make_case(3, 4, 1, seed=2)
    out = verify_chain(tokens, draft_probs, logits, seed=0, backend=backend)
    assert out.num_accepted.tolist() == [4, 4, 4] and (out.output_tokens == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_non_finite_logits_give_ids_in_range(backend, temperature):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 3, 33, generator=g)
    logits[torch.rand(logits.shape, generator=g) < 0.3] = float("nan")
    logits[0] = float("nan")
    logits[1] = -torch.inf
    logits[2, :, ::2] = torch.inf
    tokens = torch.randint(0, 33, (6, 2), generator=g)
    draft_probs = torch.softmax(torch.randn(6, 2, 33, generator=g), -1)
    draft_probs[0, 0, 3] = float("nan")
    out = verify_chain(tokens, draft_probs, logits, temperature=temperature, seed=1, backend=backend)
    emitted = out.output_tokens[torch.arange(6), out.num_accepted]
    assert ((emitted >= 0) & (emitted < 33)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_request_same_tokens_in_any_batch(backend):
    """Randomness is keyed by the row's seed, not its place in the batch."""
    tokens, draft_probs, logits = make_case(9, 4, 64, seed=8)
    seeds = torch.arange(9, dtype=torch.int64) + 1000
    full = verify_chain(tokens, draft_probs, logits, seed=seeds, backend=backend)
    alone = verify_chain(tokens[5:6], draft_probs[5:6], logits[5:6], seed=seeds[5:6], backend=backend)
    assert torch.equal(full.output_tokens[5], alone.output_tokens[0])
    reordered = torch.flip(torch.arange(9), [0])
    flipped = verify_chain(tokens[reordered], draft_probs[reordered], logits[reordered],
                           seed=seeds[reordered], backend=backend)
    assert torch.equal(flipped.output_tokens[reordered.argsort()], full.output_tokens)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_draws_the_documented_philox_noise(backend):
    tokens, draft_probs, logits = make_case(5, 3, 50, seed=9)
    seeds = torch.tensor([0, 1, -7, 2**40 + 3, 2**62], dtype=torch.int64)
    seeded = verify_chain(tokens, draft_probs, logits, seed=seeds, backend=backend)
    injected = verify_chain(tokens, draft_probs, logits, uniforms=seeded_uniforms(seeds, 3, 50), backend=backend)
    assert torch.equal(seeded.output_tokens, injected.output_tokens)
    an_int = verify_chain(tokens, draft_probs, logits, seed=41, backend=backend)
    rows = verify_chain(tokens, draft_probs, logits, seed=torch.arange(5) + 41, backend=backend)
    assert torch.equal(an_int.output_tokens, rows.output_tokens)


@pytest.mark.parametrize("backend", [
    pytest.param("cpp", marks=pytest.mark.skipif("cpp" not in available_backends("cpu"), reason="no C++ extension")),
    pytest.param("triton", marks=pytest.mark.gpu),
])
def test_offsets_past_int32(backend):
    """B * (K+1) * V > 2**31 elements: the last row is read from past the int32 range."""
    device = "cuda" if backend == "triton" else "cpu"
    batch, k, vocab = 3, 4, 150_000_000  # 2.25e9 elements of fp16 logits (4.5 GB)
    try:
        logits = torch.zeros(batch, k + 1, vocab, dtype=torch.float16, device=device)
    except (RuntimeError, MemoryError):
        pytest.skip("not enough memory for a > 2**31-element tensor")
    logits[-1, :, vocab - 7] = 5.0  # the last row's argmax sits at the very end of memory
    tokens = torch.full((batch, k), vocab - 7, device=device)
    out = verify_chain(tokens, None, logits, temperature=0.0, backend=backend)
    assert out.num_accepted.tolist() == [0, 0, k]
    assert out.output_tokens[-1].tolist() == [vocab - 7] * (k + 1)
    assert out.output_tokens[0, 0].item() == 0  # all-equal row: argmax is the lowest index
