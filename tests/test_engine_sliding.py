"""Sliding-window attention (Gemma 3, Gemma 2, Mistral, Qwen2 with sliding layers) through the engine.

Tiny random models whose windows are 4-8 tokens, generations of 40 tokens: every forward after the
first few runs with keys out of the window. Oracles: the cache-free forward of a row's own
sequence (which applies the window itself) for the runner's logits, and the target's own greedy
``generate()`` for whole generations.
"""

from __future__ import annotations

import os

import pytest
import torch
from oracles import ALPHA, PAD, chi_square, first_two_token_law, left_padded_prompts, tree_path_tokens
from tiny_models import SLIDING_ARCHS, SLIDING_WINDOWS, make_sliding_pair, tiny_config, tiny_sliding_model

import draftwise
from draftwise.engine import PromptLookupDrafter
from draftwise.engine.models import ModelRunner, layer_kinds
from draftwise.engine.tree import DraftTree

ATOL = 1e-4
NEW_TOKENS = 40  # 5-10 windows of the tiny models


@pytest.fixture(scope="module")
def pairs():
    """(target, draft) per architecture, built once for the module: a 3-layer target and a draft
    of its first two layers (:func:`build_draft`), which agrees with it often enough that steps
    accept some drafts and reject others."""
    from draftwise.engine.draft_model import build_draft

    built = {}

    def get(arch: str):
        if arch not in built:
            target = tiny_sliding_model(arch, layers=3)
            built[arch] = target, build_draft(target, layers=[0, 1]).eval()
        return built[arch]

    return get


def prompts_with_repeats(batch: int, width: int = 9):
    """Left-padded prompts (row b has b padding tokens) that end with a repeat of earlier tokens,
    so that prompt lookup finds matches."""
    ids, mask = left_padded_prompts(batch, width=width)
    ids[:, -4:] = ids[:, 2:6].clone()
    ids[mask == 0] = PAD
    return ids, mask


def greedy(target, ids, mask, new_tokens=NEW_TOKENS):
    return target.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=PAD,
                           max_new_tokens=new_tokens, eos_token_id=None)


@torch.inference_mode()
def cache_free(model, sequence: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([sequence])).logits[0]


# ---------------------------------------------------------------------------------------------
# The runner's logits


@pytest.mark.parametrize("arch", SLIDING_ARCHS)
def test_runner_steps_match_the_cache_free_forward(pairs, arch):
    """Ragged prompts, then speculative steps that keep all, some or none of their tokens (by
    ``num_valid`` and by rollback) until every row is several windows long: each step's logits
    equal the cache-free forward of the row's committed sequence and the step's tokens."""
    model = pairs(arch)[0]
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 101, (n,), generator=gen).tolist() for n in (5, 11, 3)]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    runner = ModelRunner(model, 3, 64)
    logits = runner.prefill(ids, mask)
    for b, prompt in enumerate(prompts):
        torch.testing.assert_close(logits[b, width - len(prompt):], cache_free(model, prompt), atol=ATOL, rtol=ATOL)
    seqs = [list(p) for p in prompts]
    for step in range(10):
        steps = (1, 4, 3, 5)[step % 4]
        new = torch.randint(3, 101, (3, steps), generator=gen)
        kept = torch.randint(0, steps + 1, (3,), generator=gen)
        before = runner.lengths.clone()
        if step % 2:
            logits = runner.extend(new, num_valid=kept)
        else:
            logits = runner.extend(new)
            runner.rollback(before + kept)
        for b in range(3):
            want = cache_free(model, seqs[b] + new[b].tolist())[-steps:]
            torch.testing.assert_close(logits[b], want, atol=ATOL, rtol=ATOL, msg=f"step {step}, row {b}")
            seqs[b] += new[b, : int(kept[b])].tolist()
    assert min(map(len, seqs)) > 2 * SLIDING_WINDOWS[arch]


