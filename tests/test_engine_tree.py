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


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_one_tree_forward_gives_every_node_the_logits_of_its_own_path(arch):
    """Each node's logits from one forward over the whole tree (left-padded batch) equal one
    plain forward over prompt + the path to that node; after commit_path the cache holds the
    accepted path as a plain sequence."""
    from draftwise.engine.models import ModelRunner
    from tiny_models import tiny_model

    model = tiny_model(arch, seed=0)
    prompts = [[5, 9, 14, 3, 8], [7, 21, 4]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    runner = ModelRunner(model, batch_size=2, capacity=32)
    runner.prefill(ids[:, :-1], mask[:, :-1])  # the root (each prompt's last token) is not read yet
    tokens = torch.cat([ids[:, -1:], torch.tensor([[11, 12, 13, 40, 41], [30, 31, -1, 33, 34]])], 1)
    parents = torch.tensor([[-1, 0, 1, 0, 3, 1], [-1, 0, 1, 0, 3, 0]])
    tree = DraftTree(tokens, parents, runner.lengths.clone())
    logits = runner.extend_tree(tree.tokens.clamp(min=0), tree.depth, tree.ancestors)

    with torch.no_grad():
        for b, prompt in enumerate(prompts):
            for t in range(tokens.shape[1]):
                if not tree.valid[b, t]:
                    continue
                sequence = torch.tensor([prompt[:-1] + tree_path_tokens(tokens, parents, b, t)])
                want = model(input_ids=sequence).logits[0, -1]
                torch.testing.assert_close(logits[b, t], want, atol=1e-4, rtol=1e-4)
    # keep root -> node 1 -> node 2 in row 0, root -> node 5 in row 1; then one more token each
    runner.cache.commit_path(torch.tensor([[0, 1, 2], [0, 5, 0]]), torch.tensor([3, 2]))
    after = runner.extend(torch.tensor([[50], [51]]))[:, 0]
    with torch.no_grad():
        for b, (prompt, kept, extra) in enumerate(zip(prompts, ([11, 12], [34]), (50, 51))):
            sequence = torch.tensor([prompt + kept + [extra]])
            torch.testing.assert_close(after[b], model(input_ids=sequence).logits[0, -1], atol=1e-4, rtol=1e-4)


def test_chains_merge_into_a_trie():
    root = torch.tensor([1, 2])
    draft = torch.tensor([[5, 6, 7], [8, 9, -1]])
    lookup = torch.tensor([[5, 6, 3], [4, -1, -1]])
    tree = DraftTree.from_chains(root, [draft, lookup], torch.tensor([10, 20]))
    assert tree.tokens.tolist() == [[1, 5, 6, 7, 3], [2, 8, 9, 4, -1]]
    assert tree.parents.tolist() == [[-1, 0, 1, 2, 2], [-1, 0, 1, 0, -1]]
    assert tree.owner.tolist() == [[-1, 0, 0, 0, 1], [-1, 0, 0, 1, -1]]
    assert tree.valid.tolist() == [[True] * 5, [True, True, True, True, False]]
    small = DraftTree.from_chains(root, [draft, lookup], torch.tensor([10, 20]), max_nodes=3)
    assert small.tokens.tolist() == [[1, 5, 6], [2, 8, 9]]
    with pytest.raises(ValueError, match="max_nodes"):
        DraftTree.from_chains(root, [draft], torch.tensor([10, 20]), max_nodes=0)


def test_a_trie_of_chains_is_verified_along_the_longest_agreeing_branch():
    """Greedy tree verification of a trie built from two chains accepts along whichever chain
    agrees with the target longer, even when the first chain is refused at its first token."""
    from draftwise.kernels.tree import verify_tree_ref

    vocab = 12
    tree = DraftTree.from_chains(torch.tensor([0]), [torch.tensor([[3, 4]]), torch.tensor([[5, 6, 7]])],
                                 torch.tensor([0]))
    nxt = {0: 5, 5: 6, 6: 9}  # the target's argmax after each token
    logits = torch.zeros(1, tree.tokens.shape[1], vocab)
    for t, token in enumerate(tree.tokens[0].tolist()):
        logits[0, t, nxt.get(token, 1)] = 5.0
    out = verify_tree_ref(tree.tokens, tree.parents, None, logits, temperature=0.0, seed=0)
    assert out.output_tokens[0].tolist()[:3] == [5, 6, 9] and out.num_accepted.tolist() == [2]
    assert [int(tree.owner[0, n]) for n in out.path[0, 1:3]] == [1, 1]


def test_prompt_lookup_branches_come_from_distinct_earlier_matches():
    from draftwise.engine import PromptLookupDrafter
    from draftwise.engine.sequence import TokenBuffer

    #        0  1  2  3  4  5  6  7  8  9 10 11 12
    row = [7, 8, 1, 7, 8, 2, 7, 8, 1, 9, 4, 7, 8]  # "7 8" is followed by 1, 2 and 1 again
    ids = torch.tensor([row])
    buffer = TokenBuffer.from_prompt(ids, torch.ones_like(ids), 20)
    drafter = PromptLookupDrafter(max_ngram=2)
    branches = drafter.propose_branches(buffer, gamma=3, branches=4)
    assert branches[0].tolist() == drafter.propose(buffer, 3, None).tokens.tolist() == [[1, 9, 4]]
    assert [b.tolist() for b in branches[1:]] == [[[2, 7, 8]], [[1, 7, 8]]]
    tree = DraftTree.from_chains(ids[:, -1], branches, torch.tensor([12]))
    assert tree.tokens.tolist() == [[8, 1, 9, 4, 2, 7, 8, 7, 8]]  # the shared first token "1" once
    with pytest.raises(ValueError, match="branches"):
        drafter.propose_branches(buffer, 3, 0)


def test_a_drafter_keeps_only_its_drafts_that_were_committed():
    """After a step where another drafter served the row, a draft model's cache keeps its own
    drafts only as far as they equal the committed tokens: its next proposal is the one a fresh
    drafter makes on the committed text."""
    from draftwise.engine import ModelDrafter
    from draftwise.engine.sampling import Sampling
    from draftwise.engine.sequence import TokenBuffer
    from tiny_models import tiny_model

    model = tiny_model("llama", layers=1, seed=1)
    ids = torch.tensor([[5, 9, 14, 3, 8], [7, 21, 4, 30, 2]])
    mask = torch.ones_like(ids)
    greedy = Sampling.build(2, torch.device("cpu"), do_sample=False, temperature=1.0, top_k=0, top_p=1.0, seed=0)
    buffer = TokenBuffer.from_prompt(ids, mask, 32)
    buffer.append(torch.tensor([[40], [41]]), torch.tensor([1, 1]))  # the prefill's first token
    drafter = ModelDrafter(model)
    drafter.start(buffer, mask, 101)
    mine = drafter.propose(buffer, 4, greedy).tokens
    before = buffer.lengths.clone()
    # row 0 commits the drafter's first two drafts and a token of its own; row 1 other tokens
    committed = torch.tensor([[int(mine[0, 0]), int(mine[0, 1]), 99], [int(mine[1, 0]) ^ 1, 98, 97]])
    buffer.append(committed, torch.tensor([3, 3]))
    drafter.rollback(before + 2, buffer)
    assert drafter.runner.lengths.tolist() == [int(before[0]) + 2, int(before[1])]
    fresh = ModelDrafter(model)
    fresh.start(TokenBuffer.from_prompt(ids, mask, 32), mask, 101)
    assert torch.equal(drafter.propose(buffer, 3, greedy).tokens, fresh.propose(buffer, 3, greedy).tokens)


def test_a_draft_model_grows_a_dynamic_tree_of_its_likeliest_continuations():
    """Each node is among the draft's top tokens after its own path (checked with a plain
    forward), the budget holds, and the draft's likeliest next token hangs under the root."""
    from draftwise.engine import ModelDrafter
    from draftwise.engine.sequence import TokenBuffer
    from tiny_models import tiny_model

    model = tiny_model("llama", layers=1, seed=1)
    ids = torch.tensor([[5, 9, 14, 3, 8], [0, 0, 7, 21, 4]])
    mask = (torch.arange(5) >= torch.tensor([[0], [2]])).long()
    buffer = TokenBuffer.from_prompt(ids, mask, 48)
    drafter = ModelDrafter(model)
    drafter.start(buffer, mask, 101)
    buffer.append(torch.tensor([[40], [41]]), torch.tensor([1, 1]))  # the root: the prefill's token
    tree = drafter.propose_tree(buffer, budget=9, branching=3, max_depth=3)
    assert tree.valid.sum(1).tolist() == [9, 9] and tree.tokens[:, 0].tolist() == [40, 41]
    assert torch.equal(drafter.runner.lengths, buffer.lengths)  # the tree itself is not committed
    prompts = [[5, 9, 14, 3, 8, 40], [7, 21, 4, 41]]
    with torch.no_grad():
        for b in range(2):
            for t in range(1, tree.tokens.shape[1]):
                path, node = [], int(tree.parents[b, t])
                while node > 0:
                    path.insert(0, int(tree.tokens[b, node]))
                    node = int(tree.parents[b, node])
                logits = model(input_ids=torch.tensor([prompts[b] + path])).logits[0, -1]
                assert int(tree.tokens[b, t]) in logits.topk(3).indices.tolist()
            first = model(input_ids=torch.tensor([prompts[b]])).logits[0, -1].argmax()
            children = tree.tokens[b][tree.parents[b] == 0].tolist()
            assert int(first) in children
    with pytest.raises(ValueError, match="budget"):
        drafter.propose_tree(buffer, budget=1)


# ---------------------------------------------------------------------------------------------
# Tree steps through generate(tree_budget=N)

import draftwise  # noqa: E402
from draftwise.engine import PromptLookupDrafter  # noqa: E402

from oracles import ALPHA, PAD, chi_square, first_two_token_law, left_padded_prompts, tree_path_tokens  # noqa: E402
from tiny_models import ARCHS, make_pair, tiny_model  # noqa: E402

BUILDERS = {  # how a call asks for each tree builder
    "dynamic tree of one draft": lambda draft: dict(assistant_model=draft),
    "trie of a draft and prompt lookup": lambda draft: dict(drafts=[draft, PromptLookupDrafter()]),
    "prompt lookup's matches": lambda draft: dict(assistant_model=PromptLookupDrafter()),
}


@pytest.mark.parametrize("builder", list(BUILDERS))
@pytest.mark.parametrize("arch", ARCHS)
def test_tree_steps_give_the_target_greedy_output(arch, builder):
    target, draft = make_pair(arch)
    for batch in (1, 3):
        ids, mask = left_padded_prompts(batch, width=9)
        ids[:, -4:] = ids[:, 2:6].clone()  # a repeat, so that prompt lookup has matches
        want = target.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=PAD,
                               max_new_tokens=20, eos_token_id=None)
        out = draftwise.generate(target, ids, mask, **BUILDERS[builder](draft), tree_budget=10, do_sample=False,
                                 pad_token_id=PAD, max_new_tokens=20, eos_token_id=None, return_dict_in_generate=True)
        assert torch.equal(out.sequences, want), f"batch {batch}"
        stats = out.spec_stats
        assert stats.tree_steps == stats.target_calls > 0 and stats.tree_nodes == stats.drafted
        if builder == "dynamic tree of one draft":
            assert stats.tree_nodes > stats.tree_steps, "trees of more than one node"


