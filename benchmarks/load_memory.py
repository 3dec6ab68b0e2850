"""GPU memory of loading the transformer from disk, per quantization mode: the peak while loading
and what stays allocated once loaded.

The point of NF4 and int8 is to fit FLUX.1-dev's 24 GB of bf16 transformer on a smaller card, which
only holds if the GPU never carries the full-precision model on the way: fluxray loads quantized
weights on the CPU and quantizes block by block as they move to the GPU (fluxray.transformer's
staging_device). This measures it on a checkpoint written to a temporary diffusers folder: FLUX.1's
width (3072) with fewer blocks (`--layers`, `--single-layers`; FLUX.1-dev has 19 and 38), random
weights, bf16, and for each mode `load_transformer` with compile off.

    PYTHONPATH=/tmp/site:. python benchmarks/load_memory.py            # one GPU, ~1 minute
    python benchmarks/load_memory.py --spec tiny --device cpu           # the code path, on the CPU

JSON to benchmarks/results/load-memory-<device>.json (on the CPU: memory figures are null).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fluxray.models.sources import ModelSource  # noqa: E402
from fluxray.models.specs import get_spec  # noqa: E402
from fluxray.runtime import default_dtype, pick_device  # noqa: E402
from fluxray.speed import SpeedOptions  # noqa: E402
from fluxray.transformer import load_transformer  # noqa: E402


def gib(n: int) -> float:
    return round(n / 2**30, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="flux-dev")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--layers", type=int, default=4, help="double blocks (FLUX.1: 19)")
    parser.add_argument("--single-layers", type=int, default=8, help="single blocks (FLUX.1: 38)")
    parser.add_argument("--modes", default="none,fp8,int8,nf4")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    dtype = default_dtype(device)
    base = get_spec(args.spec)
    spec = dataclasses.replace(
        base, transformer={**base.transformer, "num_layers": args.layers, "num_single_layers": args.single_layers}
    )
    cuda = device.type == "cuda"
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not cuda:  # fp8 and nf4 need a GPU; the CPU run checks the path with what runs there
        modes = [m for m in modes if m in ("none", "int8")]
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    report = {
        "benchmark": "load_memory",
        "env": {"device": name, "torch": torch.__version__},
        "config": {"spec": args.spec, "layers": args.layers, "single_layers": args.single_layers, "dtype": str(dtype)},
        "modes": {},
    }
    from diffusers import FluxTransformer2DModel

    with tempfile.TemporaryDirectory() as root:
        torch.manual_seed(0)
        model = FluxTransformer2DModel(**spec.transformer).to(dtype)
        report["config"]["params"] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(Path(root) / "transformer", safe_serialization=True)
        del model
        gc.collect()
        source = ModelSource(spec=spec, kind="diffusers", root=Path(root))
        for mode in modes:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            started = time.perf_counter()
            model = load_transformer(source, device, dtype, SpeedOptions(quantize=mode, compile="off"))
            entry = {"load_seconds": round(time.perf_counter() - started, 2)}
            entry["on_device"] = all(p.device.type == device.type for p in model.parameters())
            if cuda:
                entry["peak_gib"] = gib(torch.cuda.max_memory_allocated(device) - before)
                entry["resident_gib"] = gib(torch.cuda.memory_allocated(device) - before)
            report["modes"][mode] = entry
            print(mode, entry, flush=True)
            del model
            gc.collect()
    none = report["modes"].get("none", {})
    for mode, entry in report["modes"].items():
        if mode != "none" and none.get("resident_gib"):
            entry["peak_vs_bf16_resident"] = round(entry["peak_gib"] / none["resident_gib"], 3)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = Path(args.out or Path(__file__).parent / "results" / f"load-memory-{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all(e["on_device"] for e in report["modes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
