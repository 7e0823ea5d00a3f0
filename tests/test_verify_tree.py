"""Tier 1: token-tree verification, torch reference. A chain tree gives verify_chain's tokens for
the same seed; a branching tree with stochastic and deterministic children emits the target's
law; greedy rows descend to the argmax child."""

from __future__ import annotations

import pytest
import torch

from draftwise.kernels.reference import verify_chain_ref
from draftwise.kernels.tree import verify_tree_ref

from oracles import ALPHA, chi_square


@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_a_chain_tree_gives_verify_chains_tokens(stochastic, temperature):
    g = torch.Generator().manual_seed(int(temperature * 10) + stochastic)
    batch, k, vocab = 6, 4, 24
    logits = torch.randn(batch, k + 1, vocab, generator=g) * 2
    q = torch.softmax(logits[:, :k] + torch.randn(batch, k, vocab, generator=g), -1)
    drafts = torch.multinomial(q.view(-1, vocab), 1, generator=g).view(batch, k)
    drafts[0, 2:] = -1  # a shorter chain
    seeds = torch.arange(batch) * 7919 + 3
    chain = verify_chain_ref(drafts, q if stochastic else None, logits, temperature=temperature, seed=seeds)
    tokens = torch.cat([torch.full((batch, 1), 5), drafts], 1)
    parents = torch.arange(-1, k).expand(batch, -1)
    probs = torch.cat([torch.zeros(batch, 1, vocab), q], 1) if stochastic else None
    tree = verify_tree_ref(tokens, parents, probs, logits, temperature=temperature, seed=seeds)
    assert torch.equal(tree.output_tokens, chain.output_tokens)
    assert torch.equal(tree.num_accepted, chain.num_accepted)
    walked = tree.path[:, 1:]
    assert torch.equal(walked >= 0, torch.arange(k).view(1, -1) < chain.num_accepted.view(-1, 1))


def test_greedy_rows_descend_to_the_argmax_child():
    vocab = 6
    logits = torch.zeros(1, 4, vocab)
    logits[0, 0, 3] = 5  # after the root: 3
    logits[0, 2, 1] = 5  # after node 2 (token 3): 1
    tokens = torch.tensor([[0, 2, 3, 1]])
    parents = torch.tensor([[-1, 0, 0, 2]])
    out = verify_tree_ref(tokens, parents, None, logits, temperature=0.0, seed=1)
    assert out.path.tolist() == [[0, 2, 3]]
    assert out.output_tokens.tolist() == [[3, 1, int(logits[0, 3].argmax())]]
    assert out.num_accepted.tolist() == [2]


def test_a_branching_tree_emits_the_target_law():
    """Root with three children (two drawn from a draft's law, one deterministic) and a grandchild
    under the first; a Markov target (its law after a token depends on that token only). The
    emitted tokens follow the target's law, whatever was drafted."""
    vocab, rows = 6, 12_000
    g = torch.Generator().manual_seed(0)
    markov = torch.randn(vocab, vocab, generator=g) * 1.5  # logits after token v
    draft_law = torch.softmax(markov + torch.randn(vocab, vocab, generator=g) * 1.5, -1)
    root = 2
    first = torch.multinomial(draft_law[root].expand(rows, -1), 2, replacement=True, generator=g)  # siblings, i.i.d.
    fixed = torch.full((rows,), 4)  # a deterministic sibling (as from prompt lookup)
    grandchild = torch.multinomial(draft_law[first[:, 0]], 1, generator=g).squeeze(1)
    tokens = torch.stack([torch.full((rows,), root), first[:, 0], first[:, 1], fixed, grandchild], 1)
    parents = torch.tensor([-1, 0, 0, 0, 1]).expand(rows, -1)
    probs = draft_law[tokens]  # law of each node's token: the draft's after its parent
    probs[:, 0] = 0
    probs[:, 3] = torch.nn.functional.one_hot(fixed, vocab).float()  # deterministic: one-hot
    probs[:, 1:3] = draft_law[root]
    probs[:, 4] = draft_law[first[:, 0]]
    out = verify_tree_ref(tokens, parents, probs, markov[tokens], temperature=1.0, seed=torch.arange(rows))
    p = torch.softmax(markov.double(), -1)
    first_token = out.output_tokens[:, 0]
    fit = chi_square(torch.bincount(first_token, minlength=vocab), p[root])
    assert fit.pvalue > ALPHA, f"law of the first token: {fit}"
    # Below an accepted child with token a, the next token follows the target's law after a.
    below = out.num_accepted >= 1
    a, b = first_token[below], out.output_tokens[below, 1]
    share = torch.bincount(a, minlength=vocab).double() / len(a)
    fit = chi_square(torch.bincount(a * vocab + b, minlength=vocab * vocab), (share.view(-1, 1) * p).flatten())
    assert fit.pvalue > ALPHA, f"law of the second token after an accepted first: {fit}"
    assert 0.2 < below.float().mean() < 1 and (out.num_accepted == 2).any()


