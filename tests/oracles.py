"""Oracles the test files share: the chi-square test against a fully specified law, the exact law
of a model's first two sampled tokens, and the left-padded prompts of the engine tests."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from scipy import stats

ALPHA = 1e-6  # p-value threshold: a correct kernel fails a check less than once in 10**6 runs
MIN_EXPECTED = 5.0  # outcomes with a smaller expected count are merged before the chi-square
PAD = 2  # the pad id of the engine tests' prompts


class Fit(NamedTuple):
    pvalue: float
    statistic: float
    dof: int
    trials: int
    impossible: int  # trials that landed on an outcome of probability 0

    def __str__(self) -> str:
        return (
            f"p={self.pvalue:.3g} (chi2={self.statistic:.1f}, dof={self.dof}, trials={self.trials}, "
            f"impossible outcomes={self.impossible})"
        )


def chi_square(counts, probs, min_expected: float = MIN_EXPECTED) -> Fit:
    """Chi-square test of ``counts`` against the fully specified law ``probs`` (same length).

    Outcomes are sorted by expected count and merged, smallest first, into groups whose expected
    count reaches ``min_expected``; a remainder joins the last group. Any count on an outcome of
    probability 0 gives p-value 0 (for a law on one outcome, that is the whole test).
    """
    counts = torch.as_tensor(counts, dtype=torch.float64).flatten().numpy()
    probs = torch.as_tensor(probs, dtype=torch.float64).flatten().numpy()
    if counts.shape != probs.shape or (probs < 0).any() or not probs.sum() > 0:
        raise ValueError(f"chi_square: counts {counts.shape} and a positive law {probs.shape} expected")
    trials = int(counts.sum())
    possible = probs > 0
    impossible = int(counts[~possible].sum())
    expected = trials * probs[possible] / probs[possible].sum()
    observed = counts[possible]
    group_expected, group_observed = [], []
    pending_expected = pending_observed = 0.0
    for i in np.argsort(expected, kind="stable"):
        pending_expected += expected[i]
        pending_observed += observed[i]
        if pending_expected >= min_expected:
            group_expected.append(pending_expected)
            group_observed.append(pending_observed)
            pending_expected = pending_observed = 0.0
    if group_expected:
        group_expected[-1] += pending_expected
        group_observed[-1] += pending_observed
    if not group_expected:
        raise ValueError(f"chi_square: {trials} trials are too few for a test")
    e, o = np.asarray(group_expected), np.asarray(group_observed)
    statistic = float(((o - e) ** 2 / e).sum())
    dof = len(e) - 1
    pvalue = 0.0 if impossible else float(stats.chi2.sf(statistic, dof)) if dof else 1.0
    return Fit(pvalue, statistic, dof, trials, impossible)


def left_padded_prompts(batch: int, width: int = 7, seed: int = 0, high: int = 100):
    """Left-padded prompts of different lengths (row b loses b tokens to padding), ids in [3, high)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, high, (batch, width), generator=g)
    mask = torch.ones_like(ids)
    for row in range(batch):
        mask[row, : min(row, width - 1)] = 0
    return ids * mask + PAD * (1 - mask), mask


def first_two_token_law(target, prompt: torch.Tensor, temperature: float, top_k: int = 0,
                         top_p: float = 1.0) -> torch.Tensor:
    """The exact law of the first two generated tokens, ``[V, V]``, by enumeration."""
    from draftwise.kernels.reference import target_probs

    def law(logits):  # [N, V] -> the processed distribution of each row
        n = logits.shape[0]
        return target_probs(logits.double().unsqueeze(1), torch.full((n,), temperature),
                            torch.full((n,), top_k), torch.full((n,), top_p)).squeeze(1)

    with torch.no_grad():
        first = law(target(prompt).logits[:, -1])[0]
        vocab = first.shape[0]
        seconds = torch.cat([prompt.repeat(vocab, 1), torch.arange(vocab).view(-1, 1)], 1)
        second = law(target(seconds).logits[:, -1])
    return first.view(-1, 1) * second


def tree_path_tokens(tokens: torch.Tensor, parents: torch.Tensor, row: int, node: int) -> list[int]:
    """The tokens from the root of row ``row``'s tree down to ``node`` (``parents`` -1 at the root)."""
    path = [node]
    while parents[row, path[-1]] >= 0:
        path.append(int(parents[row, path[-1]]))
    return [int(tokens[row, n]) for n in reversed(path)]