def test_a_tree_step_has_more_than_one_branch():
    target, draft = make_pair("llama")
    ids, mask = left_padded_prompts(1)
    out = draftwise.generate(target, ids, mask, assistant_model=draft, tree_budget=12, do_sample=False,
                             pad_token_id=PAD, max_new_tokens=8, eos_token_id=None, return_dict_in_generate=True)
    stats = out.spec_stats
    assert stats.tree_nodes > stats.tree_steps * 6, "a dynamic tree uses its budget"
    assert max(step.width for step in stats.trace) <= 13


@pytest.mark.parametrize("builder", ["dynamic tree of one draft", "trie of a draft and prompt lookup"])
def test_sampled_tree_steps_keep_the_target_law(builder):
    """The joint law of the first two tokens, sampled through tree steps, is the target's (χ²)."""
    target = tiny_model("llama", layers=2, vocab=16, seed=0)
    target.generation_config.eos_token_id = None
    draft = tiny_model("llama", layers=1, vocab=16, seed=3)
    prompt = torch.tensor([[3, 7, 5, 3, 7]])
    trials = 20_000 if builder.startswith("dynamic") else 20_000
    law = first_two_token_law(target, prompt, 0.8)
    out = draftwise.generate(target, prompt.repeat(trials, 1), **BUILDERS[builder](draft), tree_budget=6,
                             max_new_tokens=3, do_sample=True, temperature=0.8, top_k=0, seed=5, pad_token_id=0,
                             return_dict_in_generate=True)
    pairs = out.sequences[:, -3] * 16 + out.sequences[:, -2]
    fit = chi_square(torch.bincount(pairs, minlength=256), law.flatten())
    assert fit.pvalue > ALPHA, f"joint law of the first two tokens: {fit}"
    assert out.spec_stats.tree_steps > 0 and out.spec_stats.accepted > 0


