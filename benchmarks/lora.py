"""LoRA per request: fluxray's per-row adapters against diffusers' load_lora_weights + set_adapters, same run.

    python benchmarks/lora.py                                  # tiny model on the CPU, 512², rank 64
    python benchmarks/lora.py --model random:flux-dev --size 512 --steps 4   # on a GPU

Four rank-`--rank` adapters on every Linear of the transformer's blocks (random weights, saved by diffusers'
save_lora_weights, read back from disk) and measured:

- cold load: file on disk to an adapter ready on the device (fluxray: read_lora + LoraBank.add; diffusers:
  load_lora_weights);
- warm swap: both adapters already loaded, the next call uses the other one (fluxray: the rows' slot
  indices and scales, LoraBank.select; diffusers: set_adapters);
- denoising time per image for 4 images of one prompt: no adapter (bare batch), one adapter on every row,
  4 different adapters in one batch (fluxray's mixed batch), and 4 separate calls with one adapter each
  (fluxray alone per adapter; diffusers with set_adapters before each call, its only way to give images
  different adapters).

The tiny model is tiny next to a rank-64 adapter (its hidden size is far below 4 × 64), so on it the
low-rank products are not the small delta they are on FLUX.1-dev: read the CPU figures as the method's
overheads at their worst, not as the GPU's.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from make_tiny_loras import make_lora  # noqa: E402

from benchmarks.reporting import write_report  # noqa: E402
from fluxray.lora import LoraChoice, LoraLinear, attach_loras, read_lora  # noqa: E402
from fluxray.params import GenerationParams  # noqa: E402
from fluxray.pipeline import Pipeline  # noqa: E402
from fluxray.runtime import default_dtype, pick_device  # noqa: E402

PROMPT = "a red circle on the left, blue background"
NAMES = ("a", "b", "c", "d")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def stats(times: list[float], per: int = 1) -> dict:
    mean = statistics.mean(times) / per
    return {"mean_s": round(mean, 5), "stdev_s": round(statistics.stdev(times) / per, 5) if len(times) > 1 else 0.0}


def block_linears(transformer) -> list[str]:
    """Every Linear in the transformer's blocks: what a full FLUX.1 LoRA (ai-toolkit, kohya) targets."""
    return [
        name
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear)
        and name.startswith(("transformer_blocks.", "single_transformer_blocks."))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    device = pick_device(args.device)
    dtype = default_dtype(device)
    pipeline = Pipeline.load(args.model, device=str(device), dtype=dtype)
    transformer = pipeline.transformer
    targets = block_linears(transformer)
    folder = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    for seed, name in enumerate(NAMES):
        make_lora(folder / f"{name}.safetensors", transformer, seed=seed, rank=args.rank, targets=targets)
    file_bytes = (folder / "a.safetensors").stat().st_size

    # Cold load: disk to device (fluxray: read and convert, then copy into a slot of every wrapped Linear).
    def cold_fluxray():
        fresh = Pipeline.load(args.model, device=str(device), dtype=dtype)
        bank = attach_loras(fresh.transformer, max_per_row=len(NAMES), max_rank=args.rank, slots=len(NAMES))
        sync(device)
        start = time.perf_counter()
        bank.add(read_lora(folder / "a.safetensors", fresh.transformer, max_rank=args.rank))
        sync(device)
        return time.perf_counter() - start

    cold = [cold_fluxray() for _ in range(args.repeats)]

    bank = attach_loras(transformer, max_per_row=len(NAMES), max_rank=args.rank, slots=len(NAMES))
    for name in NAMES:
        bank.add(read_lora(folder / f"{name}.safetensors", transformer, max_rank=args.rank))
    wrapped = [m for m in transformer.modules() if isinstance(m, LoraLinear)]

    def params(seed: int, loras: list[str], n: int = 1) -> GenerationParams:
        return GenerationParams(
            prompt=PROMPT,
            width=args.size,
            height=args.size,
            num_inference_steps=args.steps,
            seed=seed,
            n=n,
            loras=[{"name": name, "scale": 1.0} for name in loras],
        )

    # Warm swap: both resident, the next call's rows use the other one (the bank's slot indices and scales).
    flip = [0]

    def swap():
        flip[0] ^= 1
        bank.select([[LoraChoice(NAMES[flip[0]], 1.0)]])
        sync(device)

    swap_times = timed(swap, device, args.repeats * 3)
    images = len(NAMES)
    runs = {
        "bare batch (no adapter)": lambda: pipeline.generate(params(1, [], n=images)),
        "one adapter on every row": lambda: pipeline.generate(params(1, ["a"], n=images)),
        "4 different adapters, one batch": lambda: pipeline.generate(
            [params(1 + i, [name]) for i, name in enumerate(NAMES)]
        ),
        "4 separate calls, one adapter each": lambda: [
            pipeline.generate(params(1 + i, [name])) for i, name in enumerate(NAMES)
        ],
    }
    ours = {label: stats(timed(fn, device, args.repeats), per=images * args.steps) for label, fn in runs.items()}

    # The peer: diffusers with the same files as PEFT adapters.
    peer = pipeline.to_diffusers()
    peer.set_progress_bar_config(disable=True)
    for module in wrapped:  # the peer gets plain Linears (fluxray's wrappers stay out of its way)
        parent_name, _, child = module.module_name.rpartition(".")
        setattr(transformer.get_submodule(parent_name) if parent_name else transformer, child, module.base)
    peer_cold = []
    for i in range(args.repeats):
        start = time.perf_counter()
        peer.load_lora_weights(str(folder / "a.safetensors"), adapter_name=f"cold{i}")
        sync(device)
        peer_cold.append(time.perf_counter() - start)
        peer.delete_adapters(f"cold{i}")
    for name in NAMES:
        peer.load_lora_weights(str(folder / f"{name}.safetensors"), adapter_name=name)
    peer_flip = [0]

    def peer_swap():
        peer_flip[0] ^= 1
        peer.set_adapters([NAMES[peer_flip[0]]], adapter_weights=[1.0])
        sync(device)

    peer_swap_times = timed(peer_swap, device, args.repeats * 3)

    def peer_call(seed: int, name: str | None, n: int = 1):
        if name is None:
            peer.disable_lora()
        else:
            peer.enable_lora()
            peer.set_adapters([name], adapter_weights=[1.0])
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
        guidance = 3.5 if pipeline.source.spec.guidance_embeds else 0.0
        return peer(
            PROMPT,
            width=args.size,
            height=args.size,
            num_inference_steps=args.steps,
            guidance_scale=guidance,
            generator=generators,
            num_images_per_prompt=n,
            max_sequence_length=pipeline.source.spec.max_sequence_length,
        )

    peer_runs = {
        "bare batch (no adapter)": lambda: peer_call(1, None, n=images),
        "one adapter on every row": lambda: peer_call(1, "a", n=images),
        "4 separate calls, one adapter each": lambda: [peer_call(1 + i, name) for i, name in enumerate(NAMES)],
    }
    theirs = {label: stats(timed(fn, device, args.repeats), per=images * args.steps) for label, fn in peer_runs.items()}
    bare = ours["bare batch (no adapter)"]["mean_s"]
    report = {
        "benchmark": "lora",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "model": args.model,
        "size": args.size,
        "steps": args.steps,
        "rank": args.rank,
        "adapter_targets": len(targets),
        "adapter_file_bytes": file_bytes,
        "cold_load": {"fluxray": stats(cold), "diffusers": stats(peer_cold)},
        "warm_swap": {"fluxray": stats(swap_times), "diffusers": stats(peer_swap_times)},
        "seconds_per_image_step": {"fluxray": ours, "diffusers": theirs},
        "mixed_batch_overhead_over_bare": round(ours["4 different adapters, one batch"]["mean_s"] / bare - 1, 3),
        "mixed_batch_vs_separate_calls": round(
            ours["4 separate calls, one adapter each"]["mean_s"] / ours["4 different adapters, one batch"]["mean_s"], 3
        ),
        "mixed_batch_vs_diffusers_separate_calls": round(
            theirs["4 separate calls, one adapter each"]["mean_s"] / ours["4 different adapters, one batch"]["mean_s"],
            3,
        ),
    }
    kind = "cpu" if device.type == "cpu" else "cuda"
    write_report(report, args.out or Path(__file__).parent / "results" / f"lora-{kind}.json")


if __name__ == "__main__":
    main()
