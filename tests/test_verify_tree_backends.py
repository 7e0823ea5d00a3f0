"""Tier 1: token-tree verification on every backend (torch, C++, Triton in the interpreter) gives
exactly the float64 reference's path, tokens and accept counts for the same seeds: chains, stars,
deep and wide trees, padded rows, per-row structures, greedy and sampled rows mixed, top-k /
top-p, stochastic and one-hot nodes, float32 and bfloat16 inputs. Plus the noise clause: the child
of rank i at depth d is tested with its own draw (i, d, accept)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from draftwise.kernels import TreeVerifyOutput, verify_chain, verify_tree, verify_tree_ref  # noqa: E402
from draftwise.kernels.backend import available_backends  # noqa: E402
from draftwise.kernels.reference import STREAM_ACCEPT, philox_uniform  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [
    pytest.param(name, id=name)
    for name in ("torch", "cpp", "triton") if name in available_backends(DEVICE)
]
VOCAB = 40  # not a power of two; three vocabulary blocks in the Triton kernel (see the fixture)

# Parent lists of tree shapes (node 0 the root).
CHAIN = [-1, 0, 1, 2, 3, 4]
STAR = [-1, 0, 0, 0, 0, 0]
#   0 ─┬─ 1 ─┬─ 4 ─┬─ 7 ── 9 ── 10
#      │     │     └─ 8
#      │     └─ 5
#      ├─ 2 ── 6
#      └─ 3
DEEP_WIDE = [-1, 0, 0, 0, 1, 1, 2, 4, 4, 7, 9]
SHAPES = [pytest.param(CHAIN, id="chain"), pytest.param(STAR, id="star"), pytest.param(DEEP_WIDE, id="deep-wide")]


@pytest.fixture(autouse=True)
def _small_triton_blocks(monkeypatch):
    """Several vocabulary blocks per pass at V = 40, the last one partial."""
    try:
        from draftwise.kernels import tree_triton
    except ImportError:
        return
    monkeypatch.setattr(tree_triton, "BLOCK_V", 16)


def make_tree_case(parents, batch: int, *, seed: int, vocab: int = VOCAB, dtype=torch.float32):
    """``(tree_tokens, parents, draft_probs, target_logits)``; each node's token drawn from a draft
    law near the target's law at its parent, or (half the nodes) the target's argmax there, so that
    greedy and sampled walks go deep."""
    g = torch.Generator().manual_seed(seed)
    parents = torch.as_tensor(parents, dtype=torch.int64)
    if parents.dim() == 1:
        parents = parents.expand(batch, -1).clone()
    nodes = parents.shape[1]
    logits = torch.randn(batch, nodes, vocab, generator=g, dtype=torch.float64) * 2.0
    above = logits.gather(1, parents.clamp(min=0).unsqueeze(-1).expand(-1, -1, vocab))
    draft = torch.softmax(above + 0.8 * torch.randn(batch, nodes, vocab, generator=g, dtype=torch.float64), -1)
    tokens = torch.multinomial(draft.view(-1, vocab), 1, generator=g).view(batch, nodes)
    argmax = above.argmax(-1)
    tokens = torch.where(torch.rand(batch, nodes, generator=g) < 0.5, argmax, tokens)
    tokens[:, 0] = 0
    return (tokens.to(DEVICE), parents.to(DEVICE), draft.to(dtype).to(DEVICE), logits.to(dtype).to(DEVICE))


def seeds_for(batch: int) -> torch.Tensor:
    return (torch.arange(batch, dtype=torch.int64) * 1_000_003 - 2**40).to(DEVICE)


def assert_matches_reference(backend, tokens, parents, draft_probs, logits, **kwargs) -> TreeVerifyOutput:
    want = verify_tree_ref(tokens, parents, draft_probs, logits, **kwargs)
    got = verify_tree(tokens, parents, draft_probs, logits, backend=backend, **kwargs)
    for name, w, o in zip(TreeVerifyOutput._fields, want, got):
        assert o.dtype == torch.int64 and o.device == w.device, name
        assert torch.equal(o, w), f"{name}: got {o.tolist()}, want {w.tolist()}"
    return got


@pytest.mark.parametrize("stochastic", [pytest.param(True, id="draft-probs"), pytest.param(False, id="onehot")])
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_match_the_reference(backend, shape, temperature, stochastic):
    tokens, parents, q, logits = make_tree_case(shape, 3, seed=len(shape) + int(10 * temperature))
    out = assert_matches_reference(backend, tokens, parents, q if stochastic else None, logits,
                                   temperature=temperature, seed=seeds_for(3))
    assert bool(((out.output_tokens >= -1) & (out.output_tokens < VOCAB)).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_chain_tree_gives_the_chain_kernels_tokens(backend):
    """On one backend, a chain tree and verify_chain agree token for token for the same seeds."""
    batch, k = 4, len(CHAIN) - 1
    tokens, parents, q, logits = make_tree_case(CHAIN, batch, seed=3)
    rows = dict(temperature=torch.tensor([1.0, 0.7, 0.0, 1.0]), top_p=torch.tensor([1.0, 1.0, 1.0, 0.8]),
                seed=seeds_for(batch))
    for probs in (q, None):
        tree = verify_tree(tokens, parents, probs, logits, backend=backend, **rows)
        chain = verify_chain(tokens[:, 1:], None if probs is None else probs[:, 1:], logits, backend=backend, **rows)
        assert torch.equal(tree.output_tokens, chain.output_tokens)
        assert torch.equal(tree.num_accepted, chain.num_accepted)
        assert tree.path.shape == (batch, k + 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deep_walks_and_residual_draws_are_covered(backend):
    """Many sampled rows of the deep and wide tree: every depth is reached, and second and third
    children pass after their elder siblings failed (the residual law)."""
    batch = 16
    tokens, parents, q, logits = make_tree_case(DEEP_WIDE, batch, seed=5)
    out = assert_matches_reference(backend, tokens, parents, q, logits, temperature=1.0, seed=seeds_for(batch))
    first_step = out.path[:, 1]
    assert int(out.num_accepted.max()) >= 4
    assert bool((first_step == 2).any() or (first_step == 3).any()), "no younger sibling passed"
    assert bool((first_step == -1).any()), "no row rejected every child of the root"


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_rows_with_filters(backend):
    """Greedy and sampled rows in one batch, each row with its own temperature, top-k and top-p,
    and its own tree (random parents)."""
    batch, nodes = 6, 9
    g = torch.Generator().manual_seed(11)
    parents = torch.stack([torch.tensor([-1] + [int(torch.randint(0, t, (1,), generator=g)) for t in range(1, nodes)])
                           for _ in range(batch)])
    tokens, parents, q, logits = make_tree_case(parents, batch, seed=12)
    rows = dict(
        temperature=torch.tensor([0.0, 1.0, 0.7, 1.0, 0.0, 0.7]),
        top_k=torch.tensor([0, 5, 0, 0, 3, 12]),
        top_p=torch.tensor([1.0, 1.0, 0.8, 0.6, 0.5, 0.9]),
    )
    for stochastic in (True, False):
        assert_matches_reference(backend, tokens, parents, q if stochastic else None, logits, seed=seeds_for(batch),
                                 **rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_rows(backend):
    """Ids outside [0, V) pad a node and everything below it; the output width is the deepest
    valid node of the batch (here shallower than the tree's deepest node)."""
    batch = 4
    tokens, parents, q, logits = make_tree_case(DEEP_WIDE, batch, seed=21)
    tokens[:, 10] = -1  # the deepest node, in every row
    tokens[0, 4] = -1  # row 0: nodes 4, 7, 8, 9 go with it
    tokens[1, 1] = VOCAB + 3  # row 1: the whole first branch
    tokens[2, 1:] = -1  # row 2: the root alone (a bonus token only)
    for temperature in (0.0, 1.0):
        out = assert_matches_reference(backend, tokens, parents, q, logits, temperature=temperature,
                                       seed=seeds_for(batch))
        assert out.path.shape == (batch, 5)
        assert out.num_accepted[2] == 0 and out.path[2].tolist() == [0, -1, -1, -1, -1]


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_inputs(backend, dtype):
    tokens, parents, q, logits = make_tree_case(DEEP_WIDE, 4, seed=31, dtype=dtype)
    assert_matches_reference(backend, tokens, parents, q, logits, temperature=torch.tensor([1.0, 0.7, 0.0, 1.0]),
                             top_p=torch.tensor([1.0, 0.9, 1.0, 1.0]), seed=seeds_for(4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_inputs_give_ids_in_vocab(backend):
    """NaN and infinite logits (a whole NaN row, +inf ties, -inf), NaN and zero draft probabilities."""
    batch = 4
    tokens, parents, q, logits = make_tree_case(DEEP_WIDE, batch, seed=71)
    logits[0, 0] = torch.nan  # the root's row: uniform after sanitising
    logits[1, 0, 3] = logits[1, 0, 7] = torch.inf  # two tied maxima
    logits[2, :, ::3] = -torch.inf
    logits[3, 1, 5] = torch.nan
    q[1, 1:, ::2] = torch.nan
    q[2, torch.arange(1, 11), tokens[2, 1:]] = 0.0  # drafted tokens the draft gave no mass
    for temperature in (0.0, 1.0):
        for probs in (q, None):
            out = assert_matches_reference(backend, tokens, parents, probs, logits, temperature=temperature,
                                           seed=seeds_for(batch))
            assert bool(((out.output_tokens >= -1) & (out.output_tokens < VOCAB)).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_vocabulary_over_several_chunks(backend, monkeypatch):
    """V = 4099: two chunks of the C++ statistics, several Triton blocks; top-k and top-p rows."""
    try:
        from draftwise.kernels import tree_triton
        monkeypatch.setattr(tree_triton, "BLOCK_V", 1024)
    except ImportError:
        pass
    batch = 3
    tokens, parents, q, logits = make_tree_case(CHAIN[:4], batch, seed=81, vocab=4099)
    assert_matches_reference(backend, tokens, parents, q, logits, temperature=torch.tensor([1.0, 0.7, 1.0]),
                             top_k=torch.tensor([0, 50, 0]), top_p=torch.tensor([1.0, 1.0, 0.9]),
                             seed=seeds_for(batch))


def _sibling_seeds(count: int):
    """Row seeds for which ``u(1, 1) < 1/2`` decides differently from the draws a wrong counter
    would take (``u(0, 1)``: the first sibling's; ``u(1, 0)``: depth 0's), half of them each way."""
    seeds = torch.arange(4000, dtype=torch.int64)
    u = {(i, d): philox_uniform(seeds, i, d, STREAM_ACCEPT) < 0.5 for i in (0, 1) for d in (0, 1)}
    differs = (u[1, 1] != u[0, 1]) & (u[1, 1] != u[1, 0])
    passes, fails = seeds[differs & u[1, 1]][: count // 2], seeds[differs & ~u[1, 1]][: count - count // 2]
    return torch.cat([passes, fails]), torch.cat([torch.ones(len(passes)), torch.zeros(len(fails))]).bool()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_younger_sibling_takes_its_own_draw(backend):
    """Root -> A (p = 1, always passes) -> children a (p = 0, always fails) and b (p = 1/2), all
    one-hot: b passes exactly when u(rank 1, depth 1) < 1/2, a draw that decides differently from
    the first sibling's and from depth 0's on every row here."""
    seeds, b_passes = _sibling_seeds(8)
    batch, vocab = len(seeds), 8
    logits = torch.full((batch, 4, vocab), -torch.inf)
    logits[:, 0, 5] = 0.0  # after the root: token 5 (A) only
    logits[:, 1, 2] = logits[:, 1, 3] = 0.0  # after A: tokens 2 and 3 (b), 1/2 each; a = 1 has p = 0
    logits[:, 2:] = 0.0
    tokens = torch.tensor([0, 5, 1, 3]).expand(batch, -1)
    parents = torch.tensor([-1, 0, 1, 1]).expand(batch, -1)
    out = assert_matches_reference(backend, tokens.to(DEVICE), parents.to(DEVICE), None, logits.to(DEVICE),
                                   temperature=1.0, seed=seeds.to(DEVICE))
    assert out.num_accepted.cpu().tolist() == [2 if passed else 1 for passed in b_passes.tolist()]
    assert out.path[:, 2].cpu().tolist() == [3 if passed else -1 for passed in b_passes.tolist()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_int_seed_and_no_seed(backend):
    tokens, parents, q, logits = make_tree_case(STAR, 3, seed=41)
    assert_matches_reference(backend, tokens, parents, q, logits, temperature=1.0, seed=12345)
    out = verify_tree(tokens, parents, q, logits, temperature=1.0, backend=backend)  # seeds drawn
    assert bool(((out.output_tokens >= -1) & (out.output_tokens < VOCAB)).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_named(backend):
    tokens, parents, q, logits = make_tree_case(STAR, 2, seed=51)
    kwargs = dict(backend=backend, seed=1)
    with pytest.raises(ValueError, match="parents: expected every parent before its child"):
        verify_tree(tokens, torch.tensor([[-1, 2, 0, 0, 0, 0]] * 2, device=DEVICE), q, logits, **kwargs)
    with pytest.raises(ValueError, match="top_p"):
        verify_tree(tokens, parents, q, logits, top_p=0.0, **kwargs)
    with pytest.raises(ValueError, match="top_k"):
        verify_tree(tokens, parents, q, logits, top_k=-1, **kwargs)
    with pytest.raises(ValueError, match="temperature"):
        verify_tree(tokens, parents, q, logits, temperature=-0.5, **kwargs)
    with pytest.raises(TypeError, match="target_logits"):
        verify_tree(tokens, parents, q, logits.long(), **kwargs)
    with pytest.raises(ValueError, match="draft_probs"):
        verify_tree(tokens, parents, q[:, :2], logits, **kwargs)
    with pytest.raises(ValueError, match="backend"):
        verify_tree(tokens, parents, q, logits, backend="cuda-magic")


@pytest.mark.skipif("cpp" not in available_backends("cpu"), reason="the C++ extension draftwise._C is not built")
def test_cpp_kernel_checks_parents_itself():
    """The raw-pointer kernel never walks out of a row on bad parents, whatever its caller checked."""
    from draftwise.kernels.tree_cpp import verify_tree_cpp

    tokens, parents, q, logits = make_tree_case(STAR, 2, seed=61)
    rows = (torch.ones(2), torch.zeros(2, dtype=torch.int64), torch.ones(2), torch.arange(2))
    with pytest.raises(ValueError, match="parents: expected every parent before its child"):
        verify_tree_cpp(tokens.cpu(), torch.tensor([[-1, 0, 5, 0, 0, 0]] * 2), q.cpu(), logits.cpu(), *rows)
    with pytest.raises(ValueError, match="parents: node 0 is the root"):
        verify_tree_cpp(tokens.cpu(), torch.tensor([[0, 0, 0, 0, 0, 0]] * 2), q.cpu(), logits.cpu(), *rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    out = verify_tree(torch.empty(0, 3, dtype=torch.int64, device=DEVICE),
                      torch.empty(0, 3, dtype=torch.int64, device=DEVICE), None,
                      torch.empty(0, 3, VOCAB, device=DEVICE), backend=backend, seed=0)
    assert out.path.shape == out.output_tokens.shape == (0, 1) and out.num_accepted.shape == (0,)
