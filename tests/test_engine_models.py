"""ModelRunner + KVCache against transformers' own cache-free forward, on tiny random models.

Oracle: the logits the runner returns for a token equal ``model(input_ids=row_sequence).logits`` of
that row's committed sequence (no padding, no cache) followed by the tokens of the same forward.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, tiny_config, tiny_model
from transformers import Qwen2ForCausalLM

from draftwise.engine.cache import KVCache
from draftwise.engine.models import ModelRunner

ATOL = 1e-4
VOCAB = 101
PROMPT_LENGTHS = (5, 8, 3)  # left-padded to 8

MODEL_CASES = [pytest.param(arch, "sdpa", id=f"{arch}-sdpa") for arch in ARCHS] + [
    pytest.param(arch, "eager", id=f"{arch}-eager") for arch in ARCHS
]


@pytest.fixture(scope="module")
def models():
    """One model per (arch, attn), built once for the module."""
    cache = {}

    def get(arch: str, attn: str = "sdpa"):
        if (arch, attn) not in cache:
            cache[arch, attn] = tiny_model(arch, attn=attn)
        return cache[arch, attn]

    return get


def random_tokens(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, shape, generator=gen)


def left_padded(prompts: list[torch.Tensor], pad_id: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = p
        mask[b, width - len(p) :] = 1
    return ids, mask


@torch.inference_mode()
def reference_logits(model, seqs: list[torch.Tensor], new: torch.Tensor) -> list[torch.Tensor]:
    """Per row: logits of the T tokens ``new[b]`` after ``seqs[b]``, one cache-free forward each."""
    steps = new.shape[1]
    return [model(input_ids=torch.cat([seq, new[b]])[None]).logits[0, -steps:] for b, seq in enumerate(seqs)]


def assert_rows_match(logits: torch.Tensor, refs: list[torch.Tensor], what: str) -> None:
    for b, ref in enumerate(refs):
        err = (logits[b] - ref).abs().max().item()
        assert err <= ATOL, f"{what}: row {b} differs from the cache-free forward by {err:.2e}"


def start(model, prompts, capacity=40, batch_size=None):
    runner = ModelRunner(model, batch_size or len(prompts), capacity)
    ids, mask = left_padded(prompts)
    logits = runner.prefill(ids, mask)
    return runner, ids, mask, logits


def step(runner, model, seqs, new, num_valid=None, accept=None):
    """One forward of ``new`` [B, T], checked against the oracle, then the commit.

    ``num_valid``: commit through ``extend(num_valid=...)``; ``accept``: commit all T, then roll
    back to ``accept`` of them (the two ways a speculative step can keep 0..T tokens).
    """
    before = runner.lengths.clone()
    logits = runner.extend(new, num_valid=num_valid)
    assert logits.shape == (new.shape[0], new.shape[1], runner.vocab_size)
    assert_rows_match(logits, reference_logits(model, seqs, new), f"extend T={new.shape[1]}")
    kept = num_valid if num_valid is not None else accept
    if kept is None:
        kept = torch.full((new.shape[0],), new.shape[1])
    if accept is not None:
        runner.rollback(before + accept)
    assert torch.equal(runner.lengths, before + kept)
    return [torch.cat([seq, new[b, : int(kept[b])]]) for b, seq in enumerate(seqs)]


@pytest.mark.parametrize(("arch", "attn"), MODEL_CASES)
def test_prefill_then_speculative_steps_match_full_forward(models, arch, attn):
    model = models(arch, attn)
    gen = torch.Generator().manual_seed(1)
    prompts = [random_tokens(gen, n) for n in PROMPT_LENGTHS]
    runner, ids, mask, logits = start(model, prompts)

    assert logits.shape == (3, ids.shape[1], runner.vocab_size)
    valid = [logits[b, mask[b].bool()] for b in range(3)]
    refs = [model(input_ids=p[None]).logits[0] for p in prompts]
    assert_rows_match(valid, refs, "prefill")
    assert torch.equal(runner.starts, torch.tensor([3, 0, 5]))
    assert torch.equal(runner.lengths, torch.full((3,), ids.shape[1]))

    seqs = list(prompts)
    seqs = step(runner, model, seqs, random_tokens(gen, 3, 1))
    seqs = step(runner, model, seqs, random_tokens(gen, 3, 4), num_valid=torch.tensor([0, 4, 2]))
    seqs = step(runner, model, seqs, random_tokens(gen, 3, 4), accept=torch.tensor([3, 1, 0]))
    seqs = step(runner, model, seqs, random_tokens(gen, 3, 1), num_valid=torch.tensor([1, 0, 1]))
    seqs = step(runner, model, seqs, random_tokens(gen, 3, 4), num_valid=torch.tensor([4, 0, 1]))
    seqs = step(runner, model, seqs, random_tokens(gen, 3, 4), accept=torch.tensor([0, 4, 2]))
    seqs = step(runner, model, seqs, random_tokens(gen, 3, 1))
    assert torch.equal(runner.lengths, runner.starts + torch.tensor([len(s) for s in seqs]))


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_last_only(models, arch):
    model = models(arch)
    gen = torch.Generator().manual_seed(2)
    prompts = [random_tokens(gen, n) for n in PROMPT_LENGTHS]
    runner = ModelRunner(model, 3, 16)
    ids, mask = left_padded(prompts)
    logits = runner.prefill(ids, mask, last_only=True)
    assert logits.shape == (3, 1, runner.vocab_size)
    assert_rows_match(logits, [model(input_ids=p[None]).logits[0, -1:] for p in prompts], "last_only")


def test_prefill_without_mask_and_fewer_rows_than_allocated(models):
    model = models("llama")
    gen = torch.Generator().manual_seed(3)
    ids = random_tokens(gen, 2, 6)
    runner = ModelRunner(model, 4, 16)
    logits = runner.prefill(ids)
    assert runner.batch_size == 2
    assert_rows_match(logits, [model(input_ids=ids[b : b + 1]).logits[0] for b in range(2)], "prefill")
    step(runner, model, list(ids), random_tokens(gen, 2, 3))


def test_capacity_exceeded_raises_before_writing(models):
    model = models("llama")
    gen = torch.Generator().manual_seed(4)
    prompts = [random_tokens(gen, n) for n in PROMPT_LENGTHS]
    runner, ids, _, _ = start(model, prompts, capacity=10)
    buffers = [layer.keys_buffer.clone() for layer in runner.cache.layers]
    lengths = runner.lengths.clone()
    with pytest.raises(ValueError, match=r"row \d needs 12 slots.*capacity is 10.*`capacity`"):
        runner.extend(random_tokens(gen, 3, 4))
    assert torch.equal(runner.lengths, lengths)
    for layer, before in zip(runner.cache.layers, buffers):
        assert torch.equal(layer.keys_buffer, before)
    # The state is intact: a forward that fits still matches the oracle.
    step(runner, model, list(prompts), random_tokens(gen, 3, 2))


def test_write_slots_built_once_per_forward_and_follow_the_lengths():
    """Every layer of one forward writes at the same slots (one index for all of them); a new
    commit, rollback or forward width gives a new index at the new lengths."""
    cache = KVCache(3, 2, 1, 2, 16)
    cache.start(torch.tensor([0, 1]))
    first = cache.write_slots(3)
    assert cache.write_slots(3) is first
    assert first.view(2, 3).tolist() == [[0, 1, 2], [0, 1, 2]]
    kv = torch.ones(2, 1, 3, 2)
    for layer in range(3):
        cache.update(kv * layer, kv * layer, layer)
    cache.advance(torch.tensor([1, 3]))
    assert cache.write_slots(2).view(2, 2).tolist() == [[1, 2], [3, 4]]
    assert cache.write_slots(1).view(2, 1).tolist() == [[1], [3]]
    cache.rollback(torch.tensor([1, 2]))
    assert cache.write_slots(1).view(2, 1).tolist() == [[1], [2]]
    for layer in range(3):
        cache.update(kv[:, :, :1] * 10, kv[:, :, :1] * 10, layer)
        assert cache.layers[layer].keys_buffer[:, 0, :, 0][:, :4].tolist() == [
            [layer, 10, layer, 0], [layer, layer, 10, 0]]


def test_cache_bound_is_tightened_before_raising():
    """A ragged commit leaves the host bound of max(lengths) above the truth; near the capacity the
    cache reads the exact lengths instead of raising."""
    cache = KVCache(1, 2, 1, 2, 10)
    kv = torch.ones(2, 1, 4, 2)
    cache.update(kv, kv, 0)
    cache.advance(torch.tensor([1, 2]))
    assert cache.max_length == 4  # bound: nothing commits more than the 4 slots written
    cache.check_room(8)  # 2 + 8 fits: no error
    assert cache.max_length == 2
    with pytest.raises(ValueError, match=r"row 1 needs 11 slots \(2 used \+ 9 new\).*capacity is 10"):
        cache.check_room(9)


def test_capacity_after_many_rejected_drafts(models):
    model = models("qwen2")
    gen = torch.Generator().manual_seed(5)
    prompts = [random_tokens(gen, n) for n in PROMPT_LENGTHS]
    runner, ids, _, _ = start(model, prompts, capacity=16)
    seqs = list(prompts)
    for _ in range(4):  # 4 x T=4 written, nothing committed: the bound may reach 24 > 16
        seqs = step(runner, model, seqs, random_tokens(gen, 3, 4), num_valid=torch.zeros(3, dtype=torch.long))
    seqs = step(runner, model, seqs, random_tokens(gen, 3, 4), num_valid=torch.tensor([2, 4, 0]))
    assert runner.cache.max_length >= int(runner.lengths.max())
    with pytest.raises(ValueError, match="row 1 needs 17 slots"):
        runner.extend(random_tokens(gen, 3, 5))


def test_rollback_above_current_length_raises(models):
    model = models("gpt2")
    gen = torch.Generator().manual_seed(6)
    runner, *_ = start(model, [random_tokens(gen, n) for n in PROMPT_LENGTHS])
    lengths = runner.lengths.clone()
    with pytest.raises(ValueError, match="`lengths`"):
        runner.rollback(lengths + torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="`lengths`"):
        runner.rollback(lengths[:2])
    assert torch.equal(runner.lengths, lengths)
    runner.rollback(lengths - 1)
    assert torch.equal(runner.lengths, lengths - 1)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_select_rows_keeps_the_right_rows(models, arch):
    model = models(arch)
    gen = torch.Generator().manual_seed(7)
    prompts = [random_tokens(gen, n) for n in PROMPT_LENGTHS]
    runner, *_ = start(model, prompts)
    seqs = step(runner, model, list(prompts), random_tokens(gen, 3, 4), num_valid=torch.tensor([1, 3, 4]))
    lengths, starts = runner.lengths.clone(), runner.starts.clone()

    rows = torch.tensor([2, 0])
    runner.select_rows(rows)
    assert runner.batch_size == 2
    assert torch.equal(runner.lengths, lengths[rows])
    assert torch.equal(runner.starts, starts[rows])
    seqs = [seqs[2], seqs[0]]
    seqs = step(runner, model, seqs, random_tokens(gen, 2, 4), accept=torch.tensor([2, 0]))
    seqs = step(runner, model, seqs, random_tokens(gen, 2, 1))

    runner.select_rows(torch.tensor([1]))
    step(runner, model, [seqs[1]], random_tokens(gen, 1, 3))
    with pytest.raises(ValueError, match="`rows`"):
        runner.select_rows(torch.tensor([1]))


def test_padded_vocabulary(models):
    """Embeddings padded past the tokenizer's vocabulary: the logits are wider than it."""
    model = tiny_model("llama", vocab=VOCAB, seed=3)
    model.resize_token_embeddings(VOCAB, pad_to_multiple_of=16)
    gen = torch.Generator().manual_seed(8)
    prompts = [random_tokens(gen, n) for n in PROMPT_LENGTHS]
    runner, _, _, logits = start(model, prompts)
    assert runner.vocab_size == 112
    assert logits.shape[-1] == 112
    step(runner, model, list(prompts), random_tokens(gen, 3, 4), num_valid=torch.tensor([4, 1, 0]))


