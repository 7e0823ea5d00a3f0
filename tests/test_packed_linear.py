"""The packed-GEMM path of verification-sized CPU forwards against PyTorch's own linear layers."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model
from torch import nn

from draftwise.engine import packed_linear
from draftwise.engine.models import ModelRunner
from draftwise.engine.packed_linear import BUCKETS, MIN_ROWS, PackedLinears, bucket_for

pytestmark = pytest.mark.skipif(not packed_linear.available(), reason="this PyTorch has no MKL packed GEMM")


def test_buckets():
    assert bucket_for(1) is None and bucket_for(MIN_ROWS - 1) is None
    assert bucket_for(MIN_ROWS) == BUCKETS[0]
    assert all(bucket_for(b) == b for b in BUCKETS)
    assert bucket_for(BUCKETS[-1] + 1) is None


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 9, 13, 16, 17, 40])
def test_routed_linear_matches_torch(rows):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 80), nn.ReLU(), nn.Linear(80, 24, bias=False))
    packs = PackedLinears(model)
    x = torch.randn(1, rows, 48)
    with torch.inference_mode():
        expected = model(x)
        with packs.routing(rows):
            routed = model(x)
            assert ("forward" in vars(model[0])) == (bucket_for(rows) is not None)
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-5)
    assert all("forward" not in vars(m) for m in model)  # the model is left as it was


def test_packs_follow_weight_updates():
    torch.manual_seed(0)
    model = nn.Linear(32, 16)
    packs = PackedLinears(model)
    x = torch.randn(6, 32)
    with torch.no_grad():
        model.weight.mul_(-2.0)
    with torch.inference_mode(), packs.routing(6):
        routed = model(x)
    torch.testing.assert_close(routed, nn.functional.linear(x, model.weight, model.bias), rtol=1e-5, atol=1e-5)


def test_training_forwards_keep_autograd():
    model = nn.Linear(32, 16)
    packs = PackedLinears(model)
    with packs.routing(8):
        model(torch.randn(8, 32)).sum().backward()
    assert model.weight.grad is not None


def test_runner_uses_packs_and_switch_turns_them_off(monkeypatch):
    model = tiny_model("llama")
    assert ModelRunner(model, batch_size=1, capacity=16).linears is packed_linear.for_model(model)
    monkeypatch.setenv(packed_linear.ENV_SWITCH, "0")
    assert ModelRunner(model, batch_size=1, capacity=16).linears is None
    assert packed_linear.for_model(model.to(torch.float64)) is None


def test_runner_logits_with_and_without_packs(monkeypatch):
    """A 6-token extend (packed) gives the logits of the unpacked path."""
    model = tiny_model("qwen2")
    prompt, block = torch.randint(3, 100, (2, 5)), torch.randint(3, 100, (2, 3))

    def logits():
        runner = ModelRunner(model, batch_size=2, capacity=16)
        runner.prefill(prompt)
        return runner.extend(block)

    packed = logits()
    monkeypatch.setenv(packed_linear.ENV_SWITCH, "0")
    torch.testing.assert_close(packed, logits(), rtol=1e-4, atol=1e-5)
