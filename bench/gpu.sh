#!/usr/bin/env bash
# The GPU check in one command, for a machine with a CUDA device:
#   bash bench/gpu.sh [OUT_DIR]          (default bench/results/gpu)
# 1. the kernel test tier on the device (Triton compiled for the GPU, not the interpreter:
#    exactness against the torch reference for chains and trees, tree attention, the edge cases,
#    the op checks, the tests marked gpu, the engine on the device: greedy output, no device syncs
#    in the loop, token trees with SDPA and with the tree-attention kernel);
# 2. every kernel benchmark: bench/bench_verify.py (Triton and the torch reference against a
#    device-to-device copy, then torch.compile of the reference at B 8, K 4: its compiles
#    take minutes), bench/bench_verify_tree.py,
#    bench/bench_tree_attention.py (against SDPA with a mask), bench/bench_ragged.py (the ragged
#    entry against padding + the padded entry at B 64 and 256, and its CUDA-graph replay);
# 3. bench/gpu_engine.py: forward costs and whole generations in real model shapes.
# Writes at most ten files, with the GPU's name and the versions, under OUT_DIR; each stage has
# its own time limit, so one that hangs costs only its own results. Uses $PY, else
# .venv/bin/python, else python3; that interpreter needs a CUDA build of torch, triton, transformers
# and pytest-benchmark, and either the package installed or the repository on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${1:-bench/results/gpu}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench/gpu.sh: $PY sees no CUDA device (a CUDA build of torch and a GPU are needed)" >&2
    exit 2
fi
mkdir -p "$OUT"
LOG="$OUT/bench.txt"
: > "$LOG"

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
    "$PY" - <<'PYEOF'
import platform, torch
print("python:", platform.python_version())
print("torch:", torch.__version__, "cuda:", torch.version.cuda, "device:", torch.cuda.get_device_name(0))
for name in ("triton", "transformers", "numpy"):
    try:
        print(f"{name}:", __import__(name).__version__)
    except ImportError:
        print(f"{name}: not installed")
PYEOF
} | tee "$OUT/versions.txt"

status=0
stage() {  # stage SECONDS COMMAND...: the command under a time limit; its exit status
    local limit=$1
    shift
    echo "== $* (limit ${limit}s)" >> "$LOG"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "== exit $rc after $((SECONDS - start))s" >> "$LOG"
    return $rc
}

workers=()
"$PY" -c "import xdist" 2>/dev/null && workers=(-n 8)  # compiles run in parallel
stage 200 "$PY" -m pytest -q -p no:cacheprovider "${workers[@]}" tests/test_verify_triton.py \
    tests/test_verify_chain.py tests/test_verify_tree.py tests/test_verify_tree_backends.py \
    tests/test_tree_attention.py tests/test_edge_cases.py tests/test_op_checks.py tests/test_custom_op.py \
    tests/test_engine_cuda.py tests/test_ragged.py tests/test_adapters.py 2>&1 | tee "$OUT/tests.txt" || status=1
stage 120 "$PY" -m pytest -q -p no:cacheprovider bench/bench_verify.py --benchmark-only -k "not compiled" \
    --benchmark-json="$OUT/verify.json" 2>&1 | tail -5 | tee -a "$LOG" || status=1
stage 120 "$PY" bench/bench_tree_attention.py --out "$OUT/tree_attention.json" 2>&1 | tee -a "$LOG" || status=1
stage 180 "$PY" bench/gpu_engine.py --out "$OUT/engine.json" 2>&1 | tee -a "$LOG" || status=1
stage 60 "$PY" -m pytest -q -p no:cacheprovider bench/bench_verify_tree.py --benchmark-only \
    --benchmark-json="$OUT/verify_tree.json" 2>&1 | tail -5 | tee -a "$LOG" || status=1
stage 180 "$PY" bench/bench_ragged.py --out "$OUT/ragged.json" --md "$OUT/ragged.md" 2>&1 | tee -a "$LOG" || status=1
stage 120 "$PY" -m pytest -q -p no:cacheprovider bench/bench_verify.py --benchmark-only -k "compiled and B8 and K4" \
    --benchmark-json="$OUT/verify_compiled.json" 2>&1 | tail -5 | tee -a "$LOG" || status=1
for name in verify verify_compiled verify_tree; do
    if [ -f "$OUT/$name.json" ]; then "$PY" bench/report.py "$OUT/$name.json" 2>&1 | tee -a "$LOG"; fi
done
echo "bench/gpu.sh: results in $OUT (exit $status)"
exit $status
