"""Drop-in ``generate()``: Hugging Face's names and return types, speculative underneath."""

from __future__ import annotations

import dataclasses
import os
import numbers
from typing import Optional, Sequence

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from draftwise.kernels import Lenience, get_implementation, resolve_backend

from .distributed import agreed, tensor_parallel_group
from .draft_model import check_draft_placement, load_draft
from .drafters import LookupThenModelDrafter, ModelDrafter, PromptLookupDrafter
from .models import ModelRunner
from .processing import ScoreProcessing, ScoreRecord
from .sampling import Sampling
from .sequence import TokenBuffer
from .settings import GenerationSettings, expand_for_sequences, resolve_settings
from .policy import AUTO_TREE_BUDGET, DEFAULT_GAMMA, MAX_GAMMA, AdaptivePolicy, DraftPolicy, StepShapes
from .selector import resolve_selector
from .speculate import Decoder
from .stats import SpecStats
from .stopping import StopCriteria

STEP_MARGIN = 2  # cache slots past the widest step's (a row's last token and drafts), kept free


@dataclasses.dataclass(frozen=True)
class CallOptions:
    """One call's options, resolved once: Hugging Face's settings and the engine's own."""

    settings: GenerationSettings
    gamma: int  # the draft length to start from (fixed with the "constant" schedule)
    schedule: str  # "constant", "heuristic" or "adaptive"
    selector: object  # selector= as given (None, a folder, "online" or a DraftPolicy)
    extra_drafters: tuple  # drafters the call's settings add (prompt lookup)
    confidence_threshold: float
    seed: int
    streamer: object
    stop_strings: tuple[str, ...]
    tokenizer: object
    lenience: Optional[Lenience]  # None: exact
    tree_budget: int  # 0: chains
    tree_auto: bool  # tree_budget="auto": chain or tree steps, whichever measures faster


@dataclasses.dataclass
class SpeculativeOutput(GenerateDecoderOnlyOutput):
    """Hugging Face's decoder-only output with the speculative statistics added."""

    spec_stats: Optional[SpecStats] = None


def _as_drafter(draft, name: str):
    if isinstance(draft, (ModelDrafter, PromptLookupDrafter, LookupThenModelDrafter)):
        return draft
    if isinstance(draft, torch.nn.Module):
        return ModelDrafter(draft, name=name)
    raise TypeError(f"drafts: expected models or drafters, got {type(draft).__name__}")


def _check_vocabulary(target, drafter, tokenizer) -> None:
    """Drafts must share the target's vocabulary (padding past the tokenizer's is fine)."""
    model = drafter.draft_model
    if model is None:
        return
    target_vocab, draft_vocab = target.config.vocab_size, model.config.vocab_size
    if target_vocab == draft_vocab:
        return
    real = len(tokenizer) if tokenizer is not None else None
    if real is not None and real <= min(target_vocab, draft_vocab):
        return
    hint = "" if real is not None else " (if both only pad the same tokenizer's vocabulary, pass tokenizer=)"
    raise ValueError(
        f"drafts: {drafter.name} has a vocabulary of {draft_vocab} tokens, the target {target_vocab}; "
        f"drafts must use the target's tokenizer{hint}"
    )


