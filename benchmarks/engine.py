"""fluxray's in-process engine against diffusers' FluxPipeline, on the same weights, in the same run.

    python benchmarks/engine.py                       # tiny model on the CPU
    python benchmarks/engine.py --model random:flux-dev --width 1024 --height 1024   # on a GPU

Both sides share the very same module objects (text encoders, transformer, VAE), start from the
same seeds and run the same steps; the peer runs image by image (its documented way to give each
image its own seed) and fluxray runs the same images one by one and then as one batch.
Protocol: warm-up runs, then timed repeats; mean and spread; the JSON goes to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fluxray.params import GenerationParams
from fluxray.pipeline import Pipeline
from fluxray.runtime import default_dtype, pick_device

PROMPT = "a photo of a cat sitting on a red chair in the morning light"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, warmup: int, repeats: int) -> tuple[list[float], object]:
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times, result


def summary(name: str, mode: str, images: int, times: list[float]) -> dict:
    mean = statistics.mean(times)
    return {
        "impl": name,
        "mode": mode,
        "images": images,
        "seconds_mean": round(mean, 4),
        "seconds_stdev": round(statistics.stdev(times), 4) if len(times) > 1 else 0.0,
        "seconds_per_image": round(mean / images, 4),
        "runs": len(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: tiny on CPU, random:flux-dev on a GPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--images", type=int, default=4, help="images per timed run")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/engine-<device>.json)")
    args = parser.parse_args()

    device = pick_device(args.device)
    model = args.model or ("random:flux-dev" if device.type == "cuda" else "tiny")
    side = 1024 if model.startswith("random:flux") else 256
    width, height = args.width or side, args.height or side
    dtype = default_dtype(device)
    torch.set_grad_enabled(False)

    started = time.perf_counter()
    pipeline = Pipeline.load(model, device=str(device), dtype=dtype)
    load_seconds = time.perf_counter() - started
    peer = pipeline.to_diffusers()
    spec = pipeline.source.spec
    seeds = list(range(1000, 1000 + args.images))
    base = dict(prompt=PROMPT, width=width, height=height, num_inference_steps=args.steps)
    base["guidance_scale"] = args.guidance if spec.guidance_embeds else 0.0

    def run_diffusers():
        out = []
        for seed in seeds:
            generator = torch.Generator("cpu").manual_seed(seed)
            image = peer(
                PROMPT,
                width=width,
                height=height,
                num_inference_steps=args.steps,
                guidance_scale=base["guidance_scale"],
                max_sequence_length=spec.max_sequence_length,
                generator=generator,
            ).images[0]
            out.append(np.asarray(image))
        return out

    def run_fluxray_sequential():
        return [pipeline.generate(GenerationParams(**base, seed=s))[0].pixels for s in seeds]

    def run_fluxray_batched():
        images = pipeline.generate(GenerationParams(**base, seed=seeds[0], n=len(seeds)))
        return [im.pixels for im in images]

    results = []
    t, theirs = timed(run_diffusers, device, args.warmup, args.repeats)
    results.append(summary("diffusers.FluxPipeline", "one image per call", args.images, t))
    t, ours_seq = timed(run_fluxray_sequential, device, args.warmup, args.repeats)
    results.append(summary("fluxray", "one image per call", args.images, t))
    t, ours_batch = timed(run_fluxray_batched, device, args.warmup, args.repeats)
    results.append(summary("fluxray", f"batch of {args.images}", args.images, t))

    def max_diff(a, b):
        return max(int(np.abs(x.astype(np.int16) - y.astype(np.int16)).max()) for x, y in zip(a, b))

    peer_per_image = results[0]["seconds_per_image"]
    report = {
        "benchmark": "engine",
        "env": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
            "dtype": str(dtype).removeprefix("torch."),
        },
        "config": {
            "model": pipeline.source.name,
            "width": width,
            "height": height,
            "steps": args.steps,
            "guidance": base["guidance_scale"],
            "images": args.images,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "load_seconds": round(load_seconds, 2),
        },
        "results": results,
        "speedup_vs_diffusers": {
            r["mode"]: round(peer_per_image / r["seconds_per_image"], 3) for r in results if r["impl"] == "fluxray"
        },
        "max_pixel_diff_vs_diffusers": {
            "one image per call": max_diff(ours_seq, theirs),
            "batched": max_diff(ours_batch, theirs),
        },
    }
    if device.type == "cuda":
        report["env"]["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    out = Path(args.out or Path(__file__).parent / "results" / f"engine-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
