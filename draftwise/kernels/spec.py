"""The contract of chain verification, shared by every backend.

Glossary (one speculative step of one row):

- **drafted**: the tokens a draft proposed, ``draft_tokens[b, :k_b]``; ``PAD_TOKEN`` (-1) fills
  the rest of the row. Any id outside ``[0, V)`` ends the row's drafts.
- **accepted**: the leading drafted tokens that passed verification (``num_accepted[b]`` of them).
- **recovered**: the token sampled from the residual ``norm(max(0, p - q))`` at the first
  rejected position (greedy rows: the target's argmax there).
- **bonus**: the token sampled from the target at position ``k_b`` when every drafted token was
  accepted.
- **emitted**: accepted tokens followed by the one recovered or bonus token:
  ``num_accepted[b] + 1`` tokens, then ``PAD_TOKEN``.

How the target distribution ``p`` is formed from ``target_logits`` (the same in every backend):
inputs are rounded to float32 (the math is float32); NaN logits count as the lowest value and
every logit is clamped to the float32 range, so a row of NaN or -inf is uniform and +inf entries
share the mass; then temperature, top-k (keep a token when fewer than ``k`` logits are strictly
larger; ties at the k-th value are kept) and top-p (keep a token when the weight of strictly
larger logits is below ``top_p`` of the weight kept by top-k; ties are kept or dropped
together), in that order, as Hugging Face's warpers apply them.

Sampling at the emitted position j is an exponential race: ``argmax_v r(v) / E_v`` with
``E_v = -log(1 - t_v)`` ~ Exp(1) samples ``norm(r)`` exactly (lowest index on ties).

Randomness: Philox4x32-10 keyed by the row's 64-bit seed; the counter is ``(v, position,
stream, 0)`` with stream 0 for the acceptance draw (v = 0) and stream 1 for the race over the
vocabulary. Of word 0, x, the acceptance draw is ``u = ((x >> 9) + 0.5) / 2**23`` (exact in
float32, strictly inside (0, 1)) and the race draw is ``t = float32(x | 1) / 2**32`` (in (0, 1],
full float32 precision near 0, where the race is decided, so ties stay at float32 rounding
level even over 10**5 equally likely tokens). A row's tokens therefore depend on its seed and
inputs only, never on the batch.
"""

from __future__ import annotations

import dataclasses
import enum
import numbers
from typing import NamedTuple, Optional, Union

import torch

PAD_TOKEN = -1

ScalarOrRows = Union[float, int, torch.Tensor, None]


class VerifyOutput(NamedTuple):
    """Result of :func:`draftwise.kernels.verify_chain`.

    output_tokens: ``[B, K+1]`` int64, accepted tokens then the recovered or bonus token, then -1.
    num_accepted: ``[B]`` int64.
    accept_probs: ``[B, K]`` float32, the probability that a draft from q_i passes position i:
        ``sum_v min(p_i(v), q_i(v))`` (``sum_v min(q_i, f(p_i))`` with lenience; ``q_i(argmax p_i)``
        for greedy rows), NaN on padded positions; ``None`` when not asked for.
    """

    output_tokens: torch.Tensor
    num_accepted: torch.Tensor
    accept_probs: Optional[torch.Tensor] = None


class Uniforms(NamedTuple):
    """Injected noise, float32-exact values (backends read them as float32).

    accept: ``[B, K]`` in (0, 1), the draw ``u`` of each acceptance test ``u * q(x) < f(p(x))``.
    race: ``[B, K+1, V]`` in (0, 1], the race draws: the emitted token at position j is
        ``argmax_v r(v) / -log(1 - race[b, j, v])``.
    """

    accept: torch.Tensor
    race: torch.Tensor


class LenienceKind(enum.IntEnum):
    """Lenience functions f(p, eps) of DistillSpec's lossy speculative sampling."""

    NONE = 0
    LINEAR = 1  # f = p / eps
    SQUARE = 2  # f = p / eps**2
    POWER = 3  # f = p ** eps (the paper's preferred trade-off)