@pytest.mark.parametrize("value", [-1, 64, 2.5, True])
def test_a_bad_tree_budget_is_named(value):
    target, draft = make_pair("llama")
    ids, mask = left_padded_prompts(1)
    with pytest.raises(ValueError, match="tree_budget"):
        draftwise.generate(target, ids, mask, assistant_model=draft, tree_budget=value, max_new_tokens=4,
                           pad_token_id=PAD)


@pytest.mark.parametrize("setting", [dict(lenience=0.5, do_sample=True), dict(repetition_penalty=1.3)])
def test_tree_steps_refuse_what_they_do_not_run(setting):
    target, draft = make_pair("llama")
    ids, mask = left_padded_prompts(1)
    with pytest.raises(ValueError, match="tree_budget"):
        draftwise.generate(target, ids, mask, assistant_model=draft, tree_budget=8, max_new_tokens=4,
                           pad_token_id=PAD, **setting)


def test_a_trie_keeps_the_law_of_first_children_only():
    """Chains [5, 6] and [5, 7] (laws q0, q1): node 5 and its first child 6 keep chain 0's laws;
    7, a later sibling, is deterministic (one-hot); the root has no law."""
    vocab = 10
    q0, q1 = torch.rand(1, 2, vocab), torch.rand(1, 2, vocab)
    tree = DraftTree.from_chains(torch.tensor([1]), [torch.tensor([[5, 6]]), torch.tensor([[5, 7]])],
                                 torch.tensor([3]), laws=[q0, q1])
    assert tree.tokens.tolist() == [[1, 5, 6, 7]] and tree.parents.tolist() == [[-1, 0, 1, 1]]
    assert torch.equal(tree.probs[0, 1], q0[0, 0]) and torch.equal(tree.probs[0, 2], q0[0, 1])
    assert torch.equal(tree.probs[0, 3], torch.nn.functional.one_hot(torch.tensor(7), vocab).float())
    assert not tree.probs[0, 0].any()


