"""Speculative decoding on general text, by kind: every arm against the target alone.

The default pair (SmolLM2-135M-Instruct and its shipped draft, distilled on code) on held-out
prompts of seven kinds (`draftwise.distill.prompts.evaluation_prompts`: conversation,
translation, summaries, questions, math, answers from a passage, code), with and without the
chat template; batch 1, greedy, 48 new tokens. Arms, interleaved prompt by prompt in one process:

- target alone (plain decoding through `draftwise.generate` with no draft);
- the draft at a fixed γ 4; the draft with the adaptive γ that always drafts (the schedule
  before the no-draft arm); the draft with the default policy (adaptive γ, no draft where
  drafting loses: what `generate(target, **inputs, assistant_model=draft)` does);
- prompt lookup (default policy); the draft and prompt lookup as a pool (`drafts=[draft,
  lookup]`, default policy, per row).

Every arm's output is checked against the target's own; speedups are ratios of summed times to
the target's on the same prompts.

    .venv/bin/python bench/bench_selection.py --per-kind 2 --out bench/results/selection_cpu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import draftwise
from draftwise.defaults import load_default
from draftwise.distill.prompts import KINDS, evaluation_prompts
from draftwise.engine import AdaptivePolicy, PromptLookupDrafter
from draftwise.prompts import chat_text

NEW_TOKENS = 48


def arms(target, draft) -> dict:
    lookup = PromptLookupDrafter(max_ngram=3)
    common = dict(max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)

    def run(**kwargs):
        return lambda inputs: draftwise.generate(target, **inputs, **common, **kwargs)

    return {
        "target alone": run(),
        "draft, γ 4": run(assistant_model=draft, num_assistant_tokens=4),
        "draft, adaptive γ, always drafting": run(assistant_model=draft, selector=AdaptivePolicy(no_draft=False)),
        "draft (default policy)": run(assistant_model=draft),
        "prompt lookup (default policy)": run(assistant_model=lookup),
        "draft + lookup pool (default policy)": run(drafts=[draft, lookup]),
    }


def measure(target, tokenizer, draft, per_kind: int, seed: int) -> dict:
    runs = arms(target, draft)
    prompts = evaluation_prompts(per_kind, seed=seed)
    cases = [(kind, template, text) for kind in KINDS for template in (True, False) for text in prompts[kind]]
    warm = tokenizer(chat_text(tokenizer, prompts["question"][0]), return_tensors="pt")
    for run in runs.values():
        run(warm)
    results = {kind: {t: {name: dict(seconds=0.0, drafted=0, accepted=0, emitted=0, steps=0) for name in runs}
                      for t in ("chat", "raw")} for kind in KINDS}
    with tqdm(total=len(cases) * len(runs), desc="timing", unit="run") as bar:
        for kind, template, text in cases:
            prompt = chat_text(tokenizer, text) if template else text + "\n\n"
            inputs = tokenizer(prompt, return_tensors="pt")
            reference = None
            for name, run in runs.items():
                bar.set_postfix_str(f"{kind}: {name}")
                start = time.perf_counter()
                out = run(inputs)
                seconds = time.perf_counter() - start
                bar.update()
                if reference is None:
                    reference = out.sequences
                elif not torch.equal(out.sequences, reference):
                    raise AssertionError(f"{name} differs from the target's own greedy output on a {kind} prompt")
                cell = results[kind]["chat" if template else "raw"][name]
                stats = out.spec_stats
                cell["seconds"] += seconds
                cell["drafted"] += stats.drafted
                cell["accepted"] += stats.accepted
                cell["emitted"] += stats.emitted
                cell["steps"] += stats.row_steps
    return results


def speedups(results: dict) -> dict:
    """``{kind: {template: {arm: speedup over the target alone}}}``, plus every kind together."""
    out = {}
    for kind, by_template in results.items():
        out[kind] = {t: {name: cells["target alone"]["seconds"] / c["seconds"] for name, c in cells.items()}
                     for t, cells in by_template.items()}
    names = next(iter(next(iter(results.values())).values())).keys()
    for t in ("chat", "raw"):
        total = {name: sum(results[k][t][name]["seconds"] for k in results) for name in names}
        out.setdefault("all kinds", {})[t] = {name: total["target alone"] / s for name, s in total.items()}
    return out


def table(ratios: dict, results: dict) -> str:
    names = list(next(iter(next(iter(ratios.values())).values())).keys())[1:]
    lines = ["| kind | template | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for kind, by_template in ratios.items():
        for t, row in by_template.items():
            cells = []
            for name in names:
                cell = f"{row[name]:.2f}×"
                if kind in results:
                    c = results[kind][t][name]
                    if c["drafted"]:
                        cell += f" (α {c['accepted'] / c['drafted']:.2f})"
                cells.append(cell)
            lines.append(f"| {kind} | {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-kind", type=int, default=2, help="prompts per kind (each with and without the template)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="bench/results/selection_cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    target, tokenizer, draft = load_default()
    results = measure(target, tokenizer, draft, args.per_kind, args.seed)
    ratios = speedups(results)
    text = table(ratios, results)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), per_kind=args.per_kind, seed=args.seed,
                new_tokens=NEW_TOKENS, command=f"python bench/bench_selection.py --per-kind {args.per_kind} "
                                                f"--seed {args.seed} --out {args.out}")
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, results=results, speedups=ratios), indent=1))
    out.with_suffix(".md").write_text(
        "# Speedup over the target alone, by kind of text (batch 1, greedy, 48 new tokens)\n\n"
        f"Command: `{meta['command']}`\n\n{text}\n")


if __name__ == "__main__":
    main()
