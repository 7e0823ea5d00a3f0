"""What a draft forward of one token costs by batch size: the pool's draft models, a 200-token
context, median of 60 forwards. ``python bench/draft_rows.py``"""

from __future__ import annotations

import time

import torch

from draftwise.defaults import load_target, pool_drafters
from draftwise.engine.models import ModelRunner


def forward_ms(model, batch: int, context: int = 200, repeats: int = 60) -> float:
    runner = ModelRunner(model, batch_size=batch, capacity=context + 8)
    runner.reset()
    prompt = torch.randint(100, 1000, (batch, context))
    runner.prefill(prompt, torch.ones_like(prompt), last_only=True)
    token = torch.randint(100, 1000, (batch, 1))
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            runner.extend(token)
            times.append(time.perf_counter() - start)
            runner.rollback(runner.lengths - 1)
    return 1e3 * sorted(times)[len(times) // 2]


def main() -> None:
    target, _ = load_target()
    for drafter in pool_drafters(target):
        if drafter.draft_model is not None:
            costs = {batch: round(forward_ms(drafter.draft_model, batch), 2) for batch in (1, 2, 7)}
            print(f"{drafter.name}: ms per one-token forward by batch size {costs}")


if __name__ == "__main__":
    main()