@pytest.mark.parametrize("arch", ["gemma3", "qwen2", "mistral"])
def test_a_tree_deeper_than_the_window_gives_every_node_its_path_logits(pairs, arch):
    """One tree forward whose paths are longer than the window (left-padded batch): every node's
    logits equal a plain forward over prompt + its root-to-node path, whose window counts tokens
    along the path, not the nodes' slots; after ``commit_path`` the next token sees the right
    window too."""
    model = pairs(arch)[0]
    window = SLIDING_WINDOWS[arch]
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 101, (n,), generator=gen).tolist() for n in (12, 7)]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    runner = ModelRunner(model, batch_size=2, capacity=64)
    runner.prefill(ids[:, :-1], mask[:, :-1])  # the root (each prompt's last token) is read by the tree
    # two branches of window + 2 nodes each, interleaved in slot order: slots and depths differ
    depth_limit = window + 2
    parents = [-1]
    for d in range(depth_limit):
        parents += [0 if d == 0 else len(parents) - 2, 0 if d == 0 else len(parents) - 1]
    nodes = len(parents)
    tokens = torch.cat([ids[:, -1:], torch.randint(3, 101, (2, nodes - 1), generator=gen)], 1)
    tokens[1, 5] = -1  # a padding node (and everything below it)
    parents = torch.tensor([parents, parents])
    tree = DraftTree(tokens, parents, runner.lengths.clone())
    assert int(tree.depth.max()) > window
    logits = runner.extend_tree(tree.tokens.clamp(min=0), tree.depth, tree.ancestors)

    for b, prompt in enumerate(prompts):
        for t in range(nodes):
            if tree.valid[b, t]:
                want = cache_free(model, prompt[:-1] + tree_path_tokens(tokens, parents, b, t))[-1]
                torch.testing.assert_close(logits[b, t], want, atol=ATOL, rtol=ATOL, msg=f"row {b}, node {t}")
    deepest = [nodes - 2, nodes - 1]  # row 0: the first branch's last node; row 1: the second's
    paths = [[0] + [n for n in range(1, nodes) if tree.ancestors[b, deepest[b]] >> n & 1] for b in range(2)]
    runner.cache.commit_path(torch.tensor(paths), torch.tensor([len(p) for p in paths]))
    after = runner.extend(torch.tensor([[50], [51]]))[:, 0]
    for b, prompt in enumerate(prompts):
        want = cache_free(model, prompt[:-1] + tree_path_tokens(tokens, parents, b, deepest[b]) + [50 + b])[-1]
        torch.testing.assert_close(after[b], want, atol=ATOL, rtol=ATOL)


# ---------------------------------------------------------------------------------------------
# Whole generations against the target's own greedy generate()

DRAFTING = {
    "target alone": lambda draft: {},
    "chain draft": lambda draft: dict(assistant_model=draft, num_assistant_tokens=5,
                                      num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0),
    # a fixed schedule: the adaptive one follows measured timings, and may stop drafting on a tiny model
    "prompt lookup": lambda draft: dict(prompt_lookup_num_tokens=4, num_assistant_tokens_schedule="constant"),
    "tree of a draft": lambda draft: dict(assistant_model=draft, tree_budget=12),
    "trie of a draft and prompt lookup": lambda draft: dict(drafts=[draft, PromptLookupDrafter()], tree_budget=10),
}


@pytest.mark.parametrize("drafting", list(DRAFTING))
@pytest.mark.parametrize("arch", SLIDING_ARCHS)
def test_greedy_generation_past_the_window_equals_the_target_generate(pairs, arch, drafting):
    """A ragged batch of 3 (left padding) and one prompt alone, 40 new tokens: the target's own
    greedy output, token for token, while drafts are rejected and rolled back across the window."""
    target, draft = pairs(arch)
    for batch in (3, 1):
        ids, mask = prompts_with_repeats(batch)
        want = greedy(target, ids, mask)
        out = draftwise.generate(target, ids, mask, **DRAFTING[drafting](draft), do_sample=False, pad_token_id=PAD,
                                 max_new_tokens=NEW_TOKENS, eos_token_id=None, return_dict_in_generate=True)
        assert torch.equal(out.sequences, want), f"batch {batch}"
        stats = out.spec_stats
        if drafting != "target alone" and batch == 3:
            assert 0 < stats.accepted < stats.drafted, "drafts both accepted and rejected"


