"""The distillation recipe for a target with a tokenizer: prepare the data once (cached), build
the draft, mix the sources, train. ``draftwise distill`` and ``bench/distill_study.py`` run it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from draftwise.engine.draft_model import draft_vocab_ids, load_draft

from .data import (Example, chat_prompts, corpus_examples, corpus_texts, frequent_tokens, heldout_requests,
                   sample_continuations, teacher_log_probs, training_requests)
from .draft import build_draft
from .sources import Item, Mixture, OnPolicySource, StaticSource, Teacher
from .trainer import DistillConfig, DistillTrainer

DATA_KINDS = ("fixed", "target", "on-policy")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What :func:`prepare_data` builds. ``vocab_size``: the draft's reduced vocabulary (the most
    frequent ids of the training text and prompts), or 0 for the full vocabulary."""

    train_prompts: int = 400
    corpus_texts: int = 300
    corpus_length: int = 128
    max_new_tokens: int = 96
    heldout_prompts: int = 32
    heldout_source: str = "humaneval"
    vocab_size: int = 8192
    max_prompt_tokens: int = 192
    teacher_temperature: float = 1.0
    methods: bool = False  # training prompts also about class methods (many more distinct prompts)
    completions: bool = False  # also requests to write a documented function's body
    seed: int = 0

    def key(self) -> str:
        fields = dataclasses.asdict(self)
        if not self.completions:  # left out when off: data prepared without the field keeps its name
            del fields["completions"]
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


@dataclasses.dataclass
class PreparedData:
    vocab_ids: torch.Tensor | None
    prompts: list[torch.Tensor]  # training chat prompts (on-policy data continues them)
    fixed: list[Example]
    fixed_teacher: list[torch.Tensor] | None  # None: computed on an example's first visit
    target: list[Example]  # the target's greedy answers to the training prompts
    target_teacher: list[torch.Tensor]
    heldout: list[Example]  # the target's greedy answers to held-out prompts
    heldout_teacher: list[torch.Tensor]
    heldout_prompts: list[torch.Tensor]


