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
