"""The default pair's speed: SmolLM2 with its distilled draft against the target alone, and the
distilled draft against the cross-entropy baseline trained for the same steps on the same text.

    python bench/default_draft.py --baseline ~/.cache/draftwise/ce-baseline/draft \
        --extra "other draft=path/to/draft"       # more draft folders to compare (repeatable)

Held-out prompts: the demo's (standard-library files never trained on) and HumanEval (a source
never trained on). Batch 1; the target alone (Hugging Face's ``generate``) is timed in the same
run. draftwise runs its target compiled (``compile=True``) unless ``--no-compile``. Writes
bench/results/default_draft.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import transformers

from draftwise.defaults import DEFAULT_DRAFT, demo_prompts, load_default
from draftwise.distill.evaluate import evaluate_drafts, format_rows
from draftwise.engine import LookupThenModelDrafter, ModelDrafter, load_draft
from draftwise.prompts import chat_text, heldout_requests

RESULTS = Path(__file__).parent / "results"


def heldout_prompt_sets(tokenizer, humaneval: int) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """The held-out prompts and the decoding modes each is measured in: the demo's first 4
    (greedy) and ``humaneval`` HumanEval problems (greedy and T = 1), chat-formatted."""
    problems = [chat_text(tokenizer, r) for r in heldout_requests("humaneval", humaneval, seed=1)]
    return {"demo (stdlib, held-out files)": (demo_prompts(tokenizer)[:4], ("greedy",)),
            "HumanEval": (problems, ("greedy", "T=1"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="the cross-entropy baseline's draft folder")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=FOLDER",
                        help="another draft folder to measure beside them (repeatable)")
    parser.add_argument("--gammas", default="2,3,4")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--humaneval", type=int, default=6, help="HumanEval prompts")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="run draftwise's target eagerly (default: compile=True, compiled before the timing)")
    parser.add_argument("--out", type=Path, default=RESULTS / "default_draft")
    args = parser.parse_args()
    gammas = [int(g) for g in args.gammas.split(",")]
    torch.manual_seed(0)
    target, tokenizer, draft = load_default()
    drafts = {"distilled": draft, "distilled + lookup": LookupThenModelDrafter(ModelDrafter(draft)),
              # the control for longer copies: copied runs as long as the model's gamma
              "distilled + lookup, copy_extra 0": LookupThenModelDrafter(ModelDrafter(draft), copy_extra=0)}
    if args.baseline is not None:
        drafts["cross-entropy baseline"] = load_draft(args.baseline, target)
    for extra in args.extra:
        name, sep, folder = extra.partition("=")
        if not sep or not name or not folder:
            parser.error(f"--extra: expected NAME=FOLDER, got {extra!r}")
        drafts[name] = load_draft(Path(folder).expanduser(), target)
    prompt_sets = heldout_prompt_sets(tokenizer, args.humaneval)
    report = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "draft": DEFAULT_DRAFT.folder.name, "max_new_tokens": args.max_new_tokens,
              "compiled target": args.compile, "results": {}}
    lines = []
    for name, (prompts, modes) in prompt_sets.items():
        rows = evaluate_drafts(target, tokenizer, drafts, prompts, gammas=gammas, modes=modes,
                               max_new_tokens=args.max_new_tokens, compile=args.compile)
        report["results"][name] = rows
        lines += [f"{name}, {len(prompts)} prompts, {args.max_new_tokens} new tokens, batch 1:", "", format_rows(rows), ""]
        print("\n".join(lines[-4:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
