"""The default pool and its selector, measured: speedup over the target alone by kind of text.

On held-out prompts of seven kinds (`draftwise.distill.prompts.evaluation_prompts`, texts none of
the drafts or the selector trained on), each with and without the chat template; batch 1, greedy,
48 new tokens. Arms, interleaved prompt by prompt in one process:

- target alone (Hugging Face's `model.generate`), the baseline of every ratio;
- draftwise without a draft (the pool's no-draft arm; the second baseline: what drafting itself
  gains or loses);
- each drafter of the pool alone (`draftwise.generate(target, assistant_model=d)`, default policy);
- a random arm (the mean time of the pool's arms, each drafter alone and no draft: the
  expectation of picking one at random per prompt) and the per-prompt oracle (the fastest of
  them, measured);
- the whole pool under: the per-step default of one drafter (`AdaptivePolicy`), the offline
  selector (one choice per prompt, the paper's method; with prompt lookup scored for free beside
  the chosen arm, and without), the online policy without a prior, and the online policy with
  the selector as its prior.

Then one batch of mixed prompts (one per kind): the pool with per-row choice against each single
drafter for the whole batch. Every output is checked against the target's own.

    .venv/bin/python bench/bench_pool.py --per-kind 3 --out bench/results/pool_cpu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

import draftwise
from draftwise.defaults import POOL_SELECTOR, load_target, pool_drafters
from draftwise.distill.prompts import KINDS
from draftwise.distill.selection import evaluation_set
from draftwise.engine import AdaptivePolicy
from draftwise.engine.selector import OfflinePolicy, OnlinePolicy, Selector
from draftwise.measure import new_tokens, timed, warm_up

NEW_TOKENS = 48
NO_DRAFT_ARM = "draftwise, no draft"


def sampling(sample: bool) -> dict:
    """Greedy, or plain sampling at T = 1 (no top-k, no top-p)."""
    return dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)


def single_arms(target, pool, common: dict) -> dict:
    """The target alone, draftwise without a draft and each drafter alone: a run per name, taking
    the tokenized inputs."""
    runs = {"target alone": lambda x: target.generate(**x, **common),
            NO_DRAFT_ARM: lambda x: draftwise.generate(target, **x, **common)}
    for drafter in pool:
        runs[drafter.name] = (lambda d: lambda x: draftwise.generate(target, **x, assistant_model=d, **common))(drafter)
    return runs


def arms(target, tokenizer, pool, selector, sample: bool = False) -> dict:
    common = dict(max_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.pad_token_id, **sampling(sample))
    runs = single_arms(target, pool, common)
    policies = {
        "pool: per-step default": lambda: AdaptivePolicy(),
        "pool: offline selector": lambda: OfflinePolicy(selector),
        "pool: offline, chosen arm only": lambda: OfflinePolicy(selector, free_drafters=False),
        "pool: online": lambda: OnlinePolicy(),
        "pool: online + selector": lambda: OnlinePolicy(selector),
    }
    for name, make in policies.items():
        runs[name] = (lambda make: lambda x: draftwise.generate(target, **x, drafts=pool, selector=make(),
                                                                **common))(make)
    return runs


def measure(target, tokenizer, pool, selector, prompts: list[dict], repeats: int, sample: bool = False,
            singles_only: bool = False) -> list[dict]:
    """Per prompt, each arm's best time and its new tokens. Greedy: every output must equal the
    target's. Sampled: outputs differ run to run (their law is the target's, which the tests
    check), so speeds are tokens per second."""
    runs = arms(target, tokenizer, pool, selector, sample)
    if singles_only:
        runs = {name: run for name, run in runs.items() if not name.startswith("pool:")}
    warm_up(runs, tokenizer(prompts[0]["text"], return_tensors="pt", add_special_tokens=False))
    records = []
    for prompt in tqdm(prompts, desc="prompts", unit="prompt"):
        inputs = tokenizer(prompt["text"], return_tensors="pt", add_special_tokens=False)
        seconds = {name: [] for name in runs}
        tokens = {name: [] for name in runs}
        reference = None
        width = inputs["input_ids"].shape[1]
        for _ in range(repeats):
            for name, run in runs.items():
                with torch.inference_mode():
                    t, out = timed(lambda: run(inputs))
                seconds[name].append(t)
                tokens[name].append(new_tokens(out, width, tokenizer.pad_token_id))
                reference = out if reference is None else reference
                if not sample and not torch.equal(out, reference):
                    raise AssertionError(f"{name} differs from the target's output on {prompt['kind']}")
        arm = selector.choose(selector.features_for(target, inputs["input_ids"], inputs["attention_mask"]))[0]
        records.append(dict(kind=prompt["kind"], template=prompt["template"], text=prompt["text"],
                            seconds={k: sum(v) / len(v) if sample else min(v) for k, v in seconds.items()},
                            tokens={k: sum(v) / len(v) for k, v in tokens.items()},
                            offline_choice=selector.arms[arm] if arm >= 0 else selector.arms[-1]))
    return records


def with_derived_arms(records: list[dict], singles: list[str]) -> None:
    """Adds the random arm (mean of the single arms' times per token) and the oracle (their
    minimum), at the target's token count."""
    for r in records:
        per_token = [r["seconds"][name] / max(r["tokens"][name], 1) for name in singles]
        base = r["tokens"]["target alone"]
        r["seconds"]["random arm"] = base * sum(per_token) / len(per_token)
        r["seconds"]["oracle"] = base * min(per_token)
        r["tokens"]["random arm"] = r["tokens"]["oracle"] = base
        r["oracle_arm"] = singles[per_token.index(min(per_token))]