class SpeculativeEngine:
    """A target and its drafts, set up once for repeated ``generate`` calls.

    ``drafts``: draft models (each gets its own KV cache), draft folders (``draftwise distill``
    output), drafters (``ModelDrafter``, ``PromptLookupDrafter``, ``LookupThenModelDrafter``), or
    nothing (plain decoding through the engine). With several drafts
    each step picks one by its measured speed. ``backend`` picks the verification kernel once.
    ``compile=True`` runs the target's decode and verification forwards through ``torch.compile``
    (see :class:`~draftwise.engine.models.ModelRunner`; the graphs are compiled when the first call
    builds the target's runner, with a progress bar).
    """

    def __init__(self, target, drafts: Sequence = (), *, tokenizer=None, backend: str | None = None,
                 compile: bool = False):
        if not isinstance(compile, bool):
            raise TypeError(f"compile: expected True or False, got {type(compile).__name__}")
        self.target = target
        self.compile = compile
        self.tokenizer = tokenizer
        self.device = next(target.parameters()).device
        # A path is a draft folder written by draftwise.distill (save_draft): rebuilt on this target.
        drafts = [load_draft(d, target) if isinstance(d, (str, os.PathLike)) else d for d in drafts]
        self.drafters = [_as_drafter(d, f"draft{i}" if len(drafts) > 1 else "draft") for i, d in enumerate(drafts)]
        # Drafters built here from bare models take each call's assistant_confidence_threshold.
        self.owned = [isinstance(d, torch.nn.Module) for d in drafts]
        for i, drafter in enumerate(self.drafters):
            if drafter.draft_model is not None:
                argument = "assistant_model" if len(self.drafters) == 1 else f"drafts[{i}]"
                check_draft_placement(target, drafter.draft_model, argument=argument)
            _check_vocabulary(target, drafter, tokenizer)
        if len({d.name for d in self.drafters}) != len(self.drafters):
            raise ValueError("drafts: every drafter needs its own name")
        self.backend = resolve_backend(backend, self.device)
        self.runner: ModelRunner | None = None
        self.group = tensor_parallel_group(target)  # split by transformers over processes: they agree on choices

    def _runner(self, batch: int, capacity: int) -> ModelRunner:
        if self.runner is None or self.runner.batch_size != batch or self.runner.cache.capacity < capacity:
            self.runner = ModelRunner(self.target, batch_size=batch, capacity=capacity, compile=self.compile)
            self.runner.precompile()  # with compile=True: no compile in the middle of a generation
        self.runner.reset()
        return self.runner

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """See :func:`draftwise.generate`."""
        input_ids, attention_mask = _check_inputs(input_ids, attention_mask, self.device)
        options = _resolve(self.target, kwargs, input_ids.shape[1], self.device)
        settings = options.settings
        prompts = input_ids
        input_ids, attention_mask = expand_for_sequences(input_ids, attention_mask, settings.num_return_sequences)
        batch, width = input_ids.shape
        max_new = settings.max_new_tokens
        gamma_max = max(options.gamma, MAX_GAMMA)
        capacity = width + max_new + max(gamma_max, options.tree_budget) + STEP_MARGIN
        buffer = TokenBuffer.from_prompt(input_ids, attention_mask, capacity)
        processors = settings.processors(self.target, attention_mask)
        trees = options.tree_budget
        drafters = list(self.drafters) + list(options.extra_drafters)
        if options.tree_auto and (processors is not None or len(drafters) != 1 or options.schedule != "adaptive"
                                  or options.selector is not None or self.compile):
            # "auto": trees only for one drafter, its γ adaptive, no selector, nothing a tree does not run,
            # and eager forwards (tree forwards are not compiled, so they lose to compiled chains)
            trees = 0
        if trees and processors is not None:
            raise ValueError("tree_budget: token trees run neither logits processors (repetition_penalty, "
                             "no_repeat_ngram_size, min_p, ...) nor output_scores / output_logits; "
                             "pass tree_budget=0 with them")
        config = settings.config
        sampling = Sampling.build(batch, self.device, do_sample=settings.do_sample,
                                  temperature=float(config.temperature), top_k=int(config.top_k or 0),
                                  top_p=float(config.top_p), seed=options.seed,
                                  processing=None if processors is None else ScoreProcessing(processors, input_ids))
        eos = settings.eos_token_ids
        stop = StopCriteria(
            max_new_tokens=max_new,
            eos_token_ids=None if eos is None else torch.tensor(eos, device=self.device).view(-1),
            stop_strings=options.stop_strings, tokenizer=options.tokenizer or self.tokenizer,
        )
        for drafter, owned in zip(self.drafters, self.owned):
            if owned:
                drafter.confidence_threshold = options.confidence_threshold
        adaptive = dict(schedule=options.schedule, initial=options.gamma, maximum=gamma_max)
        policy = resolve_selector(options.selector, drafters, self.target, **adaptive) or AdaptivePolicy(**adaptive)
        policy.check_pool([d.name for d in drafters], self.target)
        stats = SpecStats()
        streamer = options.streamer
        if streamer is not None:
            if batch != 1:
                raise ValueError(f"streamer: streaming needs a batch of 1, got {batch} rows")
            streamer.put(prompts.cpu())
        record = None
        if settings.output_scores or settings.output_logits:
            record = ScoreRecord(batch, scores=settings.output_scores, logits=settings.output_logits)
        decoder = Decoder(
            target=self._runner(batch, capacity), drafters=drafters, policy=policy, max_draft=gamma_max,
            verify=get_implementation(self.backend, filtered=sampling.filtered), sampling=sampling, stop=stop,
            stats=stats, streamer=streamer,
            measure_accept_probs=settings.return_dict_in_generate,
            lenience=options.lenience, record=record, tree_budget=trees, tree_gamma=options.gamma,
            shapes=StepShapes() if trees and options.tree_auto else None,
            backend=self.backend, group=self.group,
        )
        with torch.inference_mode():
            generated = decoder.run(buffer, attention_mask)
        if streamer is not None:
            streamer.end()
        sequences = _assemble(input_ids, generated, settings.pad_token_id)
        if not settings.return_dict_in_generate:
            return sequences
        return SpeculativeOutput(
            sequences=sequences, spec_stats=stats,
            scores=None if record is None else record.steps("scores"),
            logits=None if record is None else record.steps("logits"),
        )


