"""Input builders shared by the kernel tests: shapes and (p, q) regimes of TESTING.md."""

from __future__ import annotations

import torch

from draftwise.kernels import PAD_TOKEN, Uniforms

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
):
    """``(draft_tokens [B,K], draft_probs [B,K,V] | None, target_logits [B,K+1,V])``.

    random: independent p and q; equal: q = p; disjoint: q puts its mass where p has none;
    onehot: draft_probs None; peaked: p and q concentrated on the same few tokens.
    """
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, k + 1, vocab, generator=g) * 2.0
    if regime == "peaked":
        logits = logits * 6.0
    draft_logits = torch.randn(batch, k, vocab, generator=g) * 2.0
    if regime == "equal":
        draft_logits = logits[:, :k].clone()
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
    if regime == "equal":
        q = torch.softmax(logits[:, :k].double(), -1)
    draft_probs = None if regime == "onehot" else q.to(dtype)
    return tokens, draft_probs, logits.to(dtype)


def make_uniforms(batch: int, k: int, vocab: int, seed: int = 1) -> Uniforms:
    """Noise strictly inside (0, 1), as the kernels' own generator makes it."""
    g = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return (torch.randint(0, 2**23, shape, generator=g).double() + 0.5) * 2.0**-23

    return Uniforms(accept=draw(batch, k), race=draw(batch, k + 1, vocab))
