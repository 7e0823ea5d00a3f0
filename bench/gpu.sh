#!/usr/bin/env bash
# The GPU check in one command, for a machine with a CUDA device:
#   bash bench/gpu.sh
# runs the kernel test tier on the device (Triton compiled for the GPU, not the interpreter:
# exactness against the torch reference for chains and trees, tree attention, the edge cases,
# the op checks, the tests marked gpu, the engine on the device: greedy output, no device syncs
# in the loop, token trees through the tree-attention kernel), then every kernel benchmark (bench/bench_verify.py:
# Triton, the torch reference and its torch.compile, against a device-to-device copy;
# bench/bench_verify_tree.py; bench/bench_tree_attention.py against SDPA with a mask), and
# writes everything, with the GPU's name and the versions, under bench/results/gpu/. Uses $PY, else .venv/bin/python, else python3;
# that interpreter needs a CUDA build of torch, triton and the package (pip install -e .[test]).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=bench/results/gpu

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench/gpu.sh: $PY sees no CUDA device (a CUDA build of torch and a GPU are needed)" >&2
    exit 2
fi
mkdir -p "$OUT"

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
    "$PY" - <<'PYEOF'
import platform, torch
print("python:", platform.python_version())
print("torch:", torch.__version__, "cuda:", torch.version.cuda, "device:", torch.cuda.get_device_name(0))
for name in ("triton", "transformers"):
    try:
        print(f"{name}:", __import__(name).__version__)
    except ImportError:
        print(f"{name}: not installed")
PYEOF
} | tee "$OUT/versions.txt"

status=0
"$PY" -m pytest -q -p no:cacheprovider tests/test_verify_triton.py tests/test_verify_chain.py \
    tests/test_verify_tree.py tests/test_verify_tree_backends.py tests/test_tree_attention.py \
    tests/test_edge_cases.py tests/test_op_checks.py tests/test_custom_op.py tests/test_engine_cuda.py \
    2>&1 | tee "$OUT/tests.txt" || status=1
"$PY" -m pytest -q -p no:cacheprovider bench/bench_verify.py --benchmark-only \
    --benchmark-json="$OUT/verify.json" 2>&1 | tail -5 | tee "$OUT/bench.txt" || status=1
"$PY" -m pytest -q -p no:cacheprovider bench/bench_verify_tree.py --benchmark-only \
    --benchmark-json="$OUT/verify_tree.json" 2>&1 | tail -5 | tee -a "$OUT/bench.txt" || status=1
"$PY" bench/bench_tree_attention.py --out "$OUT/tree_attention.json" 2>&1 | tee "$OUT/tree_attention.txt" || status=1
for name in verify verify_tree; do
    [ -f "$OUT/$name.json" ] && "$PY" bench/report.py "$OUT/$name.json" | tee "$OUT/$name.md"
done
echo "bench/gpu.sh: results in $OUT (exit $status)"
exit $status
