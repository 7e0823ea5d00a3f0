"""Token trees: what a tree step drafts, with the structure the attention and the verification read.

A chain of drafts is the tree whose every node has one child.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from draftwise.kernels.tree import check_parents, tree_structure

MAX_NODES = 64  # the ancestor mask is one int64 per node


@dataclasses.dataclass
class DraftTree:
    """One token tree per row, nodes in topological order (every parent before its children).

    Node 0 is the row's last committed token (the root); ``parents[b, t]`` is node t's parent (-1
    for the root); a node whose token is -1 is padding (rows may have trees of different sizes),
    and so is every node below it. For a row whose root "The" has two drafted continuations::

        node      0     1     2     3            The ─┬─ cat ── sat
        token    The   cat   sat   dog                └─ dog
        parent   -1     0     1     0
        depth     0     1     2     1
        ancestor  0b1  0b11 0b111 0b1001        (bit j: node j is the node or one of its ancestors)

    The derived fields are computed once: ``depth``; ``positions = prefix_lengths + depth`` (each
    node's position in its row's sequence, ``prefix_lengths`` the committed tokens before the
    root); ``ancestors`` (bit j of ``ancestors[b, i]`` set iff node j is node i or one of its
    ancestors: the tree part of the attention mask, 0 for padding); ``valid``.

    ``probs[b, t]`` is the law node t's token was drawn from given its ancestors, or ``None`` when
    every node is deterministic (one-hot); ``owner[b, t]`` the drafter that proposed node t (-1 for
    the root and padding).
    """

    tokens: torch.Tensor  # [B, T] int64
    parents: torch.Tensor  # [B, T] int64
    prefix_lengths: torch.Tensor  # [B] int64: committed tokens before the root
    probs: Optional[torch.Tensor] = None  # [B, T, V]
    owner: Optional[torch.Tensor] = None  # [B, T] int64
    depth: torch.Tensor = dataclasses.field(init=False)
    positions: torch.Tensor = dataclasses.field(init=False)
    ancestors: torch.Tensor = dataclasses.field(init=False)
    valid: torch.Tensor = dataclasses.field(init=False)

    def __post_init__(self):
        self._check()
        self.valid, self.depth = tree_structure(self.tokens, self.parents)
        ancestors = torch.zeros_like(self.parents)
        ancestors[:, 0] = 1
        for t in range(1, self.tokens.shape[1]):
            parent = self.parents[:, t].clamp(min=0).view(-1, 1)
            ancestors[:, t] = ancestors.gather(1, parent).squeeze(1) | _bit(t)
        self.ancestors = torch.where(self.valid, ancestors, 0)
        self.positions = self.prefix_lengths.view(-1, 1) + self.depth
        if self.owner is None:
            self.owner = torch.full_like(self.tokens, -1)

    @classmethod
    def chain(cls, root: torch.Tensor, drafts: torch.Tensor, prefix_lengths: torch.Tensor,
              probs: Optional[torch.Tensor] = None) -> "DraftTree":
        """The chain ``root -> drafts[:, 0] -> drafts[:, 1] ...`` as a tree (-1 in drafts pads)."""
        batch, k = drafts.shape
        tokens = torch.cat([root.view(-1, 1), drafts], 1)
        parents = torch.arange(-1, k, device=drafts.device).expand(batch, -1).contiguous()
        if probs is not None:
            probs = torch.cat([torch.zeros_like(probs[:, :1]), probs], 1)
        return cls(tokens, parents, prefix_lengths, probs)

    @classmethod
    def from_chains(cls, root: torch.Tensor, chains: list[torch.Tensor], prefix_lengths: torch.Tensor,
                    max_nodes: int = MAX_NODES, laws: Optional[list[Optional[torch.Tensor]]] = None) -> "DraftTree":
        """Several drafters' chains (``chains[i]``: ``[B, K_i]``, -1 pads) merged into one trie per
        row: a prefix two chains share is one path; each node's ``owner`` is the first chain that
        proposed it. A row keeps at most ``max_nodes`` nodes (the root included), the earlier
        chains first.

        ``laws[i]`` (``[B, K_i, V]`` or None) is the law each token of chain i was drawn from. A
        node keeps its chain's law only when it is the first child of its parent: its token was
        then drawn from that law given exactly the node's path, independently of its siblings.
        Every other node is deterministic (one-hot): a later sibling exists because its token
        differs from the earlier ones, so it was not drawn from its law alone, and recursive
        rejection stays exact only for deterministic siblings there."""
        if not 1 <= max_nodes <= MAX_NODES:
            raise ValueError(f"max_nodes: expected a value in [1, {MAX_NODES}], got {max_nodes}")
        laws = list(laws) if laws is not None else [None] * len(chains)
        if len(laws) != len(chains):
            raise ValueError(f"laws: expected one entry per chain ({len(chains)}), got {len(laws)}")
        rows = [_trie_row(b, int(root[b]), chains, max_nodes) for b in range(root.shape[0])]
        width = max(len(tokens) for tokens, _, _, _ in rows)

        def padded(column: int, fill: int) -> torch.Tensor:
            return torch.tensor([row[column] + [fill] * (width - len(row[column])) for row in rows],
                                dtype=torch.int64, device=root.device)

        tokens = padded(0, -1)
        probs = None
        if any(law is not None for law in laws):
            vocab = next(law for law in laws if law is not None).shape[-1]
            probs = torch.nn.functional.one_hot(tokens.clamp(min=0), vocab).float()
            probs[:, 0] = 0.0  # the root is committed, not drafted
            for b, (_, _, _, sources) in enumerate(rows):
                for node, (chain, position) in sources.items():
                    if laws[chain] is not None:
                        probs[b, node] = laws[chain][b, position].float()
        return cls(tokens, padded(1, -1), prefix_lengths, probs, padded(2, -1))

    def attention_mask(self) -> torch.Tensor:
        """``[B, T, T]`` bool: node i attends to node j (the tree block of the attention mask)."""
        nodes = self.tokens.shape[1]
        bits = torch.stack([_bit(j) for j in range(nodes)]).to(self.ancestors.device)
        return (self.ancestors.unsqueeze(-1) & bits.view(1, 1, -1)) != 0

    def _check(self) -> None:
        check_parents(self.tokens, self.parents)
        batch, nodes = self.tokens.shape
        if nodes > MAX_NODES:
            raise ValueError(f"tokens: a tree has 1 to {MAX_NODES} nodes per row, got {nodes}")
        if self.prefix_lengths.shape != (batch,):
            raise ValueError(f"prefix_lengths: expected shape [{batch}], got {tuple(self.prefix_lengths.shape)}")
        if self.probs is not None and self.probs.shape[:2] != (batch, nodes):
            raise ValueError(f"probs: expected [B, T, V] = [{batch}, {nodes}, V], got {tuple(self.probs.shape)}")


def _bit(j: int) -> torch.Tensor:
    """Bit j of an int64 (bit 63 is the sign bit: the value is negative, the bit pattern right)."""
    return torch.tensor(1 << j if j < 63 else -(1 << 63), dtype=torch.int64)


def _trie_row(b: int, root: int, chains: list[torch.Tensor], max_nodes: int):
    """Row b's trie: ``(tokens, parents, owner, sources)``, where ``sources`` maps each node that is
    the first child of its parent to the (chain, position) that drew it."""
    tokens, parents, owner, sources = [root], [-1], [-1], {}
    children: dict[tuple[int, int], int] = {}
    has_child: set[int] = set()
    for index, chain in enumerate(chains):
        node = 0
        for position, token in enumerate(chain[b].tolist()):
            if token < 0:
                break
            child = children.get((node, token))
            if child is None:
                if len(tokens) == max_nodes:
                    break
                child = len(tokens)
                children[(node, token)] = child
                if node not in has_child:
                    sources[child] = (index, position)
                    has_child.add(node)
                tokens.append(token)
                parents.append(node)
                owner.append(index)
            node = child
    return tokens, parents, owner, sources
