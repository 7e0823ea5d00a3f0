"""The teacher's log-probabilities kept compactly: the ``k`` largest per position, the rest as one number.

A dense record costs ``positions × V_draft × 2`` bytes (fp16): 630 MB for 400 answers of 96 tokens
over an 8192-id draft vocabulary, and no dense record over a 262k-id vocabulary fits at all. A
:class:`TopKLogProbs` keeps, per position, the ids (in the target's full vocabulary) and
log-probabilities of the ``k`` most likely tokens: ``6 k`` bytes. The mass outside them is known
exactly (``1 − Σ top-k``) and spread evenly over the other ``V − k`` ids when a dense row is rebuilt
(:meth:`TopKLogProbs.dense`): the top ``k`` are exact, the total is exact, the tail is flat.

Because the ids are full-vocabulary ids, the draft's reduced vocabulary can be chosen after the
target has answered (from the answers themselves) and changed later without asking the target again.
"""

from __future__ import annotations

import dataclasses

import torch

POSITION_BYTES_PER_ENTRY = 6  # an int32 id and an fp16 log-probability


@dataclasses.dataclass
class TopKLogProbs:
    """``ids [n, k]`` int32 full-vocabulary ids and ``values [n, k]`` fp16 log-probabilities (the
    ``k`` largest of each of ``n`` positions, normalised over the full ``vocab``)."""

    ids: torch.Tensor
    values: torch.Tensor
    vocab: int

    @classmethod
    def from_log_probs(cls, log_probs: torch.Tensor, k: int) -> "TopKLogProbs":
        """Keep the ``k`` largest of each row of full-vocabulary ``log_probs [n, V]``."""
        if not 0 < k <= log_probs.shape[-1]:
            raise ValueError(f"k: expected an int in [1, {log_probs.shape[-1]}], got {k!r}")
        values, ids = log_probs.topk(k, dim=-1)
        return cls(ids.to(torch.int32).cpu(), values.half().cpu(), log_probs.shape[-1])

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.values.nbytes

    def split(self, sizes: list[int]) -> list["TopKLogProbs"]:
        return [TopKLogProbs(i, v, self.vocab) for i, v in zip(self.ids.split(sizes), self.values.split(sizes))]

    def dense(self, vocab_ids: torch.Tensor | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 log-probabilities ``[n, len(vocab_ids)]`` (or ``[n, vocab]``): exact for the kept
        ids, ``log((1 − Σ kept) / (V − k))`` for every other id (−inf when the kept ids hold all the
        mass). Sub-normalised over a reduced vocabulary, as the losses expect. ``index``: the
        :func:`column_index` of ``vocab_ids``, when the caller keeps it across records."""
        values = self.values.float()
        n, k = values.shape
        rest = (1.0 - values.exp().sum(-1)).clamp_min(0.0) / max(self.vocab - k, 1)
        width = self.vocab if vocab_ids is None else len(vocab_ids)
        columns = self.ids.long()
        if vocab_ids is not None:
            columns = (column_index(vocab_ids, self.vocab) if index is None else index)[columns]
        out = rest.log().unsqueeze(1).expand(n, width + 1).clone()
        out.scatter_(1, columns, values)
        return out[:, :width]


def column_index(vocab_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Full id -> its column in the draft vocabulary ``vocab_ids``; ``len(vocab_ids)`` for ids outside it."""
    index = torch.full((vocab,), len(vocab_ids), dtype=torch.long)
    index[vocab_ids.cpu()] = torch.arange(len(vocab_ids))
    return index


def dense_teacher(teacher, vocab_ids: torch.Tensor | None, index: torch.Tensor | None = None) -> torch.Tensor:
    """A teacher record as a dense float32 tensor over the draft's vocabulary (a dense record as is);
    ``index`` as for :meth:`TopKLogProbs.dense`."""
    if isinstance(teacher, TopKLogProbs):
        return teacher.dense(vocab_ids, index)
    return teacher.float()


def record_bytes(positions: int, k: int) -> int:
    """The bytes of ``positions`` top-``k`` records."""
    return positions * k * POSITION_BYTES_PER_ENTRY


def readable_size(size: int) -> str:
    """``size`` bytes as KiB, MiB or GiB."""
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}"
