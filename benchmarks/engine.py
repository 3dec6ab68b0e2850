"""fluxray's in-process engine against diffusers' FluxPipeline, on the same weights, in the same run.

    python benchmarks/engine.py                       # tiny model on the CPU
    python benchmarks/engine.py --model random:flux-dev --width 1024 --height 1024   # on a GPU

Edits too (unless --no-edits): img2img and inpainting on the same model, FLUX.1 Fill and Kontext on the
matching variant (tiny-fill / tiny-kontext, or random:flux-fill / random:flux-kontext), each against its
diffusers pipeline over the same modules (FluxImg2ImgPipeline, FluxInpaintPipeline, FluxFillPipeline,
FluxKontextPipeline), image by image for both, then fluxray's batch.

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

from fluxray.editing import EditParams, reference_size
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


def max_diff(a, b) -> int:
    return max(int(np.abs(x.astype(np.int16) - y.astype(np.int16)).max()) for x, y in zip(a, b))


def edit_inputs(width: int, height: int):
    """A scene of the tiny model's world and a mask over its left half (white = repaint)."""
    from PIL import Image

    from fluxray.tiny.scenes import Scene, render

    image = render(Scene("yellow", "square", "right", "green"), width, height)
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, 0, width // 2, height))
    return image, mask


def edit_results(pipeline: Pipeline, args, width: int, height: int, device, dtype) -> list[dict]:
    """Each edit method: the diffusers pipeline image by image, fluxray image by image, fluxray batched."""
    import diffusers

    image, mask = edit_inputs(width, height)
    variant = "random:{}" if pipeline.source.kind == "random" else "{}"
    base = pipeline.source.spec.name.removeprefix("random:")
    fill_name = variant.format("tiny-fill" if base == "tiny" else "flux-fill")
    kontext_name = variant.format("tiny-kontext" if base == "tiny" else "flux-kontext")
    peer = pipeline.to_diffusers()
    methods = [
        ("img2img", pipeline, diffusers.FluxImg2ImgPipeline.from_pipe(peer), {"strength": 0.6}, False),
        ("inpaint", pipeline, diffusers.FluxInpaintPipeline.from_pipe(peer), {"strength": 1.0}, True),
    ]
    for name, cls, needs_mask in (("fill", "FluxFillPipeline", True), ("kontext", "FluxKontextPipeline", False)):
        other = Pipeline.load(fill_name if name == "fill" else kontext_name, device=str(device), dtype=dtype)
        other_peer = getattr(diffusers, cls).from_pipe(other.to_diffusers())
        other_peer.set_progress_bar_config(disable=True)
        methods.append((name, other, other_peer, {"strength": 1.0} if name == "fill" else {}, needs_mask))
    seeds = list(range(2000, 2000 + args.edit_images))
    out = []
    for method, ours, theirs_pipe, extra, needs_mask in methods:
        out.append(
            time_edit(args, device, method, ours, theirs_pipe, extra, image, mask if needs_mask else None, seeds)
        )
        print(json.dumps(out[-1]), flush=True)
    return out


def time_edit(args, device, method, ours: Pipeline, theirs_pipe, extra: dict, image, mask, seeds) -> dict:
    spec = ours.source.spec
    width, height = image.size
    guidance = args.guidance if spec.guidance_embeds else 0.0
    common = dict(prompt=PROMPT, width=width, height=height, num_inference_steps=args.steps)
    peer_kwargs = dict(**common, guidance_scale=guidance, max_sequence_length=spec.max_sequence_length, **extra)
    if method == "kontext":
        rw, rh = reference_size(spec, *image.size)
        peer_kwargs.update(image=theirs_pipe.image_processor.resize(image, rh, rw), _auto_resize=False)
        peer_kwargs["max_area"] = width * height
    else:
        peer_kwargs["image"] = image
    if mask is not None:
        peer_kwargs["mask_image"] = mask

    def run_peer():
        return [
            np.asarray(theirs_pipe(generator=torch.Generator("cpu").manual_seed(s), **peer_kwargs).images[0])
            for s in seeds
        ]

    def params(seed: int, n: int = 1) -> EditParams:
        return EditParams(**common, guidance_scale=guidance, seed=seed, n=n, **extra)

    def run_sequential():
        return [ours.edit(params(s), image, mask)[0].pixels for s in seeds]

    def run_batched():
        return [im.pixels for im in ours.edit(params(seeds[0], len(seeds)), image, mask)]

    t, peer_images = timed(run_peer, device, args.warmup, args.repeats)
    rows = [summary(f"diffusers.{type(theirs_pipe).__name__}", "one image per call", len(seeds), t)]
    t, sequential = timed(run_sequential, device, args.warmup, args.repeats)
    rows.append(summary("fluxray", "one image per call", len(seeds), t))
    t, batched = timed(run_batched, device, args.warmup, args.repeats)
    rows.append(summary("fluxray", f"batch of {len(seeds)}", len(seeds), t))
    peer_per_image = rows[0]["seconds_per_image"]
    return {
        "method": method,
        "model": ours.source.name,
        "results": rows,
        "speedup_vs_diffusers": {r["mode"]: round(peer_per_image / r["seconds_per_image"], 3) for r in rows[1:]},
        "max_pixel_diff_vs_diffusers": {
            "one image per call": max_diff(sequential, peer_images),
            "batched": max_diff(batched, peer_images),
        },
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
    parser.add_argument("--no-edits", action="store_true", help="text to image only")
    parser.add_argument("--edit-images", type=int, default=2, help="images per timed edit run")
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
    if not args.no_edits:
        report["edits"] = edit_results(pipeline, args, width, height, device, dtype)
    if device.type == "cuda":
        report["env"]["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    out = Path(args.out or Path(__file__).parent / "results" / f"engine-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
