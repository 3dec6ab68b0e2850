"""Prompt adherence of the embedded tiny model, read back by the detector of its synthetic world.

    python benchmarks/quality.py                 # everything below, on the CPU (a few minutes)
    python benchmarks/quality.py --seeds 2       # quicker

The held-out prompts (fluxray.tiny.scenes.HELD_OUT: combinations training never showed) are generated
over several seeds and each image is read by fluxray.tiny.scenes.read_scene: did the shape come out in
the asked colour, shape class and place, on the asked background? Reported, in one run:

- the default settings (28 steps, guidance 3.5, fp32) — the goals: colour >= 90%, shape >= 80%,
  place >= 80%;
- adherence against the number of steps (a curve, also drawn to quality-steps-cpu.png);
- adherence against the distilled guidance scale, and true CFG with a negative prompt;
- every lossy speed switch that runs on the CPU (bf16 weights, int8 weight-only blocks, the fp8 block
  path through torch's CPU `_scaled_mm`) beside fp32, and each one's drop;
- the VAE's reconstruction PSNR on renders of the held-out scenes.

A grid of generated images with their prompts goes to tiny-model-examples.png (shown in the README).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fluxray.images import psnr  # noqa: E402
from fluxray.params import GenerationParams  # noqa: E402
from fluxray.pipeline import Pipeline  # noqa: E402
from fluxray.speed import SpeedOptions, accelerate_transformer, resolve  # noqa: E402
from fluxray.tiny.scenes import ATTRIBUTES, HELD_OUT, SHAPES, Scene, rates_of_reads, read_scene, render  # noqa: E402

GOALS = {"colour": 0.9, "shape": 0.8, "place": 0.8}
SIZE = 256


def generate(pipeline: Pipeline, scenes, seeds, per_scene=None, **settings) -> list[tuple[Scene, int, np.ndarray]]:
    """One image per (scene, seed), generated in batches of 16 requests; `per_scene(scene)` adds
    settings of each scene's own (a negative prompt) to the shared ones."""
    jobs = [(scene, seed) for scene in scenes for seed in seeds]
    out = []
    for i in range(0, len(jobs), 16):
        chunk = jobs[i : i + 16]
        params = [
            GenerationParams(
                prompt=scene.prompt,
                seed=seed,
                width=SIZE,
                height=SIZE,
                **settings,
                **(per_scene(scene) if per_scene else {}),
            )
            for scene, seed in chunk
        ]
        out += [(scene, seed, image.pixels) for (scene, seed), image in zip(chunk, pipeline.generate(params))]
    return out


def score(images) -> dict:
    """Fraction of images whose colour / shape / place / background match, and all four at once; and
    what shape class the detector read for each asked one (a model that draws blobs shows as one
    class read for all three)."""
    asked = [scene for scene, _, _ in images]
    seen = [read_scene(Image.fromarray(pixels)) for _, _, pixels in images]
    rates = rates_of_reads(asked, seen)
    read = Counter((scene.shape, s.shape if s else "nothing") for scene, s in zip(asked, seen, strict=True))
    shapes = {s: {r: read[(s, r)] for r in (*SHAPES, "nothing") if read[(s, r)]} for s in SHAPES}
    return {**{a: round(r, 4) for a, r in rates.items()}, "images": len(images), "shape_read_as": shapes}


