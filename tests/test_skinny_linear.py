"""The skinny-GEMM kernel against a float64 product, and its routing of verification-sized forwards."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model
from torch import nn

from draftwise.engine import skinny_linear as routing_module
from draftwise.engine.models import ModelRunner
from draftwise.engine.skinny_linear import MAX_ROWS, MIN_ROWS, SkinnyLinears, routes
from draftwise.kernels import linear

pytestmark = pytest.mark.skipif(not linear.available(), reason="the C++ extension is not built")
ISAS = linear.supported_isas() if linear.available() else ()


def reference(x, weight, bias=None):
    out = x.double() @ weight.double().T
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 13, 24, 33])
@pytest.mark.parametrize("n, k", [(130, 576), (7, 37), (64, 16), (1, 8), (257, 100)])
def test_kernel_matches_float64(isa, rows, n, k):
    torch.manual_seed(rows * 1000 + n + k)
    x, weight, bias = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
    for b in (None, bias):
        out = linear.skinny_linear(x, weight, b, isa=isa)
        assert out.dtype == torch.float32 and out.shape == (rows, n)
        torch.testing.assert_close(out.double(), reference(x, weight, b), rtol=1e-5, atol=1e-5 * k**0.5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_row_does_not_depend_on_its_batch(isa, threads):
    """Fixed summation order: every row is bitwise the same alone or with others, on any thread count."""
    torch.manual_seed(1)
    x, weight = torch.randn(9, 200), torch.randn(300, 200)
    together = linear.skinny_linear(x, weight, isa=isa, num_threads=threads)
    for i in range(9):
        alone = linear.skinny_linear(x[i : i + 1], weight, isa=isa, num_threads=1)
        assert torch.equal(alone[0], together[i])


def test_shapes_and_strides():
    torch.manual_seed(2)
    weight = torch.randn(40, 24)
    x = torch.randn(3, 24, 5).transpose(1, 2)  # [3, 5, 24], not contiguous
    out = linear.skinny_linear(x, weight)
    assert out.shape == (3, 5, 40)
    torch.testing.assert_close(out.double(), reference(x, weight), rtol=1e-5, atol=1e-5)
    assert linear.skinny_linear(torch.randn(0, 24), weight).shape == (0, 40)


@pytest.mark.parametrize(
    "args, name",
    [
        ((torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8)), "x"),
        ((torch.randn(2, 8), torch.randn(4, 8).half()), "weight"),
        ((torch.randn(2, 8), torch.randn(8, 4).T), "weight"),
        ((torch.randn(2, 7), torch.randn(4, 8)), "x"),
        ((torch.randn(2, 8), torch.randn(4, 8), torch.randn(5)), "bias"),
    ],
)
def test_bad_arguments_name_themselves(args, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        linear.skinny_linear(*args)


def test_unknown_isa_is_refused():
    with pytest.raises(ValueError, match="isa"):
        linear.skinny_linear(torch.randn(2, 8), torch.randn(4, 8), isa="neon")


def test_routed_range():
    top = MAX_ROWS.get(linear.best_isa(), 0)
    assert not routes(MIN_ROWS - 1) and routes(MIN_ROWS) == (top > 0) and routes(top) == (top > 0)
    assert not routes(top + 1) and not routes(MAX_ROWS["avx512"] + 1)


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 13, 16, 24, 25, 40])
def test_routed_linear_matches_torch(rows):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 80), nn.ReLU(), nn.Linear(80, 24, bias=False))
    linears = SkinnyLinears(model)
    x = torch.randn(1, rows, 48)
    with torch.inference_mode():
        expected = model(x)
        with linears.routing(rows):
            routed = model(x)
            assert ("forward" in vars(model[0])) == routes(rows)
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-5)
    assert all("forward" not in vars(m) for m in model)  # the model is left as it was


def test_routing_follows_weight_updates():
    torch.manual_seed(0)
    model = nn.Linear(32, 16)
    linears = SkinnyLinears(model)
    x = torch.randn(6, 32)
    with torch.no_grad():
        model.weight.mul_(-2.0)
    with torch.inference_mode(), linears.routing(6):
        routed = model(x)
    torch.testing.assert_close(routed, nn.functional.linear(x, model.weight, model.bias), rtol=1e-5, atol=1e-5)


def test_training_forwards_keep_autograd():
    model = nn.Linear(32, 16)
    linears = SkinnyLinears(model)
    with linears.routing(8):
        model(torch.randn(8, 32)).sum().backward()
    assert model.weight.grad is not None


def test_runner_routes_and_switch_turns_it_off(monkeypatch):
    model = tiny_model("llama")
    assert isinstance(ModelRunner(model, batch_size=1, capacity=16).linears, SkinnyLinears)
    monkeypatch.setenv(routing_module.ENV_SWITCH, "0")
    assert ModelRunner(model, batch_size=1, capacity=16).linears is None
    monkeypatch.delenv(routing_module.ENV_SWITCH)
    with routing_module.switched_off():
        assert ModelRunner(model, batch_size=1, capacity=16).linears is None
    assert isinstance(ModelRunner(model, batch_size=1, capacity=16).linears, SkinnyLinears)  # switched back on
    assert routing_module.for_model(model.to(torch.float64)) is None


def test_runner_logits_with_and_without_the_kernel(monkeypatch):
    """A 2 x 3-token extend (6 rows, routed) gives the logits of PyTorch's path."""
    model = tiny_model("qwen2")
    prompt, block = torch.randint(3, 100, (2, 5)), torch.randint(3, 100, (2, 3))

    def logits():
        runner = ModelRunner(model, batch_size=2, capacity=16)
        runner.prefill(prompt)
        return runner.extend(block)

    routed = logits()
    monkeypatch.setenv(routing_module.ENV_SWITCH, "0")
    torch.testing.assert_close(routed, logits(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("crossover", [0, 20, 24, 50, 96, 127, 128, 1000])
def test_calibration_finds_the_largest_winning_bound(crossover):
    """Bisection over the candidate bounds: the largest one at or below where the kernel stops
    winning, the floor when it wins at none; few measurements."""
    from draftwise.engine.skinny_linear import CALIBRATION_ROWS, largest_winning

    asked = []

    def wins(rows):
        asked.append(rows)
        return rows <= crossover

    found = largest_winning(CALIBRATION_ROWS, wins, floor=20)
    below = [c for c in CALIBRATION_ROWS if c <= crossover]
    assert found == (below[-1] if below else 20)
    assert len(asked) <= 3


def test_max_rows_from_the_environment_and_the_floor_for_small_models(monkeypatch):
    from draftwise.engine.skinny_linear import ENV_MAX_ROWS, calibrated_max_rows

    model = nn.Sequential(nn.Linear(48, 80), nn.ReLU(), nn.Linear(80, 24))
    top = MAX_ROWS.get(linear.best_isa(), 0)
    assert SkinnyLinears(model).max_rows == top  # too small to time: the floor
    monkeypatch.setenv(ENV_MAX_ROWS, "30")
    linears = SkinnyLinears(model)
    assert linears.max_rows == 30
    with torch.inference_mode(), linears.routing(25):
        assert ("forward" in vars(model[0])) == (top > 0)
    monkeypatch.setenv(ENV_MAX_ROWS, "many")
    with pytest.raises(ValueError, match=ENV_MAX_ROWS):
        calibrated_max_rows(list(linears.linears))
