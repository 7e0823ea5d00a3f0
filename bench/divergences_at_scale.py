"""The divergences at the default draft's scale: one draft per objective, each trained with the
previous default draft's recipe (the target's answers to 2580 prompts, 1800 steps x 8, lr 1e-3), then
evaluated in one run on held-out prompts, greedy and T = 1.

    for d in ce fkl rkl jsd tvd; do
      draftwise distill --output runs/$d --teacher-top-k 0 --divergence $d --data target \\
        --train-prompts 3467 --methods \\
        --steps 1800 --lr 1e-3 --eval-every 200 --checkpoint-every 200
    done
    python bench/divergences_at_scale.py --run ce=runs/ce --run fkl=runs/fkl --run rkl=runs/rkl \\
        --run jsd=runs/jsd --run tvd=runs/tvd

The paper's standard-SD baseline (cross-entropy on the stdlib code and documentation, never
the target's answers; 2900 steps of these shorter pieces take the 1800 steps' training time)
beside cross-entropy and forward KL on the target's answers, written to another file:

    draftwise distill --output runs/standard-sd --teacher-top-k 0 --divergence ce --data fixed --corpus-texts 12000 \
        --corpus-docs 0.75 --train-prompts 3467 --methods --steps 2900 --lr 1e-3 --eval-every 200
    python bench/divergences_at_scale.py --out bench/results/standard_sd_baseline \
        --run "standard SD: ce on stdlib text=runs/standard-sd" --run "ce on the target's answers=runs/ce" \
        --run "fkl on the target's answers (default draft)=runs/fkl"

The default draft (the same recipe with ``--completions``: also requests to write a documented
function's body) against the baselines on its draft vocabulary:

    draftwise distill --output runs/fkl-c --teacher-top-k 0 --divergence fkl --data target --train-prompts 3467 \
        --methods --completions --steps 1800 --lr 1e-3 --eval-every 200
    draftwise distill --output runs/ce-c --teacher-top-k 0 --divergence ce --data target --train-prompts 3467 \
        --methods --completions --steps 1800 --lr 1e-3 --eval-every 200
    draftwise distill --output runs/standard-sd-c --teacher-top-k 0 --divergence ce --data fixed --corpus-texts 12000 \
        --corpus-docs 0.75 --train-prompts 3467 --methods --completions --steps 2900 --lr 1e-3 --eval-every 200
    python bench/divergences_at_scale.py --out bench/results/completion_prompts \
        --run "standard SD: ce on stdlib text=runs/standard-sd-c" --run "ce on the target's answers=runs/ce-c" \
        --run "fkl on the target's answers (default draft)=runs/fkl-c" \
        --run "previous default draft: fkl, without completion prompts=runs/fkl"

Each ``--run`` is a ``draftwise distill`` output folder (``draft/`` and ``training.json``, whose
last held-out evaluation gives the acceptance and top-1 columns). Batch 1, the target alone
(Hugging Face's ``generate``) timed in the same run, draftwise's target compiled. Writes
bench/results/divergences_at_scale.{json,md}, or ``--out``'s.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import transformers

from default_draft import heldout_prompt_sets  # the same prompt sets as the default draft's bench

from draftwise.defaults import load_target
from draftwise.distill.evaluate import evaluate_drafts
from draftwise.engine import load_draft

RESULTS = Path(__file__).parent / "results"


def _runs(parser: argparse.ArgumentParser, specs: list[str]) -> dict[str, Path]:
    runs = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        path = Path(folder).expanduser()
        if not sep or not name:
            parser.error(f"--run: expected NAME=FOLDER, got {spec!r}")
        if not (path / "draft").is_dir() or not (path / "training.json").is_file():
            parser.error(f"--run {name}: {path} holds no draft/ and training.json (a draftwise distill output)")
        runs[name] = path
    if not runs:
        parser.error("--run: give at least one NAME=FOLDER")
    return runs


def _markdown(report: dict) -> str:
    setup = (f"{report['machine']}; torch {report['versions']['torch']}, transformers "
             f"{report['versions']['transformers']}; {report['max_new_tokens']} new tokens, batch 1, "
             "draftwise's target compiled.")
    header = ("| prompts | mode | objective | held-out acceptance | held-out top-1 | γ | α | τ | tokens/s | "
              "target alone | speedup |")
    lines = [setup, "", header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for prompts, rows in report["results"].items():
        for r in rows:
            trained = report["training"][r["draft"]]
            lines.append(f"| {prompts} | {r['mode']} | {r['draft']} | {trained['acceptance']:.3f} | "
                         f"{trained['top1']:.3f} | {r['gamma']} | {r['alpha']:.3f} | {r['tau']:.2f} | "
                         f"{r['tokens_per_s']:.1f} | {r['target_tokens_per_s']:.1f} | {r['speedup']:.2f}× |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", default=[], metavar="NAME=FOLDER",
                        help="a distill output folder and the name to show (repeatable)")
    parser.add_argument("--gammas", default="2,4")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--humaneval", type=int, default=8, help="HumanEval prompts")
    parser.add_argument("--out", type=Path, default=RESULTS / "divergences_at_scale")
    args = parser.parse_args()
    runs = _runs(parser, args.run)
    gammas = [int(g) for g in args.gammas.split(",")]
    torch.manual_seed(0)
    target, tokenizer = load_target()
    drafts = {name: load_draft(path / "draft", target) for name, path in runs.items()}
    training = {}
    for name, path in runs.items():
        history = json.loads((path / "training.json").read_text())
        last = history["history"][-1]
        training[name] = {"objective": history["config"]["objective"], "steps": last["step"],
                          "acceptance": last["acceptance"], "top1": last["top1"], "seconds": last["seconds"]}
    prompt_sets = heldout_prompt_sets(tokenizer, args.humaneval)
    report = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "max_new_tokens": args.max_new_tokens, "training": training, "results": {}}
    for name, (prompts, modes) in prompt_sets.items():
        report["results"][name] = evaluate_drafts(target, tokenizer, drafts, prompts, gammas=gammas, modes=modes,
                                                  max_new_tokens=args.max_new_tokens, compile=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(_markdown(report))
    print(_markdown(report))


if __name__ == "__main__":
    main()
