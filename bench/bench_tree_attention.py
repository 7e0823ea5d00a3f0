"""Tree attention: the Triton kernel against SDPA with an explicit mask, side by side.

    python bench/bench_tree_attention.py --out bench/results/tree_attention_cuda.json
    python bench/bench_tree_attention.py --device cpu --quick --out /tmp/tree_attention_cpu.json

Providers, interleaved on the same inputs: ``sdpa`` (torch SDPA in the input dtype over the whole
cache with a prebuilt [B, 1, T, S] boolean mask: what an engine without this kernel runs),
``reference`` (``tree_attention_ref``: builds the mask and computes in float32, the oracle) and,
on CUDA, ``triton``. On the CPU the Triton kernel runs only in its interpreter, which is a test
tool and not a speed path: it is not timed there.

Two timings per provider, median and p20/p80 in µs: ``eager`` (one call between synchronisations,
host work included: what the decode loop pays without graphs) and, on CUDA, ``device`` (calls
replayed from a CUDA graph, each on its own copy of the inputs, copies enough to overflow L2).
The bandwidth is the bytes the kernel must move (q, the prefix and tree K/V of each row, the
output: each once) over the device time (the eager time on the CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import torch

from draftwise.kernels.tree_attention import tree_attention_mask, tree_attention_ref

L2_FLUSH_BYTES = 256 << 20  # input copies cycled through in a graph: more than any GPU's L2
MAX_COPIES = 64
HEADS = {"smollm2-135m": (9, 3, 64), "llama-8b": (32, 8, 128)}  # (Hq, Hkv, D)
NODES = (8, 32, 64)
PREFIXES = (512, 2048)


def tree_words(nodes: int, rng: random.Random) -> list[int]:
    """Ancestor words of a random tree (each node's parent among the earlier ones)."""
    parents, words = [-1], [1]
    for node in range(1, nodes):
        parents.append(rng.randrange(node))
        words.append(words[parents[node]] | (1 << node))
    return [w - (1 << 64) if w >= 1 << 63 else w for w in words]


def make_inputs(batch, nodes, prefix, heads, dtype, device, seed=0):
    q_heads, kv_heads, head_dim = heads
    g = torch.Generator().manual_seed(seed)
    slots = prefix + nodes + 64  # a static cache with room to spare, as the engine holds it
    rng = random.Random(seed)
    return dict(
        q=torch.randn(batch, nodes, q_heads, head_dim, generator=g).to(device, dtype),
        k=torch.randn(batch, kv_heads, slots, head_dim, generator=g).to(device, dtype),
        v=torch.randn(batch, kv_heads, slots, head_dim, generator=g).to(device, dtype),
        prefix_lengths=torch.full((batch,), prefix, dtype=torch.int64, device=device),
        tree_mask=torch.tensor([tree_words(nodes, rng) for _ in range(batch)], device=device),
    )


def providers(args, device):
    """name -> a callable on the prepared inputs (the explicit mask is built outside ``sdpa``)."""
    group = args["q"].shape[2] // args["k"].shape[1]
    mask = tree_attention_mask(args["prefix_lengths"], args["tree_mask"], args["k"].shape[2])[:, None]
    q = args["q"].transpose(1, 2)

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(
            q, args["k"], args["v"], attn_mask=mask, enable_gqa=group > 1).transpose(1, 2)

    found = {"sdpa": sdpa, "reference": lambda: tree_attention_ref(**args, validate=False)}
    if device.type == "cuda":
        from draftwise.kernels.tree_attention import tree_attention_triton

        found["triton"] = lambda: tree_attention_triton(**args, validate=False)
    return found


def time_graphs(copies, reps):
    """Device µs per call: each provider's calls over all input copies captured in one CUDA graph,
    the graphs replayed in turn, timed with events."""
    graphs = {}
    for name in copies[0]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (compile, allocate) outside the capture
            for functions in copies:
                functions[name]()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                for functions in copies:
                    functions[name]()
        except RuntimeError as error:  # a provider that cannot be captured keeps its eager time
            print(f"{name}: no CUDA graph ({error})")
            continue
        graphs[name] = graph
    times = {name: [] for name in graphs}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        for name, graph in graphs.items():
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) * 1e3 / len(copies))
    return {name: summary(values) for name, values in times.items()}


UNITS = {"us": 1e6, "ms": 1e3}


