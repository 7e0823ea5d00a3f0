"""Command line: ``draftwise demo`` (the main job), ``draftwise distill`` and ``draftwise eval-draft``
(distil a draft from its target and measure it), ``draftwise verify-demo`` (the kernel alone)."""

from __future__ import annotations

import argparse
import time

import torch


def _demo(args: argparse.Namespace) -> int:
    """Speculative decoding on the default pair, side by side with the target alone and with
    Hugging Face's assisted generation (same draft, same γ), on real held-out prompts."""
    import draftwise
    from draftwise.defaults import DEFAULT_DRAFT, demo_prompts, load_default
    from draftwise.distill.evaluate import timed

    torch.manual_seed(0)
    target, tokenizer, draft = load_default()
    # Copy from the context where the last tokens occurred before, draft with the model elsewhere.
    hybrid = draftwise.LookupThenModelDrafter(draftwise.ModelDrafter(draft, confidence_threshold=0.4))
    prompts = demo_prompts(tokenizer)[: args.prompts]
    common = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    g = args.gamma
    fixed = dict(num_assistant_tokens=g, num_assistant_tokens_schedule="constant")
    adaptive = dict(num_assistant_tokens_schedule="adaptive")
    engine = dict(return_dict_in_generate=True, **common)
    compiled = dict(compile=args.compile, **engine)
    tag = ", compiled" if args.compile else ""
    runs = {
        "target alone": lambda x: target.generate(**x, **common),
        f"HF assisted generation, gamma {g}": lambda x: target.generate(**x, assistant_model=draft, **fixed, **common),
        f"draftwise, gamma {g}": lambda x: draftwise.generate(target, **x, assistant_model=draft, **fixed, **engine),
    }
    if args.compile:  # what compiling alone gives, and speculative decoding on top of it
        runs["draftwise, no draft, compiled"] = lambda x: draftwise.generate(target, **x, **compiled)
        runs[f"draftwise, gamma {g}{tag}"] = lambda x: draftwise.generate(
            target, **x, assistant_model=draft, **fixed, **compiled)
    runs[f"draftwise, adaptive gamma{tag}"] = lambda x: draftwise.generate(
        target, **x, assistant_model=draft, **adaptive, **compiled)
    runs[f"draftwise, draft + prompt lookup{tag}"] = lambda x: draftwise.generate(
        target, **x, assistant_model=hybrid, **adaptive, **compiled)
    print(f"target: {type(target).__name__} ({sum(p.numel() for p in target.parameters()) / 1e6:.1f}M parameters); "
          f"draft: {DEFAULT_DRAFT.folder.name} ({draft.config.num_hidden_layers} layers, distilled); "
          f"greedy, {args.max_new_tokens} new tokens per prompt")
    if args.compile:
        print("compiling the target's decode and verification forwards (torch.compile, once per process: "
              "1-3 minutes on a 2-core CPU; --no-compile skips it)")
    warm = tokenizer(prompts[0], return_tensors="pt")
    for run in runs.values():  # warm-up: thread pools, allocator, first-call set-up
        run(warm)
    totals = {name: [0.0, 0, []] for name in runs}  # seconds, new tokens, stats
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        width = inputs["input_ids"].shape[1]
        reference = None
        for name, run in runs.items():
            seconds, out = timed(lambda: run(inputs))
            sequences = out.sequences if hasattr(out, "sequences") else out
            new = sequences[0, width:]
            new = new[new != tokenizer.pad_token_id] if tokenizer.pad_token_id is not None else new
            totals[name][0] += seconds
            totals[name][1] += len(new)
            if getattr(out, "spec_stats", None) is not None:
                totals[name][2].append(out.spec_stats)
            if reference is None:
                reference = sequences
                print("-" * 100)
                print(tokenizer.decode(new, skip_special_tokens=True).strip()[:600])
            elif not torch.equal(sequences, reference):
                print(f"  [{name}: output differs from the target's own greedy output]")
    base = totals["target alone"][1] / totals["target alone"][0]
    print("-" * 100)
    print(f"\n{'':44} {'tokens/s':>9} {'speedup':>8} {'alpha':>6} {'tau':>5}")
    for name, (seconds, tokens, stats) in totals.items():
        rate = tokens / seconds
        alpha = tau = ""
        if stats and sum(s.drafted for s in stats):
            alpha = f"{sum(s.accepted for s in stats) / max(1, sum(s.drafted for s in stats)):.3f}"
            tau = f"{sum(s.emitted for s in stats) / max(1, sum(s.row_steps for s in stats)):.2f}"
        print(f"{name:44} {rate:9.1f} {rate / base:7.2f}x {alpha:>6} {tau:>5}")
    return 0


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


