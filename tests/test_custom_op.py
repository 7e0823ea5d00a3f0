"""The custom op: opcheck, and a torch.compile graph that holds it."""

from __future__ import annotations

import pytest
import torch

from draftwise.kernels import available_backends, normalize_inputs, op_arguments, verify_chain, verify_chain_op

from cases import make_case, make_uniforms

CPU_BACKENDS = [name for name in ("torch", "cpp") if name in available_backends("cpu")]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("noise", ["seeded", "injected"])
@pytest.mark.parametrize("accept_probs", [False, True], ids=["tokens", "with-accept-probs"])
def test_opcheck(backend, noise, accept_probs):
    tokens, draft_probs, logits = make_case(3, 4, 50, seed=1)
    kwargs = {"seed": 5} if noise == "seeded" else {"uniforms": make_uniforms(3, 4, 50)}
    inputs = normalize_inputs(tokens, draft_probs, logits, temperature=torch.tensor([1.0, 0.0, 0.5]),
                              return_accept_probs=accept_probs, **kwargs)
    torch.library.opcheck(verify_chain_op, op_arguments(inputs, backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_op_equals_the_eager_call(backend):
    tokens, draft_probs, logits = make_case(4, 3, 40, seed=2)
    inputs = normalize_inputs(tokens, draft_probs, logits, seed=torch.arange(4) + 9)
    got = torch.ops.draftwise.verify_chain(*op_arguments(inputs, backend))
    want = verify_chain(tokens, draft_probs, logits, seed=torch.arange(4) + 9, backend=backend)
    assert torch.equal(got[0], want.output_tokens) and torch.equal(got[1], want.num_accepted)


def test_compiled_graph_holds_the_op():
    tokens, draft_probs, logits = make_case(2, 3, 30, seed=3)
    inputs = normalize_inputs(tokens, draft_probs, logits, seed=torch.tensor([1, 2]))
    args = op_arguments(inputs, "torch")

    def step(logits_in):
        scaled = logits_in * 1.0
        return torch.ops.draftwise.verify_chain(args[0], args[1], scaled, *args[3:])[0]

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(logits), step(logits))


def _tree_case(seed: int):
    """Two rows: a branching tree and a shorter, padded one; one greedy row, one sampled."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.tensor([[4, 1, 2, 3, 5, 6], [7, 8, 9, -1, -1, -1]])
    parents = torch.tensor([[-1, 0, 0, 1, 1, 3], [-1, 0, 1, -1, -1, -1]])
    logits = torch.randn(2, 6, 12, generator=g)
    probs = torch.softmax(torch.randn(2, 6, 12, generator=g), -1)
    rows = (torch.tensor([1.0, 0.0]), torch.zeros(2, dtype=torch.int64), torch.ones(2), torch.tensor([3, 4]))
    return tokens, parents, probs, logits, rows


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("with_probs", [True, False], ids=["laws", "one-hot"])
def test_tree_op_opcheck_and_eager_equality(backend, with_probs):
    import draftwise
    from draftwise.kernels import verify_tree_op

    tokens, parents, probs, logits, rows = _tree_case(5)
    probs = probs if with_probs else None
    torch.library.opcheck(verify_tree_op, (tokens, parents, probs, logits, *rows, backend))
    path, output, accepted = torch.ops.draftwise.verify_tree(tokens, parents, probs, logits, *rows, backend)
    want = draftwise.verify_tree(tokens, parents, probs, logits, temperature=rows[0], top_k=rows[1], top_p=rows[2],
                                 seed=rows[3], backend=backend)
    width = want.path.shape[1]
    assert path.shape == tokens.shape and bool((path[:, width:] == -1).all())
    assert torch.equal(path[:, :width], want.path) and torch.equal(output[:, :width], want.output_tokens)
    assert torch.equal(accepted, want.num_accepted)


def test_compiled_graph_holds_the_tree_op():
    tokens, parents, probs, logits, rows = _tree_case(6)

    def step(logits_in):
        return torch.ops.draftwise.verify_tree(tokens, parents, probs, logits_in * 1.0, *rows, "torch")[1]

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(logits), step(logits))


def test_tree_op_names_a_bad_argument():
    tokens, parents, probs, logits, rows = _tree_case(7)
    with pytest.raises(ValueError, match="target_logits"):
        torch.ops.draftwise.verify_tree(tokens, parents, probs, logits[:, :3], *rows, "torch")
    with pytest.raises(ValueError, match="backend"):
        torch.ops.draftwise.verify_tree(tokens, parents, probs, logits, *rows, "cuda")
