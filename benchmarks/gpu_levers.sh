#!/usr/bin/env bash
# One GPU machine's run of the speed levers, in one call (~6 min on one H200): the attention kernels
# alone, then end to end at 1024x1024 beside diffusers' FluxPipeline (benchmarks/gpu.py) and the step
# profile of the new modes. Needs the wheels in .whl/ (see benchmarks/gpu.py; FA3 is the fa3-fwd wheel:
# pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64
# -d .whl fa3-fwd==0.0.3). Writes each JSON to OUT (default benchmarks/results) as it finishes.
set -u
OUT=${OUT:-benchmarks/results}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:.
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used,temperature.gpu --format=csv
status=0
timeout 90 python3 benchmarks/attention_kernels.py --out "$OUT/attention-kernels-nvidia-h200.json" || status=1
timeout 360 python3 benchmarks/gpu.py --sizes 1024x1024 --modes diffusers,bf16,bf16-fa3,quantized,fp8-fast,fp8-fa3fp8 \
    --out "$OUT/gpu-levers-nvidia-h200.json" > "$OUT/gpu-levers.log" 2>&1 || status=1
grep -E "s/img|failed" "$OUT/gpu-levers.log"
timeout 150 python3 benchmarks/step_profile.py --modes bf16-fa3,fp8-fa3fp8 --out "$OUT/step-profile-levers-nvidia-h200.json" || status=1
exit $status
