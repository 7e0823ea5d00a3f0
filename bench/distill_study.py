"""DistillSpec on SmolLM2, small scale: divergence x data against the cross-entropy baseline,
then a lenience sweep. Every draft has the same architecture (the target's first layers, its
embeddings shared and frozen, a reduced vocabulary) and the same number of training steps and
examples; all are evaluated in one run on held-out prompts of another source (HumanEval).

    python bench/distill_study.py                      # train what is missing, evaluate, write results
    python bench/distill_study.py --steps 40 --prompts 6

Writes bench/results/distill_study.{json,md} (and .png with matplotlib). Runs resume from their
checkpoints in --work, so an interrupted study goes on where it stopped.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from draftwise.defaults import default_cache_dir, load_target
from draftwise.distill.evaluate import evaluate_drafts
from draftwise.distill.recipe import DataSpec, distill, prepare_data
from draftwise.distill.trainer import DistillConfig
from draftwise.engine.draft_model import load_draft
from draftwise.prompts import chat_text, heldout_requests

RESULTS = Path(__file__).parent / "results"
DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")
LENIENCE = (1.0, 0.5, 0.2, 0.1, 0.05)


def study_runs() -> dict[str, tuple[str, dict]]:
    """name -> (objective, data mixture). ``ce``: the paper's "standard SD" draft; ``target``:
    the target's own answers (sequence-level distillation)."""
    runs = {}
    for data in ("fixed", "target", "on-policy"):
        if data != "on-policy":
            runs[f"ce / {data}"] = ("ce", {data: 1.0})
        for kind in DIVERGENCES:
            runs[f"{kind} / {data}"] = (kind, {data: 1.0})
    return runs


def _folder(work: Path, name: str) -> Path:
    return work / name.replace(" / ", "-")


def _markdown(results: dict) -> str:
    lines = [f"DistillSpec study: {results['setup']['draft']}; {results['setup']['training']}; "
             f"held-out {results['setup']['heldout']}; {results['setup']['machine']}.", "",
             "| draft | data | held-out acceptance | held-out top-1 | α T=0 | τ T=0 | speedup T=0 | "
             "α T=1 | τ T=1 | speedup T=1 | train s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in results["runs"].items():
        objective, data = name.split(" / ")
        e = {row["mode"]: row for row in results["eval"] if row["draft"] == name}
        g, s = e.get("greedy", {}), e.get("T=1", {})
        lines.append(f"| {objective} | {data} | {run['acceptance']:.3f} | {run['top1']:.3f} | "
                     f"{g.get('alpha', float('nan')):.3f} | {g.get('tau', float('nan')):.2f} | "
                     f"{g.get('speedup', float('nan')):.2f}× | {s.get('alpha', float('nan')):.3f} | "
                     f"{s.get('tau', float('nan')):.2f} | {s.get('speedup', float('nan')):.2f}× | "
                     f"{run['seconds']:.0f} |")
    if results.get("lenience"):
        lines += ["", f"Lenience sweep ({results['lenience_draft']}, T = 1, γ = {results['setup']['gamma']}; "
                  "f(p, ε) = p^ε; quality = the target's mean log-probability of the output tokens):", "",
                  "| ε | α | τ | speedup | output log-likelihood | target alone |", "|---|---|---|---|---|---|"]
        for row in results["lenience"]:
            lines.append(f"| {row['epsilon']} | {row['alpha']:.3f} | {row['tau']:.2f} | {row['speedup']:.2f}× | "
                         f"{row['log_likelihood']:.3f} | {row['target_log_likelihood']:.3f} |")
    return "\n".join(lines) + "\n"


def _plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode, ax in zip(("greedy", "T=1"), axes):
        rows = [r for r in results["eval"] if r["mode"] == mode]
        ax.barh([r["draft"] for r in rows], [r["tau"] for r in rows])
        ax.set_title(f"block efficiency τ, γ = {results['setup']['gamma']}, {mode}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--layers", default="0,1")
    parser.add_argument("--prompts", type=int, default=6, help="held-out prompts to evaluate on")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--only", help="comma-separated run names to train (default: all)")
    parser.add_argument("--work", type=Path, default=default_cache_dir() / "distill-study")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--train-only", action="store_true", help="train the runs, evaluate nothing")
    args = parser.parse_args()
    torch.manual_seed(0)
    target, tokenizer = load_target()
    spec = DataSpec(teacher_top_k=0)  # the records this study was run with
    data = prepare_data(target, tokenizer, spec, cache_dir=default_cache_dir())
    layers = [int(i) for i in args.layers.split(",")]
    runs = study_runs()
    chosen = runs if not args.only else {k: runs[k] for k in args.only.split(",")}
    results = {"setup": {
        "draft": f"SmolLM2-135M-Instruct layers {layers}, shared frozen embeddings, {spec.vocab_size}-token vocabulary",
        "training": f"{args.steps} steps x {args.batch_size} examples, AdamW lr {args.lr}, warm-up + cosine",
        "heldout": f"{args.prompts} HumanEval prompts, {args.max_new_tokens} new tokens, batch 1",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                   f"torch {torch.__version__}",
        "gamma": args.gamma, "data": {"train_prompts": len(data.prompts), "fixed": len(data.fixed),
                                      "target": len(data.target), "heldout": len(data.heldout)},
    }, "runs": {}}
    for name, (objective, mix) in runs.items():
        folder = _folder(args.work, name)
        if name in chosen:
            config = DistillConfig(objective=objective, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                   warmup_steps=max(1, args.steps // 10), eval_every=max(1, args.steps // 4),
                                   checkpoint_every=max(1, args.steps // 4))
            start = time.perf_counter()
            print(f"== {name}")
            distill(target, tokenizer, data, folder, layers=layers, mix=mix, config=config)
            print(f"   {time.perf_counter() - start:.0f} s")
        info = folder / "training.json"
        if info.is_file() and (folder / "draft").is_dir():
            history = json.loads(info.read_text())["history"]
            last = history[-1]
            results["runs"][name] = {"acceptance": last["acceptance"], "top1": last["top1"],
                                     "initial_acceptance": history[0]["acceptance"],
                                     "initial_top1": history[0]["top1"], "seconds": last["seconds"]}
    if args.train_only:
        return
    drafts = {name: load_draft(_folder(args.work, name) / "draft", target) for name in results["runs"]}
    prompts = [chat_text(tokenizer, r) for r in heldout_requests("humaneval", args.prompts, seed=1)]
    results["eval"] = evaluate_drafts(target, tokenizer, drafts, prompts, gammas=(args.gamma,),
                                      max_new_tokens=args.max_new_tokens)
    t1 = [r for r in results["eval"] if r["mode"] == "T=1"]
    if t1:
        best = max(t1, key=lambda r: r["tau"])["draft"]
        results["lenience_draft"], results["lenience"] = best, []
        for epsilon in LENIENCE:
            row = evaluate_drafts(target, tokenizer, {best: drafts[best]}, prompts, gammas=(args.gamma,),
                                  modes=("T=1",), max_new_tokens=args.max_new_tokens,
                                  lenience=None if epsilon == 1 else epsilon, score_quality=True)[0]
            results["lenience"].append({"epsilon": epsilon, **row})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distill_study.json").write_text(json.dumps(results, indent=1))
    (args.out / "distill_study.md").write_text(_markdown(results))
    _plot(results, args.out / "distill_study.png")
    print(_markdown(results))


if __name__ == "__main__":
    main()
