"""The ragged entry point against the padded one, side by side, at serving batch sizes.

    python bench/bench_ragged.py --out bench/results/ragged_cpu.json --md bench/results/ragged_cpu.md
    python bench/bench_ragged.py --out OUT/ragged.json          # on a CUDA machine: Triton (+ torch)

A serving stack holds a step's drafts flat (``draft_token_ids [N]``, ``cu_num_draft_tokens [B]``,
``target_logits [N + B, V]``, ``draft_probs [N, V]``; docs/serving.md). Providers, interleaved run by
run on the same inputs, per backend:

- ``ragged``: ``verify_chain_ragged`` on the flat buffers, what the stack calls directly;
- ``pad+padded``: ``pad_ragged`` (one gather of rows into ``[B, K+1, V]`` and one into
  ``[B, K, V]``, the cheapest padding) then ``verify_chain``: what the stack pays to use the
  padded entry;
- ``padded``: ``verify_chain`` on inputs padded beforehand: the verification alone, a floor that a
  stack holding flat buffers does not reach.

Inputs: request b has a draft count drawn uniformly in [0, K] (seeded), int32 ids as vLLM holds
them, float32 logits, every draft drawn from q = p (every draft passes: the kernels read every
row). The tokens of ``ragged`` and ``padded`` must be equal before anything is timed.

Bytes, per call: ``input`` (the flat logits and q, each read once), ``pad_copy`` (the padding
step: every padded row read once and written once) and ``allocated``
(what torch allocates during the call: on the CPU the profiler's allocations, on CUDA the caching
allocator's counter; memory that the C++ kernel allocates itself, O(V) scratch, is not seen).
Times: median and p20/p80 in ms of eager calls between synchronisations; on CUDA also ``graph``,
the call replayed from a CUDA graph (the ragged Triton path needs no host sync when
``max_draft_len``, ``filtered`` and seeds are given).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from bench_tree_attention import summary, time_interleaved  # the same timing as the tree-attention bench

from draftwise.kernels import available_backends, verify_chain, verify_chain_ragged
from draftwise.kernels.ragged import pad_ragged

BATCHES = (64, 256)
DRAFTS = 4
VOCAB = 32000


def make_inputs(batch: int, k: int, vocab: int, device, seed: int = 0) -> dict:
    """A flat batch: ragged counts in [0, k], drafts drawn from q = p (all pass), int32 ids."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, k + 1, (batch,), generator=g)
    num_tokens = int(counts.sum())
    logits = torch.randn(num_tokens + batch, vocab, generator=g) * 3
    starts = counts.cumsum(0) - counts
    drafted = torch.cat([torch.arange(s + b, s + b + c) for b, (s, c) in
                         enumerate(zip(starts.tolist(), counts.tolist()))])  # flat rows of the drafts
    draft_probs = torch.softmax(logits[drafted], -1)
    tokens = torch.multinomial(draft_probs, 1, generator=g).view(-1)
    return dict(draft_token_ids=tokens.int().to(device), cu_num_draft_tokens=counts.cumsum(0).int().to(device),
                target_logits=logits.to(device), draft_probs=draft_probs.to(device),
                seed=torch.arange(batch, dtype=torch.int64, device=device) * 7919 + 1, k=k)


def providers(inputs: dict, backend: str) -> dict:
    """name -> a callable returning output tokens; the padded inputs are built once, outside."""
    flat = (inputs["draft_token_ids"], inputs["cu_num_draft_tokens"], inputs["target_logits"], inputs["draft_probs"])
    k, seed = inputs["k"], inputs["seed"]
    padded = pad_ragged(*flat, max_draft_len=k)
    return {
        "ragged": lambda: verify_chain_ragged(*flat, max_draft_len=k, seed=seed, filtered=False,
                                              backend=backend).output_tokens,
        "pad+padded": lambda: verify_chain(*pad_ragged(*flat, max_draft_len=k), seed=seed,
                                           backend=backend).output_tokens,
        "padded": lambda: verify_chain(*padded, seed=seed, backend=backend).output_tokens,
    }


