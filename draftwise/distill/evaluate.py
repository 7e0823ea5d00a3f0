"""Evaluating a draft through the engine: empirical and analytic α, τ, and the wall-clock speedup
over the target alone (Hugging Face's ``generate`` on the same prompts, timed in the same run)."""

from __future__ import annotations

from typing import Sequence

import torch

from draftwise.measure import Tally, sequences_of, timed

MODES = {"greedy": dict(do_sample=False), "T=1": dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)}


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
    templated = bool(getattr(tokenizer, "chat_template", None))  # a templated prompt holds its special tokens
    inputs = [tokenizer(p, return_tensors="pt", add_special_tokens=not templated) for p in prompts]
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
        totals = {key: Tally() for key in runs}
        quality = {key: [0.0, 0] for key in runs}  # the target's log-likelihood of the outputs, tokens
        for x in inputs:  # prompt by prompt, every run in turn: a drifting machine slows all alike
            width = x["input_ids"].shape[1]
            for key, run in runs.items():
                torch.manual_seed(seed)
                elapsed, out = timed(lambda: run(x, engines.get(key[0]), key[1]))
                totals[key].add(elapsed, out, width, pad)
                if score_quality:
                    log_likelihood, count = target_log_likelihood(target, sequences_of(out), width, pad)
                    quality[key][0] += log_likelihood
                    quality[key][1] += count
                bar.update()
        base = totals[("target", 0)].tokens_per_second
        for (name, gamma), total in totals.items():
            if name == "target":
                continue
            pooled = total.pooled
            rate = total.tokens_per_second
            row = {
                "mode": mode, "draft": name, "gamma": gamma, "alpha": pooled.alpha,
                "analytic_alpha": pooled.analytic_alpha if pooled.accept_prob_count else None, "tau": pooled.tau,
                "tokens_per_s": rate, "target_tokens_per_s": base, "speedup": rate / base,
            }
            if score_quality:
                row.update(log_likelihood=quality[(name, gamma)][0] / max(1, quality[(name, gamma)][1]),
                           target_log_likelihood=quality[("target", 0)][0] / max(1, quality[("target", 0)][1]))
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