def test_the_window_changes_the_output():
    """The teeth of the tests above: the same model run as if its layers were all full-attention
    (or with a window one token wider or narrower) drifts from its greedy output."""
    import draftwise.engine.models as models

    target, draft = make_sliding_pair("gemma3")
    ids, mask = prompts_with_repeats(3)
    want = greedy(target, ids, mask)
    real = models.layer_kinds
    for name, fake in [("full", lambda c: (["full_attention"] * c.num_hidden_layers, None)),
                       ("wider", lambda c: (real(c)[0], real(c)[1] + 1)),
                       ("narrower", lambda c: (real(c)[0], real(c)[1] - 1))]:
        models.layer_kinds = fake
        try:
            for kwargs in (dict(), dict(assistant_model=draft, tree_budget=12)):
                out = draftwise.generate(target, ids, mask, **kwargs, do_sample=False, pad_token_id=PAD,
                                         max_new_tokens=NEW_TOKENS, eos_token_id=None)
                assert not torch.equal(out, want), f"window {name}, {list(kwargs)}"
        finally:
            models.layer_kinds = real


def test_sampled_chain_steps_keep_the_target_law():
    """A prompt longer than the window, sampled through chain steps of a sliding draft: the joint
    law of the first two tokens is the target's (χ²)."""
    target = tiny_sliding_model("gemma3", layers=3, vocab=16, seed=0)
    target.generation_config.eos_token_id = None
    draft = tiny_sliding_model("gemma3", layers=1, vocab=16, seed=3)
    prompt = torch.tensor([[3, 7, 5, 3, 7, 9, 4, 11, 6]])
    law = first_two_token_law(target, prompt, 0.8)
    out = draftwise.generate(target, prompt.repeat(20_000, 1), assistant_model=draft, max_new_tokens=3,
                             do_sample=True, temperature=0.8, top_k=0, seed=5, pad_token_id=0,
                             num_assistant_tokens=3, num_assistant_tokens_schedule="constant",
                             assistant_confidence_threshold=0.0, return_dict_in_generate=True)
    pairs = out.sequences[:, -3] * 16 + out.sequences[:, -2]
    fit = chi_square(torch.bincount(pairs, minlength=256), law.flatten())
    assert fit.pvalue > ALPHA, f"joint law of the first two tokens: {fit}"
    assert out.spec_stats.accepted > 0


@pytest.mark.parametrize("arch", ["gemma3", "mistral", "gemma2"])
def test_tree_kernel_runs_the_full_layers_and_leaves_sliding_ones_to_sdpa(arch, monkeypatch):
    """With the Triton tree-attention kernel on (CUDA's opt-in path; here in the interpreter) the
    kernel serves the full-attention layers only: it knows no window, so sliding layers keep SDPA
    with their masks. An ``eager`` model (Gemma 2, soft-capped) keeps its own attention throughout.
    The output stays the target's."""
    from draftwise.engine import attention, models

    calls = []
    kernel = attention.tree_attention
    monkeypatch.setattr(models, "tree_attention_backend", lambda device: "triton")
    monkeypatch.setattr(attention, "tree_attention", lambda *args, **kw: calls.append(args[-1]) or kernel(*args, **kw))
    target, draft = make_sliding_pair(arch)
    ids, mask = prompts_with_repeats(3)
    out = draftwise.generate(target, ids, mask, assistant_model=draft, tree_budget=8, do_sample=False,
                             pad_token_id=PAD, max_new_tokens=24, eos_token_id=None, return_dict_in_generate=True)
    assert torch.equal(out.sequences, greedy(target, ids, mask, 24))
    full_layers = layer_kinds(target.config)[0].count("full_attention") if arch != "gemma2" else 0
    assert len(calls) == full_layers * out.spec_stats.tree_steps  # gemma3: 1 of 3 layers; mistral: none


# ---------------------------------------------------------------------------------------------
# Drafts built from a sliding-window target's layers


def test_a_draft_built_from_gemma3_layers_keeps_their_types_and_window():
    from draftwise.engine.draft_model import build_draft

    target = tiny_sliding_model("gemma3", layers=4)  # sliding, full, sliding, full
    for layers in ([0, 1], [1, 2, 3], [2]):
        draft = build_draft(target, layers=layers).eval()
        types = [target.config.layer_types[i] for i in layers]
        assert draft.config.layer_types == types
        assert draft.config.sliding_window == target.config.sliding_window
        assert [layer.self_attn.sliding_window for layer in draft.model.layers] == [
            target.config.sliding_window if kind == "sliding_attention" else None for kind in types]
        ids, mask = prompts_with_repeats(2)
        want = greedy(draft, ids, mask, 24)
        assert torch.equal(draftwise.generate(draft, ids, mask, do_sample=False, pad_token_id=PAD, max_new_tokens=24,
                                              eos_token_id=None), want), f"the draft of layers {layers} alone"
    out = draftwise.generate(target, ids, mask, assistant_model=draft, do_sample=False, pad_token_id=PAD,
                             max_new_tokens=24, eos_token_id=None)
    assert torch.equal(out, greedy(target, ids, mask, 24))