def _special_ids(tokenizer) -> list[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>") if t in tokenizer.get_vocab())
    return sorted(i for i in ids if i is not None and i >= 0)


def prepare_data(target, tokenizer, spec: DataSpec = DataSpec(), cache_dir: str | Path | None = None,
                 progress: bool = True) -> PreparedData:
    """Build (or load from ``cache_dir``) the fixed corpus, the target's greedy answers to the
    training prompts and to held-out prompts, and the teacher's log-probs of all of them.
    The target's answers record its log-probs while they are generated (no second pass)."""
    from tqdm.auto import tqdm

    path = Path(cache_dir) / f"distill-data-{spec.key()}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        return PreparedData(**torch.load(path, weights_only=False))
    vocab = target.get_input_embeddings().weight.shape[0]
    eos = tokenizer.eos_token_id
    requests = training_requests(spec.train_prompts, spec.seed, spec.methods, spec.completions)
    prompts = chat_prompts(tokenizer, requests, spec.max_prompt_tokens)
    heldout_prompts = chat_prompts(tokenizer, heldout_requests(spec.heldout_source, spec.heldout_prompts, spec.seed),
                                   spec.max_prompt_tokens)
    fixed = corpus_examples(tokenizer, corpus_texts(spec.corpus_texts, spec.seed), spec.corpus_length)
    vocab_ids = None
    if spec.vocab_size:
        prompt_examples = [Example(p, 1) for p in prompts]
        vocab_ids = frequent_tokens([*fixed, *prompt_examples], spec.vocab_size, vocab, _special_ids(tokenizer))
    with tqdm(total=len(prompts) + len(heldout_prompts) + len(fixed), desc="preparing distillation data",
              unit="seq", disable=not progress) as bar:
        common = dict(temperature=0.0, eos_token_id=eos, record_ids=vocab_ids if vocab_ids is not None else
                      torch.arange(vocab), record_temperature=spec.teacher_temperature, progress=bar.update)
        answers, answers_teacher = sample_continuations(target, prompts, spec.max_new_tokens, **common)
        heldout, heldout_teacher = sample_continuations(target, heldout_prompts, spec.max_new_tokens, **common)
        fixed_teacher = []
        for first in range(0, len(fixed), 8):
            chunk = fixed[first:first + 8]
            fixed_teacher += teacher_log_probs(target, chunk, vocab_ids, temperature=spec.teacher_temperature)
            bar.update(len(chunk))
    data = PreparedData(vocab_ids, prompts, fixed, fixed_teacher, answers, answers_teacher, heldout,
                        heldout_teacher, heldout_prompts)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fields = {f.name: getattr(data, f.name) for f in dataclasses.fields(data)}  # Examples stay Examples
        torch.save(fields, path.with_suffix(".partial"))
        path.with_suffix(".partial").replace(path)
    return data


def with_corpus(data: PreparedData, tokenizer, spec: DataSpec, count: int, docs_share: float = 0.25) -> PreparedData:
    """``data`` (prepared from ``spec``) with another fixed corpus, :func:`corpus_texts` of ``count``
    pieces, on the same draft vocabulary; the teacher's log-probs of it are computed when training
    first needs them."""
    texts = corpus_texts(count, spec.seed, methods=spec.methods, docs_share=docs_share)
    fixed = corpus_examples(tokenizer, texts, spec.corpus_length)
    return dataclasses.replace(data, fixed=fixed, fixed_teacher=None)


def make_sources(data: PreparedData, target, draft, mix: dict[str, float], *, on_policy_tokens: int = 48,
                 on_policy_temperature: float = 1.0, teacher_temperature: float = 1.0, eos_token_id=None,
                 seed: int = 0, needs_teacher: bool = True) -> Mixture:
    """A :class:`Mixture` of the named sources (``fixed``, ``target``, ``on-policy``) with the
    given fractions. ``needs_teacher=False`` (cross-entropy) skips the teacher's log-probs of
    fixed text that were not prepared."""
    unknown = sorted(set(mix) - set(DATA_KINDS))
    if unknown:
        raise ValueError(f"data: unknown source(s) {unknown}; expected some of {DATA_KINDS}")
    teacher = Teacher(target, data.vocab_ids, temperature=teacher_temperature)
    sources, fractions = [], []
    for name, fraction in mix.items():
        if fraction == 0:
            continue
        if name == "fixed":
            lazy = teacher if data.fixed_teacher is None and needs_teacher else None
            source = StaticSource(name, data.fixed, lazy, seed, known=data.fixed_teacher)
        elif name == "target":
            source = StaticSource(name, data.target, None, seed, known=data.target_teacher)
        else:
            source = OnPolicySource(draft, data.prompts, teacher, max_new_tokens=on_policy_tokens,
                                    temperature=on_policy_temperature, eos_token_id=eos_token_id, seed=seed)
        sources.append(source)
        fractions.append(fraction)
    return Mixture(sources, fractions)


def heldout_items(data: PreparedData) -> list[Item]:
    return [Item(e, t, "heldout") for e, t in zip(data.heldout, data.heldout_teacher)]


def distill(target, tokenizer, data: PreparedData, output_dir: str | Path, *, layers=(0, 1),
            fresh: bool = False, init: str | Path | None = None, mix: dict[str, float] | None = None,
            config: DistillConfig = DistillConfig(), on_policy_tokens: int = 48, resume: bool = True,
            progress: bool = True) -> DistillTrainer:
    """Build a draft from ``target``'s ``layers`` on the data's vocabulary (or start from the saved
    draft ``init``) and train it; the draft lands in ``output_dir/draft``."""
    target.requires_grad_(False)
    if init is not None:
        draft = load_draft(init, target).train()
        ids = draft_vocab_ids(draft)
        if (ids is None) != (data.vocab_ids is None) or (ids is not None and not torch.equal(ids.cpu(), data.vocab_ids)):
            raise ValueError(f"init: the draft in {init} predicts another vocabulary than the data's")
    else:
        draft = build_draft(target, layers=layers, fresh=fresh, vocab_ids=data.vocab_ids, seed=config.seed)
    sources = make_sources(data, target, draft, mix or {"target": 1.0}, on_policy_tokens=on_policy_tokens,
                           teacher_temperature=config.temperature, eos_token_id=tokenizer.eos_token_id,
                           seed=config.seed, needs_teacher=config.needs_teacher)
    trainer = DistillTrainer(draft, sources, config, output_dir, heldout=heldout_items(data))
    if resume:
        trainer.resume()
    trainer.train(progress=progress)
    return trainer
