"""GPU memory of one app serving FLUX.1-dev, Kontext and Fill on one GPU with one T5/CLIP/VAE (the
shipped multi-model app's shape, deployments/configs): the weights held and the peak while each
model runs a 1024x1024 step and the VAE decodes one 1024x1024 image.

    PYTHONPATH=/tmp/site:. python benchmarks/multi_model_memory.py        # one GPU, ~1 minute
    python benchmarks/multi_model_memory.py --device cpu --tiny            # the code path, on the CPU

Random weights at the real sizes (random:flux-dev, random:flux-kontext, random:flux-fill), bf16,
compile off (compiling changes the activations' peak little and costs minutes here). Kontext's step
carries its reference image's tokens (a 1024x1024 reference: 4096 more tokens), so it runs at the
token count of a 1024x2048 dev image. JSON to benchmarks/results/multi-model-memory-<device>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reporting import results_path, write_report  # noqa: E402
from fluxray.models.sources import resolve_model  # noqa: E402
from fluxray.pipeline import Pipeline  # noqa: E402
from fluxray.runtime import default_dtype, pick_device  # noqa: E402
from fluxray.speed import SpeedOptions, warm_up  # noqa: E402
from fluxray.transformer import load_transformer  # noqa: E402


def gib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**30, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="tiny, tiny-kontext, tiny-fill at 64x64 (a CPU check)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    dtype = default_dtype(device)
    names = ("tiny", "tiny-kontext", "tiny-fill") if args.tiny else ("flux-dev", "flux-kontext", "flux-fill")
    side = 64 if args.tiny else 1024
    speed = SpeedOptions(compile="off")

    def allocated() -> int | None:
        return torch.cuda.memory_allocated(device) if cuda else None

    report = {
        "benchmark": "multi_model_memory",
        "env": {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__},
        "config": {"models": list(names), "size": f"{side}x{side}", "dtype": str(dtype), "compile": "off"},
        "held_gib": {},
        "peak_gib": {},
    }
    model = names[0] if args.tiny else f"random:{names[0]}"
    pipeline = Pipeline.load(model, device=str(device), dtype=dtype, speed=speed)
    transformers = {names[0]: pipeline.transformer}
    report["held_gib"]["text encoders + VAE + " + names[0]] = gib(allocated())
    for name in names[1:]:
        source = resolve_model(name if args.tiny else f"random:{name}")
        transformers[name] = load_transformer(source, device, dtype, speed)
        report["held_gib"][f"+ {name}"] = gib(allocated())
    with torch.inference_mode():
        for name, transformer in transformers.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            height = 2 * side if "kontext" in name else side  # the reference image's tokens ride along
            warm_up(transformer, [(side, height)], pipeline.source.spec.max_sequence_length, batches=(1,))
            report["peak_gib"][f"{name} step"] = gib(torch.cuda.max_memory_allocated(device) if cuda else None)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        channels = pipeline.transformer.config.in_channels // 4
        latents = torch.randn(1, (side // 16) ** 2, channels * 4, device=device, dtype=dtype)
        pipeline.decoder.decode(latents, side, side)
        report["peak_gib"]["VAE decode"] = gib(torch.cuda.max_memory_allocated(device) if cuda else None)
    report["held_gib"]["total"] = gib(allocated())
    write_report(report, args.out or results_path("multi-model-memory", report["env"]["device"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