# ---------------------------------------------------------------------------------------------
# What stays refused


def test_layer_kinds_of_the_supported_configs():
    assert layer_kinds(tiny_config("llama")) == (["full_attention"] * 2, None)
    assert layer_kinds(tiny_config("qwen2")) == (["full_attention"] * 2, None)
    for arch in SLIDING_ARCHS:
        types, window = layer_kinds(tiny_sliding_model(arch).config)
        assert window == SLIDING_WINDOWS[arch] and "sliding_attention" in types


@pytest.mark.parametrize("change, message", [
    (dict(layer_types=["full_attention", "chunked_attention"]), r"\['chunked_attention'\]"),
    (dict(layer_types=["linear_attention", "full_attention"]), r"\['linear_attention'\]"),
    (dict(attention_chunk_size=8, sliding_window=None, layer_types=None), r"\['chunked_attention'\]"),
    (dict(sliding_window=None), "sliding_window"),
    (dict(use_bidirectional_attention=True), "bidirectional"),
])
def test_unsupported_layers_are_named(change, message):
    config = tiny_config("llama")
    config.sliding_window, config.layer_types = 4, ["sliding_attention", "full_attention"]
    for key, value in change.items():
        setattr(config, key, value)
    if config.layer_types is None:
        del config.layer_types
    with pytest.raises(ValueError, match=message):
        layer_kinds(config)


# ---------------------------------------------------------------------------------------------
# A real Gemma 3: DRAFTWISE_GEMMA3 names a save_pretrained folder, else the prepared gemma-3-270m
# in the draftwise cache (`draftwise.defaults.prepare_target(name="gemma-3-270m")`), if there is one.


def _gemma3_folder():
    from draftwise.defaults import KNOWN_TARGETS, default_cache_dir

    return os.environ.get("DRAFTWISE_GEMMA3") or str(default_cache_dir() / KNOWN_TARGETS["gemma-3-270m"].folder)


GEMMA3 = _gemma3_folder()


@pytest.mark.skipif(not os.path.isfile(os.path.join(GEMMA3, "model.safetensors")),
                    reason="no prepared Gemma 3: set DRAFTWISE_GEMMA3 or prepare gemma-3-270m")
def test_real_gemma3_greedy_equals_its_generate():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(GEMMA3)
    model = AutoModelForCausalLM.from_pretrained(GEMMA3, dtype=torch.float32, attn_implementation="sdpa").eval()
    texts = ["The capital of France is Paris. The capital of France is", "def add(a, b):\n    return"]
    tokenizer.padding_side = "left"
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    want = model.generate(**inputs, do_sample=False, max_new_tokens=48)
    for kwargs in (dict(), dict(prompt_lookup_num_tokens=4)):
        assert torch.equal(draftwise.generate(model, **inputs, do_sample=False, max_new_tokens=48, **kwargs), want)


@pytest.mark.skipif(not os.path.isfile(os.path.join(GEMMA3, "model.safetensors")),
                    reason="no prepared Gemma 3: set DRAFTWISE_GEMMA3 or prepare gemma-3-270m")
def test_real_gemma3_with_its_shipped_draft_past_the_window_equals_its_generate():
    """The draft shipped for Gemma-3-270M, on a prompt longer than the 512-token window."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from draftwise.defaults import default_draft

    tokenizer = AutoTokenizer.from_pretrained(GEMMA3)
    model = AutoModelForCausalLM.from_pretrained(GEMMA3, dtype=torch.float32, attn_implementation="sdpa").eval()
    draft = default_draft(model, "gemma-3-270m")
    colours = ["red", "green", "blue"]
    text = " ".join(f"Item {i}: the {colours[i % 3]} box holds {i * 7 % 11} stones." for i in range(60))
    inputs = tokenizer(text + " Item 60:", return_tensors="pt")
    assert inputs["input_ids"].shape[1] > model.config.sliding_window
    want = model.generate(**inputs, do_sample=False, max_new_tokens=32)
    got = draftwise.generate(model, **inputs, assistant_model=draft, do_sample=False, max_new_tokens=32)
    assert torch.equal(got, want)
