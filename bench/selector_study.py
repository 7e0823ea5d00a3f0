"""The offline selector, studied on logged rewards: features, training methods, cost weight, data.

Reads two collections written by `draftwise selector collect` (training prompts: the requests
the pool's drafts were distilled on; held-out prompts: the evaluation kinds) and trains selectors
on the first with every setting below, scoring each on the second by the mean predicted speedup
of its choices (the reward with cost weight 1) against every single arm, a random arm and the
per-prompt oracle:

- feature: the target's mean prefill hidden state against token statistics;
- method: REINFORCE with a baseline (bandit feedback, the paper's) against full information;
- cost weight λ of the training reward τ / cost^λ: 0 (alignment alone, the paper's reward), 0.5, 1;
- data: 10 .. all training prompts, three seeds each.

With `--measured bench/results/pool_cpu.json` (from bench/bench_pool.py on the same held-out
prompts), it also compares the logged reward with the speedup measured through the engine.

    .venv/bin/python bench/selector_study.py --train ~/.cache/draftwise/selector/train \\
        --eval ~/.cache/draftwise/selector/eval --out bench/results/selector_study
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from draftwise.distill.selection import Collection, TrainConfig, policy_quality, train_selector


def quality(train, heldout, limit=None, **config) -> dict:
    selector = train_selector(train, TrainConfig(**config), limit=limit, progress=False)
    return policy_quality(selector, heldout)


def settings_table(train, heldout) -> list[dict]:
    rows = []
    for feature in ("hidden", "tokens"):
        for method in ("reinforce", "full"):
            for cost_weight in (0.0, 0.5, 1.0):
                q = quality(train, heldout, feature=feature, method=method, cost_weight=cost_weight)
                rows.append(dict(feature=feature, method=method, cost_weight=cost_weight, **q))
    return rows


def data_curve(train, heldout, sizes, seeds=(0, 1, 2)) -> list[dict]:
    rows = []
    for method in ("reinforce", "full"):
        for size in sizes:
            values = [quality(train, heldout, limit=size, method=method, seed=s)["selector"] for s in seeds]
            rows.append(dict(method=method, prompts=size, mean=sum(values) / len(values), values=values))
    return rows


def reward_vs_measured(heldout: Collection, measured: dict) -> dict:
    """Per (prompt, arm): the logged reward (predicted speedup) against the measured one."""
    by_text = {r["text"]: r for r in measured["records"] if "text" in r}
    predicted, actual, same_best, n = [], [], 0, 0
    rewards = heldout.rewards(1.0)
    for record, reward in zip(heldout.records, rewards):
        m = by_text.get(record["text"])
        if m is None:
            continue
        base = m["seconds"]["target alone"]
        speed = [base / m["seconds"][arm] if arm in m["seconds"] else base / m["seconds"]["target alone"]
                 for arm in heldout.arms[:-1]] + [1.0]
        predicted += reward.tolist()
        actual += speed
        same_best += int(int(reward.argmax()) == max(range(len(speed)), key=speed.__getitem__))
        n += 1
    if not n:
        return {}
    p, a = torch.tensor(predicted), torch.tensor(actual)
    corr = float(torch.corrcoef(torch.stack([p, a]))[0, 1])
    return dict(prompts=n, correlation=corr, same_best_arm=same_best / n,
                mean_predicted=float(p.mean()), mean_measured=float(a.mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--measured", help="bench/bench_pool.py's json on the same held-out prompts")
    parser.add_argument("--out", default="bench/results/selector_study")
    args = parser.parse_args()
    train, heldout = Collection.read(args.train), Collection.read(args.eval)
    torch.manual_seed(0)
    settings = settings_table(train, heldout)
    n = len(train.records)
    sizes = [s for s in (10, 20, 40, 80, 160) if s < n] + [n]
    curve = data_curve(train, heldout, sizes)
    compare = reward_vs_measured(heldout, json.loads(Path(args.measured).read_text())) if args.measured else {}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(dict(settings=settings, curve=curve, compare=compare,
                                                        train=n, heldout=len(heldout.records)), indent=1))
    first = settings[0]
    lines = [f"# The offline selector on logged rewards ({n} training prompts, {len(heldout.records)} held-out)", "",
             f"Command: `python bench/selector_study.py --train {args.train} --eval {args.eval}"
             + (f" --measured {args.measured}" if args.measured else "") + f" --out {args.out}`", "",
             "Mean predicted speedup on the held-out prompts (reward with cost weight 1) of the selector's "
             "choices; the oracle takes each prompt's best arm.", "",
             "Single arms: " + ", ".join(f"{a} {v:.3f}" for a, v in first["per_arm"].items())
             + f"; random arm {first['random']:.3f}; oracle {first['oracle']:.3f}.", "",
             "| feature | method | cost weight λ | selector | of the oracle | choices |", "|---|---|---|---|---|---|"]
    for r in settings:
        lines.append(f"| {r['feature']} | {r['method']} | {r['cost_weight']} | {r['selector']:.3f} | "
                     f"{r['selector'] / r['oracle']:.1%} | {r['choices']} |")
    lines += ["", "Data: mean over three seeds (hidden feature, λ = 1).", "",
              "| method | " + " | ".join(str(s) for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for method in ("reinforce", "full"):
        row = [c for c in curve if c["method"] == method]
        lines.append(f"| {method} | " + " | ".join(f"{c['mean']:.3f}" for c in row) + " |")
    if compare:
        lines += ["", f"Logged reward against the speedup measured through the engine ({compare['prompts']} "
                      f"held-out prompts, every arm): correlation {compare['correlation']:.2f}; the same best "
                      f"arm on {compare['same_best_arm']:.0%} of prompts; mean predicted "
                      f"{compare['mean_predicted']:.2f}× against measured {compare['mean_measured']:.2f}×."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
