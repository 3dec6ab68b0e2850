"""FLUX.1's attention at one size, kernel by kernel: torch SDPA (cuDNN, FlashAttention-2) against
FlashAttention-3 in bf16 and with fp8 q/k/v (fluxray.speed.flash_attention), on the same random inputs.

    PYTHONPATH=/tmp/site:. python benchmarks/attention_kernels.py     # one GPU (Hopper for FA3), ~20 s
    python benchmarks/attention_kernels.py --device cpu --tokens 256  # the path, on the CPU (SDPA only)

Shape (batch, tokens, heads, head_dim) = (1, 4608, 24, 128): a 1024x1024 image's 4096 tokens and
512 text tokens. For each kernel: the median time of one call (CUDA events over 20 calls after a
warm-up), its TFLOP/s (4 * tokens^2 * heads * head_dim), and its error ||out - ref|| / ||ref|| against
float32 math on the same inputs. JSON to benchmarks/results/attention-kernels-<device>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reporting import results_path, write_report  # noqa: E402
from fluxray.runtime import pick_device  # noqa: E402
from fluxray.speed.flash_attention import FA3FluxProcessor, fa3_interface_name  # noqa: E402


def timed(fn, device, repeats=20) -> float:
    """Median seconds of one call."""
    for _ in range(3):
        fn()
    if device.type != "cuda":
        import time

        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tokens", type=int, default=4608)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device).manual_seed(0)
    shape = (1, args.tokens, args.heads, args.head_dim)
    # RMS-normed q and k (as FLUX's QK-norm leaves them) and v of the projections' scale.
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=g) for _ in range(3))
    ref = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    flops = 4 * args.tokens**2 * args.heads * args.head_dim

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                ).transpose(1, 2)

        return run

    kernels = {"sdpa-math": sdpa(SDPBackend.MATH)}
    if cuda:
        kernels["sdpa-cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION)
        kernels["sdpa-flash2"] = sdpa(SDPBackend.FLASH_ATTENTION)
        if fa3_interface_name():
            for name, fp8 in (("fa3-bf16", False), ("fa3-fp8", True)):
                processor = FA3FluxProcessor(fp8=fp8)
                kernels[name] = lambda processor=processor: processor.attend(q, k, v)
    report = {
        "benchmark": "attention_kernels",
        "env": {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__},
        "config": {"shape": list(shape), "dtype": str(dtype), "fa3_interface": fa3_interface_name()},
        "kernels": {},
    }
    for name, fn in kernels.items():
        try:
            out = fn()
            seconds = timed(fn, device)
            error = ((out.float() - ref).norm() / ref.norm()).item()
            report["kernels"][name] = {
                "ms": round(seconds * 1e3, 3),
                "tflops_per_s": round(flops / seconds / 1e12, 1),
                "rel_error_vs_fp32": float(f"{error:.3g}"),
            }
        except Exception as error:  # a kernel this device or build lacks is recorded, not fatal
            report["kernels"][name] = {"error": f"{type(error).__name__}: {error}"[:500]}
        print(name, report["kernels"][name], flush=True)
    write_report(report, args.out or results_path("attention-kernels", report["env"]["device"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