def speedups(records: list[dict], names: list[str], base: str = "target alone") -> dict:
    groups = {}
    for r in records:
        for kind in (r["kind"], "all kinds"):
            for key in ((kind, r["template"]), (kind, "both")):
                groups.setdefault(key, []).append(r)

    def rate(group, name):  # tokens per second over the group
        return sum(r["tokens"][name] for r in group) / sum(r["seconds"][name] for r in group)

    return {f"{kind}|{template}": {name: rate(group, name) / rate(group, base) for name in names}
            for (kind, template), group in groups.items()}


def batch_measure(target, tokenizer, pool, selector, prompts: list[dict], repeats: int) -> dict:
    """One left-padded batch of mixed prompts: per-row choice against each drafter for all rows."""
    tokenizer.padding_side = "left"
    inputs = tokenizer([p["text"] for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    common = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    runs = {name: (lambda run: lambda: run(inputs))(run) for name, run in single_arms(target, pool, common).items()}
    policies = {"pool: per-step default": lambda: AdaptivePolicy(),
                "pool: offline selector": lambda: OfflinePolicy(selector),
                "pool: online + selector": lambda: OnlinePolicy(selector)}
    for name, make in policies.items():
        for planned in (True, False):
            runs[name + ("" if planned else ", row by row")] = (
                lambda make, planned: lambda: draftwise.generate(
                    target, **inputs, drafts=pool, selector=_planned(make(), planned), **common))(make, planned)
    seconds = {name: [] for name in runs}
    reference = None
    for _ in range(repeats):
        for name, run in runs.items():
            with torch.inference_mode():
                t, out = timed(run)
            seconds[name].append(t)
            reference = out if reference is None else reference
            if not torch.equal(out, reference):
                raise AssertionError(f"batch: {name} differs from the target's output")
    best = {name: min(v) for name, v in seconds.items()}
    return dict(rows=len(prompts), seconds=best,
                speedup={name: best["target alone"] / t for name, t in best.items()})


def _planned(policy, planned: bool):
    """The policy, with batch steps planned for the batch (the engine's default) or row by row."""
    policy.plan_batches = planned
    return policy


def table(ratios: dict, names: list[str]) -> str:
    lines = ["| kind | template | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    order = [f"{k}|{t}" for k in KINDS + ("all kinds",) for t in ("chat", "raw", "both") if f"{k}|{t}" in ratios]
    for key in order:
        kind, template = key.split("|")
        lines.append(f"| {kind} | {template} | " + " | ".join(f"{ratios[key][n]:.2f}×" for n in names) + " |")
    return "\n".join(lines)


def plot(ratios: dict, names: list[str], path: Path) -> bool:
    """A bar chart of the speedups per kind (both templates), if matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    kinds = [k for k in KINDS if f"{k}|chat" in ratios] + ["all kinds"]

    def both(kind, name):
        if kind == "all kinds":
            return ratios["all kinds|both"][name]
        return (ratios[f"{kind}|chat"][name] + ratios[f"{kind}|raw"][name]) / 2

    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([k + i * width for k in range(len(kinds))], [both(kind, name) for kind in kinds], width, label=name,
               color=plt.cm.tab20(i % 20))
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylim(bottom=0.7)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(kinds))], kinds)
    ax.set_ylabel("speedup over the target alone")
    ax.legend(fontsize=7, ncol=5, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-kind", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--selector", default=str(POOL_SELECTOR))
    parser.add_argument("--sample", action="store_true", help="sample at T = 1 instead of greedy decoding")
    parser.add_argument("--out", default="bench/results/pool_cpu")
    parser.add_argument("--singles-only", action="store_true",
                        help="only the single arms: the target alone, no draft, each drafter alone (no batch)")
    parser.add_argument("--batch-only", action="store_true",
                        help="only the batches of mixed prompts (one per kind; chat template, then raw)")
    args = parser.parse_args()
    torch.manual_seed(0)
    target, tokenizer = load_target()
    pool = pool_drafters(target)
    selector = Selector.load(args.selector)
    prompts = evaluation_set(tokenizer, args.per_kind, args.seed)
    if args.batch_only:
        return batches_only(target, tokenizer, pool, selector, prompts, args)
    records = measure(target, tokenizer, pool, selector, prompts, args.repeats, args.sample, args.singles_only)
    singles = [NO_DRAFT_ARM] + [d.name for d in pool]  # the pool's arms: each drafter, and no draft
    with_derived_arms(records, singles)
    names = singles + ["random arm", "oracle", "pool: per-step default", "pool: offline selector",
                       "pool: offline, chosen arm only", "pool: online", "pool: online + selector"]
    names = [n for n in names if n in records[0]["seconds"]]
    ratios = speedups(records, names)
    drafting = [n for n in [d.name for d in pool] + ["oracle", "pool: offline selector"] if n in names]
    over_no_draft = speedups(records, drafting, base=NO_DRAFT_ARM)
    one_per_kind = [next(p for p in prompts if p["kind"] == k and p["template"] == "chat") for k in KINDS]
    batch = None if args.sample or args.singles_only else batch_measure(target, tokenizer, pool, selector,
                                                                        one_per_kind, max(args.repeats, 2))
    command = (f"python bench/bench_pool.py --per-kind {args.per_kind} --repeats {args.repeats} --seed {args.seed}"
               + (" --sample" if args.sample else "") + (" --singles-only" if args.singles_only else "")
               + f" --out {args.out}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(command=command, records=records, ratios=ratios,
                                                        over_no_draft=over_no_draft, batch=batch), indent=1))
    plotted = plot(ratios, names, out.with_suffix(".png"))
    choices = {}
    for r in records:
        choices.setdefault(r["offline_choice"], 0)
        choices[r["offline_choice"]] += 1
    mode = "sampled at T = 1" if args.sample else "greedy"
    text = [f"# The default pool by kind of text (batch 1, {mode}, {NEW_TOKENS} new tokens)", "",
            f"Command: `{command}`", "", "Speedup over the target alone (Hugging Face `generate`): tokens per second "
            "over summed times" + (", runs averaged over repeats" if args.sample else "") + ".",
            "", table(ratios, names), "",
            "The same runs over draftwise without a draft (what drafting itself gains or loses, on the same "
            "forwards):", "", table(over_no_draft, drafting), "",
            f"Offline selector's choices: {choices}. Per-prompt oracle arm counts: "
            f"{ {a: sum(r['oracle_arm'] == a for r in records) for a in singles} }."]
    if batch is not None:
        text += ["", f"One batch of {batch['rows']} mixed prompts (one per kind, chat template): "
                 + ", ".join(f"{k} {v:.2f}×" for k, v in batch["speedup"].items() if k != "target alone")]
    if plotted:
        text += ["", f"![speedup by kind]({out.with_suffix('.png').name})"]
    out.with_suffix(".md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


def batches_only(target, tokenizer, pool, selector, prompts: list[dict], args) -> None:
    command = f"python bench/bench_pool.py --batch-only --repeats {args.repeats} --seed {args.seed} --out {args.out}"
    text = ["# The default pool on batches of mixed prompts (greedy, "
            f"{NEW_TOKENS} new tokens)", "", f"Command: `{command}`", "",
            "Speedup over the target alone (Hugging Face `generate` on the same batch), fastest of the repeats; "
            "every output equals the target's.", ""]
    results = {}
    for template in ("chat", "raw"):
        rows = [next(p for p in prompts if p["kind"] == k and p["template"] == template) for k in KINDS]
        results[template] = batch_measure(target, tokenizer, pool, selector, rows, max(args.repeats, 2))
    names = [n for n in results["chat"]["speedup"] if n != "target alone"]
    text += ["| batch | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for template, batch in results.items():
        text.append(f"| {batch['rows']} prompts, {template} | "
                    + " | ".join(f"{batch['speedup'][n]:.2f}×" for n in names) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(command=command, batches=results), indent=1))
    out.with_suffix(".md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
