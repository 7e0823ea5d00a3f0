"""Markdown table from a pytest-benchmark JSON of bench_verify.py or bench_verify_tree.py:
``python bench/report.py FILE``."""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.1f}"


def table(path: str) -> str:
    with open(path) as handle:
        runs = json.load(handle)["benchmarks"]
    copy = next((r["extra_info"]["gbps"] for r in runs if r["extra_info"].get("provider") == "copy"), None)
    rows = defaultdict(dict)
    for run in runs:
        info = run["extra_info"]
        if info.get("provider") in (None, "copy"):
            continue
        size = info["k"] if "k" in info else info["nodes"]  # drafts of a chain, or nodes of a tree
        rows[(info["batch"], size, info["vocab"], info["mode"])][info["provider"]] = (run["stats"], info)
    providers = sorted({p for row in rows.values() for p in row}, key=["triton", "cpp", "compiled", "torch"].index)
    trees = any("nodes" in info for row in rows.values() for _, info in row.values())
    head = f"| B | {'T' if trees else 'K'} | V | mode | " + " | ".join(
        f"{p} ms (p20–p80)" + ("" if trees else f" | {p} GB/s") for p in providers)
    head += " | speed-up vs torch |" if "torch" in providers else " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (batch, k, vocab, mode), row in sorted(rows.items()):
        cells = []
        for provider in providers:
            if provider not in row:
                cells += ["–"] * (1 if trees else 2)
                continue
            stats, info = row[provider]
            cells.append(f"{_ms(stats['median'])} ({_ms(info['p20'])}–{_ms(info['p80'])})")
            if not trees:
                cells.append(f"{info['gbps']:.1f}" + (f" ({100 * info['gbps'] / copy:.0f}%)" if copy else ""))
        fastest = providers[0]
        if "torch" in row and fastest in row and fastest != "torch":
            cells.append(f"{row['torch'][0]['median'] / row[fastest][0]['median']:.1f}×")
        lines.append(f"| {batch} | {k} | {vocab} | {mode} | " + " | ".join(cells) + " |")
    if copy:
        lines.append(f"\nCopy bandwidth measured in the same run: {copy:.1f} GB/s (read + write).")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
