"""What one forward costs on this machine, through the engine's KV cache: the default target for
1 token (a decode step) and for γ + 1 tokens (a verification), with the skinny GEMM of
verification-sized forwards and without it (``DRAFTWISE_SKINNY_GEMM=0``), next to the same
forward through transformers' own ``DynamicCache`` (what Hugging Face's generation runs) and
compiled (``compile=True``: inductor, the skinny GEMM as a custom op; compiled before the
timing), and the default draft for 1 token.

    python bench/step_costs.py            # median milliseconds over 30 calls, 200-token context
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from draftwise.defaults import load_default
from draftwise.engine import ModelRunner
from draftwise.engine.models import cache_argument
from draftwise.engine import skinny_linear


def step_ms(model, tokens: int, context: int = 200, calls: int = 30, compile: bool = False) -> float:
    runner = ModelRunner(model, batch_size=1, capacity=context + tokens + 1, compile=compile)
    runner.precompile()
    runner.prefill(torch.randint(100, 4000, (1, context)))
    times = []
    for i in range(calls + 3):
        block = torch.randint(100, 4000, (1, tokens))
        start = time.perf_counter()
        runner.extend(block)
        times.append(time.perf_counter() - start)
        runner.rollback(runner.lengths - tokens)
    return 1e3 * statistics.median(times[3:])


def hf_step_ms(model, tokens: int, context: int = 200, calls: int = 30) -> float:
    """The same forward through transformers' ``DynamicCache``, cropped back after each call."""
    cache = DynamicCache()
    times = []
    with torch.inference_mode():
        model(input_ids=torch.randint(100, 4000, (1, context)), **{cache_argument(model): cache}, use_cache=True)
        for i in range(calls + 3):
            block = torch.randint(100, 4000, (1, tokens))
            start = time.perf_counter()
            model(input_ids=block, **{cache_argument(model): cache}, use_cache=True)
            times.append(time.perf_counter() - start)
            cache.crop(-tokens)
    return 1e3 * statistics.median(times[3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gammas", default="1,2,3,4,6,8,12,23")
    args = parser.parse_args()
    torch.manual_seed(0)
    target, _, draft = load_default()
    routed = skinny_linear.for_model(target)
    print(f"skinny GEMM bound measured on this CPU for the target: {routed.max_rows if routed else 0} rows")
    print("target forward            | skinny GEMM | PyTorch GEMM | transformers' DynamicCache | compiled")
    for tokens in [1] + [int(g) + 1 for g in args.gammas.split(",")]:
        skinny = step_ms(target, tokens)
        with skinny_linear.switched_off():
            torch_gemm = step_ms(target, tokens)
        hf = hf_step_ms(target, tokens)
        compiled = step_ms(target, tokens, compile=True)
        label = f"{tokens} token" + ("" if tokens == 1 else f"s (verify gamma {tokens - 1})")
        print(f"{label:<25} | {skinny:8.1f} ms | {torch_gemm:9.1f} ms | {hf:9.1f} ms | {compiled:8.1f} ms")
    print(f"default draft, 1 token: {step_ms(draft, 1):.1f} ms")


if __name__ == "__main__":
    main()
