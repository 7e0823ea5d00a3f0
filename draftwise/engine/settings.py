"""The generation settings of one call: resolved as Hugging Face resolves them, then each one
either honoured exactly or refused.

The effective configuration is Hugging Face's own: the call's arguments over the
``generation_config`` passed, over the model's ``generation_config``, over the library's
defaults (``model._prepare_generation_config``), with the lengths and special tokens prepared the
way ``model.generate`` prepares them. Every field whose value then differs from Hugging Face's
default is in one of three sets:

- ``HONOURED``: reproduced exactly (the logits processors and warpers run per verified position,
  see :mod:`draftwise.engine.processing`);
- ``NO_OUTPUT_EFFECT``: settings of how Hugging Face runs (its cache, its compilation, its
  assistant's schedule) or of beam search that greedy/sampled decoding ignores, which leave the
  output as it is;
- anything else is refused with an :class:`UnsupportedSetting` naming the field and where it
  was set. A field unknown to this module (one a later transformers adds) is refused too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Optional

import torch
from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

# Reproduced exactly. Processor fields become Hugging Face's own processors, applied per position.
HONOURED = frozenset({
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "stop_strings",
    "do_sample", "temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "sequence_bias", "suppress_tokens",
    "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "renormalize_logits",
    "num_return_sequences", "output_scores", "output_logits", "return_dict_in_generate",
    "pad_token_id", "bos_token_id", "eos_token_id",
    # the speculative schedule: it changes the speed, never the output
    "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
    "prompt_lookup_num_tokens", "max_matching_ngram_size",
})
# How Hugging Face runs, not what it outputs (the engine keeps its own caches and schedule), or
# beam-search settings that decoding with one beam ignores in Hugging Face as well.
NO_OUTPUT_EFFECT = frozenset({
    "use_cache", "cache_implementation", "cache_config", "max_cache_len", "compile_config", "disable_compile",
    "prefill_chunk_size", "continuous_batching_config", "low_memory", "is_assistant", "assistant_lookbehind",
    "target_lookbehind", "decoder_start_token_id", "length_penalty", "early_stopping",
})
# Fields whose default is None but that some configs set to their neutral value instead.
NEUTRAL = {"guidance_scale": 1.0, "penalty_alpha": 0.0}
METADATA = frozenset({"transformers_version", "_from_model_config", "_commit_hash", "_original_object_hash"})
# Arguments of draftwise.generate that are not generation-config fields.
CALL_ARGUMENTS = frozenset({"generation_config", "logits_processor", "streamer", "tokenizer", "seed", "lenience",
                            "selector"})
# Warpers the verification kernel applies itself (fused, no per-position pass).
KERNEL_WARPERS = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)


class UnsupportedSetting(TypeError, ValueError):
    """A generation setting the engine cannot reproduce exactly (a ``TypeError`` for an unknown
    argument, a ``ValueError`` for an unsupported value: either ``except`` catches it)."""


@dataclasses.dataclass
class GenerationSettings:
    """What one call asks for, in the engine's terms."""

    config: GenerationConfig  # Hugging Face's effective config (lengths and special tokens prepared)
    max_new_tokens: int
    do_sample: bool
    eos_token_ids: Optional[list[int]]
    pad_token_id: int
    num_return_sequences: int
    output_scores: bool
    output_logits: bool
    return_dict_in_generate: bool
    user_processors: LogitsProcessorList

    def processors(self, model, attention_mask: torch.Tensor) -> Optional[list[LogitsProcessorList]]:
        """One processor list per row (``attention_mask [B, W]``), built by Hugging Face's
        ``_get_logits_processor`` as ``model.generate`` builds it; ``None`` when the kernel applies
        everything itself (temperature, top-k, top-p) and no scores are returned."""
        first = self._row_processors(model, attention_mask[:1])
        if all(isinstance(p, KERNEL_WARPERS) for p in first) and not self.output_scores:
            return None
        return [first] + [self._row_processors(model, attention_mask[b: b + 1])
                          for b in range(1, attention_mask.shape[0])]

    def _row_processors(self, model, row_mask: torch.Tensor) -> LogitsProcessorList:
        try:
            return model._get_logits_processor(
                generation_config=self.config, input_ids_seq_length=row_mask.shape[1],
                logits_processor=self.user_processors, device=row_mask.device,
                model_kwargs={"attention_mask": row_mask},
            )
        except ValueError as error:
            raise ValueError(f"generate: a generation setting is out of range: {error}") from error