def _load_target(path: str | None):
    """The default target, or a causal LM folder (``save_pretrained`` layout) with its tokenizer."""
    if path is None:
        from draftwise.defaults import load_target

        return load_target()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _distill(args: argparse.Namespace) -> int:
    """Distil a draft from the target (DistillSpec) and save it where ``draftwise.generate`` loads it."""
    from draftwise.defaults import default_cache_dir
    from draftwise.distill.recipe import DataSpec, distill, prepare_data, with_corpus
    from draftwise.distill.trainer import DistillConfig

    if not 0 <= args.lmbda <= 1:
        raise SystemExit(f"draftwise distill: --lmbda must lie in [0, 1], got {args.lmbda}")
    if args.corpus_texts < 0 or (args.corpus_texts and args.data != "fixed"):
        raise SystemExit(f"draftwise distill: --corpus-texts must be 0, or a positive count with --data fixed; "
                         f"got {args.corpus_texts} with --data {args.data}")
    if not 0 <= args.corpus_docs <= 1:
        raise SystemExit(f"draftwise distill: --corpus-docs must lie in [0, 1], got {args.corpus_docs}")
    torch.manual_seed(args.seed)
    target, tokenizer = _load_target(args.target)
    spec = DataSpec(train_prompts=args.train_prompts, max_new_tokens=args.max_new_tokens,
                    vocab_size=args.vocab_size, heldout_source=args.heldout, methods=args.methods,
                    completions=args.completions, seed=args.seed)
    data = prepare_data(target, tokenizer, spec, cache_dir=default_cache_dir())
    if args.corpus_texts:
        data = with_corpus(data, tokenizer, spec, args.corpus_texts, args.corpus_docs)
    mix = {"on-policy": 1.0} if args.data == "on-policy" else {args.data: 1 - args.lmbda, "on-policy": args.lmbda}
    config = DistillConfig(objective=args.divergence, beta=args.beta, temperature=args.temperature,
                           steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                           warmup_steps=args.steps // 10 if args.warmup_steps is None else args.warmup_steps,
                           eval_every=args.eval_every,
                           checkpoint_every=args.checkpoint_every, seed=args.seed)
    trainer = distill(target, tokenizer, data, args.output, layers=args.draft_layers, fresh=args.fresh,
                      init=args.init_draft, mix=mix,
                      config=config, on_policy_tokens=args.on_policy_tokens, resume=not args.restart)
    last = next((r for r in reversed(trainer.history) if "acceptance" in r), {})
    print(f"draft saved to {args.output}/draft; held-out acceptance {last.get('acceptance', float('nan')):.3f}, "
          f"top-1 agreement {last.get('top1', float('nan')):.3f}")
    return 0


