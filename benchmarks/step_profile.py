"""Where one denoising step's GPU time goes: one transformer call at a size, profiled with
torch.profiler, its kernels grouped into GEMMs, attention, fp8 quantisation and the rest, per mode.

    PYTHONPATH=/tmp/site:. python benchmarks/step_profile.py --modes bf16,fp8   # one GPU, ~2 minutes
    python benchmarks/step_profile.py --model tiny --device cpu --size 64x64    # the path, on the CPU

JSON to benchmarks/results/step-profile-<device>.json: per mode, the step's wall time and the
kernel time of each group (ms) with its top kernels; it says which lever can still pay (a group's
share bounds what speeding it up saves).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fluxray.acceleration import SpeedOptions, warm_up  # noqa: E402
from fluxray.params import parse_size  # noqa: E402
from fluxray.runtime import default_dtype, pick_device  # noqa: E402
from fluxray.sources import resolve_model  # noqa: E402
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
        "fp8": SpeedOptions(quantize="fp8"),
        "int8": SpeedOptions(quantize="int8"),
    }
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    report = {"benchmark": "step_profile", "env": {"device": name, "torch": torch.__version__}, "modes": {}}
    report["config"] = {"model": args.model, "size": args.size, "dtype": str(dtype)}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        torch._dynamo.reset()
        model = load_transformer(source, device, dtype, speeds[mode])
        sync = torch.cuda.synchronize if cuda else (lambda: None)

        def step(model=model):
            warm_up(model, [(width, height)], source.spec.max_sequence_length, batches=(1,))

        step()  # compiles
        step()
        sync()
        started = time.perf_counter()
        step()
        sync()
        wall = time.perf_counter() - started
        activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            step()
            sync()
        totals, kernels = collections.Counter(), collections.Counter()
        for event in prof.key_averages():
            us = event.self_device_time_total if cuda else event.self_cpu_time_total
            if us <= 0 or (not cuda and not event.key.startswith("aten::")):
                continue
            totals[group_of(event.key)] += us
            kernels[event.key] += us
        report["modes"][mode] = {
            "step_ms": round(wall * 1e3, 2),
            "kernel_ms": {g: round(us / 1e3, 2) for g, us in totals.most_common()},
            "top_kernels": [[k[:120], round(us / 1e3, 2)] for k, us in kernels.most_common(12)],
        }
        print(mode, report["modes"][mode]["step_ms"], report["modes"][mode]["kernel_ms"], flush=True)
        del model
        if cuda:
            torch.cuda.empty_cache()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = Path(args.out or Path(__file__).parent / "results" / f"step-profile-{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