def test_reset_and_new_prompts(models):
    model = models("gpt2")
    gen = torch.Generator().manual_seed(9)
    runner, *_ = start(model, [random_tokens(gen, n) for n in PROMPT_LENGTHS])
    runner.extend(random_tokens(gen, 3, 4))
    runner.select_rows(torch.tensor([0]))
    runner.reset()
    assert runner.batch_size == 3 and int(runner.lengths.sum()) == 0
    prompts = [random_tokens(gen, n) for n in (2, 7, 4)]
    ids, mask = left_padded(prompts)
    logits = runner.prefill(ids, mask)
    refs = [model(input_ids=p[None]).logits[0] for p in prompts]
    assert_rows_match([logits[b, mask[b].bool()] for b in range(3)], refs, "prefill")
    step(runner, model, prompts, random_tokens(gen, 3, 2))


def test_bad_inputs(models):
    model = models("llama")
    runner = ModelRunner(model, 2, 16)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with pytest.raises(ValueError, match="`attention_mask`"):
        runner.prefill(ids, torch.tensor([[1, 0, 1], [1, 1, 1]]))  # right/inner padding
    with pytest.raises(ValueError, match="`input_ids`"):
        runner.prefill(torch.ones(3, 4, dtype=torch.long))  # more rows than allocated
    with pytest.raises(ValueError, match="capacity is 16"):
        runner.prefill(torch.ones(2, 17, dtype=torch.long))
    with pytest.raises(TypeError, match="`input_ids`"):
        runner.prefill(ids.float())
    runner.prefill(ids)
    with pytest.raises(ValueError, match="`tokens`"):
        runner.extend(torch.ones(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="`num_valid`"):
        runner.extend(torch.ones(2, 1, dtype=torch.long), num_valid=torch.ones(3, dtype=torch.long))


def test_rejects_chunked_attention_layers():
    """Sliding-window layers run (tests/test_engine_sliding.py); chunked ones are refused by name."""
    config = tiny_config("qwen2")
    config.layer_types = ["full_attention", "chunked_attention"]
    model = Qwen2ForCausalLM(config).eval()
    with pytest.raises(ValueError, match="chunked_attention"):
        ModelRunner(model, 1, 16)


def test_cache_commit_path_gathers_accepted_nodes():
    """A tree step writes T nodes per row; commit_path moves the accepted ones to consecutive slots."""
    cache = KVCache(1, 2, 1, 2, 12)
    cache.start(torch.tensor([0, 1]))
    prompt = torch.arange(2 * 3, dtype=torch.float32).view(2, 1, 3, 1).expand(2, 1, 3, 2)
    cache.update(prompt, prompt, 0)
    cache.advance(3)
    nodes = 100 + torch.arange(2 * 5, dtype=torch.float32).view(2, 1, 5, 1).expand(2, 1, 5, 2)
    keys, _ = cache.update(nodes, -nodes, 0)
    assert keys.shape == (2, 1, 8, 2)
    cache.commit_path(torch.tensor([[0, 2, 4], [1, 3, 0]]), torch.tensor([3, 2]))
    assert torch.equal(cache.lengths, torch.tensor([6, 5]))
    layer = cache.layers[0]
    assert layer.keys_buffer[0, 0, 3:6, 0].tolist() == [100, 102, 104]
    assert layer.keys_buffer[1, 0, 3:5, 0].tolist() == [106, 108]
    assert layer.values_buffer[1, 0, 3:5, 0].tolist() == [-106, -108]
    assert layer.keys_buffer[1, 0, :3, 0].tolist() == [3, 4, 5]


def test_grouped_heads_stay_inside_sdpa(models):
    """Multi-token forwards of a grouped-head sdpa model on the CPU run attention.sdpa_attention,
    give the logits of transformers' own sdpa path, and leave the model's setting as it was."""
    from draftwise.engine import attention

    model = models("llama", "sdpa")
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    gen = torch.Generator().manual_seed(4)
    prompts = [random_tokens(gen, n) for n in PROMPT_LENGTHS]
    blocks = [random_tokens(gen, 3, 1), random_tokens(gen, 3, 4)]
    seen = []
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args: seen.append(module.config._attn_implementation))

    def run(gqa: bool):
        runner, *_ = start(model, prompts)
        runner.gqa_attention = gqa
        return [runner.extend(block) for block in blocks]

    try:
        fast, plain = run(True), run(False)
    finally:
        hook.remove()
    # prefill, T=1, T=4; then prefill (before the switch is turned off), T=1, T=4
    assert seen == [attention.NAME, "sdpa", attention.NAME, attention.NAME, "sdpa", "sdpa"]
    assert model.config._attn_implementation == "sdpa"
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not ModelRunner(models("gpt2", "sdpa"), 1, 8).gqa_attention  # one key/value head per head
    assert not ModelRunner(models("llama", "eager"), 1, 8).gqa_attention