@torch.no_grad()
def vae_psnr(pipeline: Pipeline) -> float:
    vae = pipeline.decoder.vae
    images = [render(scene, SIZE, SIZE) for scene in HELD_OUT]
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 127.5 - 1
    rec = vae.decode(vae.encode(x.to(vae.dtype)).latent_dist.mean).sample.float().clamp(-1, 1)
    rec = ((rec + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)
    return round(psnr(rec, np.stack([np.asarray(im) for im in images])), 2)


def draw_grid(images, path: Path, columns: int = 4) -> None:
    """Generated images in a grid, each with its prompt underneath."""
    cell, caption = 256, 34
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * cell, rows * (cell + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (scene, seed, pixels) in enumerate(images):
        x, y = (k % columns) * cell, (k // columns) * (cell + caption)
        grid.paste(Image.fromarray(pixels).resize((cell, cell)), (x, y))
        words = scene.prompt.split(", ")
        draw.text((x + 4, y + cell + 2), words[0], fill="black")
        draw.text((x + 4, y + cell + 17), f"{', '.join(words[1:])} (seed {seed})", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def draw_steps_curve(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(int(s) for s in curve)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for attribute in ("colour", "shape", "place", "all"):
        ax.plot(steps, [curve[str(s)][attribute] for s in steps], marker="o", label=attribute)
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("denoising steps")
    ax.set_ylabel("fraction of images right")
    ax.set_title("tiny model: prompt adherence on held-out prompts vs steps")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description="prompt adherence of the tiny model on held-out prompts")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per held-out prompt (default 4)")
    parser.add_argument("--steps", default="1,2,4,8,16,28", help="the steps curve")
    parser.add_argument("--guidance", default="1,2,3.5,5", help="the guidance curve")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality-cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    seeds = list(range(args.seeds))
    start = time.time()
    fp32 = Pipeline.load(args.model, device="cpu", dtype=torch.float32)
    spec = fp32.source.spec
    result: dict = {
        "model": args.model,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "prompts": len(HELD_OUT),
        "seeds": seeds,
        "size": f"{SIZE}x{SIZE}",
        "defaults": {"steps": spec.default_steps, "guidance": spec.default_guidance},
        "goals": GOALS,
    }
    result["vae_reconstruction_psnr_db"] = vae_psnr(fp32)
    print(f"VAE reconstruction PSNR {result['vae_reconstruction_psnr_db']} dB", flush=True)

    default = generate(fp32, HELD_OUT, seeds)
    result["default"] = score(default)
    result["goals_met"] = {a: result["default"][a] >= g for a, g in GOALS.items()}
    print(f"default: {result['default']}", flush=True)
    draw_grid([img for img in default if img[1] == 0][:16], args.out.parent / "tiny-model-examples.png")

    def sweep(setting: str, values: list, default) -> dict:
        """The score at each value of one setting, the others at their defaults."""
        out = {}
        for value in values:
            out[str(value)] = (
                result["default"] if value == default else score(generate(fp32, HELD_OUT, seeds, **{setting: value}))
            )
            print(f"{setting} {value}: {out[str(value)]}", flush=True)
        return out

    steps = [int(s) for s in args.steps.split(",")]
    result["steps_curve"] = sweep("num_inference_steps", steps, spec.default_steps)
    draw_steps_curve(result["steps_curve"], args.out.parent / "quality-steps-cpu.png")
    guidance = [float(s) for s in args.guidance.split(",")]
    result["guidance_curve"] = sweep("guidance_scale", guidance, spec.default_guidance)

    # True CFG on top of the distilled guidance, the negative prompt naming the same shape in
    # another colour: the pair the score can see.
    def negative_other_colour(scene: Scene) -> dict:
        other = next(c for c in ("red", "blue", "green", "yellow") if c not in (scene.colour, scene.background))
        return {"negative_prompt": dataclasses.replace(scene, colour=other).prompt}

    cfg = generate(fp32, HELD_OUT, seeds, per_scene=negative_other_colour, true_cfg_scale=2.0)
    result["true_cfg_2_negative_other_colour"] = score(cfg)
    print(f"true cfg 2: {result['true_cfg_2_negative_other_colour']}", flush=True)

    switches = {}
    reference = np.stack([pixels for _, _, pixels in default])
    bf16 = Pipeline.load(args.model, device="cpu", dtype=torch.bfloat16)
    int8 = Pipeline.load(args.model, device="cpu", dtype=torch.float32, speed=SpeedOptions(quantize="int8"))
    fp8 = Pipeline.load(args.model, device="cpu", dtype=torch.float32)
    # fp8 is refused on the CPU for users (it is a GPU speed switch); the same block path runs on
    # torch's CPU _scaled_mm, as tests/fluxray/test_speed.py does.
    speed = dataclasses.replace(resolve(SpeedOptions(fuse_qkv="on"), "cpu"), quantize="fp8")
    accelerate_transformer(fp8.transformer, speed, spec.max_sequence_length)
    for name, pipeline in (("bf16", bf16), ("int8", int8), ("fp8_cpu_scaled_mm", fp8)):
        images = generate(pipeline, HELD_OUT, seeds)
        switches[name] = score(images)
        switches[name]["psnr_vs_fp32_db"] = round(psnr(np.stack([p for _, _, p in images]), reference), 2)
        switches[name]["drop_vs_fp32"] = {
            a: round(result["default"][a] - switches[name][a], 4) for a in (*ATTRIBUTES, "all")
        }
        print(f"{name}: {switches[name]}", flush=True)
    result["switches"] = switches
    result["seconds"] = round(time.time() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