def time_interleaved(functions, device, reps, warmup=3, unit="us"):
    """Median and p20/p80 per provider in ``unit`` (``us`` or ``ms``), the providers interleaved run by run."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in functions.values():
        for _ in range(warmup):
            fn()
    sync()
    times = {name: [] for name in functions}
    for _ in range(reps):
        for name, fn in functions.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * UNITS[unit])
    return {name: summary(values, unit) for name, values in times.items()}


def summary(values, unit="us"):
    values = sorted(values)
    pick = lambda f: values[min(len(values) - 1, int(f * len(values)))]  # noqa: E731
    return {f"median_{unit}": statistics.median(values), f"p20_{unit}": pick(0.2), f"p80_{unit}": pick(0.8)}


def moved_bytes(batch, nodes, prefix, heads, dtype) -> int:
    q_heads, kv_heads, head_dim = heads
    size = torch.empty((), dtype=dtype).element_size()
    kv = 2 * batch * kv_heads * (prefix + nodes) * head_dim
    return size * (kv + 2 * batch * nodes * q_heads * head_dim)


def run_shape(batch, nodes, prefix, heads_name, dtype, device, reps):
    heads = HEADS[heads_name]
    args = make_inputs(batch, nodes, prefix, heads, dtype, device)
    functions = providers(args, device)
    expected = functions["reference"]().float()
    errors = {name: (fn().float() - expected).abs().max().item() for name, fn in functions.items()}
    size = moved_bytes(batch, nodes, prefix, heads, dtype)
    eager = time_interleaved(functions, device, reps)
    timings = {name: {"eager": eager[name], "max_abs_error": errors[name]} for name in functions}
    if device.type == "cuda":
        count = max(1, min(MAX_COPIES, L2_FLUSH_BYTES // size))
        copies = [functions] + [providers(make_inputs(batch, nodes, prefix, heads, dtype, device, seed=c), device)
                                for c in range(1, count)]
        for name, timing in time_graphs(copies, reps).items():
            timings[name]["device"] = timing
    for name, timing in timings.items():
        timing["gb_per_s"] = size / timing.get("device", timing["eager"])["median_us"] / 1e3
    if "triton" in timings:
        for kind in ("eager", "device"):
            timings["triton"][f"{kind}_speedup_vs_sdpa"] = (timings["sdpa"][kind]["median_us"]
                                                             / timings["triton"][kind]["median_us"])
    return {"batch": batch, "nodes": nodes, "prefix": prefix, "heads": heads_name, "q_heads": heads[0],
            "kv_heads": heads[1], "head_dim": heads[2], "bytes": size, "providers": timings}


def _cell(name, timing):
    device = f" device {timing['device']['median_us']:7.1f}" if "device" in timing else ""
    return f"{name}: eager {timing['eager']['median_us']:7.1f}{device} µs ({timing['gb_per_s']:6.1f} GB/s)"


def environment(device):
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["device_name"] = platform.processor() or platform.machine()
        info["note"] = ("CPU: the torch providers only; the Triton kernel runs on the CPU only in "
                        "its interpreter, a test tool, not a speed path")
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="bfloat16 on CUDA, float32 on the CPU by default")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--reps", type=int, default=None, help="timed runs per provider (50 CUDA, 5 CPU)")
    parser.add_argument("--quick", action="store_true", help="one small shape per head layout")
    parser.add_argument("--out", required=True, help="where the JSON goes")
    opts = parser.parse_args(argv)
    device = torch.device(opts.device)
    dtype = getattr(torch, opts.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    reps = opts.reps or (50 if device.type == "cuda" else 5)
    info = environment(device)
    if "note" in info:
        print(info["note"])
    shapes = [(b, t, p, h) for h in HEADS for b in opts.batch for p in PREFIXES for t in NODES]
    if opts.quick:
        shapes = [(opts.batch[0], NODES[0], PREFIXES[0], h) for h in HEADS]
    results = []
    for batch, nodes, prefix, heads_name in shapes:
        row = run_shape(batch, nodes, prefix, heads_name, dtype, device, reps)
        results.append(row)
        cells = "  ".join(_cell(name, t) for name, t in row["providers"].items())
        print(f"B{batch:<2} T{nodes:<2} L{prefix:<5} {heads_name:13s} {cells}")
    with open(opts.out, "w") as handle:
        json.dump({"environment": info, "dtype": str(dtype), "reps": reps, "results": results}, handle, indent=1)
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