def test_a_trie_of_two_sampled_chains_emits_the_target_law():
    """Two chains drawn i.i.d. from one peaked q, merged into a trie: where their first tokens
    differ, the second is a later sibling, kept because it differs, so deterministic in the trie.
    The first emitted token follows p (χ²); verifying that sibling against q instead (as if it
    were drawn from q alone) must fail the same test."""
    from draftwise.kernels import available_backends, verify_tree

    backend = "cpp" if "cpp" in available_backends("cpu") else "torch"
    rows, vocab = (200_000 if backend == "cpp" else 20_000), 4
    p, q = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.7, 0.1, 0.1, 0.1])
    drawn = torch.multinomial(q, 2 * rows, replacement=True, generator=torch.Generator().manual_seed(0))
    drawn = drawn.view(rows, 2)
    zeros = torch.zeros(rows, dtype=torch.int64)
    tree = DraftTree.from_chains(zeros, [drawn[:, :1], drawn[:, 1:]], zeros, laws=[q.expand(rows, 1, vocab)] * 2)
    logits = p.log().expand(rows, tree.tokens.shape[1], vocab).contiguous()
    as_drawn = tree.probs.clone()
    as_drawn[tree.tokens[:, 2] >= 0, 2] = q  # the teeth: the later sibling verified against q
    fits = [chi_square(torch.bincount(verify_tree(tree.tokens, tree.parents, probs, logits, temperature=1.0,
                                                  seed=torch.arange(rows), backend=backend).output_tokens[:, 0],
                                      minlength=vocab), p) for probs in (tree.probs, as_drawn)]
    assert fits[0].pvalue > ALPHA, f"first emitted token: {fits[0]}"
    assert fits[1].pvalue < ALPHA, f"a sibling verified against its law must bias the output: {fits[1]}"


