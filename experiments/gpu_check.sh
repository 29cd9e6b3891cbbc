#!/usr/bin/env bash
# The GPU check of docs/gpu.md, from a fresh checkout on a machine with one (or more) NVIDIA GPUs:
#   pip install -e .            # torch with CUDA already installed
#   bash experiments/gpu_check.sh            # summary in $OUT/gpu_check.json, else experiments/results/gpu_check/
# It runs the demo on CUDA with 3 ranks sharing GPU 0 (gloo) and a SIGKILL, checks the recovered run
# is BIT-IDENTICAL to a fault-free one, then bench_overhead.py --device cuda (snapshot table), all
# within ~7 minutes. Exit status 0 only if the verdict is BIT-IDENTICAL and both parts finished.
# GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 runs the same steps on the CPU (to check the script itself).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
DEVICE="${GPU_CHECK_DEVICE:-cuda-shared}"
"$PYTHON" -c "import moetion, logging_store" || { echo "gpu_check: run 'pip install -e .' first" >&2; exit 2; }
# NVML, not the CUDA runtime, answers torch.cuda.is_available() in the parent processes: they fork
# the ranks, and a CUDA runtime started before a fork is unusable in the children.
export PYTORCH_NVML_BASED_CUDA_CHECK=1
# Bitwise replay needs reproducible cuBLAS; set before Python starts, so every handle uses it.
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
export MOETION_LOG_LEVEL="${MOETION_LOG_LEVEL:-WARNING}"
if [[ "$DEVICE" != cpu ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
ARGS=(--device "$DEVICE")
[[ -n "${GPU_CHECK_QUICK:-}" ]] && ARGS+=(--quick)
[[ -n "${OUT:-}" ]] && ARGS+=(--out "$OUT")
exec timeout 470 "$PYTHON" experiments/gpu_check.py "${ARGS[@]}"