def resolve_settings(model, kwargs: dict, prompt_width: int, device) -> GenerationSettings:
    """The call's settings as ``model.generate(**kwargs)`` would resolve them (``kwargs`` holds
    the generation arguments only, not ``CALL_ARGUMENTS`` other than ``generation_config`` and
    ``logits_processor``)."""
    passed = kwargs.pop("generation_config", None)
    if passed is not None and not isinstance(passed, GenerationConfig):
        raise TypeError(f"generation_config: expected a transformers.GenerationConfig, got {type(passed).__name__}")
    user_processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
    for name in ("max_new_tokens", "max_length"):
        value = kwargs.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    with _quiet_transformers():
        config, unknown = model._prepare_generation_config(passed, **kwargs)
    unknown = sorted(k for k in unknown if k not in ("output_attentions", "output_hidden_states"))
    if unknown:
        raise UnsupportedSetting(
            f"generate: unsupported argument(s) {', '.join(unknown)}; supported: {', '.join(supported_arguments())}")
    _refuse_unsupported(model, config, passed, kwargs)
    has_default_max = kwargs.get("max_length") is None and config.max_length is not None
    has_default_min = kwargs.get("min_length") is None and config.min_length is not None
    with _quiet_transformers():
        config = model._prepare_generated_length(
            generation_config=config, has_default_max_length=has_default_max,
            has_default_min_length=has_default_min, model_input_name="input_ids",
            input_ids_length=prompt_width, inputs_tensor=None)
        model._prepare_special_tokens(config, kwargs_has_attention_mask=True, device=device)
    return _settings(config, prompt_width, user_processors)


def _settings(config: GenerationConfig, prompt_width: int, user_processors) -> GenerationSettings:
    max_new = config.max_length - prompt_width
    if max_new < 1:
        raise ValueError(f"max_length: the prompts are {prompt_width} tokens wide, so max_length={config.max_length} "
                         f"leaves nothing to generate; set max_new_tokens")
    do_sample = bool(config.do_sample)
    sequences = int(config.num_return_sequences or 1)
    if sequences < 1 or (sequences > 1 and not do_sample):
        raise ValueError(f"num_return_sequences: expected 1, or any count >= 1 with do_sample=True, "
                         f"got {sequences} with do_sample={do_sample}")
    eos = config._eos_token_tensor
    pad = config._pad_token_tensor
    return GenerationSettings(
        config=config, max_new_tokens=max_new, do_sample=do_sample,
        eos_token_ids=None if eos is None else eos.view(-1).tolist(),
        pad_token_id=0 if pad is None else int(pad), num_return_sequences=sequences,
        output_scores=bool(config.output_scores), output_logits=bool(config.output_logits),
        return_dict_in_generate=bool(config.return_dict_in_generate), user_processors=user_processors,
    )


def _refuse_unsupported(model, config: GenerationConfig, passed, kwargs: dict) -> None:
    defaults = GenerationConfig._get_default_generation_params()
    for name, value in config.to_dict().items():
        if name in METADATA or name in HONOURED or name in NO_OUTPUT_EFFECT:
            continue
        if _inactive(name, value, defaults.get(name)):
            continue
        raise UnsupportedSetting(
            f"{name}: draftwise does not support {name}={value!r} (set {_origin(name, model, passed, kwargs)}); "
            f"leave it at {defaults.get(name)!r}, or use model.generate for this setting")


def _origin(name: str, model, passed, kwargs: dict) -> str:
    if kwargs.get(name) is not None:
        return "in the call"
    if passed is not None and getattr(passed, name, None) is not None:
        return "in the generation_config passed"
    return "in the model's generation_config"


def _inactive(name: str, value: Any, default: Any) -> bool:
    """Whether a field's value leaves Hugging Face's decoding as its default does."""
    return value is None or value is False or value == default or value == NEUTRAL.get(name)


def supported_arguments() -> list[str]:
    return sorted(HONOURED | NO_OUTPUT_EFFECT | CALL_ARGUMENTS)


@contextlib.contextmanager
def _quiet_transformers():
    """Silences transformers' generation logger while its preparation helpers run (they warn
    about interplays, e.g. max_length beside max_new_tokens, as model.generate does)."""
    logger = logging.getLogger("transformers.generation.utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def expand_for_sequences(input_ids: torch.Tensor, attention_mask: torch.Tensor, count: int):
    """Each prompt ``count`` times in a row, as Hugging Face expands for ``num_return_sequences``."""
    if count == 1:
        return input_ids, attention_mask
    return input_ids.repeat_interleave(count, 0), attention_mask.repeat_interleave(count, 0)
