"""Tiny LoRAs for the embedded tiny model, deterministically (fixed seeds), for tests and examples.

    python scripts/make_tiny_loras.py --out DIR

Writes, in diffusers' PEFT layout (saved by diffusers' own `save_lora_weights`), `style.safetensors`
(rank 4, no alpha: scale 1) and `subject.safetensors` (rank 8, alpha 4 in its adapter metadata: scale 0.5);
with --formats, also `ink-kohya.safetensors` (kohya sd-scripts keys: `lora_unet_double_blocks_0_img_attn_qkv`
with lora_down/lora_up/alpha, BFL's fused q/k/v) and `ink-xlabs.safetensors` (XLabs keys:
`double_blocks.0.processor.qkv_lora1.down.weight`, ...), which diffusers' converters turn into its own keys.
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
# Other layouts: (key, diffusers module whose shape it takes, how many of its outputs are fused in it)
KOHYA = (
    ("lora_unet_double_blocks_0_img_attn_qkv", "transformer_blocks.0.attn.to_q", 3),
    ("lora_unet_double_blocks_1_img_mlp_2", "transformer_blocks.1.ff.net.2", 1),
    ("lora_unet_double_blocks_0_txt_attn_proj", "transformer_blocks.0.attn.to_add_out", 1),
    ("lora_unet_single_blocks_1_linear2", "single_transformer_blocks.1.proj_out", 1),
)
XLABS = (
    ("double_blocks.0.processor.qkv_lora1", "transformer_blocks.0.attn.to_q", 3),
    ("double_blocks.1.processor.proj_lora2", "transformer_blocks.1.attn.to_add_out", 1),
    ("single_blocks.0.processor.qkv_lora", "single_transformer_blocks.0.attn.to_q", 3),
    ("single_blocks.1.processor.proj_lora", "single_transformer_blocks.1.proj_out", 1),
)


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


def make_layout_lora(path: Path, transformer, layout: str, seed: int = 5, rank: int = 4, alpha: float = 2.0) -> None:
    """A LoRA in kohya's (`layout="kohya"`, with `alpha` tensors) or XLabs' key layout, for the transformer's
    shapes; diffusers' lora_state_dict converts both."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    modules = dict(transformer.named_modules())
    down, up = (".lora_down.weight", ".lora_up.weight") if layout == "kohya" else (".down.weight", ".up.weight")
    tensors = {}
    for key, module, fused in KOHYA if layout == "kohya" else XLABS:
        linear = getattr(modules[module], "base", modules[module])
        tensors[key + down] = torch.randn(rank, linear.in_features, generator=generator) * 0.3
        tensors[key + up] = torch.randn(fused * linear.out_features, rank, generator=generator) * 0.3
        if layout == "kohya":
            tensors[key + ".alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))


def make_tiny_loras(out: Path, formats: bool = False) -> list[Path]:
    from fluxray.models.sources import load_transformer_module, resolve_model

    transformer = load_transformer_module(resolve_model("tiny"))
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, recipe in TINY_LORAS.items():
        make_lora(out / f"{name}.safetensors", transformer, **recipe)
        paths.append(out / f"{name}.safetensors")
    if formats:
        for layout in ("kohya", "xlabs"):
            make_layout_lora(out / f"ink-{layout}.safetensors", transformer, layout)
            paths.append(out / f"ink-{layout}.safetensors")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--formats", action="store_true", help="also the kohya and XLabs layouts")
    args = parser.parse_args()
    for path in make_tiny_loras(args.out, args.formats):
        print(path)


if __name__ == "__main__":
    main()
