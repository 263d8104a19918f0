#!/usr/bin/env bash
# One command for a lent GPU: CUDA tests, then the kernel (and model) benchmarks.
# Everything lands in the folder given as $1 (default: $OUT, else bench/results/gpu-<date>).
# Budget: under 8 minutes on one H100/H200; each step has its own time limit so a slow
# step cannot eat the rest.
#
#   bash bench/gpu_check.sh "$OUT"
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/results/gpu-$(date +%Y-%m-%d)}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
  python - <<'PY'
import platform, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, "triton", tv)
PY
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"

# The device image cannot install from a registry: put the source tree on the path and map
# kernels/ to rectok.kernels with an offline editable install, or, failing that, a symlink
# (this runs on a throw-away copy of the tree).
if ! python -c "import rectok.kernels" 2>/dev/null; then
  pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
  python -c "import rectok.kernels" 2>/dev/null || ln -sfn ../kernels rectok/kernels
fi
python -c "import rectok.kernels; print('rectok.kernels from', rectok.kernels.__file__)"

echo "== CUDA tests =="
# Optional packages missing there (lpips, torch-fidelity, DALI) must not stop the rest.
# -o addopts: whatever pyproject's addopts hold, plain "-ra" here. SIGINT at the limit: pytest
# still prints its summary.
timeout -s INT -k 30 180 python -m pytest -q -m cuda tests -p no:cacheprovider -o addopts="-ra" \
  --durations=10 --continue-on-collection-errors 2>&1 | tee "$out/cuda_tests.txt" | tail -40

echo "== kernel benchmark =="
timeout 250 python bench/kernels.py --quick --budget-s 200 --out "$out" 2>&1 | tee "$out/kernels_log.txt" | tail -80

echo "== memory per preset =="
timeout 60 python bench/memory.py --out "$out" 2>&1 | tee "$out/memory_log.txt" | tail -20

echo "== perceptual loss: fp32 / bf16, NCHW / channels_last, compiled =="
timeout 90 python bench/perceptual.py --quick --out "$out" 2>&1 | tee "$out/perceptual_log.txt" | tail -12

if [ -f bench/models.py ]; then
  echo "== model benchmark =="
  # The model benchmark gets whatever the steps above left of 8 minutes (bash's SECONDS counts
  # from the script's start): it starts no new row once --budget-s is spent (rows without
  # compilation come first) and writes its JSON / markdown after every row, so even a
  # timeout leaves the rows measured so far.
  left=$((465 - SECONDS))
  if [ "$left" -ge 40 ]; then
    timeout "$left" python bench/models.py --quick --out "$out" --budget-s $((left - 35)) 2>&1 \
      | tee "$out/models_log.txt" | tail -40
  else
    echo "skipped: only ${left} s left of the 8-minute budget" | tee "$out/models_log.txt"
  fi
fi
ls -la "$out"