def test_attention_switch_is_undone_on_error(models):
    from draftwise.engine import attention

    model = models("qwen2", "sdpa")
    with pytest.raises(RuntimeError), attention.using(model):
        assert model.config._attn_implementation == attention.NAME
        raise RuntimeError("inside a forward")
    assert model.config._attn_implementation == "sdpa"


def test_runners_of_one_model_take_turns_across_threads(models):
    """While one thread runs a model with its modules switched, another thread's runner of the same
    model waits for it (the switches are per model, not per thread); other models do not wait."""
    import threading

    from draftwise.engine.models import model_lock

    model, other = models("llama", "sdpa"), models("qwen2", "sdpa")
    runners = [ModelRunner(m, batch_size=1, capacity=16) for m in (model, other)]
    assert runners[0].gqa_attention  # grouped heads: its forwards switch the attention
    done = {}

    def prefill(runner, key):
        runner.prefill(torch.tensor([[5, 6, 7]]))
        done[key] = True

    lock = model_lock(model)
    assert model_lock(model) is lock and model_lock(other) is not lock
    with lock:
        threads = [threading.Thread(target=prefill, args=(r, k)) for r, k in zip(runners, ("same", "other"))]
        for t in threads:
            t.start()
        threads[1].join(timeout=30)
        threads[0].join(timeout=0.5)
        assert done == {"other": True}  # the same model's runner is still waiting
    threads[0].join(timeout=30)
    assert done == {"other": True, "same": True}