def _eval_draft(args: argparse.Namespace) -> int:
    """Measure a draft through the engine: α, analytic α, τ and the speedup over the target alone."""
    import json

    from draftwise.distill.data import chat_text, heldout_requests
    from draftwise.distill.evaluate import evaluate_draft, format_rows
    from draftwise.engine.draft_model import load_draft

    torch.manual_seed(args.seed)
    target, tokenizer = _load_target(args.target)
    if args.draft == "default":
        from draftwise.defaults import default_draft

        draft = default_draft(target)
    else:
        draft = load_draft(args.draft, target)
    requests = heldout_requests(args.prompts_source, args.prompts, seed=args.seed)
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
    parser = argparse.ArgumentParser(prog="draftwise", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="speculative decoding on the default model pair, vs the target alone")
    demo.add_argument("--prompts", type=int, default=4, help="how many of the demo prompts")
    demo.add_argument("--max-new-tokens", type=int, default=64)
    demo.add_argument("--gamma", type=int, default=2, help="drafted tokens per step of the fixed-gamma runs")
    demo.add_argument("--no-compile", dest="compile", action="store_false",
                      help="run the target's forwards eagerly (no torch.compile)")
    demo.set_defaults(run=_demo)
    kernel = commands.add_parser("verify-demo", help="the verification kernel alone on a realistic batch")
    kernel.add_argument("--batch", type=int, default=8)
    kernel.add_argument("--k", type=int, default=4, help="drafted tokens per row")
    kernel.add_argument("--vocab", type=int, default=49152)
    kernel.add_argument("--repeats", type=int, default=20)
    kernel.set_defaults(run=_verify_demo)
    _add_distill(commands)
    _add_eval_draft(commands)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError, ModuleNotFoundError) as error:
        parser.exit(2, f"draftwise {args.command}: {error}\n")


def _add_distill(commands) -> None:
    p = commands.add_parser("distill", help="distil a draft from the target (DistillSpec)")
    p.add_argument("--target", help="a causal LM folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--output", required=True, help="output folder: draft/, training.json, checkpoint.pt")
    p.add_argument("--draft-layers", type=_ints, default=[0, 1], help="target layers the draft starts from (0,1)")
    p.add_argument("--fresh", action="store_true", help="initialise the draft's layers randomly instead")
    p.add_argument("--init-draft", help="start from this saved draft folder instead (same vocabulary)")
    p.add_argument("--vocab-size", type=int, default=8192, help="reduced draft vocabulary (0: the target's)")
    p.add_argument("--divergence", default="tvd", choices=["fkl", "rkl", "jsd", "tvd", "ce"],
                   help="what to minimise (ce: the cross-entropy baseline, no distillation)")
    p.add_argument("--beta", type=float, default=0.5, help="JSD(beta): 0 = forward KL, 1 = reverse KL")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--data", default="target", choices=["fixed", "target", "on-policy"])
    p.add_argument("--corpus-texts", type=int, default=0,
                   help="with --data fixed: train on this many pieces of the fixed corpus (0: the prepared 300)")
    p.add_argument("--corpus-docs", type=float, default=0.25,
                   help="with --corpus-texts: the share of documentation passages (the rest: stdlib code)")
    p.add_argument("--lmbda", type=float, default=0.0, help="fraction of on-policy (draft-generated) examples")
    p.add_argument("--on-policy-tokens", type=int, default=48, help="tokens the draft samples per on-policy example")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: a tenth of --steps")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--train-prompts", type=int, default=400, help="chat prompts the target answers")
    p.add_argument("--methods", action="store_true", help="prompts about class methods too (more distinct prompts)")
    p.add_argument("--completions", action="store_true",
                   help="also prompts to write a documented function's body from its signature and docstring")
    p.add_argument("--max-new-tokens", type=int, default=96, help="length of the target's answers")
    p.add_argument("--heldout", default="humaneval", choices=["humaneval", "stdlib"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--restart", action="store_true", help="ignore a checkpoint in --output")
    p.set_defaults(run=_distill)


def _add_eval_draft(commands) -> None:
    p = commands.add_parser("eval-draft", help="alpha, tau and speedup of a draft on held-out prompts")
    p.add_argument("--draft", default="default", help="a draft folder, or 'default'")
    p.add_argument("--target", help="a causal LM folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--prompts-source", default="humaneval", choices=["humaneval", "stdlib"])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--gammas", type=_ints, default=[1, 2, 4, 6, 8])
    p.add_argument("--modes", default="greedy,T=1")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--lenience", type=float, default=None, help="lossy acceptance (1 = exact)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="run draftwise's target through torch.compile (compiled before the timing)")
    p.add_argument("--json", help="also write the rows to this file")
    p.set_defaults(run=_eval_draft)