def test_bad_trees_are_named():
    logits = torch.zeros(1, 3, 5)
    tokens = torch.tensor([[0, 1, 2]])
    with pytest.raises(ValueError, match="parents: expected every parent before its child"):
        verify_tree_ref(tokens, torch.tensor([[-1, 2, 0]]), None, logits)
    with pytest.raises(ValueError, match="parents: node 0 is the root"):
        verify_tree_ref(tokens, torch.tensor([[0, 0, 0]]), None, logits)
    with pytest.raises(ValueError, match="target_logits"):
        verify_tree_ref(tokens, torch.tensor([[-1, 0, 0]]), None, logits[:, :2])
    with pytest.raises(ValueError, match="lenience"):
        verify_tree_ref(tokens, torch.tensor([[-1, 0, 0]]), None, logits, lenience=0.5)
    with pytest.raises(ValueError, match="temperature"):
        verify_tree_ref(tokens, torch.tensor([[-1, 0, 0]]), None, logits, temperature=-1.0)


def test_pad_nodes_and_their_children_are_ignored():
    logits = torch.zeros(1, 4, 5)
    logits[0, 0, 1] = 9
    tokens = torch.tensor([[0, -1, 3, 1]])  # node 1 is padding; node 3 hangs under it
    parents = torch.tensor([[-1, 0, 0, 1]])
    out = verify_tree_ref(tokens, parents, None, logits, temperature=0.0, seed=0)
    assert out.path.tolist() == [[0, -1]] and out.output_tokens.tolist() == [[1, -1]]


def _two_iid_children(p: torch.Tensor, q: torch.Tensor, rows: int, seed: int):
    """``rows`` trees of a root with two children drawn i.i.d. from q; the target's law after the
    root is p (T = 1, so logits = log p)."""
    g = torch.Generator().manual_seed(seed)
    vocab = p.shape[0]
    children = torch.multinomial(q, 2 * rows, replacement=True, generator=g).view(rows, 2)
    tokens = torch.cat([torch.zeros(rows, 1, dtype=torch.int64), children], 1)
    parents = torch.tensor([-1, 0, 0]).expand(rows, -1)
    probs = q.expand(rows, 3, vocab).clone()
    logits = p.log().expand(rows, 3, vocab).clone()
    return tokens, parents, probs, logits


@pytest.mark.parametrize("case", range(3))
def test_acceptance_at_a_node_is_the_recursive_rules_and_within_the_bound(case):
    """With two children drawn i.i.d. from q, the chance that one passes is, by the recursive
    rule, β + (1 − β) Σ min(r, q) with β = Σ min(p, q) and r = norm(max(0, p − q)); no exact rule
    can pass more often than 1 − max_S [q(S)² − p(S)] (S a prefix of the tokens sorted by p/q)."""
    from draftwise.kernels import available_backends, verify_tree

    g = torch.Generator().manual_seed(case)
    vocab = 5
    p = torch.softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * 1.5, 0)
    q = torch.softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * 1.5, 0)
    beta = torch.minimum(p, q).sum()
    r = (p - q).clamp_min(0)
    r = r / r.sum()
    analytic = float(beta + (1 - beta) * torch.minimum(r, q).sum())
    order = (p / q).argsort()
    bound = 1 - max(float(q[order[:n]].sum() ** 2 - p[order[:n]].sum()) for n in range(vocab + 1))
    assert analytic <= bound + 1e-12

    backend = "cpp" if "cpp" in available_backends("cpu") else "torch"
    rows = 40_000 if backend == "cpp" else 4_000
    tokens, parents, probs, logits = _two_iid_children(p, q, rows, seed=case + 10)
    out = verify_tree(tokens, parents, probs.float(), logits.float(), temperature=1.0,
                      seed=torch.arange(rows) + 1000 * case, backend=backend)
    measured = float((out.num_accepted >= 1).double().mean())
    sigma = (analytic * (1 - analytic) / rows) ** 0.5
    assert abs(measured - analytic) < 4 * sigma + 1e-3, f"measured {measured:.4f}, analytic {analytic:.4f}"
    assert measured <= bound + 4 * sigma
