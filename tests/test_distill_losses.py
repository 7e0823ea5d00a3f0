"""DistillSpec losses against direct float64 formulas, closed-form gradients and finite differences."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.special import xlogy

from draftwise.distill.losses import (
    DIVERGENCES,
    LOG_PROB_FLOOR,
    acceptance_rate,
    cross_entropy,
    divergence,
    token_divergence,
)

SHAPE = (2, 5, 11)
TEACHERS = ("normalised", "subset", "zeros")
F64 = {"atol": 1e-12, "rtol": 1e-10}


def _logits(shape=SHAPE, seed=0, scale=1.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=g, dtype=torch.float64)


def _teacher(case: str, shape=SHAPE, seed=1) -> torch.Tensor:
    """Teacher log-probabilities over the draft vocabulary, float64."""
    g = torch.Generator().manual_seed(seed)
    *lead, vocab = shape
    if case == "normalised":
        return torch.log_softmax(2 * torch.randn(shape, generator=g, dtype=torch.float64), -1)
    if case == "subset":  # a target over a larger vocabulary, restricted to the draft's ids: Σ p < 1
        full = torch.log_softmax(2 * torch.randn(*lead, vocab + 7, generator=g, dtype=torch.float64), -1)
        return full[..., torch.randperm(vocab + 7, generator=g)[:vocab]]
    assert case == "zeros"  # a truncated target: exact zeros, log p = -inf
    logits = 2 * torch.randn(shape, generator=g, dtype=torch.float64)
    drop = torch.rand(shape, generator=g) < 0.4
    drop[..., 0] = False
    return torch.log_softmax(logits.masked_fill(drop, -math.inf), -1)


def _reference(kind, logits, teacher, beta=0.5, temperature=1.0) -> torch.Tensor:
    """The divergences written from probabilities, in the logits' dtype."""
    q, p = torch.softmax(logits / temperature, -1), teacher.exp()
    if kind == "fkl":
        return (xlogy(p, p) - p * q.log()).sum(-1)
    if kind == "rkl":  # a zero of p costs what log p = LOG_PROB_FLOOR costs (documented floor)
        return (q * (q.log() - torch.where(p > 0, p.log(), LOG_PROB_FLOOR))).sum(-1)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1) + 0.5 * (1 - p.sum(-1))
    m = beta * p + (1 - beta) * q
    return beta * (xlogy(p, p) - xlogy(p, m)).sum(-1) + (1 - beta) * (q * (q.log() - m.log())).sum(-1)


def _grad(kind, logits, teacher, **kwargs) -> torch.Tensor:
    logits = logits.detach().requires_grad_()
    token_divergence(logits, teacher, kind, **kwargs).sum().backward()
    return logits.grad


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=["T1", "T0.7"])
@pytest.mark.parametrize("case", TEACHERS)
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_value_matches_formula(kind, case, temperature):
    logits, teacher = _logits(), _teacher(case)
    got = token_divergence(logits, teacher, kind, temperature=temperature)
    assert got.shape == SHAPE[:-1] and got.dtype == torch.float64
    torch.testing.assert_close(got, _reference(kind, logits, teacher, temperature=temperature), **F64)


