"""Block efficiency of drafts on every kind of prompt: the shipped draft (distilled on requests
about code) against drafts distilled on other prompt sources, on the evaluation prompts of
:mod:`draftwise.distill.prompts` (conversation, translation, summary, question, math, passage,
code; texts no training source reads).

    python bench/pool_drafts.py --draft prose=~/.cache/draftwise/pool/prose/draft

The prose draft is the shipped draft's recipe on prose prompts (Wikipedia articles and Python
documentation), at a size that trains in about 40 minutes on a shared 2-core CPU:

    draftwise distill --output ~/.cache/draftwise/pool/prose --teacher-top-k 0 --divergence fkl --data target \\
      --prompt-source prose --train-prompts 1200 --steps 1000 --lr 1e-3 --eval-every 200 --checkpoint-every 200

Each prompt (chat template applied) is generated alone (batch 1), greedy, γ 4 (constant), 48 new
tokens, by ``draftwise.generate``; τ (tokens emitted per target call) and α (accepted / drafted)
are summed over a kind's prompts. Greedy τ does not depend on the machine's load, so no timing is
reported. Every draft's output must equal the others' (greedy speculative decoding emits the
target's own tokens); the script fails when they differ. Writes bench/results/pool_drafts.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import transformers

import draftwise
from draftwise.defaults import DEFAULT_DRAFT, load_default
from draftwise.distill.prompts import KINDS, evaluation_prompts
from draftwise.prompts import chat_text

RESULTS = Path(__file__).parent / "results"


def measure(target, tokenizer, draft, prompts: list[str], gamma: int, max_new_tokens: int) -> dict:
    """Summed speculative-decoding counters of ``draft`` over ``prompts``, and each output's ids."""
    totals = dict(row_steps=0, emitted=0, drafted=0, accepted=0)
    taus, outputs = [], []
    for prompt in prompts:
        inputs = tokenizer(chat_text(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)
        out = draftwise.generate(target, **inputs, assistant_model=draft, num_assistant_tokens=gamma,
                                 num_assistant_tokens_schedule="constant", max_new_tokens=max_new_tokens,
                                 do_sample=False, return_dict_in_generate=True)
        stats = out.spec_stats
        for name in totals:
            totals[name] += getattr(stats, name)
        taus.append(stats.tau)
        outputs.append(out.sequences[0, inputs["input_ids"].shape[1]:].tolist())
    return dict(tau=totals["emitted"] / totals["row_steps"], alpha=totals["accepted"] / max(1, totals["drafted"]),
                tau_per_prompt=taus, **totals), outputs


def table(results: dict, names: list[str]) -> str:
    head = "| kind | " + " | ".join(f"τ {n}" for n in names) + " | " + " | ".join(f"α {n}" for n in names) + " |"
    lines = [head, "|---" * (1 + 2 * len(names)) + "|"]
    for kind, by_draft in results.items():
        taus = " | ".join(f"{by_draft[n]['tau']:.2f}" for n in names)
        alphas = " | ".join(f"{by_draft[n]['alpha']:.3f}" for n in names)
        lines.append(f"| {kind} | {taus} | {alphas} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", action="append", default=[], metavar="NAME=FOLDER",
                        help="a distilled draft folder to measure beside the shipped one (repeatable)")
    parser.add_argument("--per-kind", type=int, default=4, help="prompts of each kind")
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0, help="of the evaluation prompts")
    parser.add_argument("--out", type=Path, default=RESULTS / "pool_drafts")
    args = parser.parse_args()
    prompts = evaluation_prompts(args.per_kind, seed=args.seed)  # before the models load
    torch.manual_seed(0)
    target, tokenizer, shipped = load_default()
    drafts, folders = {"shipped (code)": shipped}, {"shipped (code)": str(DEFAULT_DRAFT.folder)}
    for entry in args.draft:
        name, sep, folder = entry.partition("=")
        if not sep or not name or not folder:
            parser.error(f"--draft: expected NAME=FOLDER, got {entry!r}")
        drafts[name] = draftwise.load_draft(Path(folder).expanduser(), target)
        folders[name] = str(Path(folder).expanduser())
    names = list(drafts)
    results, totals = {}, {name: dict(row_steps=0, emitted=0, drafted=0, accepted=0) for name in names}
    for kind in KINDS:
        results[kind], reference = {}, None
        for name, draft in drafts.items():
            row, outputs = measure(target, tokenizer, draft, prompts[kind], args.gamma, args.max_new_tokens)
            if reference is not None and outputs != reference:
                raise SystemExit(f"{kind}: the output with the draft '{name}' differs from '{names[0]}''s; "
                                 f"greedy speculative decoding must emit the target's own tokens")
            reference = outputs
            results[kind][name] = row
            for counter in totals[name]:
                totals[name][counter] += row[counter]
            print(f"{kind:13} {name:20} tau {row['tau']:.2f}  alpha {row['alpha']:.3f}", flush=True)
    results["all kinds"] = {name: dict(tau=t["emitted"] / t["row_steps"], alpha=t["accepted"] / max(1, t["drafted"]), **t)
                            for name, t in totals.items()}
    report = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "drafts": folders, "prompts_per_kind": {k: len(v) for k, v in prompts.items()}, "gamma": args.gamma,
              "max_new_tokens": args.max_new_tokens, "greedy": True, "seed": args.seed, "prompts": prompts,
              "results": results}
    text = "\n".join([
        f"Drafts by kind of prompt: greedy, γ {args.gamma} (constant), {args.max_new_tokens} new tokens, batch 1, "
        f"{args.per_kind} evaluation prompts per kind (draftwise.distill.prompts, seed {args.seed}), chat template "
        f"applied; τ = tokens per target call, α = accepted / drafted, summed over a kind's prompts. Every draft's "
        f"output equals the others'.", "", table(results, names), "",
        "Drafts: " + "; ".join(f"{n}: `{f}`" for n, f in folders.items()), ""])
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
