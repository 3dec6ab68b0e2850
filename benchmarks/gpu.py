"""GPU speed: diffusers' FluxPipeline (eager, the peer) against fluxray in bf16 with the lossless
switches and fluxray in fp8, in one run, on the same weights (random:flux-dev) and seeds.

On a GPU machine (one H100/H200, a few minutes, well under 8). Its image has torch, transformers,
accelerate and safetensors but not diffusers; the missing wheels (diffusers, pydantic and their
small dependencies) ride in this checkout's ignored `.whl/` folder:

    pip install --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. python benchmarks/gpu.py

On a fresh checkout, fetch those wheels first (the device has Python 3.12 and no package index):

    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
        diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
        typing-inspection==0.4.5 importlib-metadata==10.2.0 typing-extensions==4.16.0

For the nf4 mode add bitsandbytes (0.50.2; its wheel is 43 MB, so unpack it into `.whl/bnb/`
keeping only `libbitsandbytes_cuda130.so` among its CUDA libraries, and add `.whl/bnb` to PYTHONPATH).

Here, on the CPU, the same code path on the tiny model (int8 stands in for fp8, which needs a GPU):

    python benchmarks/gpu.py --model tiny --device cpu --quick

For each mode and size (1024x1024 at 28 steps, then 512x512 and 768x1344): seconds per image end to
end (prompt to pixels); the median transformer step (each step synchronised, the first left out as
it includes text encoding) and its MFU (see flops_per_step); the first call's time and its extra
over a warm call (warmup_seconds: compiling, in the compiled modes); how many graphs each size
compiled (0 after the first size: no recompilation across resolutions); peak GPU memory; the max
|latent| difference of each fluxray mode from the peer on the same seed, and the PSNR of the
quantized mode's decoded image against fluxray-bf16's. `ratio` is a mode's seconds per image over
the peer's at the same size (`step_ratio` the same for one step); the mode-level `ratio` is
1024x1024's. The JSON goes to benchmarks/results/gpu-<device>.json, rewritten after every mode, so
a run cut short keeps what it measured; a mode that fails is recorded with its error and the
others still run (exit status 1).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fluxray.images import psnr
from fluxray.params import GenerationParams, parse_size
from fluxray.pipeline import Pipeline
from fluxray.runtime import default_dtype, pick_device
from fluxray.sampling import (
    denoise,
    denoise_task,
)
from fluxray.speed import SpeedOptions, resolve

PROMPT = "a photo of a cat sitting on a red chair in the morning light"
SEED = 1000
# Dense bf16 tensor-core peaks (TFLOP/s), the MFU denominator; fp8 modes are counted against it too,
# as "bf16-equivalent" utilisation. SXM parts; a PCIe H100 peaks at 756 (pass --peak-tflops).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
FULL_SIZES = [(1024, 1024), (512, 512), (768, 1344)]  # (width, height); the first is the headline
QUICK_SIZES = [(96, 96), (64, 64), (64, 112)]


def flops_per_step(transformer_config, width: int, height: int, text_tokens: int) -> float:
    """FLOPs of one transformer call for one image, counted from the architecture:

        blocks * (2 * 12 * d^2 * L  +  4 * L^2 * d)

    with d the hidden width (heads * head_dim), L the tokens (text + image, 2x2 latent patches of
    16x16 pixels), blocks = double + single blocks (19 + 38 = 57 for FLUX.1). Every token meets
    12 * d^2 weights per block (double: QKV 3d^2, out d^2, MLP 8d^2; single: QKV 3d^2, MLP-in 4d^2,
    out 5d^2), 2 FLOPs per multiply-add; attention is 2 * L^2 * d for Q K^T and as much for P V.
    Embedders, norms and the final layer are left out (<1%). 1024x1024 FLUX.1: 74.4 TFLOP."""
    c = transformer_config
    d = c.num_attention_heads * c.attention_head_dim
    tokens = text_tokens + (height // 16) * (width // 16)
    blocks = c.num_layers + c.num_single_layers
    return blocks * (2 * 12 * d * d * tokens + 4 * tokens * tokens * d)


class StepClock:
    """Wall-clock marks at the start, after every denoising step (synchronised) and at the end."""

    def __init__(self, device: torch.device):
        self.device, self.marks = device, []

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        self.marks = [self._now()]

    def step(self) -> None:
        self.marks.append(self._now())

    def steps(self) -> list[float]:
        # The first interval also holds text encoding and noise; the rest are pure steps.
        return list(np.diff(self.marks[:-1])[1:]) if len(self.marks) > 3 else list(np.diff(self.marks[:-1]))

    def total(self) -> float:
        return self.marks[-1] - self.marks[0]


def params_for(spec, width: int, height: int, steps: int) -> GenerationParams:
    guidance = 3.5 if spec.guidance_embeds else 0.0
    return GenerationParams(
        prompt=PROMPT, width=width, height=height, num_inference_steps=steps, guidance_scale=guidance, seed=SEED
    ).resolve(spec)


def run_fluxray(pipeline: Pipeline, params: GenerationParams, clock: StepClock):
    """One image through the engine's stages (as Pipeline.generate runs them), keeping the latents."""
    clock.start()
    embeds = pipeline.text_encoder.encode([params.prompt]).to(pipeline.device, pipeline.dtype)
    task = denoise_task(params, embeds, None, pipeline.source.spec, pipeline.device, pipeline.dtype)
    denoise(pipeline.transformer, [task], params.height, params.width, on_step=clock.step)
    pixels = pipeline.decoder.decode(task.latents, params.height, params.width).numpy()[0]
    clock.step()
    return task.latents.float().cpu(), pixels


