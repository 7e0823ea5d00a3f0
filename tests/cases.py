"""Input builders shared by the kernel tests: batches of drafted chains in five (p, q) regimes,
and the chain backends with the device each runs on."""

from __future__ import annotations

import pytest
import torch

from draftwise.kernels import PAD_TOKEN, Uniforms, available_backends


def device_of(backend: str) -> str:
    """Where ``backend`` runs: Triton on CUDA when there is a device (else its interpreter), the rest on the CPU."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


BACKENDS = [  # every chain backend, skipped where it cannot run
    pytest.param(name, id=name, marks=[] if name in available_backends(device_of(name)) else
                 pytest.mark.skip(reason=f"backend {name!r} is not available here"))
    for name in ("torch", "cpp", "triton")
]


def on(device: str, value):
    """Tensors and :class:`Uniforms` moved to ``device``, also inside tuples and dicts; other values
    as they are."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Uniforms):
        return Uniforms(*(u.to(device) for u in value))
    if isinstance(value, dict):
        return {name: on(device, item) for name, item in value.items()}
    if isinstance(value, tuple) and not hasattr(value, "_fields"):  # a plain tuple, not a named one
        return tuple(on(device, item) for item in value)
    return value

REGIMES = ("random", "equal", "disjoint", "onehot", "peaked")


def make_case(
    batch: int,
    k: int,
    vocab: int,
    regime: str = "random",
    *,
    ragged: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
):
    """``(draft_tokens [B,K], draft_probs [B,K,V] | None, target_logits [B,K+1,V])`` on ``device``.

    random: independent p and q; equal: q = p (of the logits as rounded to ``dtype``); disjoint:
    q puts its mass where p has none; onehot: draft_probs None; peaked: p and q concentrated on
    the same few tokens. ragged: rows end their drafts at random lengths with ``PAD_TOKEN``, and
    row 0 also holds the id ``V + 3`` at position ``K // 2`` (any id outside ``[0, V)`` ends a
    row's drafts the same way).
    """
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, k + 1, vocab, generator=g) * 2.0
    if regime == "peaked":
        logits = logits * 6.0
    draft_logits = torch.randn(batch, k, vocab, generator=g) * 2.0
    if regime == "equal":
        draft_logits = logits[:, :k].to(dtype).double()
    elif regime == "peaked":
        draft_logits = logits[:, :k] + 0.5 * torch.randn(batch, k, vocab, generator=g)
    elif regime == "disjoint" and vocab > 1:
        half = vocab // 2
        logits[..., half:] = -torch.inf
        draft_logits[..., :half] = -torch.inf
    q = torch.softmax(draft_logits.double(), -1)
    if k > 0:
        tokens = torch.multinomial(q.reshape(-1, vocab), 1, generator=g).view(batch, k)
    else:
        tokens = torch.empty(batch, 0, dtype=torch.int64)
    if ragged and k > 0:
        lengths = torch.randint(0, k + 1, (batch,), generator=g)
        tokens[torch.arange(k).view(1, -1) >= lengths.view(-1, 1)] = PAD_TOKEN
        tokens[0, k // 2] = vocab + 3
    draft_probs = None if regime == "onehot" else q.to(dtype).to(device)
    return tokens.to(device), draft_probs, logits.to(dtype).to(device)


def make_uniforms(batch: int, k: int, vocab: int, seed: int = 1, device: torch.device | str = "cpu") -> Uniforms:
    """Noise strictly inside (0, 1), exact in float32, as the kernels' own generator makes it."""
    g = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return ((torch.randint(0, 2**23, shape, generator=g).double() + 0.5) * 2.0**-23).to(device)

    return Uniforms(accept=draw(batch, k), race=draw(batch, k + 1, vocab))


def make_residual_case():
    """p = q exactly (uniform over 4 of V = 100 tokens) with drafts in and out of the support:
    ``(case, support, expected num_accepted)``. A draft outside the support is rejected (0 < 0 fails)
    and leaves the residual max(0, p - q) all zero, so the emitted token must come from p."""
    batch, k, vocab = 6, 3, 100
    support = torch.tensor([5, 40, 41, 97])
    logits = torch.full((batch, k + 1, vocab), -torch.inf)
    logits[..., support] = 0.0
    draft_probs = torch.zeros(batch, k, vocab)
    draft_probs[..., support] = 0.25
    tokens = torch.tensor([[5, 40, 60], [3, 5, 5], [97, 41, 2], [41, 0, 0], [6, 7, 8], [5, 97, 41]])
    return (tokens, draft_probs, logits), support, [2, 0, 2, 1, 0, 3]
