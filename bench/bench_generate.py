"""End-to-end decoding speed on the default target: the target alone, Hugging Face's assisted
generation (batch 1, where it can) and draftwise, side by side in one run.

    python bench/bench_generate.py                 # the full sweep -> bench/results/generate_cpu.*
    python bench/bench_generate.py --quick         # fewer prompts and gammas

Two drafts: a model draft (``--draft distilled``: the shipped default draft; ``--draft layer``:
the target's first layer on its shared embeddings and head, undistilled) and prompt lookup. For
every (batch, mode, gamma, draft): tokens per second over the same real prompts (the demo's), and
for draftwise alpha, tau and the time split (draft / target / verify / other); "overhead" =
(verify + other) / total is the time outside the model forwards. ``draftwise-<draft>-torch-gemm``
is draftwise with the skinny GEMM of verification forwards switched off
(``DRAFTWISE_SKINNY_GEMM=0``), to show what it brings. ``...-compiled`` runs the target's
forwards through ``torch.compile`` (``compile=True``; compiled before the timing), and
``draftwise-no-draft-compiled`` is that compiled target decoding alone: what compiling gives
without speculation.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import transformers

import draftwise
from draftwise.defaults import DEFAULT_DRAFT, MODEL_DRAFT, demo_prompts, load_default, load_model_draft
from draftwise.engine import skinny_linear
from draftwise.measure import Tally, timed

RESULTS = Path(__file__).parent / "results"


def _batches(tokenizer, prompts: list[str], batch: int, limit: int) -> list[dict]:
    """At most ``limit`` prompts, in batches of ``batch`` (left-padded)."""
    tokenizer.padding_side = "left"
    prompts = prompts[: max(limit, batch)]
    return [tokenizer(prompts[i: i + batch], return_tensors="pt", padding=True)
            for i in range(0, len(prompts) - batch + 1, batch)]


def _measure(name, run, batches, pad) -> dict:
    total = Tally()
    for inputs in batches:
        seconds, out = timed(lambda: run(inputs))
        total.add(seconds, out, inputs["input_ids"].shape[1], pad)
    row = {"provider": name, "tokens": total.tokens, "seconds": total.seconds,
           "tokens_per_second": total.tokens_per_second}
    if total.stats:
        pooled = total.pooled
        row.update(alpha=pooled.alpha, tau=pooled.tau, time_draft=pooled.time_draft, time_target=pooled.time_target,
                   time_verify=pooled.time_verify, time_other=pooled.time_other)
        row["overhead"] = (row["time_verify"] + row["time_other"]) / total.seconds
    return row


def sweep(args) -> dict:
    torch.manual_seed(0)
    target, tokenizer, distilled = load_default()
    draft = distilled if args.draft == "distilled" else load_model_draft(target)
    d = args.draft
    pad = tokenizer.pad_token_id
    prompts = demo_prompts(tokenizer)[: args.prompts]
    results = []
    for mode in args.modes:
        sample = dict(do_sample=False) if mode == "greedy" else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
        common = dict(max_new_tokens=args.max_new_tokens, pad_token_id=pad, **sample)
        for batch in args.batches:
            batches = _batches(tokenizer, prompts, batch, args.batch1_prompts if batch == 1 else len(prompts))
            target.generate(**batches[0], **{**common, "max_new_tokens": 8})  # warm-up
            # draftwise's warm-up (the first call of a process also loads the C++ extension)
            draftwise.generate(target, **batches[0], assistant_model=draft, **{**common, "max_new_tokens": 8})
            # compiles the target's graphs for this batch (once), so that no compile is timed
            draftwise.generate(target, **batches[0], compile=True, **{**common, "max_new_tokens": 8})
            base = _measure("target", lambda x: target.generate(**x, **common), batches, pad)
            results.append({"batch": batch, "mode": mode, "gamma": 0, **base})
            print(json.dumps(results[-1]))
            alone = _measure("draftwise-no-draft-compiled", lambda x: draftwise.generate(
                target, **x, seed=0, compile=True, return_dict_in_generate=True, **common), batches, pad)
            alone["speedup_vs_target"] = alone["tokens_per_second"] / base["tokens_per_second"]
            results.append({"batch": batch, "mode": mode, "gamma": 0, **alone})
            print(json.dumps(results[-1]))
            for gamma in args.gammas:
                spec = dict(num_assistant_tokens=gamma, num_assistant_tokens_schedule="constant", **common)
                def run_draftwise(x, **extra):
                    return draftwise.generate(target, **x, seed=0, return_dict_in_generate=True, **extra, **spec)

                def run_torch_gemm(x):
                    with skinny_linear.switched_off():
                        return run_draftwise(x, assistant_model=draft)

                runs = {
                    f"draftwise-{d}": lambda x: run_draftwise(x, assistant_model=draft),
                    f"draftwise-{d}-torch-gemm": run_torch_gemm,
                    "draftwise-lookup": lambda x: run_draftwise(x, prompt_lookup_num_tokens=gamma),
                    f"draftwise-{d}-compiled": lambda x: run_draftwise(x, assistant_model=draft, compile=True),
                    "draftwise-lookup-compiled": lambda x: run_draftwise(x, prompt_lookup_num_tokens=gamma,
                                                                         compile=True),
                }
                if batch == 1:  # Hugging Face's assisted generation takes one row only
                    runs[f"hf-{d}"] = lambda x: target.generate(**x, assistant_model=draft, **spec)
                    runs["hf-lookup"] = lambda x: target.generate(**x, prompt_lookup_num_tokens=gamma, **common)
                for name, run in runs.items():
                    row = _measure(name, run, batches, pad)
                    row["speedup_vs_target"] = row["tokens_per_second"] / base["tokens_per_second"]
                    results.append({"batch": batch, "mode": mode, "gamma": gamma, **row})
                    print(json.dumps(results[-1]))
    return {
        "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "draftwise": draftwise.__version__},
        "target": "SmolLM2-135M-Instruct (fp32)",
        "model draft": repr(DEFAULT_DRAFT if args.draft == "distilled" else MODEL_DRAFT),
        "lookup draft": "prompt lookup, 2-grams",
        "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "results": results,
    }


def table(report: dict) -> str:
    lines = ["| batch | mode | gamma | provider | tok/s | × target | alpha | tau | draft s | target s | verify s | other s | overhead |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        extra = [f"{r[k]:.3f}" if k in r else "–" for k in ("alpha",)] + [f"{r['tau']:.2f}" if "tau" in r else "–"]
        times = [f"{r[k]:.2f}" if k in r else "–" for k in ("time_draft", "time_target", "time_verify", "time_other")]
        overhead = f"{100 * r['overhead']:.1f}%" if "overhead" in r else "–"
        speedup = f"{r.get('speedup_vs_target', 1.0):.2f}"
        lines.append(f"| {r['batch']} | {r['mode']} | {r['gamma'] or '–'} | {r['provider']} | "
                     f"{r['tokens_per_second']:.1f} | {speedup} | {' | '.join(extra)} | {' | '.join(times)} | {overhead} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in report["results"]})
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rows = [r for r in report["results"] if r["mode"] == mode]
        for batch in sorted({r["batch"] for r in rows}):
            for provider in sorted({r["provider"] for r in rows} - {"target"}):
                points = sorted((r["gamma"], r["tokens_per_second"]) for r in rows
                                if r["batch"] == batch and r["provider"] == provider)
                if points:
                    ax.plot(*zip(*points), marker="o", label=f"{provider}, batch {batch}")
            base = next(r["tokens_per_second"] for r in rows if r["batch"] == batch and r["provider"] == "target")
            ax.axhline(base, linestyle="--", color="gray", linewidth=1)
            ax.annotate(f"target alone, batch {batch}", (0.5, base), fontsize=8, color="gray")
        ax.set(title=f"{mode}: {report['target']}", xlabel="drafted tokens per step (gamma)", ylabel="tokens / s")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="greedy only, gammas 2 and 4")
    parser.add_argument("--prompts", type=int, default=4, help="prompts of the batch-4 runs")
    parser.add_argument("--batch1-prompts", type=int, default=2, help="prompts of the batch-1 runs")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--draft", choices=("distilled", "layer"), default="distilled",
                        help="the model draft: the shipped distilled default, or the undistilled first layer")
    parser.add_argument("--gammas", default="1,2,4,6,8")
    parser.add_argument("--out", default=None, help="default: bench/results/generate_cpu (distilled) "
                        "or generate_cpu_layer")
    args = parser.parse_args()
    args.batches, args.modes = (1, 4), ("greedy", "T1")
    args.gammas = tuple(int(g) for g in args.gammas.split(","))
    args.out = args.out or str(RESULTS / ("generate_cpu" if args.draft == "distilled" else "generate_cpu_layer"))
    if args.quick:
        args.modes, args.gammas = ("greedy",), (2, 4)
    report = sweep(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(table(report) + "\n")
    try:
        plot(report, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    print(table(report))


if __name__ == "__main__":
    main()
