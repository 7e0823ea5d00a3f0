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
