"""Tiny LoRAs for the embedded tiny model, deterministically (fixed seeds), for tests and examples.

    python scripts/make_tiny_loras.py --out DIR

Writes `style.safetensors` (rank 4, no alpha: scale 1) and `subject.safetensors` (rank 8, alpha 4 in its
adapter metadata: scale 0.5) in diffusers' PEFT layout, saved by diffusers' own `save_lora_weights`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = (
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.to_v",
    "transformer_blocks.1.ff.net.2",
    "single_transformer_blocks.0.proj_mlp",
    "single_transformer_blocks.1.attn.to_k",
    "proj_out",
)
TINY_LORAS = {"style": dict(seed=1, rank=4), "subject": dict(seed=2, rank=8, alpha=4.0, targets=TARGETS[1:])}


def make_lora(path: Path, transformer, seed: int, rank: int, alpha: float | None = None, targets=TARGETS) -> None:
    """A PEFT-layout LoRA for the transformer's `targets` (with adapter metadata saying lora_alpha / r when
    alpha is given)."""
    from diffusers import FluxPipeline

    generator = torch.Generator().manual_seed(seed)
    modules = dict(transformer.named_modules())
    layers = {}
    for name in targets:
        linear = modules[name]
        linear = getattr(linear, "base", linear)
        layers[f"{name}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=generator) * 0.3
        layers[f"{name}.lora_B.weight"] = torch.randn(linear.out_features, rank, generator=generator) * 0.3
    metadata = {"r": rank, "lora_alpha": alpha, "target_modules": list(targets)} if alpha is not None else None
    FluxPipeline.save_lora_weights(
        path.parent, transformer_lora_layers=layers, weight_name=path.name, transformer_lora_adapter_metadata=metadata
    )


def make_tiny_loras(out: Path) -> list[Path]:
    from fluxray.sources import load_transformer_module, resolve_model

    transformer = load_transformer_module(resolve_model("tiny"))
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, recipe in TINY_LORAS.items():
        make_lora(out / f"{name}.safetensors", transformer, **recipe)
        paths.append(out / f"{name}.safetensors")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    for path in make_tiny_loras(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