@dataclasses.dataclass(frozen=True)
class Lenience:
    """Lossy acceptance: accept x with probability ``min(1, f(p(x), epsilon) / q(x))``.

    ``epsilon`` in (0, 1]; 1 is lossless. The residual stays ``norm(max(0, p - q))`` because
    ``f >= p``. A bare float passed as ``lenience`` means ``Lenience("power", epsilon)``.
    """

    kind: str = "power"
    epsilon: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "square", "power"):
            raise ValueError(
                f"lenience: kind must be 'linear', 'square' or 'power', got {self.kind!r}"
            )
        if not (0.0 < float(self.epsilon) <= 1.0):
            raise ValueError(f"lenience: epsilon must be in (0, 1], got {self.epsilon!r}")

    @property
    def code(self) -> LenienceKind:
        return LenienceKind[self.kind.upper()]


@dataclasses.dataclass
class ChainInputs:
    """Validated, normalised inputs: what every backend implementation receives.

    Per-row parameters are tensors on the logits' device. ``top_k == 0`` and ``top_p == 1``
    switch the filter off; ``temperature == 0`` is greedy. Exactly one of ``seeds`` and
    ``uniforms`` is set.
    """

    draft_tokens: torch.Tensor  # [B, K] int64
    draft_probs: Optional[torch.Tensor]  # [B, K, V] float, or None for one-hot drafts
    target_logits: torch.Tensor  # [B, K+1, V] float
    temperature: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64
    top_p: torch.Tensor  # [B] float32
    lenience_kind: LenienceKind
    lenience_epsilon: float
    seeds: Optional[torch.Tensor]  # [B] int64
    uniforms: Optional[Uniforms]
    return_accept_probs: bool

    @property
    def shape(self) -> tuple[int, int, int]:
        batch, k = self.draft_tokens.shape
        return batch, k, self.target_logits.shape[-1]

    @property
    def any_filter(self) -> bool:
        """True when some row uses top-k or top-p (one host sync; call outside hot loops)."""
        vocab = self.shape[2]
        return bool(((self.top_k > 0) & (self.top_k < vocab)).any() or (self.top_p < 1).any())


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return f"{type(x).__name__} {x!r}"


def _check_tensor(name: str, x, ndim: int, device: torch.device, floating: bool) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {_describe(x)}")
    if x.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got {_describe(x)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {_describe(x)}")
    if x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} like target_logits, got {_describe(x)}")


def _per_row(name: str, value, batch: int, device, dtype, default, integer: bool) -> torch.Tensor:
    """A scalar or a ``[B]`` tensor of a sampling parameter -> a ``[B]`` tensor on ``device``."""
    if value is None:
        value = default
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(batch)
        if value.shape != (batch,):
            raise ValueError(f"{name}: expected a scalar or a tensor of shape ({batch},), got {_describe(value)}")
        if integer and value.is_floating_point():
            raise TypeError(f"{name}: expected an integer tensor, got {_describe(value)}")
        if not integer and not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name}: expected a float tensor, got {_describe(value)}")
        return value.to(device=device, dtype=dtype)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number or a tensor of shape ({batch},), got {_describe(value)}")
    if integer and not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {_describe(value)}")
    return torch.full((batch,), value, dtype=dtype, device=device)


def _check_ranges(temperature, top_k, top_p) -> None:
    """Value checks on the per-row parameters (one host sync when they live on a GPU)."""
    bad = torch.stack([
        (temperature < 0).any() | temperature.isnan().any(),
        (top_k < 0).any(),
        ((top_p <= 0) | (top_p > 1) | top_p.isnan()).any(),
    ]).tolist()
    if bad[0]:
        raise ValueError("temperature: expected values >= 0 (0 means greedy), got a negative or NaN value")
    if bad[1]:
        raise ValueError("top_k: expected values >= 0 (0 or None switches it off), got a negative value")
    if bad[2]:
        raise ValueError("top_p: expected values in (0, 1] (1 or None switches it off), got a value outside")


def _lenience(lenience) -> tuple[LenienceKind, float]:
    if lenience is None:
        return LenienceKind.NONE, 1.0
    if isinstance(lenience, numbers.Real) and not isinstance(lenience, bool):
        lenience = Lenience("power", float(lenience))
    if not isinstance(lenience, Lenience):
        raise TypeError(f"lenience: expected None, a float epsilon or a Lenience, got {_describe(lenience)}")
    return lenience.code, float(lenience.epsilon)


