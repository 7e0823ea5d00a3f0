"""Evaluating a draft through the engine: empirical and analytic α, τ, and the wall-clock speedup
over the target alone (Hugging Face's ``generate`` on the same prompts, timed in the same run)."""

from __future__ import annotations

import time
from typing import Sequence

import torch

from draftwise.engine.stats import SpecStats

MODES = {"greedy": dict(do_sample=False), "T=1": dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)}
# Repeats of the same work whose times spread more than this, (slowest - fastest) / fastest, were
# slowed by something else on the machine. On an idle 2-core CPU the demo's figures move by a few
# percent between runs; beside a test run on the other core its runs took ~40 s instead of ~2.5 s.
TIMING_SPREAD_LIMIT = 0.10


def timed(fn):
    """``(seconds, fn())``."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def relative_spread(seconds: Sequence[float]) -> float:
    """(slowest - fastest) / fastest of repeated timings of the same work (0 for one timing)."""
    if not seconds or min(seconds) <= 0:
        raise ValueError(f"seconds: expected positive timings, got {list(seconds)}")
    return (max(seconds) - min(seconds)) / min(seconds)


def unreliable_timings(repeats: dict[str, Sequence[float]], limit: float = TIMING_SPREAD_LIMIT) -> dict[str, float]:
    """The relative spread of each entry of ``repeats`` (name -> seconds of each repeat of the
    same work) whose spread exceeds ``limit``, in the order given."""
    spreads = {name: relative_spread(seconds) for name, seconds in repeats.items()}
    return {name: spread for name, spread in spreads.items() if spread > limit}


def _new_tokens(sequences: torch.Tensor, width: int, pad: int | None) -> int:
    new = sequences[:, width:]
    return int((new != pad).sum()) if pad is not None else new.numel()


@torch.no_grad()
def target_log_likelihood(target, sequences: torch.Tensor, width: int, pad: int | None) -> tuple[float, int]:
    """Sum of the target's log-probabilities of the generated tokens (``sequences[:, width:]``,
    padding excluded) and their count: the quality measure of lossy decoding."""
    logits = target(sequences).logits[:, width - 1:-1].float()
    new = sequences[:, width:]
    log_probs = torch.log_softmax(logits, -1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
    keep = new != pad if pad is not None else torch.ones_like(new, dtype=torch.bool)
    return float(log_probs[keep].sum()), int(keep.sum())


def evaluate_drafts(target, tokenizer, drafts: dict, prompts: Sequence[str], *, gammas: Sequence[int] = (4,),
                    modes: Sequence[str] = ("greedy", "T=1"), max_new_tokens: int = 64, seed: int = 0,
                    lenience=None, score_quality: bool = False, progress: bool = True,
                    compile: bool = False) -> list[dict]:
    """One row per (mode, draft, γ) over ``prompts`` at batch 1, the target alone timed in the same
    run (each prompt goes through every run in turn): ``alpha`` (accepted / drafted),
    ``analytic_alpha`` (mean Σ min(p, q)), ``tau`` (tokens per target call), ``tokens_per_s``,
    ``target_tokens_per_s``, ``speedup`` and, with ``score_quality``, ``log_likelihood`` (the
    target's mean log-probability of the output tokens). ``drafts``: name -> a draft model or drafter ``draftwise.generate`` takes.
    ``compile``: the engines run the target compiled (``SpeculativeEngine(compile=True)``); the
    target alone stays Hugging Face's ``generate``."""
    import draftwise
    from tqdm.auto import tqdm

    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"modes: unknown {unknown}; expected some of {list(MODES)}")
    if not prompts:
        raise ValueError("prompts: at least one prompt is needed")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    inputs = [tokenizer(p, return_tensors="pt", add_special_tokens=False) for p in prompts]
    engines = {name: draftwise.SpeculativeEngine(target, [d], tokenizer=tokenizer, compile=compile)
               for name, d in drafts.items()}
    rows = []
    bar = tqdm(total=len(modes) * (1 + len(gammas) * len(drafts)) * len(inputs), desc="evaluating drafts",
               disable=not progress)
    for mode in modes:
        common = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, **MODES[mode])
        runs = {("target", 0): lambda x, engine, g: target.generate(**x, **common)}
        for name, engine in engines.items():
            for gamma in gammas:
                runs[(name, gamma)] = lambda x, engine, g: engine.generate(
                    **x, num_assistant_tokens=g, num_assistant_tokens_schedule="constant", seed=seed,
                    return_dict_in_generate=True, lenience=lenience, assistant_confidence_threshold=0.0, **common)
        for (name, gamma), run in runs.items():  # warm-up
            torch.manual_seed(seed)
            run(inputs[0], engines.get(name), gamma)
        totals = {key: [0.0, 0, [], 0.0, 0] for key in runs}  # seconds, tokens, stats, log-lik., count
        for x in inputs:  # prompt by prompt, every run in turn: a drifting machine slows all alike
            width = x["input_ids"].shape[1]
            for (name, gamma), run in runs.items():
                torch.manual_seed(seed)
                elapsed, out = timed(lambda: run(x, engines.get(name), gamma))
                sequences = out if isinstance(out, torch.Tensor) else out.sequences
                total = totals[(name, gamma)]
                total[0] += elapsed
                total[1] += _new_tokens(sequences, width, pad)
                if getattr(out, "spec_stats", None) is not None:
                    total[2].append(out.spec_stats)
                if score_quality:
                    log_likelihood, count = target_log_likelihood(target, sequences, width, pad)
                    total[3] += log_likelihood
                    total[4] += count
                bar.update()
        results = {key: (tokens / seconds, stats, quality / max(1, count))
                   for key, (seconds, tokens, stats, quality, count) in totals.items()}
        base, _, base_quality = results[("target", 0)]
        for (name, gamma), (rate, stats, quality) in results.items():
            if name == "target":
                continue
            pooled = SpecStats.total(stats)
            row = {
                "mode": mode, "draft": name, "gamma": gamma, "alpha": pooled.alpha,
                "analytic_alpha": pooled.analytic_alpha if pooled.accept_prob_count else None, "tau": pooled.tau,
                "tokens_per_s": rate, "target_tokens_per_s": base, "speedup": rate / base,
            }
            if score_quality:
                row.update(log_likelihood=quality, target_log_likelihood=base_quality)
            rows.append(row)
    bar.close()
    return rows


def evaluate_draft(target, tokenizer, draft, prompts: Sequence[str], **kwargs) -> list[dict]:
    """:func:`evaluate_drafts` for one draft."""
    return evaluate_drafts(target, tokenizer, {"draft": draft}, prompts, **kwargs)


def format_rows(rows: Sequence[dict]) -> str:
    """A markdown table of :func:`evaluate_draft` rows."""
    lines = ["| mode | draft | γ | α | analytic α | τ | tokens/s | target tokens/s | speedup |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        analytic = "–" if r["analytic_alpha"] is None else f"{r['analytic_alpha']:.3f}"
        lines.append(f"| {r['mode']} | {r['draft']} | {r['gamma']} | {r['alpha']:.3f} | {analytic} | {r['tau']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['target_tokens_per_s']:.1f} | {r['speedup']:.2f}× |")
    return "\n".join(lines)