def test_sampled_trie_with_laws_keeps_the_target_law_and_accepts_more():
    """A sampled draft's chain in the trie with its laws: the first two tokens keep the target's
    law (χ²), and more drafted tokens pass than when every node is deterministic."""
    target = tiny_model("llama", layers=2, vocab=16, seed=0)
    target.generation_config.eos_token_id = None
    draft = tiny_model("llama", layers=1, vocab=16, seed=3)
    prompt = torch.tensor([[3, 7, 5, 3, 7]])
    law = first_two_token_law(target, prompt, 0.8)
    common = dict(max_new_tokens=3, do_sample=True, temperature=0.8, top_k=0, pad_token_id=0,
                  return_dict_in_generate=True, num_assistant_tokens=3, assistant_confidence_threshold=0.0)
    out = draftwise.generate(target, prompt.repeat(20_000, 1), drafts=[draft, PromptLookupDrafter()], tree_budget=6,
                             seed=5, **common)
    pairs = out.sequences[:, -3] * 16 + out.sequences[:, -2]
    fit = chi_square(torch.bincount(pairs, minlength=256), law.flatten())
    assert fit.pvalue > ALPHA, f"joint law of the first two tokens: {fit}"
    with_laws = out.spec_stats.accepted / out.spec_stats.drafted
    import draftwise.engine.tree as tree_module

    original = tree_module.DraftTree.from_chains.__func__

    def without_laws(cls, root, chains, prefix_lengths, max_nodes=64, laws=None):
        return original(cls, root, chains, prefix_lengths, max_nodes)

    try:
        tree_module.DraftTree.from_chains = classmethod(without_laws)
        one_hot = draftwise.generate(target, prompt.repeat(20_000, 1), drafts=[draft, PromptLookupDrafter()],
                                     tree_budget=6, seed=5, **common)
    finally:
        tree_module.DraftTree.from_chains = classmethod(original)
    assert with_laws > one_hot.spec_stats.accepted / one_hot.spec_stats.drafted + 0.02


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tree_steps_through_the_tree_attention_kernel(arch, monkeypatch):
    """The tree forwards' attention through the Triton tree-attention kernel (CUDA's path; here in
    the interpreter) gives the target's greedy output, and the kernel really runs."""
    from draftwise.engine import attention, models

    calls = []
    kernel = attention.tree_attention
    monkeypatch.setattr(models, "tree_attention_backend", lambda device: "triton")
    monkeypatch.setattr(attention, "tree_attention", lambda *args, **kw: calls.append(args[-1]) or kernel(*args, **kw))
    target, draft = make_pair(arch)
    ids, mask = left_padded_prompts(3, width=9)
    want = target.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=PAD,
                           max_new_tokens=12, eos_token_id=None)
    got = draftwise.generate(target, ids, mask, assistant_model=draft, tree_budget=6, do_sample=False,
                             pad_token_id=PAD, max_new_tokens=12, eos_token_id=None)
    assert torch.equal(got, want)
    assert calls and set(calls) == {"triton"}


def _always_drafting(monkeypatch):
    """The adaptive policy with its costs never measured: every row drafts every step, whatever
    this machine's timings (a test of step shapes, not of when drafting pays)."""
    from draftwise.engine.policy import CostModel

    monkeypatch.setattr(CostModel, "measured", property(lambda self: False))


