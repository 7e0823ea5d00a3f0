"""Microbenchmarks of ``verify_tree``: every provider over a sweep of tree shapes, side by side.

    python -m pytest bench/bench_verify_tree.py --benchmark-only --benchmark-json=OUT.json
    python bench/report.py OUT.json

A tree of T nodes per row, each node's parent drawn among the earlier nodes (so trees are both
deep and wide); greedy rows draft the target's argmax below every node, sampled rows draw their
children from q = p, so most children pass and the walk reaches deep. On the CPU the providers
are the C++ kernel and the torch reference; on a GPU, Triton and the torch reference.
"""

from __future__ import annotations

import functools

import pytest
import torch

from draftwise.kernels import available_backends, verify_tree
from draftwise.kernels.tree import verify_tree_ref

from bench_verify import DEVICE, _hardware, _percentiles, _synchronised, _versions

BATCHES = (1, 8)
NODES = (8, 32)
VOCAB = 32000
MODES = ("greedy", "T1")


def _providers() -> list[str]:
    wanted = ("triton", "torch") if DEVICE == "cuda" else ("cpp", "torch")
    return [name for name in wanted if name in available_backends(DEVICE)]


@functools.lru_cache(maxsize=2)
def _inputs(batch: int, nodes: int, mode: str):
    g = torch.Generator().manual_seed(batch * 100 + nodes)
    parents = torch.zeros(batch, nodes, dtype=torch.int64)
    parents[:, 0] = -1
    for t in range(1, nodes):
        parents[:, t] = torch.randint(0, t, (batch,), generator=g)
    logits = torch.randn(batch, nodes, VOCAB, generator=g) * 3
    probs = torch.softmax(logits, -1)
    below = logits.gather(1, parents.clamp(min=0).unsqueeze(-1).expand(-1, -1, VOCAB))  # the parent's logits
    if mode == "greedy":
        tokens, draft_probs, temperature = below.argmax(-1), None, 0.0
    else:
        law = torch.softmax(below, -1)
        tokens = torch.multinomial(law.view(-1, VOCAB), 1, generator=g).view(batch, nodes)
        draft_probs, temperature = law.to(DEVICE), 1.0
    tokens[:, 0] = 0
    del probs
    args = (tokens.to(DEVICE), parents.to(DEVICE), draft_probs, logits.to(DEVICE))
    return args, dict(temperature=temperature, seed=torch.arange(batch, device=DEVICE) + 7)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("nodes", NODES, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("provider", _providers())
def test_verify_tree(benchmark, provider, batch, nodes, mode):
    args, kwargs = _inputs(batch, nodes, mode)
    fn = _synchronised(lambda: verify_tree(*args, **kwargs, backend=provider))
    out = fn()  # correctness first: the reference's tokens
    want = verify_tree_ref(*args, **kwargs)
    mismatched = (out.output_tokens != want.output_tokens).any(-1).sum().item()
    assert mismatched <= max(1, batch // 32), f"{mismatched} rows differ from the reference"
    benchmark.pedantic(fn, rounds=5 if provider == "torch" else 30, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(provider=provider, batch=batch, nodes=nodes, vocab=VOCAB, mode=mode,
                                hardware=_hardware(), **_percentiles(benchmark), **_versions())
