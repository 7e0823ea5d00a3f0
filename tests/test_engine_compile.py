"""The compiled target path (``compile=True``): logits of the eager forward to float rounding, the
tokens of ``model.generate``, and no compile inside a generation once the runner is precompiled."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model
from torch._dynamo.utils import counters

import draftwise
from draftwise.engine import ModelRunner, SpeculativeEngine
from draftwise.kernels import linear

PAD = 2


@pytest.fixture(scope="module")
def pair():
    # One target for the whole module: its compiled graphs are found again by their guards.
    return tiny_model("llama", layers=2, seed=0), tiny_model("llama", layers=1, seed=1)


def _prompts(batch: int, width: int = 7):
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, 100, (batch, width), generator=g)
    mask = torch.ones_like(ids)
    for row in range(batch):
        mask[row, :row] = 0
    return ids * mask + PAD * (1 - mask), mask


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("batch", [1, 3])
def test_compiled_logits_match_the_eager_forward(pair, batch):
    target, _ = pair
    ids, mask = _prompts(batch)
    runs = {}
    for compiled in (False, True):
        runner = ModelRunner(target, batch_size=batch, capacity=40, compile=compiled)
        runner.precompile()
        graphs = _graphs()
        runner.prefill(ids, mask)  # outside inference mode, unlike the precompile and generate()
        blocks = [torch.randint(3, 100, (batch, steps), generator=torch.Generator().manual_seed(steps))
                  for steps in (1, 2, 5, 1)]
        runs[compiled] = [runner.extend(block) for block in blocks]
        assert runner.lengths.tolist() == [7 + 9] * batch
        assert _graphs() == graphs, "a forward compiled a graph after the runner was precompiled"
    for eager, compiled in zip(runs[False], runs[True]):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_compiled_runner_forwards_through_the_compiled_graphs(pair, monkeypatch):
    """extend() of a compiled runner calls the compiled entry (and it holds graphs); prefills and
    eager runners do not."""
    from draftwise.engine import compiling

    target, _ = pair
    compiled, calls = compiling.compiled_call(), []

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[1])
        return compiled(*args, **kwargs)

    monkeypatch.setattr(compiling, "compiled_call", lambda: counting)
    eager, runner = (ModelRunner(target, batch_size=1, capacity=16, compile=flag) for flag in (False, True))
    runner.precompile()
    calls.clear()
    for r in (eager, runner):
        r.prefill(torch.tensor([[5, 6, 7]]))
        r.extend(torch.tensor([[8, 9]]))
    assert calls == [2]  # the compiled runner's extend only
    assert _graphs() > 0


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_equals_hf_generate_with_no_compile_in_the_generation(pair, batch):
    target, draft = pair
    ids, mask = _prompts(batch)
    want = target.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=PAD,
                           eos_token_id=None, max_new_tokens=24)
    engine = SpeculativeEngine(target, [draft], compile=True)
    # The first call builds the runner and precompiles it; the default schedule drafts chains only
    # (tree forwards are not compiled).
    first = engine.generate(ids, mask, max_new_tokens=24, do_sample=False, pad_token_id=PAD, eos_token_id=None,
                            return_dict_in_generate=True)
    assert torch.equal(first.sequences, want) and first.spec_stats.tree_steps == 0
    graphs = _graphs()
    for gamma in (1, 3, 6):  # verification forwards of 2, 4 and 7 tokens; rows finish at different steps
        got = engine.generate(ids, mask, max_new_tokens=24, do_sample=False, pad_token_id=PAD, eos_token_id=None,
                              num_assistant_tokens=gamma, num_assistant_tokens_schedule="constant")
        assert torch.equal(got, want), f"gamma {gamma}: compiled greedy output differs from model.generate"
    lookup = draftwise.generate(target, ids, mask, max_new_tokens=24, do_sample=False, pad_token_id=PAD,
                                eos_token_id=None, prompt_lookup_num_tokens=8, compile=True)
    assert torch.equal(lookup, want)
    assert _graphs() == graphs, "a generation compiled a graph after the runner was precompiled"


def test_a_runner_built_inside_inference_mode_reuses_the_graphs(pair):
    """Callers often wrap generation in torch.inference_mode(): a runner built there (here: a
    longer generation needs a larger cache) must find the graphs compiled outside it."""
    target, draft = pair
    ids, mask = _prompts(1)
    engine = SpeculativeEngine(target, [draft], compile=True)
    want = engine.generate(ids, mask, max_new_tokens=8, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    graphs = _graphs()
    with torch.inference_mode():
        got = engine.generate(ids, mask, max_new_tokens=30, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    assert engine.runner.cache.capacity > 8 + 30
    assert torch.equal(got[:, : want.shape[1]], want)
    assert _graphs() == graphs, "a runner built inside inference mode compiled new graphs"


@pytest.mark.skipif(not linear.available(), reason="the C++ extension is not built")
def test_skinny_linear_op_is_a_well_formed_custom_op():
    x, weight, bias = torch.randn(3, 5, 16), torch.randn(24, 16), torch.randn(24)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.draftwise.skinny_linear, (x, weight, bias), test_utils=checks)
    torch.testing.assert_close(torch.ops.draftwise.skinny_linear(x, weight, None), x @ weight.T,
                               rtol=1e-5, atol=1e-5)


def test_compile_must_be_a_bool(pair):
    target, _ = pair
    with pytest.raises(TypeError, match="compile"):
        SpeculativeEngine(target, [], compile="yes")
