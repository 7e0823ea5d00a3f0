"""Tiny random-weight causal LMs of several architectures, built from configs (no downloads).

``tiny_model(arch)`` gives a 2-layer, hidden-64, 4-head model (2 KV heads where the architecture
has grouped-query attention), fp32, eval mode, deterministic weights for a given seed.
``make_pair(arch)`` gives a target and a smaller 1-layer draft over the same vocabulary.
"""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ARCHS = ("llama", "qwen2", "gpt2", "gpt_neox")

HIDDEN = 64
HEADS = 4
KV_HEADS = 2  # for architectures with grouped-query attention (Llama, Qwen2)
INTERMEDIATE = 128
MAX_POSITIONS = 256


def tiny_config(arch: str, *, layers: int = 2, vocab: int = 101, attn: str = "sdpa"):
    """The config of :func:`tiny_model` (no weights)."""
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    grouped = dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POSITIONS)
    if arch == "llama":
        config = LlamaConfig(**grouped, **common)
    elif arch == "qwen2":
        config = Qwen2Config(**grouped, use_sliding_window=False, **common)
    elif arch == "gpt2":
        config = GPT2Config(
            n_embd=HIDDEN,
            n_layer=layers,
            n_head=HEADS,
            n_positions=MAX_POSITIONS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    elif arch == "gpt_neox":
        config = GPTNeoXConfig(
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=layers,
            num_attention_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            **common,
        )
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    config._attn_implementation = attn
    return config


_MODEL_CLASSES = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "gpt2": GPT2LMHeadModel,
    "gpt_neox": GPTNeoXForCausalLM,
}


def tiny_model(arch: str, *, layers: int = 2, vocab: int = 101, seed: int = 0, attn: str = "sdpa"):
    """A tiny random-weight causal LM of ``arch`` (one of :data:`ARCHS`), fp32, in eval mode."""
    config = tiny_config(arch, layers=layers, vocab=vocab, attn=attn)
    torch.manual_seed(seed)
    model = _MODEL_CLASSES[arch](config)
    return model.float().eval()


def make_pair(arch: str, *, vocab: int = 101, seed: int = 0, attn: str = "sdpa"):
    """(target, draft): a 2-layer target and a 1-layer draft of ``arch`` over the same vocabulary."""
    target = tiny_model(arch, layers=2, vocab=vocab, seed=seed, attn=attn)
    draft = tiny_model(arch, layers=1, vocab=vocab, seed=seed + 1, attn=attn)
    return target, draft


# ---------------------------------------------------------------------------------------------
# Sliding-window attention: tiny models whose windows are a few tokens, so that a short
# generation runs several windows past them.

SLIDING_ARCHS = ("gemma3", "gemma2", "mistral", "qwen2")
SLIDING_WINDOWS = {"gemma3": 4, "gemma2": 5, "mistral": 6, "qwen2": 8}
# Gemma 2 soft-caps its attention logits, which ``sdpa`` refuses: it runs with ``eager``.
SLIDING_ATTENTION = {"gemma3": "sdpa", "gemma2": "eager", "mistral": "sdpa", "qwen2": "sdpa"}


def tiny_sliding_config(arch: str, *, layers: int = 3, vocab: int = 101, window: int | None = None,
                        attn: str | None = None):
    """The config of :func:`tiny_sliding_model`: sliding layers alternating with full ones from
    layer 0 (Gemma 3, Gemma 2), every layer sliding (Mistral), or the layers from 1 on sliding
    (Qwen2's ``max_window_layers``)."""
    from transformers import Gemma2Config, Gemma3TextConfig, MistralConfig

    window = SLIDING_WINDOWS[arch] if window is None else window
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False,
                  hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POSITIONS,
                  sliding_window=window)
    alternating = (["sliding_attention", "full_attention"] * layers)[:layers]
    if arch == "gemma3":
        # query_pre_attn_scalar != head_dim: the layers' own attention scale must reach SDPA
        config = Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=24, layer_types=alternating)
    elif arch == "gemma2":
        config = Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=24, layer_types=alternating,
                              attn_logit_softcapping=5.0, final_logit_softcapping=8.0)
    elif arch == "mistral":
        config = MistralConfig(**common)
    elif arch == "qwen2":
        config = Qwen2Config(**common, use_sliding_window=True, max_window_layers=1)
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {SLIDING_ARCHS}")
    config._attn_implementation = attn or SLIDING_ATTENTION[arch]
    return config


def tiny_sliding_model(arch: str, *, layers: int = 3, vocab: int = 101, seed: int = 0, window: int | None = None,
                       attn: str | None = None):
    """A tiny random-weight causal LM of ``arch`` (one of :data:`SLIDING_ARCHS`) with sliding-window
    layers of window :data:`SLIDING_WINDOWS` ``[arch]``, fp32, in eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_sliding_config(arch, layers=layers, vocab=vocab, window=window, attn=attn)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=config._attn_implementation).float().eval()


def make_sliding_pair(arch: str, *, vocab: int = 101, seed: int = 0):
    """(target, draft): a 3-layer target and a 1-layer draft of ``arch``, both with sliding layers."""
    return (tiny_sliding_model(arch, layers=3, vocab=vocab, seed=seed),
            tiny_sliding_model(arch, layers=1, vocab=vocab, seed=seed + 1))
