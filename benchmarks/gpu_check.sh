#!/usr/bin/env bash
# Issue 12 ("Fast Phantom") GPU check for a lent GPU machine; 2.2 minutes on one H200 (README, figures measured there).
#
#   benchmarks/gpu_check.sh             # on the GPU machine (python3 with torch + CUDA)
#   benchmarks/gpu_check.sh --dry-run   # tiny shapes on the CPU, seconds (tests/core/test_gpu_check.py runs it)
#
# Prints, on random weights:
#  1. Phantom-Wan 1.3B shapes, 832x480x81, 4 references, bf16: seconds per Euler step, ours against ComfyUI's native
#     WanPhantomSubjectToVideo-style pipeline (DualCFGGuider + SamplerCustomAdvanced) in the same process on the same
#     GPU, each side's peak torch.cuda.max_memory_allocated, and the step cache's evaluations saved over 12 steps
#     (benchmarks/bench_sampling.py);
#  2. Phantom-Wan 14B shapes in fp8 with block swap (30 of 40 blocks off the GPU): the peak of one step under a
#     24 GB cap (torch.cuda.set_per_process_memory_fraction), the passes one at a time, beside what the memory model
#     (wan.memory.peak_bytes) predicts and the smallest block_swap it says fits (benchmarks/bench_block_swap.py;
#     --batch-passes there checks the batched case, where the model says 12 blocks must be swapped).
#
# Environment: PYTHON (default python3); COMFYUI_DIR: ComfyUI's source for the native side (default .comfyui; it
# needs comfy/, comfy_api/, comfy_execution/, comfy_extras/, folder_paths.py, latent_preview.py, node_helpers.py,
# protocol.py). PyAV and torchsde, which ComfyUI imports but Euler sampling never calls, are stood in for when
# missing (benchmarks/import_standins.py). Each part has its own time limit; the exit status is 1 if one failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
COMFY=${COMFYUI_DIR:-.comfyui}
if [[ ! -f $COMFY/comfy/model_management.py ]]; then
    echo "ComfyUI source not found at $COMFY (set COMFYUI_DIR to a ComfyUI checkout)" >&2
    exit 2
fi
export PYTHONPATH=".:$COMFY${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [[ ${1:-} == --dry-run ]]; then
    sampling=(--quick --refs 4 --steps 2 --cache-steps 5 --warmup 1 --repeat 1 --threads 1)
    swap=(--preset tiny --size 64x48x5 --refs 4 --block-swap 1)
    limit_sampling=120 limit_swap=60
elif [[ $# -gt 0 ]]; then
    echo "usage: $0 [--dry-run]" >&2
    exit 2
else
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "no CUDA GPU visible to $PY; run with --dry-run for the CPU smoke run" >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    sampling=(--preset phantom-wan-1.3b --size 832x480x81 --refs 4 --device cuda --dtype bf16 --steps 4
              --cache-steps 12 --warmup 1 --repeat 1 --threads 8)
    swap=(--device cuda --block-swap 30 --cap-gb 24)
    limit_sampling=300 limit_swap=170
fi

status=0
echo "== 1. sampling: ours vs ComfyUI native (benchmarks/bench_sampling.py)"
timeout "$limit_sampling" "$PY" -m benchmarks.bench_sampling "${sampling[@]}" || { echo "part 1 failed ($?)"; status=1; }
echo "== 2. 14B-shaped fp8 + block swap under a memory cap (benchmarks/bench_block_swap.py)"
timeout "$limit_swap" "$PY" -m benchmarks.bench_block_swap "${swap[@]}" || { echo "part 2 failed ($?)"; status=1; }
exit $status
