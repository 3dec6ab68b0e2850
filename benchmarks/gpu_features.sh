#!/usr/bin/env bash
# One GPU machine's run of the features' costs (~5 min on one H200): the memory of one app holding
# FLUX.1-dev, Kontext and Fill; Fill's and Kontext's step (Kontext with a 1024x1024 reference: the
# token count of a 1024x2048 image); LoRA cold load, warm swap and mixed-adapter batches at 512x512 and
# 1024x1024 (rank 64 on every block Linear). Wheels in .whl/ as for benchmarks/gpu_levers.sh. JSON to
# OUT (default benchmarks/results), each as it finishes.
set -u
OUT=${OUT:-benchmarks/results}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:.
status=0
timeout 90 python3 benchmarks/multi_model_memory.py --out "$OUT/multi-model-memory-nvidia-h200.json" | tail -22 || status=1
timeout 80 python3 benchmarks/step_profile.py --model random:flux-fill --modes bf16 --out "$OUT/step-profile-fill-nvidia-h200.json" || status=1
timeout 80 python3 benchmarks/step_profile.py --model random:flux-kontext --size 1024x2048 --modes bf16 \
    --out "$OUT/step-profile-kontext-nvidia-h200.json" || status=1
for size in 512 1024; do
    timeout 150 python3 benchmarks/lora.py --model random:flux-dev --size $size --steps 4 --repeats 2 \
        --out "$OUT/lora-$size-nvidia-h200.json" > "$OUT/lora-$size.log" 2>&1 || status=1
    tail -30 "$OUT/lora-$size.log"
done
exit $status
