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

# How to build the optional C++ extension, and what a call that needs it says without it.
REBUILD_HINT = "pip install --no-build-isolation -e .  (needs a C++ compiler and pybind11)"
CPP_MISSING = f"backend 'cpp' is not available: the extension draftwise._C is not built. Rebuild with: {REBUILD_HINT}"

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


@dataclasses.dataclass(frozen=True)
class ChainInputs:
    """Validated, normalised inputs: what every backend implementation receives.

    Construction checks the type, shape, dtype and device of every field (never tensor contents)
    and raises ``TypeError``/``ValueError`` naming the field; it widens int32 draft ids and top-k
    to int64 (the ids of vLLM and FlashInfer are int32) and brings per-row floats to float32.
    Per-row parameters are ``[B]`` tensors on the logits' device. ``top_k == 0`` and
    ``top_p == 1`` switch the filter off; ``temperature == 0`` is greedy. Exactly one of ``seeds``
    and ``uniforms`` is set. Each backend checks the per-row values where it reads them
    (:func:`check_row_values`, or the C++ kernel itself). Draft ids outside ``[0, V)`` are not an
    error: they end the row's drafts, like ``PAD_TOKEN``.
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

    def __post_init__(self) -> None:
        batch, k, vocab = check_chain_tensors(self.draft_tokens, self.draft_probs, self.target_logits)
        device = self.target_logits.device
        normalised = dict(
            draft_tokens=_as_int64(self.draft_tokens),
            temperature=_row_tensor("temperature", self.temperature, batch, device, torch.float32),
            top_k=_row_tensor("top_k", self.top_k, batch, device, torch.int64),
            top_p=_row_tensor("top_p", self.top_p, batch, device, torch.float32),
            lenience_kind=_lenience_kind(self.lenience_kind),
            lenience_epsilon=_lenience_epsilon(self.lenience_epsilon),
            uniforms=_noise(self.seeds, self.uniforms, batch, k, vocab, device),
        )
        if not isinstance(self.return_accept_probs, bool):
            raise TypeError(f"return_accept_probs: expected a bool, got {_describe(self.return_accept_probs)}")
        for name, value in normalised.items():
            if value is not getattr(self, name):
                object.__setattr__(self, name, value)

    @property
    def shape(self) -> tuple[int, int, int]:
        batch, k = self.draft_tokens.shape
        return batch, k, self.target_logits.shape[-1]


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


def check_chain_tensors(draft_tokens, draft_probs, target_logits) -> tuple[int, int, int]:
    """Type, shape, dtype and device of the drafts and the target logits; returns ``(B, K, V)``."""
    if not isinstance(target_logits, torch.Tensor):
        raise TypeError(f"target_logits: expected a torch.Tensor, got {_describe(target_logits)}")
    device = target_logits.device
    _check_tensor("target_logits", target_logits, 3, device, floating=True)
    _check_tensor("draft_tokens", draft_tokens, 2, device, floating=False)
    if draft_tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"draft_tokens: expected an int64 or int32 tensor, got {_describe(draft_tokens)}")
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
    return batch, k, vocab


def _as_int64(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.int64 else x.long()


def _row_tensor(name: str, x, batch: int, device, dtype: torch.dtype) -> torch.Tensor:
    """A ``[B]`` tensor of a sampling parameter on ``device``, converted to ``dtype``.

    Float parameters take float, int32 and int64 tensors; integer ones any integer tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor of shape ({batch},), got {_describe(x)}")
    if x.shape != (batch,):
        raise ValueError(f"{name}: expected a tensor of shape ({batch},), got {_describe(x)}")
    if dtype.is_floating_point and not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name}: expected a float tensor, got {_describe(x)}")
    if not dtype.is_floating_point and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise TypeError(f"{name}: expected an integer tensor, got {_describe(x)}")
    if x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} like target_logits, got {_describe(x)}")
    return x if x.dtype == dtype else x.to(dtype)


def _per_row(name: str, value, batch: int, device, dtype, default) -> torch.Tensor:
    """A scalar or a ``[B]`` tensor of a sampling parameter -> a ``[B]`` tensor on ``device``."""
    if value is None:
        value = default
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(batch)
        return _row_tensor(name, value.to(device), batch, device, dtype)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number or a tensor of shape ({batch},), got {_describe(value)}")
    if not dtype.is_floating_point and not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {_describe(value)}")
    return torch.full((batch,), value, dtype=dtype, device=device)