def run_peer(peer, params: GenerationParams, clock: StepClock, max_sequence_length: int):
    """One image through diffusers' FluxPipeline, seeded as fluxray seeds it; its final latents
    are taken from the last step's callback."""
    final = {}

    def on_step_end(_pipe, _i, _t, kwargs):
        clock.step()
        final["latents"] = kwargs["latents"]
        return {}

    clock.start()
    image = peer(
        params.prompt,
        width=params.width,
        height=params.height,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        max_sequence_length=max_sequence_length,
        generator=torch.Generator("cpu").manual_seed(params.seed),
        callback_on_step_end=on_step_end,
    ).images[0]
    pixels = np.asarray(image)
    clock.step()
    return final["latents"].float().cpu(), pixels


def psnr_db(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR in dB of two uint8 images, rounded for the JSON; None when they are identical."""
    value = psnr(a, b)
    return None if math.isinf(value) else round(value, 2)


def unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_mode(name, speed, args, device, dtype, model, sizes, peak) -> tuple[dict, dict]:
    """Load one mode's pipeline, warm each size once (compiling), then time `repeats` runs per size.
    Returns (the mode's report, {size: (latents, pixels)} of its last run)."""
    torch._dynamo.reset()  # each mode compiles from scratch: its compile time is its own
    free(device)  # and the previous mode's compiled code no longer holds its weights
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    pipeline = Pipeline.load(model, device=str(device), dtype=dtype, speed=speed)
    report = {"load_seconds": round(time.perf_counter() - started, 2), "sizes": {}}
    if device.type == "cuda":  # weights held once loaded (the peak below adds activations and loading)
        report["resident_memory_gib"] = round(torch.cuda.memory_allocated(device) / 2**30, 2)
    if speed is not None:
        report["switches"] = resolve(speed, device).describe()
    peer = pipeline.to_diffusers() if name == "diffusers" else None
    spec = pipeline.source.spec
    outputs = {}
    clock = StepClock(device)

    def once(params):
        if peer is not None:
            return run_peer(peer, params, clock, spec.max_sequence_length)
        return run_fluxray(pipeline, params, clock)

    for width, height in sizes:
        key = f"{width}x{height}"
        params = params_for(spec, width, height, args.steps)
        graphs = unique_graphs()
        first = time.perf_counter()
        once(params)
        first_call = time.perf_counter() - first
        compiled_graphs = unique_graphs() - graphs
        totals, steps = [], []
        for _ in range(args.repeats):
            outputs[key] = once(params)
            totals.append(clock.total())
            steps.extend(clock.steps())
        step = statistics.median(steps)
        flops = flops_per_step(pipeline.transformer.config, width, height, spec.max_sequence_length)
        entry = {
            "steps": args.steps,
            "seconds_per_image": round(statistics.mean(totals), 4),
            "seconds_per_image_stdev": round(statistics.stdev(totals), 4) if len(totals) > 1 else 0.0,
            "step_seconds": round(step, 5),
            "tflop_per_step": float(f"{flops / 1e12:.4g}"),
            "tflops_per_s": float(f"{flops / step / 1e12:.4g}"),
            "mfu": round(flops / step / (peak * 1e12), 3) if peak else None,
            "first_call_seconds": round(first_call, 2),
            "graphs_compiled_on_first_call": compiled_graphs,
            "graphs_compiled_after_warmup": unique_graphs() - graphs - compiled_graphs,
            "runs": len(totals),
        }
        report["sizes"][key] = entry
        print(f"  {name} {key}: {entry['seconds_per_image']} s/img, step {entry['step_seconds']} s", flush=True)
    # What the first call costs beyond a warm one: compiling, in the compiled modes (later sizes
    # reuse the first size's graphs), and kernel selection and allocator growth in all of them.
    headline = next(iter(report["sizes"].values()))
    report["warmup_seconds"] = round(max(0.0, headline["first_call_seconds"] - headline["seconds_per_image"]), 2)
    if device.type == "cuda":
        report["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    pipeline = peer = None  # the next mode loads its own weights into the memory these held
    free(device)
    return report, outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: random:flux-dev on a GPU, tiny on the CPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="small sizes, 4 steps, 1 run: a check of the path")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (28; 4 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per size (2; 1 with --quick)")
    parser.add_argument(
        "--modes",
        default="diffusers,bf16,quantized",
        help="comma-separated, from: diffusers, bf16, quantized, cudagraphs, nf4, bf16-cudnn, bf16-flash, "
        "quantized-cudnn, bf16-fa3, fp8-fast, fp8-fa3, fp8-fa3fp8",
    )
    parser.add_argument("--sizes", default=None, help="WxH,... (default 1024x1024,512x512,768x1344)")
    parser.add_argument("--quantize", default=None, help="the quantized mode: fp8 on a GPU, int8 on the CPU")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default by GPU name)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu-<device>.json)")
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    model = args.model or ("random:flux-dev" if device.type == "cuda" else "tiny")
    sizes = QUICK_SIZES if args.quick or model == "tiny" else FULL_SIZES
    if args.sizes:
        sizes = [parse_size(size) for size in args.sizes.split(",")]
    args.steps = args.steps or (4 if args.quick else 28)
    args.repeats = args.repeats or (1 if args.quick else 2)
    quantize = args.quantize or ("fp8" if device.type == "cuda" else "int8")
    dtype = default_dtype(device)
    dtype_name = str(dtype).removeprefix("torch.")
    name = device_name(device)
    peak = peak_tflops(name, args.peak_tflops) if device.type == "cuda" else None
    torch.set_grad_enabled(False)

    wanted = [m.strip() for m in args.modes.split(",") if m.strip()]
    modes = {
        "diffusers": ("diffusers", SpeedOptions(compile="off", fuse_qkv="off", channels_last_vae="off")),
        "bf16": (f"fluxray-{'bf16' if dtype == torch.bfloat16 else dtype_name}", SpeedOptions()),
        "quantized": (f"fluxray-{quantize}", SpeedOptions(quantize=quantize)),
        # Opt-in: CUDA graphs over the compiled blocks (off by default; see SpeedOptions.cuda_graphs).
        "cudagraphs": ("fluxray-bf16-cudagraphs", SpeedOptions(cuda_graphs="on")),
        # NF4 (bitsandbytes) is for memory: eager by default, its 4-bit GEMMs are opaque kernels.
        "nf4": ("fluxray-nf4", SpeedOptions(quantize="nf4")),
        # The attention kernel, one lever at a time: cuDNN's fused attention and torch's FlashAttention-2.
        "bf16-cudnn": ("fluxray-bf16-cudnn", SpeedOptions(attention="cudnn")),
        "bf16-flash": ("fluxray-bf16-flash", SpeedOptions(attention="flash")),
        "quantized-cudnn": (f"fluxray-{quantize}-cudnn", SpeedOptions(quantize=quantize, attention="cudnn")),
        # FlashAttention-3 (fluxray.speed.flash_attention), fp8 fast accumulation, fp8 q/k/v: lever by lever.
        "bf16-fa3": ("fluxray-bf16-fa3", SpeedOptions(attention="flash3")),
        "fp8-fast": ("fluxray-fp8-fast", SpeedOptions(quantize="fp8", fp8_fast_accum="on")),
        "fp8-fa3": ("fluxray-fp8-fast-fa3", SpeedOptions(quantize="fp8", fp8_fast_accum="on", attention="flash3")),
        "fp8-fa3fp8": (
            "fluxray-fp8-fast-fa3fp8",
            SpeedOptions(quantize="fp8", fp8_fast_accum="on", attention="flash3-fp8"),
        ),
    }
    unknown = [m for m in wanted if m not in modes]
    if unknown:
        parser.error(f"--modes: unknown {', '.join(unknown)} (choose from {', '.join(modes)})")

    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") if device.type == "cuda" else f"cpu-{model}"
    out = Path(args.out or Path(__file__).parent / "results" / f"gpu-{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "gpu",
        "env": {
            "device": name,
            "device_type": device.type,
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
            "cuda": torch.version.cuda,
            "capability": ".".join(map(str, torch.cuda.get_device_capability(device)))
            if device.type == "cuda"
            else None,
            "peak_bf16_tflops": peak,
            "attention_packages": [
                m
                for m in ("flash_attn", "flash_attn_interface", "fa3_fwd_interface", "sageattention")
                if importlib.util.find_spec(m)
            ],
            "bitsandbytes": importlib.util.find_spec("bitsandbytes") is not None,
        },
        "config": {
            "model": model,
            "dtype": dtype_name,
            "steps": args.steps,
            "repeats": args.repeats,
            "sizes": [f"{w}x{h}" for w, h in sizes],
            "seed": SEED,
            "mfu_formula": "blocks * (2*12*d^2*L + 4*L^2*d) / step_seconds / peak_bf16",
        },
        "modes": {},
    }
    if device.type != "cuda":
        report["note"] = "CPU run of the GPU benchmark's code path: a check, not a performance figure."
    started = time.perf_counter()
    outputs = {}
    for mode in wanted:
        label, speed = modes[mode]
        print(f"{label} ...", flush=True)
        try:
            report["modes"][label], outputs[label] = measure_mode(label, speed, args, device, dtype, model, sizes, peak)
        except Exception as error:
            report["modes"][label] = {"error": f"{type(error).__name__}: {error}"[:2000]}
            print(f"  {label} failed: {report['modes'][label]['error']}", flush=True)
            free(device)
        compare(report, outputs, modes, wanted)
        report["wall_seconds"] = round(time.perf_counter() - started, 1)
        out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0 if all("error" not in m for m in report["modes"].values()) else 1


def compare(report: dict, outputs: dict, modes: dict, wanted: list[str]) -> None:
    """ratio of each fluxray mode to the peer, latent distance to the peer, PSNR of every other mode vs
    fluxray-bf16 (compiled). The peer's PSNR vs fluxray-bf16 is the noise floor: the same weights, eager
    against compiled, so a lossy mode is judged beside what float rounding alone gives."""
    peer = report["modes"].get("diffusers", {})
    bf16_label = modes["bf16"][0]
    for key, entry in peer.get("sizes", {}).items():
        if key in outputs.get(bf16_label, {}) and key in outputs.get("diffusers", {}):
            entry["psnr_db_vs_bf16"] = psnr_db(outputs["diffusers"][key][1], outputs[bf16_label][key][1])
    for label, mode in report["modes"].items():
        if label == "diffusers" or "error" in mode:
            continue
        for key, entry in mode["sizes"].items():
            if key in peer.get("sizes", {}):
                entry["ratio"] = round(entry["seconds_per_image"] / peer["sizes"][key]["seconds_per_image"], 3)
                entry["step_ratio"] = round(entry["step_seconds"] / peer["sizes"][key]["step_seconds"], 3)
            if key in outputs.get("diffusers", {}):
                theirs = outputs["diffusers"][key][0]
                entry["max_latent_diff_vs_diffusers"] = round(float((outputs[label][key][0] - theirs).abs().max()), 5)
                entry["peer_latent_max_abs"] = round(float(theirs.abs().max()), 4)
            if label != bf16_label and key in outputs.get(bf16_label, {}):
                entry["psnr_db_vs_bf16"] = psnr_db(outputs[label][key][1], outputs[bf16_label][key][1])
        headline = next(iter(mode["sizes"].values()), {})
        if "ratio" in headline:
            mode["ratio"] = headline["ratio"]


if __name__ == "__main__":
    sys.exit(main())
