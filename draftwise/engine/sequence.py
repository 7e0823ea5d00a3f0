"""The committed tokens of every row: left-padded prompts followed by what was emitted."""

from __future__ import annotations

import dataclasses

import torch

from draftwise.kernels import PAD_TOKEN


@dataclasses.dataclass
class TokenBuffer:
    """``tokens[b, :lengths[b]]`` are row b's committed tokens; slots before ``starts[b]`` are the
    prompt's left padding. Slot indices are the KV-cache slots of every model (same layout).

    The last committed token of a row is always the one the target has not processed yet.
    """

    tokens: torch.Tensor  # [B, capacity] int64, PAD_TOKEN past each row's length
    lengths: torch.Tensor  # [B] int64
    starts: torch.Tensor  # [B] int64
    prompt_length: int  # the padded prompt width T (the same for every row)

    @classmethod
    def from_prompt(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, capacity: int) -> TokenBuffer:
        batch, width = input_ids.shape
        tokens = torch.full((batch, capacity), PAD_TOKEN, dtype=torch.int64, device=input_ids.device)
        tokens[:, :width] = torch.where(attention_mask.bool(), input_ids, PAD_TOKEN)
        starts = width - attention_mask.long().sum(-1)
        lengths = torch.full((batch,), width, dtype=torch.int64, device=input_ids.device)
        return cls(tokens, lengths, starts, width)

    @property
    def capacity(self) -> int:
        return self.tokens.shape[1]

    def tail(self, since: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens of each row from slot ``since[b]`` to its end, left-aligned in a block.

        Returns ``(block [B, W], counts [B])``; ``W = width`` or the largest count (one host sync).
        Entries past a row's count are ``PAD_TOKEN``.
        """
        counts = self.lengths - since
        width = int(counts.max()) if width is None else width
        columns = since.view(-1, 1) + torch.arange(width, device=since.device).view(1, -1)
        block = self.tokens.gather(1, columns.clamp(max=self.capacity - 1))
        return torch.where(columns < self.lengths.view(-1, 1), block, PAD_TOKEN), counts

    def append(self, new_tokens: torch.Tensor, counts: torch.Tensor) -> None:
        """Append ``new_tokens[b, :counts[b]]`` to row b (one scatter; slots past a row's length
        hold ``PAD_TOKEN``, so writing padding there changes nothing)."""
        offsets = torch.arange(new_tokens.shape[1], device=counts.device).view(1, -1)
        columns = (self.lengths.view(-1, 1) + offsets).clamp(max=self.capacity - 1)
        values = torch.where(offsets < counts.view(-1, 1), new_tokens, PAD_TOKEN)
        self.tokens.scatter_(1, columns, values)
        self.lengths += counts

    def select_rows(self, rows: torch.Tensor) -> None:
        self.tokens, self.lengths, self.starts = self.tokens[rows], self.lengths[rows], self.starts[rows]
