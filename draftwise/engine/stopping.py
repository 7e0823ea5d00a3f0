"""When a row of a generation is done: an EOS id, its token budget, or a stop string."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from .sequence import TokenBuffer


@dataclasses.dataclass
class StopCriteria:
    """When a row is done: an EOS id, ``max_new_tokens``, or a stop string (needs a tokenizer)."""

    max_new_tokens: int
    eos_token_ids: Optional[torch.Tensor] = None  # [E] int64
    stop_strings: Sequence[str] = ()
    tokenizer: object = None

    def cut(self, buffer: TokenBuffer, emitted: torch.Tensor, counts: torch.Tensor,
            produced: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shorten each row's emitted run at its first stop; returns ``(counts, finished)``."""
        finished = torch.zeros_like(counts, dtype=torch.bool)
        if self.eos_token_ids is not None:
            valid = torch.arange(emitted.shape[1], device=counts.device).view(1, -1) < counts.view(-1, 1)
            is_eos = torch.isin(emitted, self.eos_token_ids) & valid
            hit = is_eos.any(-1)
            counts = torch.where(hit, is_eos.int().argmax(-1) + 1, counts)
            finished |= hit
        room = self.max_new_tokens - produced
        finished |= counts >= room
        counts = torch.minimum(counts, room)
        if self.stop_strings:
            counts, finished = self._cut_stop_strings(buffer, emitted, counts, finished)
        return counts, finished

    def _cut_stop_strings(self, buffer, emitted, counts, finished):
        """Decode each row's new tokens one at a time until a stop string appears (bookkeeping on
        the host, only when stop strings are asked for)."""
        counts, finished = counts.tolist(), finished.tolist()
        longest = max(len(s) for s in self.stop_strings)
        for row, count in enumerate(counts):
            start = int(buffer.prompt_length)
            history = buffer.tokens[row, start: int(buffer.lengths[row])].tolist()
            for c in range(1, count + 1):
                text = self.tokenizer.decode(history + emitted[row, :c].tolist())
                if any(s in text[-(longest + 64):] for s in self.stop_strings):
                    counts[row], finished[row] = c, True
                    break
        return torch.tensor(counts, device=emitted.device), torch.tensor(finished, device=emitted.device)
