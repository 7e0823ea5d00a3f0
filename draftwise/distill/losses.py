"""DistillSpec losses: how far the draft (student) is from the target (teacher), per position.

Zhou et al., "DistillSpec: Improving Speculative Decoding via Knowledge Distillation" (ICLR 2024);
argument names follow TRL's GKD trainer (``beta``, ``temperature``). Over the last dimension, the
draft's vocabulary (possibly a subset of the target's):

    q = softmax(student_logits / temperature)     the draft's distribution
    p = exp(teacher_log_probs)                    the target's, computed at the same temperature

``p`` may be sub-normalised (Σ p < 1): the target's mass outside the draft's vocabulary, where
q = 0, does not depend on q. Every sum runs over the given last dimension only. Exact zeros of p
(log p = -inf) are allowed, with 0·log 0 = 0; see ``LOG_PROB_FLOOR``.

Speculative sampling accepts a token drafted from q with probability Σ min(p, q) = 1 − TVD(p, q),
which is why total variation is both a loss here and the acceptance rate's complement.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Divergence = Literal["fkl", "rkl", "jsd", "tvd"]
DIVERGENCES: tuple[str, ...] = ("fkl", "rkl", "jsd", "tvd")

# Teacher log-probabilities are clamped to this floor. exp(-1e4) is exactly 0 in float32 and in
# float64, so the clamp only replaces -inf (and log-probabilities already negligible): a zero of p
# adds nothing to FKL, JSD or TVD, and reverse KL charges q·(log q + 1e4) for it instead of +inf.
# Values and gradients stay finite, also towards a teacher tensor that requires grad.
LOG_PROB_FLOOR = -1e4


def token_divergence(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, kind: Divergence, *,
                     beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """The divergence of every position, shape ``student_logits.shape[:-1]``.

    - ``"fkl"``: forward KL, Σ p (log p − log q).
    - ``"rkl"``: reverse KL, Σ q (log q − log p).
    - ``"jsd"``: generalized Jensen–Shannon, β KL(p‖m) + (1 − β) KL(q‖m) with m = β p + (1 − β) q.
      As in TRL, ``beta=0`` is exactly forward KL and ``beta=1`` exactly reverse KL (the formula
      itself tends to 0 at both ends).
    - ``"tvd"``: total variation, ½ Σ |p − q| + ½ (1 − Σ p), the second term being the target's
      mass outside the draft vocabulary; hence 1 − TVD = Σ min(p, q) even for sub-normalised p.

    The math runs in float32, or float64 when an input is float64, and the result has that dtype.
    ``teacher_log_probs`` is used as given: compute it at the same ``temperature``.
    """
    log_q, log_p = _log_probs(student_logits, teacher_log_probs, kind, beta, temperature)
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "fkl" if beta == 0.0 else "rkl"
    p, q = log_p.exp(), log_q.exp()
    if kind == "fkl":
        return (p * (log_p - log_q)).sum(-1)  # p = 0 times a finite difference: 0·log 0 = 0
    if kind == "rkl":
        return (q * (log_q - log_p)).sum(-1)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1) + 0.5 * (1.0 - p.sum(-1))
    # log m = log(β p + (1 − β) q), in log space so that tiny p and q do not underflow.
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * (p * (log_p - log_m)).sum(-1) + (1.0 - beta) * (q * (log_q - log_m)).sum(-1)


def divergence(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, kind: Divergence, *,
               beta: float = 0.5, temperature: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The DistillSpec loss: ``token_divergence`` per position, averaged over the selected positions.

    ``mask`` (bool or 0/1, shape ``student_logits.shape[:-1]``) selects the positions; ``None``
    selects all. Unselected positions do not change the value and get zero gradient (unless their
    teacher entries are NaN); the loss is 0 when no position is selected.
    """
    values = token_divergence(student_logits, teacher_log_probs, kind, beta=beta, temperature=temperature)
    return _masked_mean(values, _as_mask(mask, values.shape, "student_logits.shape[:-1]"))


@torch.no_grad()
def acceptance_rate(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, *,
                    temperature: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over selected positions of Σ min(p, q) = 1 − TVD: the probability that the target
    accepts a token drafted from q. A metric, computed without gradient."""
    log_q, log_p = _log_probs(student_logits, teacher_log_probs, "tvd", 0.5, temperature)
    accepted = torch.minimum(log_p, log_q).exp().sum(-1)  # min taken in log space: no cancellation
    return _masked_mean(accepted, _as_mask(mask, accepted.shape, "student_logits.shape[:-1]"))


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor, *,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross entropy, −log softmax(student_logits)[label], averaged over the positions
    whose label is >= 0 (and selected by ``mask``); 0 when there are none. The baseline that
    distillation is compared with."""
    _check_tensor(student_logits, "student_logits")
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise TypeError(f"labels must be an integer tensor, got {_describe(labels)}")
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels must have shape student_logits.shape[:-1] = "
                         f"{tuple(student_logits.shape[:-1])}, got {tuple(labels.shape)}")
    valid = labels >= 0
    selected = _as_mask(mask, labels.shape, "labels.shape")
    if selected is not None:
        valid = valid & selected
    log_q = torch.log_softmax(student_logits.to(_compute_dtype(student_logits)), dim=-1)
    nll = -log_q.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return _masked_mean(nll, valid)


def _log_probs(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, kind: str, beta: float,
               temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the arguments; return (log q, log p clamped to the floor) in the compute dtype."""
    if kind not in DIVERGENCES:
        raise ValueError(f"kind must be one of {DIVERGENCES}, got {kind!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    _check_tensor(student_logits, "student_logits")
    _check_tensor(teacher_log_probs, "teacher_log_probs")
    if teacher_log_probs.shape != student_logits.shape:
        raise ValueError(f"teacher_log_probs must have the shape of student_logits "
                         f"{tuple(student_logits.shape)}, got {tuple(teacher_log_probs.shape)}")
    dtype = torch.promote_types(_compute_dtype(student_logits), _compute_dtype(teacher_log_probs))
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    return log_q, teacher_log_probs.to(dtype).clamp_min(LOG_PROB_FLOOR)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_tensor(x: object, name: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {_describe(x)}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have a last (vocabulary) dimension, got shape ()")


def _describe(x: object) -> str:
    return f"tensor of dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


def _as_mask(mask: torch.Tensor | None, shape: torch.Size, expected: str) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.shape != shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must have shape {expected} = {tuple(shape)}, got {got}")
    return mask.bool()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    # where, not a product: an unselected value that is inf or NaN cannot leak into the mean.
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp_min(1)
