"""The teacher's records, dense against top-k: the cache's size and the trained draft's α and τ.

For each k (0 = dense over the draft's vocabulary), the same training prompts are answered by the
target, a draft is distilled on those answers for the same steps, and every draft is measured through
the engine in one run on held-out prompts of another source (HumanEval), greedy, batch 1.

    python bench/teacher_top_k.py --ks 0,64,16 --train-prompts 96 --steps 150

Writes bench/results/teacher_top_k.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from draftwise.distill.evaluate import evaluate_drafts
from draftwise.distill.recipe import DataSpec, distill, prepare_data
from draftwise.distill.trainer import DistillConfig
from draftwise.defaults import load_target
from draftwise.engine.draft_model import load_draft
from draftwise.prompts import chat_text, heldout_requests

RESULTS = Path(__file__).parent / "results"


def _record_bytes(data) -> int:
    records = [*data.target_teacher, *data.heldout_teacher]
    return sum(r.nbytes for r in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", default="0,64,16", help="teacher top-k values (0: dense)")
    parser.add_argument("--train-prompts", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-prompts", type=int, default=8)
    parser.add_argument("--work", default=None, help="folder for the drafts and the data (default: a temporary one)")
    args = parser.parse_args()
    torch.manual_seed(0)
    target, tokenizer = load_target()
    work = Path(args.work or tempfile.mkdtemp(prefix="teacher-top-k-"))
    drafts, rows = {}, []
    for k in (int(v) for v in args.ks.split(",")):
        spec = DataSpec(train_prompts=args.train_prompts, max_new_tokens=args.max_new_tokens, heldout_prompts=16,
                        teacher_top_k=k, reads_fixed_corpus=False)
        start = time.perf_counter()
        data = prepare_data(target, tokenizer, spec, cache_dir=work)
        prepared = time.perf_counter() - start
        config = DistillConfig(steps=args.steps, eval_every=args.steps, checkpoint_every=args.steps)
        start = time.perf_counter()
        trainer = distill(target, tokenizer, data, work / f"k{k}", config=config)
        trained = time.perf_counter() - start
        name = "dense" if k == 0 else f"top-{k}"
        drafts[name] = load_draft(work / f"k{k}" / "draft", target)
        rows.append({"teacher": name, "record_MiB": _record_bytes(data) / 2**20,
                     "cache_file_MiB": (work / f"distill-data-{spec.key()}.pt").stat().st_size / 2**20,
                     "prepare_s": prepared, "train_s": trained, "heldout_top1": trainer.history[-1].get("top1")})
    prompts = [chat_text(tokenizer, r) for r in heldout_requests("humaneval", args.eval_prompts, seed=1)]
    measured = evaluate_drafts(target, tokenizer, drafts, prompts, modes=("greedy",), max_new_tokens=48)
    for row in rows:
        m = next(r for r in measured if r["draft"] == row["teacher"])
        row.update(alpha=m["alpha"], tau=m["tau"], speedup=m["speedup"])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "teacher_top_k.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    lines = [f"Command: `python bench/teacher_top_k.py --ks {args.ks} --train-prompts {args.train_prompts} "
             f"--steps {args.steps} --eval-prompts {args.eval_prompts}` (held-out HumanEval prompts, greedy, batch 1, "
             f"48 new tokens)", "",
             "| teacher records | records MiB | cache file MiB | prepare s | train s | held-out top-1 | α | τ "
             "| speedup |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['teacher']} | {r['record_MiB']:.1f} | {r['cache_file_MiB']:.1f} | {r['prepare_s']:.0f} | "
                     f"{r['train_s']:.0f} | {r['heldout_top1']:.3f} | {r['alpha']:.3f} | {r['tau']:.2f} | "
                     f"{r['speedup']:.2f}× |")
    (RESULTS / "teacher_top_k.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