@pytest.mark.parametrize("beta", [0.1, 0.3, 0.9])
@pytest.mark.parametrize("case", TEACHERS)
def test_jsd_value_other_betas(case, beta):
    logits, teacher = _logits(), _teacher(case)
    got = token_divergence(logits, teacher, "jsd", beta=beta)
    torch.testing.assert_close(got, _reference("jsd", logits, teacher, beta=beta), **F64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_low_precision_inputs_compute_in_float32(kind, dtype):
    logits, teacher = _logits().to(dtype), _teacher("subset").to(dtype)
    got = token_divergence(logits, teacher, kind)
    assert got.dtype == torch.float32
    expected = _reference(kind, logits.double(), teacher.double())
    torch.testing.assert_close(got, expected.float(), atol=2e-5, rtol=1e-4)


def test_jsd_beta_endpoints_are_forward_and_reverse_kl():
    logits, teacher = _logits(), _teacher("subset")
    assert torch.equal(token_divergence(logits, teacher, "jsd", beta=0.0), token_divergence(logits, teacher, "fkl"))
    assert torch.equal(token_divergence(logits, teacher, "jsd", beta=1.0), token_divergence(logits, teacher, "rkl"))
    # The endpoints are a convention: the formula itself goes to 0 there.
    assert token_divergence(logits, teacher, "jsd", beta=1e-6).abs().max() < 1e-4


def test_tvd_is_one_minus_overlap():
    logits, teacher = _logits(), _teacher("subset")
    q, p = torch.softmax(logits, -1), teacher.exp()
    overlap = torch.minimum(p, q).sum(-1)
    torch.testing.assert_close(token_divergence(logits, teacher, "tvd"), 1 - overlap, **F64)


# ---------------------------------------------------------------- gradients


def _closed_form(kind, logits, teacher, temperature):
    """d divergence / d logits, from the math."""
    q, p = torch.softmax(logits / temperature, -1), teacher.exp()
    log_p = teacher.clamp_min(LOG_PROB_FLOOR)
    if kind == "fkl":  # (s q − p)/T with s = Σ p; q − p for a normalised p
        return (p.sum(-1, keepdim=True) * q - p) / temperature
    if kind == "rkl":
        rkl = (q * (q.log() - log_p)).sum(-1, keepdim=True)
        return q * (q.log() - log_p - rkl) / temperature
    assert kind == "tvd"
    assert (q - p).abs().min() > 1e-9, "a tie q == p makes |p − q| non-differentiable"
    sign = torch.sign(q - p)
    return 0.5 * q * (sign - (q * sign).sum(-1, keepdim=True)) / temperature


@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=["T1", "T0.7"])
@pytest.mark.parametrize("case", TEACHERS)
@pytest.mark.parametrize("kind", ["fkl", "rkl", "tvd"])
def test_gradient_matches_closed_form(kind, case, temperature):
    logits, teacher = _logits(), _teacher(case)
    got = _grad(kind, logits, teacher, temperature=temperature)
    torch.testing.assert_close(got, _closed_form(kind, logits, teacher, temperature), **F64)