def _check_inputs(input_ids, attention_mask, device):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        got = (f"a {input_ids.dtype} tensor of shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor)
               else type(input_ids).__name__)
        raise ValueError(f"input_ids: expected an integer tensor of shape [batch, length], got {got}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids: expected at least one prompt token per row")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)} like input_ids, "
                         f"got {tuple(attention_mask.shape)}")
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("attention_mask: prompts must be left-padded (every row's last position must be a token)")
    return input_ids.to(device), attention_mask.to(device)


def _lenience(value) -> Optional[Lenience]:
    """``lenience=`` -> a ``Lenience``, or None for exact verification. A bare float is
    ``Lenience``'s default kind with that epsilon; epsilon 1 (any kind) is the lossless path itself."""
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = Lenience(epsilon=float(value))  # raises ValueError naming lenience outside (0, 1]
    if not isinstance(value, Lenience):
        raise TypeError(f"lenience: expected None, a float epsilon in (0, 1] or a draftwise.Lenience, "
                        f"got {type(value).__name__}")
    return None if float(value.epsilon) == 1.0 else value


def _resolve(model, kwargs: dict, prompt_width: int, device) -> CallOptions:
    """The call's options: Hugging Face's generation settings (see :mod:`.settings`) plus the
    engine's own (draft length and schedule, prompt lookup, seed, lenience, streaming)."""
    kwargs = dict(kwargs)
    own = {name: kwargs.pop(name, None)
           for name in ("seed", "lenience", "streamer", "tokenizer", "selector", "tree_budget")}
    if own["selector"] is not None and not isinstance(own["selector"], (DraftPolicy, str, os.PathLike)):
        raise TypeError(f"selector: expected a selector folder, 'online' or a draftwise DraftPolicy, "
                        f"got {type(own['selector']).__name__}")
    settings = resolve_settings(model, kwargs, prompt_width, device)
    config = settings.config
    if config.temperature is not None and config.temperature < 0:
        raise ValueError(f"temperature: expected >= 0, got {config.temperature}")
    if settings.do_sample and config.temperature == 0:  # temperature 0 samples greedily
        config.do_sample = settings.do_sample = False
    gamma = kwargs.get("num_assistant_tokens")
    schedule = kwargs.get("num_assistant_tokens_schedule") or ("constant" if gamma is not None else "adaptive")
    extra = []
    if kwargs.get("prompt_lookup_num_tokens") is not None:
        gamma = gamma or kwargs["prompt_lookup_num_tokens"]
        extra.append(PromptLookupDrafter(max_ngram=kwargs.get("max_matching_ngram_size") or 2))
    gamma = DEFAULT_GAMMA if gamma is None else gamma
    if not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"num_assistant_tokens: expected a positive int, got {gamma!r}")
    threshold = float(config.assistant_confidence_threshold)
    if not 0 <= threshold < 1:
        raise ValueError(f"assistant_confidence_threshold: expected a value in [0, 1), got {threshold}")
    seed = own["seed"]
    if seed is None:  # with a target split over processes, the first process's draw for all
        seed = agreed(tensor_parallel_group(model), int(torch.randint(0, 2**62, (1,)).item()))
    stop_strings = config.stop_strings or ()
    if isinstance(stop_strings, str):
        stop_strings = (stop_strings,)
    if stop_strings and own["tokenizer"] is None:
        raise ValueError("stop_strings: pass tokenizer= as well, to decode the generated tokens")
    lenience = _lenience(own["lenience"])
    trees = "auto" if own["tree_budget"] is None else own["tree_budget"]
    return CallOptions(
        settings=settings, gamma=gamma, schedule=schedule, selector=own["selector"], extra_drafters=tuple(extra),
        confidence_threshold=threshold, seed=seed, streamer=own["streamer"], stop_strings=tuple(stop_strings),
        tokenizer=own["tokenizer"], lenience=lenience, tree_budget=_tree_budget(trees, lenience),
        tree_auto=trees == "auto",
    )


