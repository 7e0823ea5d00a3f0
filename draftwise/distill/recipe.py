"""The distillation recipe for a target with a tokenizer: prepare the data once (cached), build
the draft, mix the sources, train. ``draftwise distill`` and ``bench/distill_study.py`` run it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path

import torch

from draftwise.engine.draft_model import build_draft, draft_vocab_ids, load_draft
from draftwise.prompts import heldout_requests

from .compact import readable_size, record_bytes
from .data import (Example, chat_prompts, corpus_examples, corpus_texts, frequent_tokens, sample_continuations,
                   teacher_log_probs, training_requests)
from .prompts import prose_training_requests
from .sources import Item, Mixture, OnPolicySource, StaticSource, Teacher
from .trainer import DistillConfig, DistillTrainer

DATA_KINDS = ("fixed", "target", "on-policy")
PROMPT_SOURCES = ("code", "prose", "mixed")  # what the training requests are about
DRAFT_LAYERS = (0, 1)  # the target's layers a draft starts from
ON_POLICY_TOKENS = 48  # tokens the draft samples per on-policy example
TEACHER_TOP_K = 64  # ``draftwise distill``'s teacher records: the 64 most likely ids per position


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What :func:`prepare_data` builds. ``vocab_size``: the draft's reduced vocabulary (the most
    frequent ids of the training text and prompts), or 0 for the full vocabulary.
    ``reads_fixed_corpus``: whether training reads the fixed corpus; only then does
    :func:`prepare_data` run the teacher over it (minutes, hundreds of MB in the cache). Its
    tokens count for the vocabulary either way, so both settings share one cache file.
    ``prompt_source``: the training requests (:func:`requests_for`): ``code`` (standard-library
    code and documentation), ``prose`` (Wikipedia articles and documentation) or ``mixed`` (half
    each). ``teacher_top_k`` (default 64): 0 records the teacher densely over the draft's vocabulary, chosen
    before the target answers (from the prompts and the fixed corpus); k > 0 records its k most
    likely ids of the full vocabulary per position (:mod:`draftwise.distill.compact`, ~1% of the
    dense size) and chooses the draft's vocabulary from the prompts and the target's answers."""

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
    prompt_source: str = "code"
    prompts_file: str | None = None  # your own training prompts instead of prompt_source's (all of them)
    heldout_file: str | None = None  # your own held-out prompts instead of heldout_source's (up to heldout_prompts)
    seed: int = 0
    teacher_top_k: int = TEACHER_TOP_K
    precision: str = "float32"  # the forwards' dtype while the teacher's records are made (autocast)
    reads_fixed_corpus: bool = True

    def __post_init__(self):
        if self.prompt_source not in PROMPT_SOURCES:
            raise ValueError(f"prompt_source: expected one of {PROMPT_SOURCES}, got {self.prompt_source!r}")
        if not isinstance(self.teacher_top_k, int) or self.teacher_top_k < 0:
            raise ValueError(f"teacher_top_k: expected an int >= 0, got {self.teacher_top_k!r}")

    def key(self) -> str:
        fields = dataclasses.asdict(self)
        del fields["reads_fixed_corpus"]  # what is computed ahead, not what the data is
        # Left out at their defaults: data prepared before these fields existed keeps its name.
        if not self.completions:
            del fields["completions"]
        if self.prompt_source == "code":
            del fields["prompt_source"]
        if not self.teacher_top_k:  # dense records: the names data had before compact records existed
            del fields["teacher_top_k"]
        if self.precision == "float32":
            del fields["precision"]
        for name in ("prompts_file", "heldout_file"):  # a file's content names the data, not its path
            if fields[name] is None:
                del fields[name]
            else:
                fields[name] = hashlib.sha1(Path(fields[name]).read_bytes()).hexdigest()
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
    training prompts and to held-out prompts, and the teacher's log-probs of all of them (of the
    fixed corpus only when ``spec.reads_fixed_corpus``; else training computes them on first use,
    if ever). The target's answers record its log-probs while they are generated (no second pass)."""
    path = Path(cache_dir) / f"distill-data-{spec.key()}.pt" if cache_dir is not None else None
    cached = _load_data(path)
    data = cached if cached is not None else _answers_and_corpus(target, tokenizer, spec, progress)
    missing_fixed_teacher = spec.reads_fixed_corpus and data.fixed_teacher is None
    if missing_fixed_teacher:
        data = dataclasses.replace(data, fixed_teacher=_fixed_corpus_teacher(target, data, spec, progress))
    if path is not None and (cached is None or missing_fixed_teacher):
        _save_data(data, path)
        if progress:
            print(f"distillation data: {path} ({readable_size(path.stat().st_size)})")
    return data


def teacher_record_bytes(spec: DataSpec, answers: int, fixed_positions: int, vocab: int) -> int:
    """At most how many bytes the teacher's records of ``answers`` target answers and
    ``fixed_positions`` fixed-corpus positions take (fp16 dense, or top-k id + fp16 value)."""
    positions = answers * spec.max_new_tokens + (fixed_positions if spec.reads_fixed_corpus else 0)
    if spec.teacher_top_k:
        return record_bytes(positions, spec.teacher_top_k)
    return positions * 2 * (spec.vocab_size or vocab)


