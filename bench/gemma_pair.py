"""Gemma-3-270M and a draft distilled from it by ``draftwise distill`` from a prompt file: the
speed of the target alone, Hugging Face's assisted generation with the same draft, and draftwise
(the draft, prompt lookup, both chosen per step by the online policy, no draft), side by side on
held-out prompts of every kind.

    python bench/gemma_pair.py --write-prompts ~/.cache/draftwise/gemma-run     # train.jsonl, heldout.jsonl
    draftwise distill --target gemma-3-270m --prompts ~/.cache/draftwise/gemma-run/train.jsonl \\
      --heldout-prompts ~/.cache/draftwise/gemma-run/heldout.jsonl --output ~/.cache/draftwise/gemma-run/fkl
    python bench/gemma_pair.py --draft ~/.cache/draftwise/gemma-run/fkl/draft
    python bench/gemma_pair.py --draft default --measure tau --out bench/results/gemma_pair_tau   # the shipped draft

The training prompts are requests about Wikipedia articles and the Python documentation
(:func:`~draftwise.distill.prompts.prose_training_requests`), the held-out ones about other Wikipedia
passages; the evaluation prompts (:func:`~draftwise.distill.prompts.evaluation_prompts`: conversation,
translation, summary, question, math, passage, code) read texts neither file does. Gemma-3-270M is a
base model (no chat template): a request is followed by a blank line. Each prompt runs through
every arm in turn (batch 1, greedy); speedups are summed tokens over summed seconds, against the
target alone in the same run. Every draftwise arm must emit the target's own tokens (checked).
``--measure tau``: instead, the draft's acceptance α and block efficiency τ (tokens per target
call) at a fixed γ (chains, every drafted token verified), untimed. Writes
bench/results/gemma_pair.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import transformers

import draftwise
from draftwise.defaults import load_target
from draftwise.engine import ModelDrafter, PromptLookupDrafter
from draftwise.distill.prompts import evaluation_prompts, prose_training_requests, unseen_prose_requests
from draftwise.prompts import chat_text

RESULTS = Path(__file__).parent / "results"
TARGET = "gemma-3-270m"


def write_prompts(folder: Path, train: int, heldout: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, requests in (("train", prose_training_requests(train)), ("heldout", unseen_prose_requests(heldout))):
        with open(folder / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"prompt": r}) + "\n" for r in requests)
        print(f"{folder / name}.jsonl: {len(requests)} prompts")


def arms(target, draft, max_new_tokens: int, pad: int) -> dict:
    common = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return {
        "target alone": lambda x: target.generate(**x, **common),
        "HF assisted, the draft": lambda x: target.generate(**x, assistant_model=draft, **common),
        "draftwise, the draft": lambda x: draftwise.generate(target, **x, assistant_model=draft, **common),
        "draftwise, prompt lookup": lambda x: draftwise.generate(target, **x, prompt_lookup_num_tokens=3, **common),
        "draftwise, the draft + prompt lookup": lambda x: draftwise.generate(
            target, **x, drafts=[ModelDrafter(draft, name="draft"), PromptLookupDrafter(name="lookup")], **common),
        "draftwise, no draft": lambda x: draftwise.generate(target, **x, **common),
    }


def measure(target, tokenizer, draft, prompts: dict, max_new_tokens: int) -> dict:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    runs = arms(target, draft, max_new_tokens, pad)
    warm = tokenizer("Hello", return_tensors="pt")
    for run in runs.values():
        run(warm)
    results = {}
    for kind, texts in prompts.items():
        totals = {name: [0, 0.0] for name in runs}
        for text in texts:
            inputs = tokenizer(chat_text(tokenizer, text), return_tensors="pt")
            width, reference = inputs["input_ids"].shape[1], None
            for name, run in runs.items():
                start = time.perf_counter()
                out = run(inputs)
                seconds = time.perf_counter() - start
                new = out[0, width:].tolist()
                if reference is None:
                    reference = new
                elif name.startswith("draftwise") and new != reference:
                    raise SystemExit(f"{kind}: '{name}' emitted other tokens than the target alone")
                totals[name][0] += len(new)
                totals[name][1] += seconds
        base = totals["target alone"][0] / totals["target alone"][1]
        results[kind] = {name: dict(tokens=t, seconds=s, tokens_per_s=t / s, speedup=t / s / base)
                         for name, (t, s) in totals.items()}
        print(kind, {n: f"{r['speedup']:.2f}x" for n, r in results[kind].items()}, flush=True)
    return results


def block_efficiency(target, tokenizer, draft, prompts: dict, max_new_tokens: int, gamma: int) -> dict:
    """Per kind: α and τ of the draft at a fixed γ (chains, no confidence stop), greedy."""
    from draftwise.engine.stats import SpecStats

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, num_assistant_tokens=gamma,
                   num_assistant_tokens_schedule="constant", tree_budget=0, assistant_confidence_threshold=0.0,
                   return_dict_in_generate=True)
    results, every = {}, []
    for kind, texts in prompts.items():
        stats = [draftwise.generate(target, **tokenizer(chat_text(tokenizer, t), return_tensors="pt"),
                                    assistant_model=draft, **options).spec_stats for t in texts]
        every += stats
        pooled = SpecStats.total(stats)
        results[kind] = dict(alpha=pooled.alpha, tau=pooled.tau)
        print(kind, f"alpha {pooled.alpha:.3f} tau {pooled.tau:.2f}", flush=True)
    pooled = SpecStats.total(every)
    results["all kinds"] = dict(alpha=pooled.alpha, tau=pooled.tau)
    return results


def table(results: dict) -> str:
    names = list(next(iter(results.values())))
    lines = ["| kind | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for kind, row in results.items():
        lines.append(f"| {kind} | " + " | ".join(f"{row[n]['speedup']:.2f}×" for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-prompts", type=Path, help="write train.jsonl and heldout.jsonl here and stop")
    parser.add_argument("--train", type=int, default=600, help="training prompts")
    parser.add_argument("--heldout", type=int, default=32, help="held-out prompts")
    parser.add_argument("--draft", help="the distilled draft folder, or 'default' (the draft shipped for Gemma-3-270M)")
    parser.add_argument("--measure", choices=("speed", "tau"), default="speed")
    parser.add_argument("--gamma", type=int, default=4, help="with --measure tau")
    parser.add_argument("--per-kind", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=RESULTS / "gemma_pair")
    args = parser.parse_args()
    if args.write_prompts:
        return write_prompts(args.write_prompts.expanduser(), args.train, args.heldout)
    if args.draft is None:
        parser.error("--draft: the draft folder to measure (or --write-prompts DIR)")
    prompts = evaluation_prompts(args.per_kind)
    torch.manual_seed(0)
    target, tokenizer = load_target(name=TARGET)
    if args.draft == "default":
        from draftwise.defaults import default_draft

        draft = default_draft(target, TARGET)
    else:
        draft = draftwise.load_draft(Path(args.draft).expanduser(), target)
    if args.measure == "tau":
        return write_tau(args, prompts, block_efficiency(target, tokenizer, draft, prompts, args.max_new_tokens,
                                                         args.gamma))
    results = measure(target, tokenizer, draft, prompts, args.max_new_tokens)
    every = {name: [sum(r[name]["tokens"] for r in results.values()), sum(r[name]["seconds"] for r in results.values())]
             for name in next(iter(results.values()))}
    base = every["target alone"][0] / every["target alone"][1]
    results["all kinds"] = {n: dict(tokens=t, seconds=s, tokens_per_s=t / s, speedup=t / s / base)
                            for n, (t, s) in every.items()}
    text = (f"{TARGET} on a {platform.machine()} CPU ({torch.get_num_threads()} threads), batch 1, greedy, "
            f"{args.max_new_tokens} new tokens, {args.per_kind} prompts per kind, no chat template; speedup over "
            f"the target alone (Hugging Face generate) in the same run. Target alone: {base:.1f} tokens/s.\n\n"
            + table(results) + "\n")
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"versions": {"torch": torch.__version__, "transformers": transformers.__version__},
         "draft": str(args.draft), "prompts": prompts, "results": results}, indent=1))
    args.out.with_suffix(".md").write_text(text)


def write_tau(args, prompts: dict, results: dict) -> None:
    text = (f"Command: `python bench/gemma_pair.py --draft {args.draft} --measure tau --gamma {args.gamma} "
            f"--per-kind {args.per_kind}`\n\n{TARGET} and its draft ({args.draft}), batch 1, greedy, "
            f"{args.max_new_tokens} new tokens, {args.per_kind} prompts per kind, no chat template; chains of "
            f"γ = {args.gamma}, every drafted token verified. α: accepted over drafted; τ: tokens per target call.\n\n"
            "| kind | α | τ |\n|---|---|---|\n"
            + "".join(f"| {kind} | {r['alpha']:.3f} | {r['tau']:.2f} |\n" for kind, r in results.items()))
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"versions": {"torch": torch.__version__, "transformers": transformers.__version__},
         "draft": str(args.draft), "gamma": args.gamma, "prompts": prompts, "results": results}, indent=1))
    args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
