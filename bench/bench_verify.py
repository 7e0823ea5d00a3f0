"""Microbenchmarks of ``verify_chain``: every provider over the sweep of shapes, side by side.

    make bench                      # CPU: torch reference vs C++, JSON in bench/results/
    python -m pytest bench/bench_verify.py --benchmark-only --benchmark-json=OUT.json
    python bench/report.py OUT.json # the markdown table of docs/benchmarks.md

Inputs are the worst case of an early-exiting kernel: every draft is accepted, so every position
of the target logits must be read; those bytes are the ones counted (q is read at single entries
when every draft passes; outputs are negligible).
On a GPU the providers are Triton, the torch reference and ``torch.compile`` of the reference,
and a device-to-device copy gives the bandwidth ceiling.
"""

from __future__ import annotations

import functools
import platform

import pytest
import torch

from draftwise.kernels import available_backends, get_implementation, normalize_inputs
from draftwise.kernels.reference import chain_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCHES = (1, 8, 64)
DRAFTS = (4, 8)
VOCABS = (32000, 128256)
MODES = ("greedy", "T1")


def _providers() -> list[str]:
    if DEVICE == "cuda":
        found = ["torch", "compiled"]
        return (["triton"] if "triton" in available_backends("cuda") else []) + found
    return [name for name in ("cpp", "torch") if name in available_backends("cpu")]


def _hardware() -> str:
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _versions() -> dict:
    versions = {"torch": torch.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    return versions


@functools.lru_cache(maxsize=2)
def _inputs(batch: int, k: int, vocab: int, mode: str):
    """The worst case for an early-exiting kernel: every draft is accepted, so every position of
    the logits must be read. Greedy drafts are the target's argmax; sampled drafts come from q = p."""
    g = torch.Generator().manual_seed(batch * 1000 + k)
    logits = torch.randn(batch, k + 1, vocab, generator=g) * 3
    if mode == "greedy":
        draft_probs, tokens, temperature = None, logits[:, :k].argmax(-1), 0.0
    else:
        draft_probs = torch.softmax(logits[:, :k], -1)
        tokens = torch.multinomial(draft_probs.reshape(-1, vocab), 1, generator=g).view(batch, k)
        draft_probs, temperature = draft_probs.to(DEVICE), 1.0
    logits, tokens = logits.to(DEVICE), tokens.to(DEVICE)
    inputs = normalize_inputs(tokens, draft_probs, logits, temperature=temperature,
                              seed=torch.arange(batch, device=DEVICE) + 7)
    bytes_read = logits.numel() * logits.element_size()  # q is read at single entries only
    return inputs, bytes_read


def _callable(provider: str, inputs):
    if provider == "compiled":
        compiled = torch.compile(functools.partial(chain_reference, compute_dtype=torch.float32))
        return lambda: compiled(inputs)
    implementation = get_implementation(provider, filtered=False)  # no top-k / top-p: known, as in a generation
    return lambda: implementation(inputs)


def _synchronised(fn):
    if DEVICE != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def _percentiles(benchmark) -> dict:
    data = sorted(benchmark.stats.stats.data)
    return {"p20": data[int(0.2 * (len(data) - 1))], "p80": data[int(0.8 * (len(data) - 1))]}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("vocab", VOCABS, ids=lambda v: f"V{v}")
@pytest.mark.parametrize("k", DRAFTS, ids=lambda k: f"K{k}")
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("provider", _providers())
def test_verify_chain(benchmark, provider, batch, k, vocab, mode):
    inputs, bytes_read = _inputs(batch, k, vocab, mode)
    fn = _synchronised(_callable(provider, inputs))
    out = fn()  # correctness first: the same tokens as the float64 reference
    want = chain_reference(inputs, torch.float64)
    mismatched = (out.output_tokens != want.output_tokens).any(-1).sum().item()
    assert mismatched <= max(1, batch // 32), f"{mismatched} rows differ from the reference"
    rounds = max(3, min(50, int(2e9 / max(bytes_read * (40 if provider == "torch" else 1), 1))))
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(
        provider=provider, batch=batch, k=k, vocab=vocab, mode=mode, dtype="float32",
        bytes_read=bytes_read, gbps=bytes_read / benchmark.stats.stats.median / 1e9,
        hardware=_hardware(), **_percentiles(benchmark), **_versions(),
    )


def test_copy_bandwidth(benchmark):
    """The memory ceiling: copy a buffer the size of the largest logits tensor."""
    source = torch.randn(64 * 9 * 128256, device=DEVICE)
    target = torch.empty_like(source)
    fn = _synchronised(lambda: target.copy_(source))
    benchmark.pedantic(fn, rounds=20, warmup_rounds=2, iterations=1)
    moved = 2 * source.numel() * source.element_size()  # read + write
    benchmark.extra_info.update(provider="copy", bytes_moved=moved, hardware=_hardware(),
                                gbps=moved / benchmark.stats.stats.median / 1e9, **_versions())
