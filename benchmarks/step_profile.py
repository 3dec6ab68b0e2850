"""Where one denoising step's GPU time goes: one transformer call at a size, profiled with
torch.profiler, its kernels grouped into GEMMs, attention, fp8 quantisation and the rest, per mode.

    PYTHONPATH=/tmp/site:. python benchmarks/step_profile.py --modes bf16,fp8   # one GPU, ~2 minutes
    python benchmarks/step_profile.py --model tiny --device cpu --size 64x64    # the path, on the CPU

JSON to benchmarks/results/step-profile-<device>.json: per mode, the step's wall time (median of 5),
the summed kernel time and the gap between them (launches and host time the GPU waits for), the
kernel launch count, the kernel time of each group (ms) with the "other" group split by what its
kernels do (norms, GELU, RoPE, copies, adds), each GEMM shape's throughput (TFLOP/s) and the top
kernels; it says which lever can still pay (a group's share bounds what speeding it up saves).
Modes: bf16, bf16-fa3 (FlashAttention-3), fp8, fp8-fast (fast accumulation), fp8-fa3, fp8-fa3fp8
(fp8 attention too), int8.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reporting import results_path  # noqa: E402
from fluxray.models.sources import resolve_model  # noqa: E402
from fluxray.params import parse_size  # noqa: E402
from fluxray.runtime import default_dtype, pick_device  # noqa: E402
from fluxray.speed import SpeedOptions, warm_up  # noqa: E402
from fluxray.transformer import load_transformer  # noqa: E402

GROUPS = [  # first match wins; kernel names as cuBLAS, cuDNN, torch and inductor's Triton give them
    # inductor names a fused kernel after every op it holds: the activation quantisation (amax, scale,
    # cast) fused into the preceding norm or GELU reads "triton_red_fused__scaled_mm_..._amax_...",
    # and the RoPE/norm fused before attention "..._scaled_dot_product_cudnn_attention_...".
    ("fp8_quant", re.compile(r"triton.*amax", re.I)),
    ("attention", re.compile(r"^(?!triton).*(flash|fmha|attention|sdpa)", re.I)),
    ("gemm", re.compile(r"^(?!triton).*(gemm|xmma|cutlass|_scaled_mm|matmul|nvjet|wgmma|addmm|aten::mm|bmm)", re.I)),
]


def group_of(kernel: str) -> str:
    return next((name for name, pattern in GROUPS if pattern.search(kernel)), "other")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:flux-dev")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--modes", default="bf16,fp8")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    dtype = default_dtype(device)
    source = resolve_model(args.model)
    width, height = parse_size(args.size)
    cuda = device.type == "cuda"
    speeds = {
        "bf16": SpeedOptions(),
        "bf16-fa3": SpeedOptions(attention="flash3"),
        "fp8": SpeedOptions(quantize="fp8"),
        "fp8-fast": SpeedOptions(quantize="fp8", fp8_fast_accum="on"),
        "fp8-fa3": SpeedOptions(quantize="fp8", fp8_fast_accum="on", attention="flash3"),
        "fp8-fa3fp8": SpeedOptions(quantize="fp8", fp8_fast_accum="on", attention="flash3-fp8"),
        "int8": SpeedOptions(quantize="int8"),
    }
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    report = {"benchmark": "step_profile", "env": {"device": name, "torch": torch.__version__}, "modes": {}}
    report["config"] = {"model": args.model, "size": args.size, "dtype": str(dtype)}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        try:
            report["modes"][mode] = profile_mode(source, device, dtype, speeds[mode], width, height)
        except Exception as error:  # a mode that cannot run here is recorded, the others still run
            report["modes"][mode] = {"error": f"{type(error).__name__}: {error}"[:1000]}
        print(mode, json.dumps(report["modes"][mode])[:600], flush=True)
        if cuda:
            torch.cuda.empty_cache()
        write(report, name, args.out)
    return 0


def write(report: dict, name: str, out: str | None) -> None:
    path = Path(out) if out else results_path("step-profile", name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::_scaled_mm", "aten::bmm")
# inductor's fused Triton kernels are named after the ops they hold: the "other" group, by what it does.
OTHER_CLASSES = [
    ("norm", re.compile(r"norm", re.I)),
    ("gelu", re.compile(r"gelu|tanh", re.I)),
    ("rope/attention prep", re.compile(r"stack|unbind|neg", re.I)),
    ("copy/cat", re.compile(r"cat|copy|clone|contiguous|elementwise_kernel", re.I)),
    ("add/mul", re.compile(r"add|mul", re.I)),
]


def other_class(kernel: str) -> str:
    return next((name for name, pattern in OTHER_CLASSES if pattern.search(kernel)), "rest")


def gemm_flops(op: str, shapes: list) -> float | None:
    """2*M*N*K from the recorded input shapes of a matmul op (None if they are not 2-D)."""
    # The first two matrices: addmm's bias is 1-D, and inductor's out= buffer comes after them.
    mats = [s for s in shapes if isinstance(s, (list, tuple)) and len(s) == 2]
    if len(mats) < 2:
        return None
    (m, k), (_, n) = mats[0], mats[1]
    return 2.0 * m * n * k


def profile_mode(source, device, dtype, speed, width, height) -> dict:
    cuda = device.type == "cuda"
    torch._dynamo.reset()
    model = load_transformer(source, device, dtype, speed)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(model=model):
        warm_up(model, [(width, height)], source.spec.max_sequence_length, batches=(1,))

    step()  # compiles
    step()
    walls = []
    for _ in range(5):
        sync()
        started = time.perf_counter()
        step()
        sync()
        walls.append(time.perf_counter() - started)
    wall = statistics.median(walls)
    # Kernels alone (a CPU op's device time would count its kernels twice), then the ops with their
    # shapes, for the GEMMs' throughput.
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        step()
        sync()
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities, record_shapes=True) as shaped:
        step()
        sync()
    totals, kernels, others = collections.Counter(), collections.Counter(), collections.Counter()
    launches = 0
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us <= 0 or (not cuda and not event.key.startswith("aten::")):
            continue
        if cuda and event.key.startswith("aten::"):
            continue  # an op's own device time is its kernels', counted under their names
        group = group_of(event.key)
        totals[group] += us
        kernels[event.key] += us
        launches += event.count
        if group == "other":
            others[other_class(event.key)] += us
    # GEMM throughput per shape: the matmul ops' device time (their kernels) and 2*M*N*K.
    gemms = []
    for event in shaped.key_averages(group_by_input_shape=True):
        if event.key not in GEMM_OPS:
            continue
        flops = gemm_flops(event.key, event.input_shapes)
        us = event.device_time_total if cuda else event.cpu_time_total
        if flops and us > 0:
            gemms.append(
                {
                    "op": event.key,
                    "shapes": [s for s in event.input_shapes if s][:3],
                    "calls": event.count,
                    "ms": round(us / 1e3, 3),
                    "tflops_per_s": float(f"{flops * event.count / (us / 1e6) / 1e12:.4g}"),
                }
            )
    gemms.sort(key=lambda g: -g["ms"])
    kernel_ms = sum(totals.values()) / 1e3
    report = {
        "step_ms": round(wall * 1e3, 2),
        "kernel_sum_ms": round(kernel_ms, 2),
        "gap_ms": round(wall * 1e3 - kernel_ms, 2),  # launch gaps and host time the GPU waits for
        "kernel_launches": launches,
        "kernel_ms": {g: round(us / 1e3, 2) for g, us in totals.most_common()},
        "other_ms": {g: round(us / 1e3, 2) for g, us in others.most_common()},
        "gemm_shapes": gemms[:12],
        "top_kernels": [[k[:120], round(us / 1e3, 2)] for k, us in kernels.most_common(12)],
    }
    del model
    return report


if __name__ == "__main__":
    sys.exit(main())
