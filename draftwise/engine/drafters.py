"""Drafters: what proposes the tokens the target verifies.

A drafter sees the committed tokens (:class:`TokenBuffer`) and proposes ``gamma`` tokens per row:
``Draft(tokens [B, gamma], probs [B, gamma, V] | None)``. ``tokens`` may end in ``PAD_TOKEN``
where a row has fewer proposals; ``probs`` is the distribution each token was drawn from, or
``None`` for one-hot proposals (greedy drafts, prompt lookup). After verification the loop calls
``rollback(valid)``: slots at or past ``valid[b]`` hold tokens that were not committed.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from draftwise.kernels import PAD_TOKEN

from .models import ModelRunner
from .sampling import Sampling
from .sequence import TokenBuffer


@dataclasses.dataclass
class Draft:
    tokens: torch.Tensor  # [B, gamma] int64, PAD_TOKEN after a row's proposals
    probs: Optional[torch.Tensor]  # [B, gamma, V] float32, or None for one-hot proposals

    def truncated(self, width: int) -> "Draft":
        """At most ``width`` proposals per row."""
        if self.tokens.shape[1] <= width:
            return self
        return Draft(self.tokens[:, :width], None if self.probs is None else self.probs[:, :width])


class ModelDrafter:
    """A draft model with its own KV cache. Before drafting it runs only the committed tokens it
    has not seen (the last emitted token, plus the last accepted draft when all were accepted).

    ``confidence_threshold`` (Hugging Face's ``assistant_confidence_threshold``): a row stops
    drafting after the first token whose draft probability is below it (that token is still
    proposed, as in Hugging Face's assisted generation), and the step stops when every row has,
    so a doubtful draft costs neither another draft forward nor a wider verification. Stopping
    depends on the draft's own distribution only, so the output stays exact. 0 drafts all
    ``gamma`` tokens.
    """

    def __init__(self, model, name: str | None = None, confidence_threshold: float = 0.0):
        if not 0.0 <= confidence_threshold < 1.0:
            raise ValueError(f"confidence_threshold: expected a value in [0, 1), got {confidence_threshold}")
        self.model = model
        self.name = name or type(model).__name__
        self.confidence_threshold = confidence_threshold
        self.runner: ModelRunner | None = None
        self.vocab: int | None = None  # the target's logits width
        self.unread = None  # (prompts, attention mask) not read yet
        self.written = None  # (first slot [B], drafted tokens) of the last proposal

    @property
    def draft_model(self):
        """The draft model this drafter runs (None for drafters without one)."""
        return self.model

    def start(self, buffer: TokenBuffer, attention_mask: torch.Tensor, vocab: int) -> None:
        """Get ready for a batch. The prompts are read when the drafter is first used, so a
        drafter of a pool that no row takes costs nothing."""
        batch = buffer.tokens.shape[0]
        if self.runner is None or self.runner.cache.capacity < buffer.capacity or self.runner.batch_size != batch:
            self.runner = ModelRunner(self.model, batch_size=batch, capacity=buffer.capacity)
        self.runner.reset()
        self.vocab = vocab
        self.unread = (buffer.tokens[:, : buffer.prompt_length].clamp(min=0), attention_mask)

    def _read_prompts(self) -> None:
        if self.unread is not None:
            prompt, attention_mask = self.unread
            self.unread = None
            self.runner.prefill(prompt, attention_mask, last_only=True)

    def propose(self, buffer: TokenBuffer, gamma: int, sampling: Sampling) -> Draft:
        self._read_prompts()
        unseen, counts = buffer.tail(self.runner.lengths)
        logits = self.runner.extend(unseen.clamp(min=0), num_valid=counts)
        last = logits[torch.arange(len(counts), device=counts.device), counts - 1]
        self.written = (self.runner.lengths, [])  # the drafts its cache holds, from that slot on
        tokens, probs = [], []
        drafting = torch.ones_like(counts, dtype=torch.bool)  # rows still drafting
        for i in range(gamma):
            logits_i = self._fit_vocab(last)
            if sampling.processing is not None:  # the law the token is drawn from: processed as the target's
                drafted = torch.stack(tokens, 1) if tokens else counts.new_empty(len(counts), 0)
                logits_i = sampling.processing(buffer, drafted, logits_i.unsqueeze(1), first=i)[:, 0]
            token, q = sampling.draw(logits_i)
            if self.confidence_threshold > 0:
                token = torch.where(drafting, token, PAD_TOKEN)
                drafting &= self._confidence(logits_i, token.clamp(min=0), q) >= self.confidence_threshold
            tokens.append(token)
            probs.append(q)
            if i + 1 == gamma or (self.confidence_threshold > 0 and not bool(drafting.any())):
                break
            last = self.runner.extend(token.clamp(min=0).view(-1, 1))[:, 0]
            self.written[1].append(token)
        return Draft(torch.stack(tokens, 1), None if probs[0] is None else torch.stack(probs, 1))

    def propose_tree(self, buffer: TokenBuffer, budget: int, branching: int = 4, max_depth: int = 6):
        """A dynamic token tree per row (EAGLE-2's rule): level by level, the ``branching`` nodes of
        highest cumulative draft log-probability each get their ``branching`` most likely
        children, one draft forward per level over the whole tree; the tree keeps the ``budget``
        nodes of highest cumulative log-probability, the root included (a child never scores
        above its parent, so the kept nodes form a tree). Children are the draft's top tokens,
        not draws: the tree is deterministic (``probs`` None), which verification handles for
        greedy and sampled rows alike."""
        from .tree import MAX_NODES

        if not 2 <= budget <= MAX_NODES or branching < 1 or max_depth < 1:
            raise ValueError(f"budget: expected 2..{MAX_NODES} nodes, branching and max_depth >= 1; "
                             f"got {budget}, {branching}, {max_depth}")
        self._read_prompts()
        self.written = None
        unseen, counts = buffer.tail(self.runner.lengths)
        logits = self.runner.extend(unseen.clamp(min=0), num_valid=counts)
        batch = len(counts)
        root = buffer.tokens.gather(1, (buffer.lengths - 1).view(-1, 1)).squeeze(1)
        rows = [dict(tokens=[int(root[b])], parents=[-1], score=[0.0], frontier=[0]) for b in range(batch)]
        node_logits = logits[torch.arange(batch, device=counts.device), counts - 1].unsqueeze(1)  # after the root
        for level in range(max_depth):
            for b, row in enumerate(rows):
                candidates = []
                for node in row["frontier"]:
                    logp = torch.log_softmax(self._fit_vocab(node_logits[b, node:node + 1]).float(), -1)[0]
                    top = logp.topk(branching)
                    candidates += [(row["score"][node] + float(v), node, int(t)) for v, t in zip(top.values, top.indices)]
                candidates.sort(key=lambda c: -c[0])
                room = MAX_NODES - len(row["tokens"])
                row["frontier"] = []
                for score, parent, token in candidates[: min(branching, room)]:
                    row["frontier"].append(len(row["tokens"]))
                    row["tokens"].append(token)
                    row["parents"].append(parent)
                    row["score"].append(score)
            if level == max_depth - 1 or all(len(row["tokens"]) >= budget for row in rows):
                break
            tree = self._tree_of(rows, buffer, keep=None)
            # the draft's logits after every non-root node (the root is already in its cache)
            node_logits = torch.cat([node_logits[:, :1], self.runner.extend_tree(
                tree.tokens[:, 1:].clamp(min=0), tree.depth[:, 1:] - 1, tree.ancestors[:, 1:] >> 1)], 1)
        return self._tree_of(rows, buffer, keep=budget)

    @staticmethod
    def _tree_of(rows: list[dict], buffer: TokenBuffer, keep: int | None):
        """The rows' nodes as a DraftTree; with ``keep``, only each row's ``keep`` best-scored."""
        from .tree import DraftTree

        kept_rows = []
        for row in rows:
            order = range(len(row["tokens"]))
            if keep is not None:
                best = sorted(order, key=lambda n: (-row["score"][n], n))[:keep]
                order = sorted(best)  # topological order is index order
            index = {old: new for new, old in enumerate(order)}
            kept_rows.append(([row["tokens"][n] for n in order],
                              [index.get(row["parents"][n], -1) for n in order]))
        width = max(len(tokens) for tokens, _ in kept_rows)
        tokens = torch.tensor([t + [-1] * (width - len(t)) for t, _ in kept_rows], device=buffer.tokens.device)
        parents = torch.tensor([p + [-1] * (width - len(p)) for _, p in kept_rows], device=buffer.tokens.device)
        return DraftTree(tokens, parents, buffer.lengths - 1)

    def score(self, buffer: TokenBuffer) -> tuple[list[int], list[int]]:
        """Read the committed tokens this drafter has not seen, but the last (its next draft
        starts there), and count per row how many of them its greedy prediction got right:
        ``(read, matched)``. Its cache then holds them, so this costs its next draft nothing."""
        self._read_prompts()
        since = self.runner.lengths
        block, counts = buffer.tail(since)
        reads = (counts - 1).clamp(min=0)
        if block.shape[1] < 2:
            zeros = [0] * len(counts)
            return zeros, list(zeros)
        logits = self.runner.extend(block[:, :-1].clamp(min=0), num_valid=reads)
        predicted = self._fit_vocab(logits.flatten(0, 1)).argmax(-1).view(logits.shape[:2])
        positions = torch.arange(block.shape[1] - 1, device=block.device).view(1, -1)
        matched = ((predicted == block[:, 1:]) & (positions < reads.view(-1, 1))).sum(1)
        # logits[:, j] read block[:, j] and predict block[:, j + 1]
        result = torch.stack([reads, matched]).tolist()
        return result[0], result[1]

    @staticmethod
    def _confidence(logits: torch.Tensor, token: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
        """The draft probability of each row's drafted token."""
        probs = q if q is not None else torch.softmax(logits.float(), -1)
        return probs.gather(1, token.view(-1, 1)).squeeze(1)

    def _fit_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits at the target's width: ids past it are never proposed; missing ids get -inf."""
        width = logits.shape[-1]
        if width >= self.vocab:
            return logits[:, : self.vocab]
        return torch.nn.functional.pad(logits, (0, self.vocab - width), value=-torch.inf)

    def rollback(self, valid: torch.Tensor, buffer: TokenBuffer | None = None) -> None:
        """Keep the cache slots below ``valid`` that hold committed tokens. With the committed
        ``buffer``, the drafts this drafter wrote are kept exactly as far as they equal the
        committed tokens: on a row another drafter served, its own drafts are not the tokens
        that were accepted there."""
        if self.unread is not None:
            return
        keep = torch.minimum(self.runner.lengths, valid)
        if buffer is not None and self.written is not None and self.written[1]:
            start, drafts = self.written[0], torch.stack(self.written[1], 1)
            columns = start.view(-1, 1) + torch.arange(drafts.shape[1], device=start.device)
            committed = buffer.tokens.gather(1, columns.clamp(max=buffer.capacity - 1))
            agree = (committed == drafts) & (columns < buffer.lengths.view(-1, 1))
            keep = torch.minimum(keep, start + agree.long().cumprod(1).sum(1))
        self.written = None
        self.runner.rollback(keep)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.written = None
        if self.unread is None:
            self.runner.select_rows(rows)
        else:
            prompt, attention_mask = self.unread
            self.unread = (prompt[rows], attention_mask[rows])


class PromptLookupDrafter:
    """Prompt lookup: find the latest earlier occurrence of the row's last n tokens (n from
    ``max_ngram`` down to ``min_ngram``) in its prompt and output, and propose the tokens that followed it.
    Proposals are one-hot, so verification stays exact; rows without a match propose nothing."""

    def __init__(self, max_ngram: int = 2, name: str = "prompt-lookup", min_ngram: int = 1):
        if max_ngram < 1:
            raise ValueError(f"max_ngram: expected >= 1, got {max_ngram}")
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"min_ngram: expected a value in [1, max_ngram={max_ngram}], got {min_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.name = name

    draft_model = None  # no model: proposals are copied from the context

    def start(self, buffer: TokenBuffer, attention_mask: torch.Tensor, vocab: int) -> None:
        pass

    def propose(self, buffer: TokenBuffer, gamma: int, sampling: Sampling) -> Draft:
        tokens, lengths = buffer.tokens, buffer.lengths
        batch, capacity = tokens.shape
        found = torch.full((batch,), -1, dtype=torch.int64, device=tokens.device)  # continuation start
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if capacity <= n:
                continue
            pattern = tokens.gather(1, (lengths.view(-1, 1) - n + torch.arange(n, device=tokens.device)).clamp(min=0))
            windows = tokens.unfold(1, n, 1)  # [B, capacity - n + 1, n]
            starts = torch.arange(windows.shape[1], device=tokens.device).view(1, -1)
            match = (windows == pattern.unsqueeze(1)).all(-1)
            match &= (starts >= buffer.starts.view(-1, 1)) & (starts + n < lengths.view(-1, 1))
            latest = torch.where(match, starts + n, -1).amax(-1)
            found = torch.where(found < 0, latest, found)
        columns = found.view(-1, 1) + torch.arange(gamma, device=tokens.device).view(1, -1)
        proposal = tokens.gather(1, columns.clamp(0, capacity - 1))
        usable = (found.view(-1, 1) >= 0) & (columns < lengths.view(-1, 1))
        usable = usable.long().cumprod(-1).bool()
        return Draft(torch.where(usable, proposal, PAD_TOKEN), None)

    def propose_branches(self, buffer: TokenBuffer, gamma: int, branches: int) -> list[torch.Tensor]:
        """Up to ``branches`` continuations per row, from the latest distinct earlier occurrences
        of its last ``max_ngram`` tokens (the branches of a token tree): ``[B, gamma]`` each, -1
        where a row has fewer matches or a shorter continuation. Branch 0 is :meth:`propose`'s
        proposal when the longest n-gram matches."""
        if branches < 1:
            raise ValueError(f"branches: expected >= 1, got {branches}")
        tokens, lengths = buffer.tokens, buffer.lengths
        capacity, n = tokens.shape[1], self.max_ngram
        steps = torch.arange(gamma, device=tokens.device).view(1, -1)
        out = []
        if capacity <= n:
            return [torch.full((tokens.shape[0], gamma), PAD_TOKEN, dtype=torch.int64, device=tokens.device)]
        pattern = tokens.gather(1, (lengths.view(-1, 1) - n + torch.arange(n, device=tokens.device)).clamp(min=0))
        windows = tokens.unfold(1, n, 1)
        starts = torch.arange(windows.shape[1], device=tokens.device).view(1, -1)
        match = (windows == pattern.unsqueeze(1)).all(-1)
        match &= (starts >= buffer.starts.view(-1, 1)) & (starts + n < lengths.view(-1, 1))
        candidates = torch.where(match, starts + n, -1)  # continuation starts, latest last
        seen: list[torch.Tensor] = []
        for _ in range(branches):
            found = candidates.amax(-1)
            if bool((found < 0).all()):
                break
            candidates = torch.where(candidates == found.view(-1, 1), -1, candidates)
            columns = found.view(-1, 1) + steps
            proposal = tokens.gather(1, columns.clamp(0, capacity - 1))
            usable = ((found.view(-1, 1) >= 0) & (columns < lengths.view(-1, 1))).long().cumprod(-1).bool()
            proposal = torch.where(usable, proposal, PAD_TOKEN)
            duplicate = torch.zeros(proposal.shape[0], dtype=torch.bool, device=proposal.device)
            for earlier in seen:  # the same continuation from another occurrence adds nothing
                duplicate |= (earlier == proposal).all(-1)
            proposal = torch.where(duplicate.view(-1, 1), PAD_TOKEN, proposal)
            seen.append(proposal)
            out.append(proposal)
        return out or [torch.full((tokens.shape[0], gamma), PAD_TOKEN, dtype=torch.int64, device=tokens.device)]

    def rollback(self, valid: torch.Tensor, buffer: TokenBuffer | None = None) -> None:
        pass

    def select_rows(self, rows: torch.Tensor) -> None:
        pass


class LookupThenModelDrafter:
    """Prompt lookup where the row's last ``lookup.min_ngram``+ tokens occurred before, the draft
    model elsewhere: copying costs nothing when the output repeats its context (code, names,
    quotes), and the model drafts the rest. A step that every row can copy skips the model; its
    cache catches up on the next step it drafts (it re-runs only the tokens it has not seen).

    A copy costs no draft forward, so copying rows propose ``copy_extra`` tokens more than the
    model's gamma (a copied run is often accepted whole; each extra token only widens the
    verification forward)."""

    def __init__(self, model: ModelDrafter, lookup: PromptLookupDrafter | None = None, name: str | None = None,
                 copy_extra: int = 2):
        if not isinstance(copy_extra, int) or isinstance(copy_extra, bool) or copy_extra < 0:
            raise ValueError(f"copy_extra: expected an int >= 0, got {copy_extra!r}")
        self.model = model
        self.lookup = lookup or PromptLookupDrafter(max_ngram=3, min_ngram=2)
        self.name = name or f"{model.name}+lookup"
        self.copy_extra = copy_extra

    @property
    def draft_model(self):
        return self.model.draft_model

    def start(self, buffer: TokenBuffer, attention_mask: torch.Tensor, vocab: int) -> None:
        self.model.start(buffer, attention_mask, vocab)
        self.lookup.start(buffer, attention_mask, vocab)

    def propose(self, buffer: TokenBuffer, gamma: int, sampling: Sampling) -> Draft:
        copied = self.lookup.propose(buffer, gamma + self.copy_extra, sampling)
        found = copied.tokens[:, 0] >= 0
        everywhere, anywhere = torch.stack([found.all(), found.any()]).tolist()  # one sync per step
        if everywhere:
            return copied
        drafted = self.model.propose(buffer, gamma, sampling)
        if not anywhere:
            return drafted
        # the model may stop early (confidence threshold); copying rows may be longer
        missing = copied.tokens.shape[1] - drafted.tokens.shape[1]
        tokens = torch.nn.functional.pad(drafted.tokens, (0, missing), value=PAD_TOKEN)
        tokens = torch.where(found[:, None], copied.tokens, tokens)
        probs = drafted.probs if drafted.probs is None else torch.nn.functional.pad(drafted.probs, (0, 0, 0, missing))
        if probs is not None:  # a copied token's proposal is one-hot
            one_hot = torch.nn.functional.one_hot(tokens.clamp(min=0), probs.shape[-1]).to(probs.dtype)
            probs = torch.where(found[:, None, None], one_hot, probs)
        return Draft(tokens, probs)

    def rollback(self, valid: torch.Tensor, buffer: TokenBuffer | None = None) -> None:
        self.model.rollback(valid, buffer)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.model.select_rows(rows)