def _answers_and_corpus(target, tokenizer, spec: DataSpec, progress: bool) -> PreparedData:
    """Everything :func:`prepare_data` builds except the teacher's log-probs of the fixed corpus."""
    from tqdm.auto import tqdm

    vocab = target.get_input_embeddings().weight.shape[0]
    prompts = chat_prompts(tokenizer, requests_for(spec), spec.max_prompt_tokens)
    heldout_prompts = chat_prompts(tokenizer, heldout_requests_for(spec), spec.max_prompt_tokens)
    fixed = corpus_examples(tokenizer, corpus_texts(spec.corpus_texts, spec.seed), spec.corpus_length)
    if progress:
        size = teacher_record_bytes(spec, len(prompts) + len(heldout_prompts), sum(e.num_predicted for e in fixed),
                                    vocab)
        print(f"distillation data: the teacher's records will take at most {readable_size(size)} "
              f"({f'top-{spec.teacher_top_k} of {vocab} ids' if spec.teacher_top_k else 'dense, fp16'} per position)")
    prompt_examples = [Example(p, 1) for p in prompts]
    vocab_ids = None
    if spec.vocab_size and not spec.teacher_top_k:
        vocab_ids = frequent_tokens([*fixed, *prompt_examples], spec.vocab_size, vocab, _special_ids(tokenizer))
    with tqdm(total=len(prompts) + len(heldout_prompts), desc="preparing distillation data: the target's answers",
              unit="seq", disable=not progress) as bar:
        common = dict(temperature=0.0, eos_token_id=tokenizer.eos_token_id, record_temperature=spec.teacher_temperature,
                      progress=bar.update)
        if spec.teacher_top_k:
            common["record_top_k"] = spec.teacher_top_k
        else:
            common["record_ids"] = vocab_ids if vocab_ids is not None else torch.arange(vocab)
        answers, answers_teacher = sample_continuations(target, prompts, spec.max_new_tokens, **common)
        heldout, heldout_teacher = sample_continuations(target, heldout_prompts, spec.max_new_tokens, **common)
    if spec.vocab_size and spec.teacher_top_k:  # the answers' own tokens count too (never the held-out ones)
        answer_tokens = [Example(a.tokens[a.start:], 0) for a in answers]
        vocab_ids = frequent_tokens([*prompt_examples, *answer_tokens], spec.vocab_size, vocab, _special_ids(tokenizer))
    return PreparedData(vocab_ids, prompts, fixed, None, answers, answers_teacher, heldout, heldout_teacher,
                        heldout_prompts)


def requests_for(spec: DataSpec) -> list:
    """The training requests: every prompt of ``spec.prompts_file`` when there is one (requests,
    or conversations as lists of messages); else those of ``spec.prompt_source``,
    ``spec.train_prompts`` of them (plus the completion requests of ``spec.completions`` on the
    code side); ``mixed`` takes half of its count from each side and shuffles them together."""
    if spec.prompts_file is not None:
        from draftwise.prompts import read_prompt_file

        return read_prompt_file(spec.prompts_file, "--prompts")
    code = prose = 0
    if spec.prompt_source == "code":
        code = spec.train_prompts
    elif spec.prompt_source == "prose":
        prose = spec.train_prompts
    else:
        prose = spec.train_prompts // 2
        code = spec.train_prompts - prose
    requests = training_requests(code, spec.seed, spec.methods, spec.completions) if code else []
    if prose:
        requests += prose_training_requests(prose, spec.seed)
        random.Random(spec.seed).shuffle(requests)
    return requests


def heldout_requests_for(spec: DataSpec) -> list:
    """The held-out requests: the first ``spec.heldout_prompts`` of ``spec.heldout_file`` when
    there is one, else of ``spec.heldout_source``."""
    if spec.heldout_file is not None:
        from draftwise.prompts import read_prompt_file

        return read_prompt_file(spec.heldout_file, "--heldout-prompts")[:spec.heldout_prompts]
    return heldout_requests(spec.heldout_source, spec.heldout_prompts, spec.seed)


def _fixed_corpus_teacher(target, data: PreparedData, spec: DataSpec, progress: bool) -> list[torch.Tensor]:
    from tqdm.auto import tqdm

    teacher = []
    with tqdm(total=len(data.fixed), desc="preparing distillation data: the fixed corpus", unit="seq",
              disable=not progress) as bar:
        for first in range(0, len(data.fixed), 8):
            chunk = data.fixed[first:first + 8]
            teacher += teacher_log_probs(target, chunk, data.vocab_ids, temperature=spec.teacher_temperature,
                                         top_k=spec.teacher_top_k)
            bar.update(len(chunk))
    return teacher


def _load_data(path: Path | None) -> PreparedData | None:
    if path is None or not path.is_file():
        return None
    return PreparedData(**torch.load(path, weights_only=False))


def _save_data(data: PreparedData, path: Path) -> None:
    """Write ``path`` atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = {f.name: getattr(data, f.name) for f in dataclasses.fields(data)}  # Examples stay Examples
    torch.save(fields, path.with_suffix(".partial"))
    path.with_suffix(".partial").replace(path)


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


def reads_fixed_corpus(mix: dict[str, float], config: DistillConfig) -> bool:
    """Whether training on ``mix`` with ``config`` reads the teacher's log-probs of the fixed corpus."""
    return mix.get("fixed", 0) > 0 and config.needs_teacher


def distill(target, tokenizer, data: PreparedData, output_dir: str | Path, *, layers=DRAFT_LAYERS,
            fresh: bool = False, init: str | Path | None = None, mix: dict[str, float] | None = None,
            config: DistillConfig = DistillConfig(), on_policy_tokens: int = ON_POLICY_TOKENS, resume: bool = True,
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
