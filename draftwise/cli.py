"""Command line: ``draftwise demo``."""

from __future__ import annotations

import argparse
import time

import torch


def _demo(args: argparse.Namespace) -> int:
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
    demo = commands.add_parser("demo", help="run the verification kernel on a realistic batch")
    demo.add_argument("--batch", type=int, default=8)
    demo.add_argument("--k", type=int, default=4, help="drafted tokens per row")
    demo.add_argument("--vocab", type=int, default=49152)
    demo.add_argument("--repeats", type=int, default=20)
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    return args.run(args)