@pytest.mark.parametrize("beta", [0.1, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("case", TEACHERS)
def test_jsd_gradient_matches_autograd_of_formula(case, beta):
    logits, teacher = _logits(), _teacher(case)
    reference_logits = logits.clone().requires_grad_()
    _reference("jsd", reference_logits, teacher, beta=beta, temperature=0.8).sum().backward()
    got = _grad("jsd", logits, teacher, beta=beta, temperature=0.8)
    torch.testing.assert_close(got, reference_logits.grad, **F64)


GRADCHECK = [pytest.param(kind, 0.5, id=kind) for kind in DIVERGENCES] + [
    pytest.param("jsd", 0.3, id="jsd-beta0.3"),
    pytest.param("jsd", 0.9, id="jsd-beta0.9"),
]


@pytest.mark.parametrize("case", TEACHERS)
@pytest.mark.parametrize("kind, beta", GRADCHECK)
def test_gradcheck(kind, beta, case):
    shape = (2, 3, 6)
    logits, teacher = _logits(shape, seed=2).requires_grad_(), _teacher(case, shape, seed=3)
    assert torch.autograd.gradcheck(
        lambda z: token_divergence(z, teacher, kind, beta=beta, temperature=0.9), (logits,))


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_teacher_zeros_keep_everything_finite(kind):
    """-inf teacher entries, even a whole row of them (padding), give finite values and gradients,
    also towards a teacher that requires grad."""
    logits = _logits().float().requires_grad_()
    teacher = _teacher("zeros").float()
    teacher[0, 0] = -math.inf
    teacher.requires_grad_()
    values = token_divergence(logits, teacher, kind)
    values.sum().backward()
    assert values.isfinite().all()
    assert logits.grad.isfinite().all() and teacher.grad.isfinite().all()


def test_gradient_teeth():
    """Slightly wrong closed forms do not pass, so the gradient tests can fail."""
    logits, teacher = _logits(), _teacher("subset")
    q, p = torch.softmax(logits, -1), teacher.exp()
    without_mean = q * (q.log() - teacher)  # RKL gradient missing the − RKL term
    assert not torch.allclose(_grad("rkl", logits, teacher), without_mean, atol=1e-6)
    normalised_form = q - p  # FKL gradient that forgets Σ p < 1
    assert not torch.allclose(_grad("fkl", logits, teacher), normalised_form, atol=1e-6)
    assert not torch.allclose(_grad("fkl", logits, teacher, temperature=0.5), _closed_form("fkl", logits, teacher, 1.0),
                              atol=1e-6)


# ---------------------------------------------------------------- divergence, acceptance_rate, cross_entropy


def _mask(shape=SHAPE[:-1], seed=4) -> torch.Tensor:
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    mask.view(-1)[:2] = torch.tensor([True, False])
    return mask


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergence_honours_mask(kind):
    logits, teacher, mask = _logits(), _teacher("subset"), _mask()
    value = divergence(logits, teacher, kind, mask=mask)
    torch.testing.assert_close(value, token_divergence(logits, teacher, kind)[mask].mean(), **F64)
    torch.testing.assert_close(divergence(logits, teacher, kind, mask=mask.double()), value, **F64)
    torch.testing.assert_close(divergence(logits, teacher, kind), token_divergence(logits, teacher, kind).mean(),
                               **F64)

    # Whatever sits at unselected positions (here: other logits, an all -inf teacher) changes nothing.
    other_logits = torch.where(mask[..., None], logits, 10 * _logits(seed=9))
    other_teacher = teacher.masked_fill(~mask[..., None], -math.inf)
    other_logits.requires_grad_()
    other_value = divergence(other_logits, other_teacher, kind, mask=mask)
    torch.testing.assert_close(other_value, value, **F64)
    nan_teacher = teacher.masked_fill(~mask[..., None], math.nan)
    torch.testing.assert_close(divergence(logits, nan_teacher, kind, mask=mask), value, **F64)
    other_value.backward()
    assert torch.equal(other_logits.grad[~mask], torch.zeros_like(other_logits.grad[~mask]))
    assert other_logits.grad[mask].abs().sum() > 0


def test_divergence_with_nothing_selected_is_zero():
    logits = _logits().requires_grad_()
    value = divergence(logits, _teacher("normalised"), "fkl", mask=torch.zeros(SHAPE[:-1], dtype=torch.bool))
    value.backward()
    assert value.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("case", ["normalised", "subset"])
def test_acceptance_rate(case):
    logits, teacher, mask = _logits(), _teacher(case), _mask()
    rate = acceptance_rate(logits, teacher, temperature=0.8, mask=mask)
    torch.testing.assert_close(rate, 1 - divergence(logits, teacher, "tvd", temperature=0.8, mask=mask), **F64)
    overlap = torch.minimum(torch.softmax(logits / 0.8, -1), teacher.exp()).sum(-1)
    torch.testing.assert_close(rate, overlap[mask].mean(), **F64)


def test_acceptance_rate_is_one_for_the_same_distribution_and_has_no_gradient():
    logits = _logits().requires_grad_()
    rate = acceptance_rate(logits, torch.log_softmax(logits.detach() / 0.8, -1), temperature=0.8)
    assert not rate.requires_grad
    torch.testing.assert_close(rate, torch.tensor(1.0, dtype=torch.float64), **F64)


def test_acceptance_rate_below_one_for_a_subset_vocabulary():
    """With the target's mass outside the draft vocabulary, even q ∝ p falls short of 1."""
    teacher = _teacher("subset")
    outside = 1 - teacher.exp().sum(-1)
    rate = acceptance_rate(teacher, teacher)  # q = p / Σ p
    torch.testing.assert_close(rate, (1 - outside).mean(), **F64)


def test_cross_entropy():
    logits = _logits()
    labels = torch.randint(0, SHAPE[-1], SHAPE[:-1], generator=torch.Generator().manual_seed(5))
    labels[0, 0], labels[1, 3] = -1, -100  # (0, 0) is selected by _mask()
    flat_logits, flat_labels = logits.reshape(-1, SHAPE[-1]), labels.reshape(-1)
    expected = F.cross_entropy(flat_logits, flat_labels.masked_fill(flat_labels < 0, -100), ignore_index=-100)
    torch.testing.assert_close(cross_entropy(logits, labels), expected, **F64)

    mask = _mask()
    keep = (mask & (labels >= 0)).reshape(-1)
    expected = F.cross_entropy(flat_logits[keep], flat_labels[keep])
    torch.testing.assert_close(cross_entropy(logits, labels, mask=mask), expected, **F64)
    assert cross_entropy(logits, torch.full_like(labels, -1)).item() == 0.0


# ---------------------------------------------------------------- bad input


def _z():
    return torch.zeros(2, 3, 6)


BAD = [
    pytest.param(lambda: token_divergence(_z(), _z(), "kl"), ValueError, "kind", id="kind-unknown"),
    pytest.param(lambda: token_divergence(_z(), _z(), "jsd", beta=-0.1), ValueError, "beta", id="beta-negative"),
    pytest.param(lambda: token_divergence(_z(), _z(), "jsd", beta=1.5), ValueError, "beta", id="beta-above-one"),
    pytest.param(lambda: divergence(_z(), _z(), "jsd", beta=math.nan), ValueError, "beta", id="beta-nan"),
    pytest.param(lambda: token_divergence(_z(), _z(), "fkl", temperature=0.0), ValueError, "temperature",
                 id="temperature-zero"),
    pytest.param(lambda: divergence(_z(), _z(), "rkl", temperature=-1.0), ValueError, "temperature",
                 id="temperature-negative"),
    pytest.param(lambda: acceptance_rate(_z(), _z(), temperature=math.nan), ValueError, "temperature",
                 id="temperature-nan"),
    pytest.param(lambda: token_divergence(_z(), torch.zeros(2, 3, 7), "fkl"), ValueError, "teacher_log_probs",
                 id="vocab-mismatch"),
    pytest.param(lambda: divergence(_z(), torch.zeros(3, 2, 6), "tvd"), ValueError, "teacher_log_probs",
                 id="leading-dims-mismatch"),
    pytest.param(lambda: token_divergence(torch.zeros(()), torch.zeros(()), "fkl"), ValueError, "student_logits",
                 id="scalar-logits"),
    pytest.param(lambda: divergence(_z(), _z(), "fkl", mask=torch.ones(2, dtype=torch.bool)), ValueError, "mask",
                 id="mask-shape"),
    pytest.param(lambda: acceptance_rate(_z(), _z(), mask=torch.ones(2, 3, 6)), ValueError, "mask",
                 id="rate-mask-shape"),
    pytest.param(lambda: cross_entropy(_z(), torch.zeros(2, 4, dtype=torch.int64)), ValueError, "labels",
                 id="labels-shape"),
    pytest.param(lambda: cross_entropy(_z(), torch.zeros(2, 3, dtype=torch.int64), mask=torch.ones(3)), ValueError,
                 "mask", id="ce-mask-shape"),
    pytest.param(lambda: cross_entropy(_z(), torch.zeros(2, 3)), TypeError, "labels", id="labels-float"),
    pytest.param(lambda: token_divergence(torch.zeros(2, 3, 6, dtype=torch.int64), _z(), "fkl"), TypeError,
                 "student_logits", id="logits-int"),
    pytest.param(lambda: divergence(_z(), [[0.0]], "fkl"), TypeError, "teacher_log_probs", id="teacher-list"),
]


@pytest.mark.parametrize("call, error, name", BAD)
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


def test_unknown_kind_lists_the_valid_ones():
    with pytest.raises(ValueError) as info:
        token_divergence(_z(), _z(), "kl")
    assert all(repr(kind) in str(info.value) for kind in DIVERGENCES)
