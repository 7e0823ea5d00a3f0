"""Hugging Face logits processors inside speculative decoding.

``model.generate`` applies its processors (repetition penalty, minimum length, banned words,
n-gram blocking, min-p, user processors …) to the scores of one position, given the ids before
it. A verification forward scores several positions at once, each after a different prefix: the
committed tokens plus the drafts before it. :class:`ScoreProcessing` runs the processors on every
position with exactly the ids ``model.generate`` would have had there (the row's prompt as
passed, left padding included, then its generated tokens, then the drafts before the position),
so the verified law is the processed one. A draft model's tokens are drawn from its own logits
processed the same way, and that law is what verification compares against.

Processors must be row-wise (a row's scores depend on that row's ids only), as all of Hugging
Face's are: rows are processed one at a time, each with its own list (the lists of one call
differ only in per-row details such as the prompt's padding). A processor runs once per scored
position, also for drafts that are then rejected.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList

from .sequence import TokenBuffer


class ScoreProcessing:
    """Per-row processor lists and the prompts as passed (``prompt_ids [B, W]``)."""

    def __init__(self, processors: list[LogitsProcessorList], prompt_ids: torch.Tensor):
        if len(processors) != prompt_ids.shape[0]:
            raise ValueError(f"processors: expected one list per row ({prompt_ids.shape[0]}), got {len(processors)}")
        self.processors = list(processors)
        self.prompt_ids = prompt_ids

    def __call__(self, buffer: TokenBuffer, proposals: torch.Tensor, logits: torch.Tensor, first: int = 0) -> torch.Tensor:
        """Processed float32 scores of ``logits [B, J, V]``, the positions ``first .. first+J-1``
        after the committed tokens: position i follows the row's first i ``proposals [B, >= i]``.
        Positions after a row's last proposal (``PAD_TOKEN``) are left unprocessed (nothing reads them)."""
        scores = logits.float().clone()
        width = buffer.prompt_length
        lengths = buffer.lengths.tolist()
        proposed = (proposals >= 0).long().cumprod(-1).sum(-1).tolist()  # proposals are a prefix
        for row, processors in enumerate(self.processors):
            history = torch.cat([self.prompt_ids[row], buffer.tokens[row, width: lengths[row]],
                                 proposals[row, : proposed[row]]])
            committed = lengths[row]
            for j in range(scores.shape[1]):
                position = first + j
                if position > proposed[row]:
                    break
                ids = history[: committed + position].view(1, -1)
                scores[row, j] = processors(ids, scores[row, j].view(1, -1))[0]
        return scores

    def select_rows(self, rows: torch.Tensor) -> None:
        self.processors = [self.processors[i] for i in rows.tolist()]
        self.prompt_ids = self.prompt_ids[rows]


class ScoreRecord:
    """Each row's logits and processed scores at every emitted position (``output_logits`` /
    ``output_scores``), assembled into Hugging Face's per-step tuples at the end."""

    def __init__(self, batch: int, scores: bool, logits: bool):
        self.want_scores, self.want_logits = scores, logits
        self.scores: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        self.logits: list[list[torch.Tensor]] = [[] for _ in range(batch)]

    def add(self, rows: torch.Tensor, counts: torch.Tensor, logits: torch.Tensor, scores: torch.Tensor) -> None:
        for row, original, count in zip(range(len(rows)), rows.tolist(), counts.tolist()):
            if self.want_scores:
                self.scores[original].append(scores[row, :count].float())
            if self.want_logits:
                self.logits[original].append(logits[row, :count].float())

    def steps(self, which: str) -> tuple[torch.Tensor, ...] | None:
        """``(step_0 [B, V], step_1, ...)`` as Hugging Face returns them; a row that has ended
        holds zeros in the steps after its last token (Hugging Face pads it with its pad token)."""
        if not getattr(self, f"want_{which}"):
            return None
        per_row = [torch.cat(chunks) for chunks in getattr(self, which)]
        steps = max(len(r) for r in per_row)
        padded = [torch.nn.functional.pad(r, (0, 0, 0, steps - len(r))) for r in per_row]
        return tuple(torch.stack(padded, 0).unbind(1))
