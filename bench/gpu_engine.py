"""The engine on a GPU, in real model shapes with random weights (no weights need to travel).

    python bench/gpu_engine.py --out bench/results/gpu/engine.json
    python bench/gpu_engine.py --device cpu --quick --out /tmp/engine_cpu.json   # a smoke run

Two parts, per model shape:

* **Forward costs** through the engine's KV cache (``ModelRunner``), 512 tokens of context,
  batch 1, median ms over 30 calls, each call between device synchronisations (the host work a
  decode loop pays is included): a decode step (1 token), chain verifications (γ + 1 tokens) and
  token trees of T nodes, the trees' attention once in the Triton tree-attention kernel and once
  in SDPA with a dense mask (the engine's default; ``DRAFTWISE_TREE_ATTENTION=triton`` picks the
  kernel). The ratio forward(T) / forward(1) is what a speculative step costs
  in decode steps: the budget a draft must beat.
* **Generation**, batch 1, greedy, side by side: ``model.generate`` (the target alone),
  ``draftwise.generate`` without a draft, and with a copy of the target as its draft (a chain of
  γ = 4, and a tree of 8 nodes). With random weights α says nothing about text; a copy of the
  target accepts nearly everything, so these rows measure the machinery (the loop's time per
  step and per token), not a speedup a user would see. The sequences are compared with
  ``model.generate``'s (in bf16 a wide forward may round a near-tie differently from a decode
  step). On CUDA, the runtime calls per token that launch, copy or wait, from the profiler, for
  ``model.generate`` and ``draftwise.generate`` without a draft.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import draftwise
from draftwise.engine import ModelRunner
from draftwise.kernels.backend import has_triton

SHAPES = {  # LlamaConfig fields of each shape
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}
QUICK_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)
CHAIN_TOKENS = (1, 2, 4, 5, 8, 9, 16, 17, 32)
TREE_NODES = (4, 8, 16, 32, 64)
CONTEXT = 512


def build_model(fields: dict, device: torch.device, dtype: torch.dtype):
    config = LlamaConfig(max_position_embeddings=4096, rope_theta=100000.0, **fields)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = 0
    return model.to(dtype).eval()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_ms(call, device, calls) -> float:
    times = []
    for i in range(calls + 3):
        _sync(device)
        start = time.perf_counter()
        call()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[3:])


def random_tree(nodes: int, rng: random.Random, device):
    """A random tree (each node's parent among the earlier ones): depth and ancestor words [1, T]."""
    parents, words, depth = [-1], [1], [0]
    for node in range(1, nodes):
        parent = rng.randrange(node)
        parents.append(parent)
        depth.append(depth[parent] + 1)
        words.append(words[parent] | (1 << node))
    words = [w - (1 << 64) if w >= 1 << 63 else w for w in words]
    return (torch.tensor([depth], device=device), torch.tensor([words], device=device))


def forward_costs(model, vocab: int, device, calls: int, tokens=CHAIN_TOKENS, nodes=TREE_NODES) -> dict:
    runner = ModelRunner(model, batch_size=1, capacity=CONTEXT + max(max(tokens), max(nodes)) + 8)
    runner.prefill(torch.randint(100, vocab, (1, CONTEXT), device=device))
    chain = {}
    for count in tokens:
        block = torch.randint(100, vocab, (1, count), device=device)

        def step():
            runner.extend(block)
            runner.rollback(runner.lengths - count)

        chain[count] = _median_ms(step, device, calls)
    trees = {}
    default = runner.tree_kernel
    kernel = "triton" if device.type == "cuda" and has_triton() else None
    for count in nodes:
        depth, ancestors = random_tree(count, random.Random(count), device)
        block = torch.randint(100, vocab, (1, count), device=device)
        row = {}
        for name, backend in (("tree_kernel", kernel), ("sdpa_mask", None)):
            if name == "tree_kernel" and backend is None:
                continue
            runner.tree_kernel = backend
            row[name] = _median_ms(lambda: runner.extend_tree(block, depth, ancestors), device, calls)
        runner.tree_kernel = default
        trees[count] = row
    return {"chain_ms": chain, "tree_ms": trees}


def generation(model, vocab: int, device, new_tokens: int, reps: int) -> dict:
    """Target alone, draftwise without a draft, with a copy of the target (chain γ = 4, tree of 8)."""
    draft = copy.deepcopy(model)
    torch.manual_seed(1)
    ids = torch.randint(100, vocab, (1, 128), device=device)
    common = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    chain = dict(assistant_model=draft, num_assistant_tokens=4, num_assistant_tokens_schedule="constant",
                 assistant_confidence_threshold=0.0, return_dict_in_generate=True)  # γ = 4 at every step
    arms = {
        "model.generate": lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **common),
        "draftwise, no draft": lambda: draftwise.generate(model, ids, **common),
        "draftwise, target copy, chain 4": lambda: draftwise.generate(model, ids, **chain, **common),
        "draftwise, target copy, tree 8": lambda: draftwise.generate(model, ids, tree_budget=8, **chain, **common),
    }
    outputs = {name: arm() for name, arm in arms.items()}  # warm-up, and the sequences compared
    want = outputs["model.generate"]
    times = {name: [] for name in arms}
    for _ in range(reps):  # interleaved, so drift hits every arm alike
        for name, arm in arms.items():
            _sync(device)
            start = time.perf_counter()
            arm()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["model.generate"])
    rows = {}
    for name, out in outputs.items():
        sequences = getattr(out, "sequences", out)
        seconds = statistics.median(times[name])
        row = {"seconds": seconds, "tokens_per_s": new_tokens / seconds, "speedup": base / seconds,
               "same_tokens_as_model_generate": bool(torch.equal(sequences, want))}
        stats = getattr(out, "spec_stats", None)
        if stats is not None:
            row.update(alpha=stats.alpha, tau=stats.tau,
                       target_calls=stats.target_calls)
        rows[name] = row
    return rows


