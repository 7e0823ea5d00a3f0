"""Tier 4: the DraftTree seam: derived depth, positions and ancestor masks; chains are trees."""

from __future__ import annotations

import pytest
import torch

from draftwise.engine.tree import MAX_NODES, DraftTree


def test_the_documented_example():
    tree = DraftTree(torch.tensor([[10, 11, 12, 13]]), torch.tensor([[-1, 0, 1, 0]]), torch.tensor([7]))
    assert tree.depth.tolist() == [[0, 1, 2, 1]]
    assert tree.positions.tolist() == [[7, 8, 9, 8]]
    assert tree.ancestors.tolist() == [[0b1, 0b11, 0b111, 0b1001]]
    mask = tree.attention_mask()[0].int().tolist()
    assert mask == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]]


def test_a_chain_is_the_tree_with_one_child_per_node():
    drafts = torch.tensor([[5, 6, 7], [8, -1, -1]])
    tree = DraftTree.chain(torch.tensor([1, 2]), drafts, torch.tensor([4, 9]))
    causal = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    assert torch.equal(tree.attention_mask()[0], causal)
    assert tree.valid.tolist() == [[True] * 4, [True, True, False, False]]
    assert not tree.attention_mask()[1, 2:].any()  # padding attends to nothing
    assert tree.positions.tolist() == [[4, 5, 6, 7], [9, 10, 9, 9]]


def test_padding_and_everything_below_it_is_masked():
    tree = DraftTree(torch.tensor([[1, -1, 3, 4]]), torch.tensor([[-1, 0, 1, 0]]), torch.tensor([0]))
    assert tree.valid.tolist() == [[True, False, False, True]]
    assert tree.ancestors.tolist() == [[0b1, 0, 0, 0b1001]]


def test_the_ancestor_mask_holds_64_nodes():
    nodes = MAX_NODES
    tree = DraftTree.chain(torch.tensor([0]), torch.arange(1, nodes).view(1, -1), torch.tensor([0]))
    mask = tree.attention_mask()[0]
    assert torch.equal(mask, torch.tril(torch.ones(nodes, nodes, dtype=torch.bool)))
    assert tree.ancestors[0, -1] == -1  # all 64 bits set


@pytest.mark.parametrize("tokens,parents,message", [
    ([[1, 2]], [[0, 0]], "node 0 is the root"),
    ([[1, 2, 3]], [[-1, 2, 0]], "every parent before its child"),
    ([[1] * (MAX_NODES + 1)], [[-1] + [0] * MAX_NODES], "1 to 64 nodes"),
])
def test_bad_trees_are_named(tokens, parents, message):
    with pytest.raises(ValueError, match=message):
        DraftTree(torch.tensor(tokens), torch.tensor(parents), torch.tensor([0]))