def pad_copy_bytes(inputs: dict) -> int:
    """The padding step: one gather per tensor, each padded row read once and written once."""
    batch, k = inputs["cu_num_draft_tokens"].shape[0], inputs["k"]
    logits, probs = inputs["target_logits"], inputs["draft_probs"]
    padded = batch * (k + 1) * logits.shape[1] * logits.element_size()
    padded += batch * k * probs.shape[1] * probs.element_size()
    return 2 * padded


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def allocated_bytes(fn, device) -> int:
    """Bytes torch allocates while ``fn`` runs (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats(device)["allocated_bytes.all.allocated"]
        fn()
        torch.cuda.synchronize()
        return torch.cuda.memory_stats(device)["allocated_bytes.all.allocated"] - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(event.self_cpu_memory_usage for event in prof.events() if event.self_cpu_memory_usage > 0)


def time_graphs(functions: dict, reps: int) -> dict:
    """ms per call replayed from a CUDA graph (each replay checked against an eager call first)."""
    found = {}
    for name, fn in functions.items():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fn()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, fn()), f"{name}: the CUDA-graph replay differs from the eager call"
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        values = []
        for _ in range(reps):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            values.append(start.elapsed_time(end))
        found[name] = summary(values, "ms")
    return found


def run(batch: int, backend: str, device, reps: int) -> dict:
    inputs = make_inputs(batch, DRAFTS, VOCAB, device)
    functions = providers(inputs, backend)
    tokens = {name: fn().long().cpu() for name, fn in functions.items()}
    assert all(torch.equal(t, tokens["padded"]) for t in tokens.values()), "ragged and padded tokens differ"
    timings = time_interleaved(functions, device, reps, warmup=1, unit="ms")
    result = {name: {"eager": timings[name], "allocated_bytes": allocated_bytes(fn, device)}
              for name, fn in functions.items()}
    if device.type == "cuda" and backend == "triton":  # the torch path reads on the host: no graph
        for name, timing in time_graphs({"ragged": functions["ragged"]}, reps).items():
            result[name]["graph"] = timing
    ratio = timings["pad+padded"]["median_ms"] / timings["ragged"]["median_ms"]
    return {"batch": batch, "k": DRAFTS, "vocab": VOCAB, "backend": backend,
            "num_tokens": int(inputs["draft_token_ids"].shape[0]),
            "input_bytes": _nbytes(inputs["target_logits"]) + _nbytes(inputs["draft_probs"]),
            "pad_copy_bytes": pad_copy_bytes(inputs), "pad_padded_over_ragged": ratio, "providers": result}


def environment(device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


def markdown(rows: list, info: dict, reps: int, command: str) -> str:
    lines = [
        "# Ragged entry vs padded entry (bench/bench_ragged.py)",
        "",
        f"Command: `{command}`",
        "",
        f"Device: {info['device_name']} ({info['device']}, {info['threads']} threads), torch {info['torch']}; "
        f"K = {DRAFTS}, V = {VOCAB}, float32 logits, ragged counts in [0, K], every draft passes; "
        f"median of {reps} interleaved runs (p20-p80), all providers in one process: compare within a row "
        f"(absolute times on a shared CPU drift between runs).",
        "",
        "| backend | B | N | ragged ms | pad+padded ms | padded ms | pad+padded / ragged | input MB | "
        "pad copy MB | allocated MB (ragged / pad+padded / padded) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        p = row["providers"]
        cell = lambda name: (f"{p[name]['eager']['median_ms']:.1f} ({p[name]['eager']['p20_ms']:.1f}-"  # noqa: E731
                             f"{p[name]['eager']['p80_ms']:.1f})")
        allocated = " / ".join(f"{p[name]['allocated_bytes'] / 1e6:.0f}" for name in ("ragged", "pad+padded", "padded"))
        lines.append(f"| {row['backend']} | {row['batch']} | {row['num_tokens']} | {cell('ragged')} | "
                     f"{cell('pad+padded')} | {cell('padded')} | {row['pad_padded_over_ragged']:.2f} | "
                     f"{row['input_bytes'] / 1e6:.0f} | {row['pad_copy_bytes'] / 1e6:.0f} | {allocated} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--backends", nargs="+", default=None,
                        help="default: triton and torch on CUDA, cpp and torch on the CPU")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per provider (20 CUDA, 5 CPU)")
    parser.add_argument("--out", required=True, help="where the JSON goes")
    parser.add_argument("--md", default=None, help="where the markdown table goes (optional)")
    opts = parser.parse_args(argv)
    device = torch.device(opts.device)
    reps = opts.reps or (20 if device.type == "cuda" else 5)
    default = ("triton", "torch") if device.type == "cuda" else ("cpp", "torch")
    backends = [name for name in (opts.backends or default) if name in available_backends(device)]
    info = environment(device)
    rows = []
    for backend in backends:
        for batch in opts.batch:
            row = run(batch, backend, device, reps)
            rows.append(row)
            cells = "  ".join(f"{name} {p['eager']['median_ms']:8.1f} ms" for name, p in row["providers"].items())
            print(f"{backend:6s} B{batch:<4} N{row['num_tokens']:<5} {cells}  "
                  f"(pad+padded / ragged {row['pad_padded_over_ragged']:.2f})", flush=True)
    with open(opts.out, "w") as handle:
        json.dump({"environment": info, "reps": reps, "results": rows}, handle, indent=1)
    table = markdown(rows, info, reps, "python bench/bench_ragged.py " + " ".join(argv if argv is not None
                                                                                else sys.argv[1:]))
    print(table)
    if opts.md:
        with open(opts.md, "w") as handle:
            handle.write(table)
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