def check_row_values(inp: ChainInputs) -> bool:
    """Raise ``ValueError`` on out-of-range per-row values; return whether some row uses top-k or
    top-p. Both come from one host sync (call it once per step, never per row)."""
    vocab = inp.shape[2]
    temperature, top_k, top_p = inp.temperature, inp.top_k, inp.top_p
    bad_temperature, bad_top_k, bad_top_p, any_filter = torch.stack([
        ~(temperature >= 0).all(),  # negative or NaN
        (top_k < 0).any(),
        ~((top_p > 0) & (top_p <= 1)).all(),
        ((top_k > 0) & (top_k < vocab)).any() | (top_p < 1).any(),
    ]).tolist()
    if bad_temperature:
        raise ValueError("temperature: expected values >= 0 (0 means greedy), got a negative or NaN value")
    if bad_top_k:
        raise ValueError("top_k: expected values >= 0 (0 or None switches it off), got a negative value")
    if bad_top_p:
        raise ValueError("top_p: expected values in (0, 1] (1 or None switches it off), got a value outside")
    return any_filter


def _lenience(lenience) -> tuple[LenienceKind, float]:
    if lenience is None:
        return LenienceKind.NONE, 1.0
    if isinstance(lenience, numbers.Real) and not isinstance(lenience, bool):
        lenience = Lenience("power", float(lenience))
    if not isinstance(lenience, Lenience):
        raise TypeError(f"lenience: expected None, a float epsilon or a Lenience, got {_describe(lenience)}")
    return lenience.code, float(lenience.epsilon)


def _lenience_kind(kind) -> LenienceKind:
    if isinstance(kind, bool) or not isinstance(kind, numbers.Integral):
        raise TypeError(f"lenience_kind: expected an int, one of {_lenience_codes()}, got {_describe(kind)}")
    try:
        return LenienceKind(kind)
    except ValueError:
        raise ValueError(f"lenience_kind: expected one of {_lenience_codes()}, got {kind!r}") from None


def _lenience_codes() -> str:
    return ", ".join(f"{int(code)} ({code.name.lower()})" for code in LenienceKind)


def _lenience_epsilon(epsilon) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        raise TypeError(f"lenience_epsilon: expected a float in (0, 1], got {_describe(epsilon)}")
    if not (0.0 < epsilon <= 1.0):
        raise ValueError(f"lenience_epsilon: expected a float in (0, 1], got {epsilon!r}")
    return float(epsilon)


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


def _noise(seeds, uniforms, batch: int, k: int, vocab: int, device) -> Optional[Uniforms]:
    """Checks that exactly one of ``seeds`` (``[B]`` int64) and ``uniforms`` is given; returns the
    uniforms as :class:`Uniforms`."""
    if (seeds is None) == (uniforms is None):
        given = "both" if seeds is not None else "neither"
        raise ValueError(f"seeds: expected exactly one of seeds and uniforms, got {given}")
    if uniforms is not None:
        return _uniforms(uniforms, batch, k, vocab, device)
    _check_tensor("seeds", seeds, 1, device, floating=False)
    if seeds.dtype != torch.int64:
        raise TypeError(f"seeds: expected an int64 tensor of shape ({batch},), got {_describe(seeds)}")
    if seeds.shape != (batch,):
        raise ValueError(f"seeds: expected an int64 tensor of shape ({batch},), got {_describe(seeds)}")
    return None


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

    Raises ``TypeError``/``ValueError`` naming the argument, what was expected and what came. The
    per-row values (negative temperature, top-p outside (0, 1] ...) are rejected by the backend
    that reads them (:func:`check_row_values`), so a call costs one host sync at most.
    """
    batch, k, vocab = check_chain_tensors(draft_tokens, draft_probs, target_logits)
    device = target_logits.device
    temperature_rows = _per_row("temperature", temperature, batch, device, torch.float32, 1.0)
    top_k_rows = _per_row("top_k", top_k, batch, device, torch.int64, 0)
    top_p_rows = _per_row("top_p", top_p, batch, device, torch.float32, 1.0)
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