def test_generate_on_one_model_from_several_threads():
    """Concurrent draftwise.generate calls on one target and draft (each building its runners while
    the others run forwards with the modules switched) all give the single-threaded output."""
    import threading

    import draftwise
    from tiny_models import tiny_model

    target = tiny_model("llama", layers=2, vocab=VOCAB, seed=0).eval()
    draft = tiny_model("llama", layers=1, vocab=VOCAB, seed=1).eval()
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    kwargs = dict(assistant_model=draft, max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None,
                  num_assistant_tokens=4, num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0)
    expected = draftwise.generate(target, ids, **kwargs)
    outputs, errors = [], []

    def run():
        try:
            outputs.extend(draftwise.generate(target, ids, **kwargs) for _ in range(3))
        except Exception as error:  # reported below, with the thread's message
            errors.append(repr(error))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(outputs) == 12 and all(torch.equal(out, expected) for out in outputs)


@pytest.mark.parametrize("arch", ARCHS)
def test_an_unpadded_decode_step_runs_sdpa_without_its_all_true_mask(arch, models, monkeypatch):
    """One unpadded row decoding one token sees every key: SDPA runs without the mask (the
    unmasked path is taken, and only then) and the logits are those of a cache-free forward."""
    from draftwise.engine import attention

    model = models(arch)
    seen = []
    mapping = attention.AttentionInterface._global_mapping
    for name, unmasked in ((attention.NAME, False), (attention.UNMASKED_NAME, True)):
        real = mapping[name]
        monkeypatch.setitem(mapping, name, lambda *a, real=real, unmasked=unmasked, **k: seen.append(unmasked)
                            or real(*a, **k))
    gen = torch.Generator().manual_seed(0)
    tokens = random_tokens(gen, 1, 9)
    runner = ModelRunner(model, 1, 16)
    runner.prefill(tokens[:, :6])
    assert not any(seen)  # the prompt: several queries, masked
    seen.clear()
    for t in range(6, 9):
        logits = runner.extend(tokens[:, t : t + 1])
        torch.testing.assert_close(logits[:, 0], model(input_ids=tokens[:, : t + 1]).logits[:, -1], atol=ATOL, rtol=0)
    assert seen == [True] * 3 * model.config.num_hidden_layers  # decode steps: unmasked, every layer
    seen.clear()
    runner.extend(tokens[:, 6:8])  # two tokens: masked again
    assert not any(seen)