def _tree_budget(value, lenience: Optional[Lenience]) -> int:
    """``tree_budget=``: 0 (chains), the most drafted nodes a token tree verifies per step, or
    "auto", the default (chain or tree steps of :data:`AUTO_TREE_BUDGET` nodes, whichever
    measures faster)."""
    from .tree import MAX_NODES

    if isinstance(value, int) and not isinstance(value, bool) and value == 0:
        return 0
    if value == "auto":
        return 0 if lenience is not None else AUTO_TREE_BUDGET
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < MAX_NODES:
        raise ValueError(f"tree_budget: expected an int in [0, {MAX_NODES - 1}] (0: chains) or 'auto', "
                         f"got {value!r}")
    if lenience is not None:
        raise ValueError("tree_budget: token trees are verified exactly; pass lenience=None")
    return value


def _assemble(input_ids: torch.Tensor, generated: list[torch.Tensor], pad_token_id: int) -> torch.Tensor:
    """Prompts followed by each row's tokens, padded with ``pad_token_id`` to the longest row."""
    longest = max(len(g) for g in generated)
    out = torch.full((len(generated), input_ids.shape[1] + longest), pad_token_id,
                     dtype=input_ids.dtype, device=input_ids.device)
    out[:, : input_ids.shape[1]] = input_ids
    for row, tokens in enumerate(generated):
        out[row, input_ids.shape[1]: input_ids.shape[1] + len(tokens)] = tokens
    return out


