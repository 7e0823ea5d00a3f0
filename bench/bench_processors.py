"""The cost of Hugging Face logits processors inside speculative decoding, per verification step.

Without processors the verification kernel applies temperature / top-k / top-p itself; with a
processor (a repetition penalty, n-gram blocking …) every verified position and every draft token
is processed on the host, row by row. This bench runs the default pair (batch 1 and 4, greedy,
fixed gamma 4, 48 new tokens) with no processor, a repetition penalty, and a repetition penalty
with n-gram blocking, arms interleaved in one process, and reports the median time per target
call, the time spent processing, and tokens per second.

    .venv/bin/python bench/bench_processors.py --out bench/results/processors_cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import draftwise
from draftwise.defaults import demo_prompts, load_default
from draftwise.engine.processing import ScoreProcessing

ARMS = {
    "no processor": {},
    "repetition_penalty=1.1": {"repetition_penalty": 1.1},
    "repetition_penalty=1.1, no_repeat_ngram_size=3": {"repetition_penalty": 1.1, "no_repeat_ngram_size": 3},
}


class ProcessingClock:
    """Seconds spent inside ScoreProcessing (target positions and draft tokens alike)."""

    def __init__(self):
        self.seconds = 0.0
        self.call = ScoreProcessing.__call__
        clock = self

        def timed(processing, *args, **kwargs):
            start = time.perf_counter()
            try:
                return clock.call(processing, *args, **kwargs)
            finally:
                clock.seconds += time.perf_counter() - start

        ScoreProcessing.__call__ = timed


def run_arm(target, draft, inputs, settings: dict, clock: ProcessingClock) -> dict:
    clock.seconds = 0.0
    out = draftwise.generate(target, **inputs, assistant_model=draft, max_new_tokens=48, do_sample=False,
                             num_assistant_tokens=4, return_dict_in_generate=True, **settings)
    stats = out.spec_stats
    return dict(ms_per_step=1e3 * stats.time_total / max(1, stats.target_calls),
                processing_ms_per_step=1e3 * clock.seconds / max(1, stats.target_calls),
                tokens_per_second=stats.tokens_per_second, tau=stats.tau)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/processors_cpu")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    target, tokenizer, draft = load_default()
    tokenizer.padding_side = "left"
    prompts = demo_prompts(tokenizer)[:4]
    clock = ProcessingClock()
    results = {}
    for batch in (1, 4):
        inputs = tokenizer(prompts[:batch], return_tensors="pt", padding=True)
        run_arm(target, draft, inputs, {}, clock)  # warm-up
        samples = {name: [] for name in ARMS}
        for _ in range(args.repeats):
            for name, settings in ARMS.items():  # interleaved: drift hits every arm alike
                samples[name].append(run_arm(target, draft, inputs, settings, clock))
        results[f"batch {batch}"] = {
            name: {key: statistics.median(s[key] for s in runs) for key in runs[0]} for name, runs in samples.items()
        }
    report(results, args)


def report(results: dict, args) -> None:
    lines = ["| batch | settings | ms per step | processing ms per step | tokens/s | τ |", "|---|---|---|---|---|---|"]
    for batch, arms in results.items():
        base = arms["no processor"]["ms_per_step"]
        for name, r in arms.items():
            lines.append(f"| {batch} | {name} | {r['ms_per_step']:.1f} ({r['ms_per_step'] / base:.2f}×) | "
                         f"{r['processing_ms_per_step']:.2f} | {r['tokens_per_second']:.1f} | {r['tau']:.2f} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), repeats=args.repeats,
                command="python bench/bench_processors.py " + f"--repeats {args.repeats} --out {args.out}")
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    out.with_suffix(".md").write_text(f"# Logits processors: cost per step (median of {args.repeats})\n\n{table}\n")


if __name__ == "__main__":
    main()
