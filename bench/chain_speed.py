"""Chain decoding speed of the draftwise on ``sys.path``, to compare two versions in one run.

The default pair, 6 held-out chat prompts, greedy, 48 new tokens; per arm the summed best-of-2
time, printed as one JSON line. Interleave two versions, e.g. the one before a change:

    git worktree add /tmp/before REV && cp draftwise/_C*.so /tmp/before/draftwise/
    for i in 1 2 3; do PYTHONPATH=/tmp/before python bench/chain_speed.py; python bench/chain_speed.py; done
"""

from __future__ import annotations

import json
import time

import torch

import draftwise
from draftwise.defaults import load_target, pool_drafters
from draftwise.distill.selection import evaluation_set


def main() -> None:
    target, tokenizer = load_target()
    pool = pool_drafters(target)
    draft, lookup = pool[0], pool[3]
    prompts = [p for p in evaluation_set(tokenizer, 1, 0) if p["template"] == "chat"][:6]
    arms = {
        "draft γ=4": dict(assistant_model=draft, num_assistant_tokens=4, assistant_confidence_threshold=0.0),
        "lookup γ=4": dict(assistant_model=lookup, num_assistant_tokens=4),
        "draft, adaptive": dict(assistant_model=draft),
    }
    times = {}
    for name, arm in arms.items():
        total = 0.0
        for prompt in prompts:
            inputs = tokenizer([prompt["text"]], return_tensors="pt", add_special_tokens=False)
            best = float("inf")
            for _ in range(2):
                start = time.perf_counter()
                with torch.inference_mode():
                    draftwise.generate(target, **inputs, max_new_tokens=48, do_sample=False, **arm)
                best = min(best, time.perf_counter() - start)
            total += best
        times[name] = total
    print(json.dumps(dict(source=draftwise.__file__, seconds=times)))


if __name__ == "__main__":
    main()