def generate(model, input_ids=None, attention_mask=None, *, assistant_model=None, drafts=None, compile=False,
             **kwargs):
    """Speculative ``model.generate``: the target's own output, faster.

    Replace ``model.generate(**inputs, assistant_model=draft, ...)`` with
    ``draftwise.generate(model, **inputs, assistant_model=draft, ...)``. Settings are resolved as
    Hugging Face resolves them (the call's arguments, then ``generation_config=``, then the model's
    ``generation_config``, then Hugging Face's defaults), and each one that differs from Hugging
    Face's default is reproduced exactly or refused with an ``UnsupportedSetting`` (both a
    ``TypeError`` and a ``ValueError``) naming it; see :mod:`draftwise.engine.settings` for the
    lists. Reproduced: lengths and stops (``max_new_tokens``, ``max_length``, ``min_new_tokens``,
    ``min_length``, ``eos_token_id``, ``pad_token_id``, ``stop_strings`` + ``tokenizer``),
    sampling (``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``typical_p`` …),
    Hugging Face's logits processors (``repetition_penalty``, ``no_repeat_ngram_size``,
    ``bad_words_ids``, ``sequence_bias``, ``suppress_tokens`` …) and your own
    (``logits_processor=[...]``, row-wise), each run on every verified position with the ids
    ``model.generate`` would have had there; ``num_return_sequences`` (sampled),
    ``output_scores`` / ``output_logits`` and ``return_dict_in_generate`` (adds ``spec_stats``)
    with Hugging Face's shapes. The speculative schedule: ``num_assistant_tokens`` (fixed draft
    length; default: adaptive, from the measured acceptance and costs),
    ``num_assistant_tokens_schedule`` ("constant", "heuristic", "adaptive"),
    ``assistant_confidence_threshold`` (a draft model stops drafting a row at a token it is less
    sure of; default 0.4 as in Hugging Face), ``prompt_lookup_num_tokens``,
    ``max_matching_ngram_size``; and ``streamer``. ``drafts=[...]`` takes several draft models or
    drafters. Batches of any size with left-padded prompts are supported.

    ``selector`` (draftwise's own) decides each row's drafter (or none) and γ before every step:
    a :class:`~draftwise.engine.policy.DraftPolicy`, a trained selector folder
    (``draftwise selector train``; one choice per row from the prompt,
    :class:`~draftwise.engine.selector.OfflinePolicy`) or ``"online"``
    (:class:`~draftwise.engine.selector.OnlinePolicy`: the pool's shipped selector as a prior when
    there is one, then every drafter scored on the row's committed text). Defaults: with one
    drafter, :class:`~draftwise.engine.policy.AdaptivePolicy`, the arm with the best expected
    tokens per second from the row's measured acceptance and the measured costs; with the
    adaptive schedule, decoding without drafts is an arm, so a draft that does not pay on a text
    stops costing time there (and is tried again now and then); with several, ``"online"``. A
    selector trained for another pool or target raises a ``ValueError`` naming ``selector``.

    ``tree_budget`` (draftwise's own): N > 0, each step verifies a token tree of at most N drafted
    nodes per row in one target forward (one draft model's dynamic tree, several drafters' trie,
    prompt lookup's matches); 0, chains; ``"auto"`` (the default): with one drafter, the adaptive
    schedule, no ``selector``, no logits processors and no ``compile``, chain or tree steps (of
    :data:`~draftwise.engine.policy.AUTO_TREE_BUDGET` nodes), whichever measures more tokens per
    second, else chains. See ``docs/trees.md``.

    ``compile`` (draftwise's own, default False) runs the target's decode and verification
    forwards through ``torch.compile``: faster steps after a one-time compile, done with a
    progress bar before the first generation starts (2 graphs for a batch of one row, 4 for a
    larger batch; 1-3 minutes for the default target on a 2-core CPU; later calls on the same
    model reuse them). The output is the compiled target's own (its logits equal the
    eager forward's to float rounding).

    ``seed`` makes a sampled call reproducible when its draft lengths are: with a fixed γ (the
    "constant" schedule) and one draft, the same call with the same seed gives the same tokens.
    The adaptive schedule (the default) and the choice among several drafts follow measured
    timings, so sampled tokens can differ between runs; the heuristic schedule and a sampled
    draft model share state across the batch, so a row's tokens can depend on the rest of the
    batch. Every run follows the target's distribution.

    ``lenience`` (draftwise's own) trades exactness for acceptance, as DistillSpec's lossy
    speculative sampling: a drafted x passes when ``u * q(x) < f(p(x), epsilon)``. It takes
    ``None`` (default: exact), a ``draftwise.Lenience(kind, epsilon)`` with kind "linear"
    (``f = p / epsilon``), "square" (``f = p / epsilon**2``) or "power" (``f = p ** epsilon``), or a
    float epsilon in (0, 1], which means ``Lenience("power", epsilon)``. Epsilon 1 is exactly the
    lossless path; smaller values accept more drafts and move the output away from the target's
    distribution towards the draft's. Tokens the target's top-k / top-p removes (p = 0) are still
    rejected. Lenience only changes sampled rows: greedy decoding (``do_sample=False`` or
    ``temperature=0``) still accepts a draft only when it is the target's argmax, so its output
    stays the target's own. An epsilon outside (0, 1] raises a ``ValueError`` naming ``lenience``,
    any other type a ``TypeError``.
    """
    if input_ids is None:
        raise ValueError("input_ids: required")
    all_drafts = ([assistant_model] if assistant_model is not None else []) + list(drafts or [])
    engine = SpeculativeEngine(model, all_drafts, tokenizer=kwargs.get("tokenizer"), compile=compile)
    return engine.generate(input_ids, attention_mask, **kwargs)