def host_calls(model, vocab: int, device, new_tokens: int) -> dict:
    """Per generated token, without a draft, ``model.generate`` against ``draftwise.generate``:
    the CUDA runtime calls that launch kernels, copy or wait (from the profiler), to tell where
    the loops differ."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(100, vocab, (1, 128), device=device)
    common = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    arms = {"model.generate": lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **common),
            "draftwise, no draft": lambda: draftwise.generate(model, ids, **common)}
    found = {}
    for name, arm in arms.items():
        arm()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            arm()
        calls = {}
        for event in prof.key_averages():
            if event.key.startswith("cuda") and any(word in event.key for word in ("Launch", "Memcpy", "Synchronize")):
                calls[event.key] = round(event.count / new_tokens, 2)
        found[name] = calls
    return found


def environment(device) -> dict:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": str(device)}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    return info


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="bfloat16 on CUDA, float32 on the CPU by default")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3, help="timed generations per arm")
    parser.add_argument("--quick", action="store_true", help="one tiny model, few calls (a smoke run)")
    parser.add_argument("--out", required=True, help="where the JSON goes")
    opts = parser.parse_args(argv)
    device = torch.device(opts.device)
    dtype = getattr(torch, opts.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    shapes = {"quick": QUICK_SHAPE} if opts.quick else {name: SHAPES[name] for name in opts.shapes}
    calls = 3 if opts.quick else 30
    report = {"environment": environment(device), "dtype": str(dtype), "context": CONTEXT, "shapes": {}}
    for name, fields in shapes.items():
        model = build_model(fields, device, dtype)
        costs = forward_costs(model, fields["vocab_size"], device, calls,
                              tokens=(1, 5) if opts.quick else CHAIN_TOKENS, nodes=(8,) if opts.quick else TREE_NODES)
        decode = costs["chain_ms"][1]
        print(f"{name}: decode step {decode:.2f} ms; "
              + ", ".join(f"{t} tokens {ms / decode:.2f}x" for t, ms in costs["chain_ms"].items() if t > 1))
        for nodes, row in costs["tree_ms"].items():
            print(f"  tree of {nodes}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in row.items()))
        runs = generation(model, fields["vocab_size"], device, 8 if opts.quick else opts.new_tokens,
                          1 if opts.quick else opts.reps)
        for arm, row in runs.items():
            print(f"  {arm:34s} {row['tokens_per_s']:7.1f} tok/s  {row['speedup']:.2f}x  "
                  f"same tokens: {row['same_tokens_as_model_generate']}"
                  + (f"  alpha {row['alpha']:.2f} tau {row['tau']:.2f}" if "alpha" in row else ""))
        report["shapes"][name] = {"config": fields, **costs, "generation": runs}
        if device.type == "cuda":
            calls = host_calls(model, fields["vocab_size"], device, opts.new_tokens)
            report["shapes"][name]["cuda_calls_per_token"] = calls
            for arm, row in calls.items():
                print(f"  {arm}: CUDA calls per token: " + ", ".join(f"{k} {v}" for k, v in sorted(row.items())))
        del model
    with open(opts.out, "w") as handle:
        json.dump(report, handle, indent=1)
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
