"""Command line: ``draftwise demo`` (the main job) and ``draftwise verify-demo`` (the kernel alone)."""

from __future__ import annotations

import argparse
import time

import torch


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _demo(args: argparse.Namespace) -> int:
    """Speculative decoding on the default pair, side by side with the target alone and with
    Hugging Face's assisted generation, on real prompts."""
    import draftwise
    from draftwise.defaults import MODEL_DRAFT, demo_prompts, load_default, load_model_draft

    torch.manual_seed(0)
    target, tokenizer, default_draft = load_default()
    model_draft = load_model_draft(target)
    prompts = demo_prompts(tokenizer)[: args.prompts]
    common = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    g, lookup = args.gamma, args.lookup_gamma
    runs = {
        "target alone": lambda x: target.generate(**x, **common),
        f"HF assisted, layer draft, gamma {g}": lambda x: target.generate(
            **x, assistant_model=model_draft, num_assistant_tokens=g, num_assistant_tokens_schedule="constant", **common),
        f"draftwise, layer draft, gamma {g}": lambda x: draftwise.generate(
            target, **x, assistant_model=model_draft, num_assistant_tokens=g, return_dict_in_generate=True, **common),
        f"HF prompt lookup, gamma {lookup}": lambda x: target.generate(**x, prompt_lookup_num_tokens=lookup, **common),
        f"draftwise prompt lookup, gamma {lookup}": lambda x: draftwise.generate(
            target, **x, prompt_lookup_num_tokens=lookup, num_assistant_tokens_schedule="constant",
            return_dict_in_generate=True, **common),
        "draftwise default (adaptive gamma)": lambda x: draftwise.generate(
            target, **x, assistant_model=default_draft, return_dict_in_generate=True, **common),
    }
    print(f"target: {type(target).__name__} ({sum(p.numel() for p in target.parameters()) / 1e6:.1f}M parameters); "
          f"layer draft: layers {list(MODEL_DRAFT.layers)} of it; default draft: prompt lookup; "
          f"greedy, {args.max_new_tokens} new tokens per prompt")
    warm = tokenizer(prompts[0], return_tensors="pt")
    for run in runs.values():  # warm-up: thread pools, allocator, first-call set-up
        run(warm)
    totals = {name: [0.0, 0, []] for name in runs}  # seconds, new tokens, stats
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        width = inputs["input_ids"].shape[1]
        reference = None
        for name, run in runs.items():
            seconds, out = _timed(lambda: run(inputs))
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
    print(f"\n{'':40} {'tokens/s':>9} {'speedup':>8} {'alpha':>6} {'tau':>5}")
    for name, (seconds, tokens, stats) in totals.items():
        rate = tokens / seconds
        alpha = tau = ""
        if stats:
            alpha = f"{sum(s.accepted for s in stats) / max(1, sum(s.drafted for s in stats)):.3f}"
            tau = f"{sum(s.emitted for s in stats) / max(1, sum(s.row_steps for s in stats)):.2f}"
        print(f"{name:40} {rate:9.1f} {rate / base:7.2f}x {alpha:>6} {tau:>5}")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="draftwise", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="speculative decoding on the default model pair, vs the target alone")
    demo.add_argument("--prompts", type=int, default=4, help="how many of the demo prompts")
    demo.add_argument("--max-new-tokens", type=int, default=64)
    demo.add_argument("--gamma", type=int, default=4, help="drafted tokens per step of the layer-draft runs")
    demo.add_argument("--lookup-gamma", type=int, default=2, help="drafted tokens per step of the prompt-lookup runs")
    demo.set_defaults(run=_demo)
    kernel = commands.add_parser("verify-demo", help="the verification kernel alone on a realistic batch")
    kernel.add_argument("--batch", type=int, default=8)
    kernel.add_argument("--k", type=int, default=4, help="drafted tokens per row")
    kernel.add_argument("--vocab", type=int, default=49152)
    kernel.add_argument("--repeats", type=int, default=20)
    kernel.set_defaults(run=_verify_demo)
    args = parser.parse_args(argv)
    return args.run(args)