@pytest.mark.parametrize("builder", ["dynamic tree of one draft", "prompt lookup's matches"])
@pytest.mark.parametrize("arch", ARCHS)
def test_chain_and_tree_steps_mixed_give_the_target_greedy_output(arch, builder, monkeypatch):
    """tree_budget="auto" alternates chain and tree steps here (forced): the drafters re-sync
    across shapes and the output stays the target's."""
    from draftwise.engine.policy import StepShapes

    shapes = []
    monkeypatch.setattr(StepShapes, "tree_next", lambda self: shapes.append(len(shapes) % 2 == 1) or shapes[-1])
    _always_drafting(monkeypatch)
    target, draft = make_pair(arch)
    ids, mask = left_padded_prompts(3, width=9)
    ids[:, -4:] = ids[:, 2:6].clone()
    want = target.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=PAD,
                           max_new_tokens=20, eos_token_id=None)
    out = draftwise.generate(target, ids, mask, **BUILDERS[builder](draft), tree_budget="auto", do_sample=False,
                             pad_token_id=PAD, max_new_tokens=20, eos_token_id=None, return_dict_in_generate=True)
    assert torch.equal(out.sequences, want)
    assert 0 < out.spec_stats.tree_steps < out.spec_stats.target_calls


def test_auto_trees_follow_the_measured_rates():
    """The faster shape runs; the slower one is tried again after pauses that double."""
    from draftwise.engine.policy import StepShapes

    shapes = StepShapes(first_tree_after=2)
    ran = []
    for _ in range(40):
        tree = shapes.tree_next()
        ran.append(tree)
        shapes.observe(tree, tokens=3 if tree else 2, seconds=1.0)  # trees emit more per second
    assert ran[:2] == [False, True] and sum(ran[10:]) >= 26  # after the first try, mostly trees
    tries = [i + 1 for i in range(1, 40) if not ran[i] and ran[i - 1]]  # steps that try the chain again
    assert tries == [6, 14, 30]  # the tree won at step 2: pauses 4, 8, 16


@pytest.mark.parametrize("budget", ["the default", "auto"])
def test_auto_trees_need_one_drafter_the_adaptive_schedule_and_no_selector(budget, monkeypatch):
    from draftwise.engine.policy import AdaptivePolicy, StepShapes

    monkeypatch.setattr(StepShapes, "tree_next", lambda self: True)  # every drafting step a tree where trees run
    _always_drafting(monkeypatch)

    target, draft = make_pair("llama")
    ids, mask = left_padded_prompts(2, width=9)
    common = dict(do_sample=False, pad_token_id=PAD, max_new_tokens=12, eos_token_id=None,
                  return_dict_in_generate=True, **({} if budget == "the default" else dict(tree_budget="auto")))
    want = target.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=PAD,
                           max_new_tokens=12, eos_token_id=None)
    out = draftwise.generate(target, ids, mask, assistant_model=draft, **common)
    assert out.spec_stats.tree_steps > 0 and torch.equal(out.sequences, want)
    for kwargs in (dict(drafts=[draft, PromptLookupDrafter()]), dict(assistant_model=draft, num_assistant_tokens=3),
                   dict(assistant_model=draft, repetition_penalty=1.2),
                   dict(assistant_model=draft, selector=AdaptivePolicy())):
        assert draftwise.generate(target, ids, mask, **kwargs, **common).spec_stats.tree_steps == 0


def test_tree_attention_choice_reads_its_variable(monkeypatch):
    """SDPA with the tree mask by default; the Triton kernel only on request and only on CUDA; a
    wrong value names the variable."""
    from draftwise.engine.models import tree_attention_backend

    monkeypatch.delenv("DRAFTWISE_TREE_ATTENTION", raising=False)
    assert tree_attention_backend(torch.device("cpu")) is None
    assert tree_attention_backend(torch.device("cuda")) is None
    monkeypatch.setenv("DRAFTWISE_TREE_ATTENTION", "triton")
    assert tree_attention_backend(torch.device("cpu")) is None
    monkeypatch.setenv("DRAFTWISE_TREE_ATTENTION", "flash")
    with pytest.raises(ValueError, match="DRAFTWISE_TREE_ATTENTION"):
        tree_attention_backend(torch.device("cpu"))
