"""Token trees against chains on the default pair: τ and speed by kind of text.

On held-out prompts of seven kinds (`draftwise.distill.prompts.evaluation_prompts`), with and
without the chat template, batch 1, 48 new tokens, greedy (every output checked against the
target's) or sampled at T = 1 (`--sample`; tokens per second, since outputs differ). Arms, run
prompt by prompt in one process:

- the target alone (Hugging Face's `model.generate`), the baseline of every speedup;
- draftwise without a draft (the same forwards as every arm below, no drafting);
- the default draft as a chain: each fixed γ, and the adaptive schedule;
- the default draft's dynamic tree (`tree_budget=N`, EAGLE-2's rule) at several budgets;
- the trie of the default draft's chain and prompt lookup's matches (`drafts=[draft, lookup]`);
- `tree_budget="auto"` (the default): chain or tree steps, whichever measures faster.

`--arms` keeps the arms whose names contain one of the given words (the target alone always runs).

    .venv/bin/python bench/bench_trees.py --per-kind 1 --out bench/results/trees_cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
from pathlib import Path

import torch
from tqdm.auto import tqdm

import draftwise
from draftwise.defaults import load_target, pool_drafters
from draftwise.distill.selection import evaluation_set
from draftwise.engine import PromptLookupDrafter
from draftwise.measure import new_tokens, sequences_of, timed, warm_up

NEW_TOKENS = 48
CHAIN_GAMMAS = (2, 3, 4, 6)
BUDGETS = (4, 8, 16, 32)


def arms(target, draft, tokenizer, sample: bool) -> dict:
    common = dict(max_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.pad_token_id)
    common |= dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    ours = dict(common, return_dict_in_generate=True)
    runs = {"target alone": lambda x: target.generate(**x, **common),
            "no draft": lambda x: draftwise.generate(target, **x, **ours)}
    for gamma in CHAIN_GAMMAS:
        runs[f"chain γ={gamma}"] = (lambda g: lambda x: draftwise.generate(
            target, **x, assistant_model=draft, num_assistant_tokens=g, assistant_confidence_threshold=0.0,
            **ours))(gamma)
    runs["chain, adaptive"] = lambda x: draftwise.generate(target, **x, assistant_model=draft, tree_budget=0, **ours)
    for budget in BUDGETS:
        runs[f"tree, {budget} nodes"] = (lambda n: lambda x: draftwise.generate(
            target, **x, assistant_model=draft, tree_budget=n, **ours))(budget)
    runs["trie: draft + lookup, 16 nodes"] = lambda x: draftwise.generate(
        target, **x, drafts=[draft, PromptLookupDrafter()], tree_budget=16, num_assistant_tokens=4,
        assistant_confidence_threshold=0.0, **ours)
    runs["auto: chain or tree (default)"] = lambda x: draftwise.generate(target, **x, assistant_model=draft, **ours)
    return runs


def measure(runs: dict, tokenizer, prompts: list[dict], sample: bool) -> list[dict]:
    warm_up(runs, tokenizer(prompts[0]["text"], return_tensors="pt", add_special_tokens=False))
    records = []
    for prompt in tqdm(prompts, desc="prompts", unit="prompt"):
        inputs = tokenizer(prompt["text"], return_tensors="pt", add_special_tokens=False)
        width = inputs["input_ids"].shape[1]
        record = dict(kind=prompt["kind"], template=prompt["template"], seconds={}, tokens={}, tau={})
        reference = None
        for name, run in runs.items():
            with torch.inference_mode():
                record["seconds"][name], out = timed(lambda: run(inputs))
            sequences = sequences_of(out)
            record["tokens"][name] = new_tokens(out, width, tokenizer.pad_token_id)
            if not isinstance(out, torch.Tensor):
                record["tau"][name] = out.spec_stats.tau
            reference = sequences if reference is None else reference
            if not sample and not torch.equal(sequences, reference):
                raise AssertionError(f"{name} differs from the target's output on {prompt['kind']}")
        records.append(record)
    return records


def summary(records: list[dict], names: list[str]) -> dict:
    """Per kind and overall: speedup (tokens per second over summed times, against the target
    alone) and mean τ of each arm."""
    groups = {}
    for r in records:
        for key in (r["kind"], "all kinds"):
            groups.setdefault(key, []).append(r)
    out = {}
    for key, group in groups.items():
        def rate(name):
            return sum(r["tokens"][name] for r in group) / sum(r["seconds"][name] for r in group)
        out[key] = {name: dict(speedup=rate(name) / rate("target alone"),
                               tau=sum(r["tau"][name] for r in group) / len(group) if name in group[0]["tau"] else None)
                    for name in names}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-kind", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample", action="store_true", help="sample at T = 1 instead of greedy decoding")
    parser.add_argument("--arms", nargs="*", default=None, help="words: keep only the arms whose names hold one")
    parser.add_argument("--out", default="bench/results/trees_cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    target, tokenizer = load_target()
    draft = pool_drafters(target)[0]  # the default draft
    prompts = evaluation_set(tokenizer, args.per_kind, args.seed)
    runs = arms(target, draft, tokenizer, args.sample)
    if args.arms:
        runs = {name: run for name, run in runs.items()
                if name == "target alone" or any(word in name for word in args.arms)}
    records = measure(runs, tokenizer, prompts, args.sample)
    names = [n for n in runs if n != "target alone"]
    table = summary(records, names)
    command = (f"python bench/bench_trees.py --per-kind {args.per_kind} --seed {args.seed}"
               + (" --sample" if args.sample else "") + (f" --arms {shlex.join(args.arms)}" if args.arms else "")
               + f" --out {args.out}")
    mode = "sampled at T = 1" if args.sample else "greedy"
    lines = [f"# Token trees against chains (default pair, batch 1, {mode}, {NEW_TOKENS} new tokens)", "",
             f"Command: `{command}` on {platform.processor() or platform.machine()}, torch {torch.__version__}.", "",
             f"{len(records)} held-out prompts (7 kinds, with and without the chat template). Each cell: speedup "
             "over the target alone (tokens per second over summed times) / mean τ (tokens per target call).", "",
             "| kind | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for kind, cells in table.items():
        lines.append(f"| {kind} | " + " | ".join(f"{c['speedup']:.2f}× / {c['tau']:.2f}" for c in cells.values()) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(command=command, records=records, summary=table), indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