def _seeds(seed, batch: int, device) -> torch.Tensor:
    """Row seeds: a ``[B]`` int64 tensor as given; an int gives row b the seed ``seed + b``."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(seed, torch.Tensor):
        if seed.shape != (batch,) or seed.dtype != torch.int64:
            raise ValueError(f"seed: expected an int or an int64 tensor of shape ({batch},), got {_describe(seed)}")
        return seed.to(device)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed: expected an int or an int64 tensor of shape ({batch},), got {_describe(seed)}")
    if not (-(2**63) <= seed < 2**63 - batch):
        raise ValueError(f"seed: expected a 64-bit integer, got {seed}")
    return torch.arange(batch, dtype=torch.int64, device=device) + seed


def _uniforms(uniforms, batch: int, k: int, vocab: int, device) -> Uniforms:
    if not (isinstance(uniforms, tuple) and len(uniforms) == 2):
        raise TypeError(f"uniforms: expected Uniforms(accept, race), got {_describe(uniforms)}")
    accept, race = uniforms
    _check_tensor("uniforms.accept", accept, 2, device, floating=True)
    _check_tensor("uniforms.race", race, 3, device, floating=True)
    if accept.shape != (batch, k):
        raise ValueError(f"uniforms.accept: expected shape ({batch}, {k}), got {_describe(accept)}")
    if race.shape != (batch, k + 1, vocab):
        raise ValueError(f"uniforms.race: expected shape ({batch}, {k + 1}, {vocab}), got {_describe(race)}")
    return Uniforms(accept, race)


def normalize_inputs(
    draft_tokens,
    draft_probs,
    target_logits,
    *,
    temperature: ScalarOrRows = 1.0,
    top_k: ScalarOrRows = None,
    top_p: ScalarOrRows = None,
    lenience=None,
    seed=None,
    uniforms=None,
    return_accept_probs: bool = False,
) -> ChainInputs:
    """Validate the public arguments of ``verify_chain`` and bring them to one form.

    Raises ``TypeError``/``ValueError`` naming the argument, what was expected and what came.
    """
    if not isinstance(target_logits, torch.Tensor):
        raise TypeError(f"target_logits: expected a torch.Tensor, got {_describe(target_logits)}")
    device = target_logits.device
    _check_tensor("target_logits", target_logits, 3, device, floating=True)
    _check_tensor("draft_tokens", draft_tokens, 2, device, floating=False)
    if draft_tokens.dtype != torch.int64:
        raise TypeError(f"draft_tokens: expected an int64 tensor, got {_describe(draft_tokens)}")
    batch, k = draft_tokens.shape
    vocab = target_logits.shape[-1]
    if target_logits.shape[:2] != (batch, k + 1):
        raise ValueError(
            f"target_logits: expected shape ({batch}, {k + 1}, V) for draft_tokens of shape "
            f"({batch}, {k}), got {_describe(target_logits)}"
        )
    if vocab < 1:
        raise ValueError(f"target_logits: expected a vocabulary of at least 1, got {_describe(target_logits)}")
    if draft_probs is not None:
        _check_tensor("draft_probs", draft_probs, 3, device, floating=True)
        if draft_probs.shape != (batch, k, vocab):
            hint = " (V mismatch: the draft's vocabulary differs from the target's)" if (
                draft_probs.shape[:2] == (batch, k)) else ""
            raise ValueError(
                f"draft_probs: expected shape ({batch}, {k}, {vocab}){hint}, got {_describe(draft_probs)}"
            )
    if not isinstance(return_accept_probs, bool):
        raise TypeError(f"return_accept_probs: expected a bool, got {_describe(return_accept_probs)}")

    temperature_rows = _per_row("temperature", temperature, batch, device, torch.float32, 1.0, integer=False)
    top_k_rows = _per_row("top_k", top_k, batch, device, torch.int64, 0, integer=True)
    top_p_rows = _per_row("top_p", top_p, batch, device, torch.float32, 1.0, integer=False)
    if batch > 0:
        _check_ranges(temperature_rows, top_k_rows, top_p_rows)
    lenience_kind, lenience_epsilon = _lenience(lenience)

    if uniforms is not None:
        if seed is not None:
            raise ValueError("seed: pass either seed or uniforms, not both")
        uniforms, seeds = _uniforms(uniforms, batch, k, vocab, device), None
    else:
        seeds = _seeds(seed, batch, device)

    return ChainInputs(
        draft_tokens=draft_tokens,
        draft_probs=draft_probs,
        target_logits=target_logits,
        temperature=temperature_rows,
        top_k=top_k_rows,
        top_p=top_p_rows,
        lenience_kind=lenience_kind,
        lenience_epsilon=lenience_epsilon,
        seeds=seeds,
        uniforms=uniforms,
        return_accept_probs=return_accept_probs,
    )
