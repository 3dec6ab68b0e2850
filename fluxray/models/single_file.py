"""Black Forest Labs' single-file checkpoints: flux1-dev.safetensors (transformer) and ae.safetensors (VAE).

diffusers' own converter assumes the full 3072-wide model and fetches configs from the Hub; this one
reads every width from the checkpoint itself and builds the model from the spec, so it works offline
and at any size (the tiny model's tests load a BFL-format copy of it).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from fluxray.models.specs import ModelSpec

_PREFIX = "model.diffusion_model."


def _swap_scale_shift(weight: torch.Tensor) -> torch.Tensor:
    # BFL's final adaLN emits (shift, scale); diffusers' AdaLayerNormContinuous expects (scale, shift).
    shift, scale = weight.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def _count(checkpoint: dict, prefix: str) -> int:
    return len({k.split(".")[1] for k in checkpoint if k.startswith(prefix)})


def bfl_transformer_config(checkpoint: dict[str, torch.Tensor], spec: ModelSpec) -> dict:
    """The FluxTransformer2DModel config of a BFL checkpoint: widths and depths read off its tensors."""
    inner = checkpoint["img_in.weight"].shape[0]
    head_dim = checkpoint["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    config = {
        **spec.transformer,
        "in_channels": checkpoint["img_in.weight"].shape[1],
        "out_channels": checkpoint["final_layer.linear.weight"].shape[0],  # FLUX.1 Fill: 384 in, 64 out
        "num_layers": _count(checkpoint, "double_blocks."),
        "num_single_layers": _count(checkpoint, "single_blocks."),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": checkpoint["txt_in.weight"].shape[1],
        "pooled_projection_dim": checkpoint["vector_in.in_layer.weight"].shape[1],
        "guidance_embeds": "guidance_in.in_layer.weight" in checkpoint,
    }
    if sum(config["axes_dims_rope"]) != head_dim:
        raise ValueError(
            f"checkpoint head dim {head_dim} does not fit spec {spec.name} (rope axes {config['axes_dims_rope']})"
        )
    return config


def bfl_to_diffusers_transformer(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and split a BFL transformer state dict into diffusers' FluxTransformer2DModel layout."""
    sd = {k.removeprefix(_PREFIX): v for k, v in checkpoint.items()}
    out: dict[str, torch.Tensor] = {}
    inner = sd["img_in.weight"].shape[0]

    def take(dst: str, src: str) -> None:
        for suffix in ("weight", "bias"):
            out[f"{dst}.{suffix}"] = sd.pop(f"{src}.{suffix}")

    for dst, src in [
        ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
        ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
        ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
        ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
        ("context_embedder", "txt_in"),
        ("x_embedder", "img_in"),
        ("proj_out", "final_layer.linear"),
    ]:
        take(dst, src)
    if "guidance_in.in_layer.weight" in sd:
        take("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer")
        take("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")
    for suffix in ("weight", "bias"):
        out[f"norm_out.linear.{suffix}"] = _swap_scale_shift(sd.pop(f"final_layer.adaLN_modulation.1.{suffix}"))

    for i in range(_count(sd, "double_blocks.")):
        src, dst = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        take(f"{dst}norm1.linear", f"{src}img_mod.lin")
        take(f"{dst}norm1_context.linear", f"{src}txt_mod.lin")
        for stream, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for suffix in ("weight", "bias"):
                for name, part in zip(names, sd.pop(f"{src}{stream}_attn.qkv.{suffix}").chunk(3, dim=0)):
                    out[f"{dst}attn.{name}.{suffix}"] = part
        out[f"{dst}attn.norm_q.weight"] = sd.pop(f"{src}img_attn.norm.query_norm.scale")
        out[f"{dst}attn.norm_k.weight"] = sd.pop(f"{src}img_attn.norm.key_norm.scale")
        out[f"{dst}attn.norm_added_q.weight"] = sd.pop(f"{src}txt_attn.norm.query_norm.scale")
        out[f"{dst}attn.norm_added_k.weight"] = sd.pop(f"{src}txt_attn.norm.key_norm.scale")
        take(f"{dst}ff.net.0.proj", f"{src}img_mlp.0")
        take(f"{dst}ff.net.2", f"{src}img_mlp.2")
        take(f"{dst}ff_context.net.0.proj", f"{src}txt_mlp.0")
        take(f"{dst}ff_context.net.2", f"{src}txt_mlp.2")
        take(f"{dst}attn.to_out.0", f"{src}img_attn.proj")
        take(f"{dst}attn.to_add_out", f"{src}txt_attn.proj")

    for i in range(_count(sd, "single_blocks.")):
        src, dst = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        take(f"{dst}norm.linear", f"{src}modulation.lin")
        for suffix in ("weight", "bias"):
            fused = sd.pop(f"{src}linear1.{suffix}")
            sizes = (inner, inner, inner, fused.shape[0] - 3 * inner)
            for name, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), fused.split(sizes, dim=0)):
                out[f"{dst}{name}.{suffix}"] = part
        out[f"{dst}attn.norm_q.weight"] = sd.pop(f"{src}norm.query_norm.scale")
        out[f"{dst}attn.norm_k.weight"] = sd.pop(f"{src}norm.key_norm.scale")
        take(f"{dst}proj_out", f"{src}linear2")

    if sd:
        raise ValueError(f"unexpected tensors in the FLUX checkpoint: {', '.join(sorted(sd)[:5])}")
    return out


def _build_and_load(cls, config: dict, state_dict: dict, device: torch.device, dtype: torch.dtype):
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls(**config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_bfl_transformer(path: Path, spec: ModelSpec, device: torch.device, dtype: torch.dtype):
    """A FluxTransformer2DModel from a BFL flux1-*.safetensors file."""
    from diffusers import FluxTransformer2DModel

    checkpoint = {k.removeprefix(_PREFIX): v for k, v in load_file(path).items()}
    config = bfl_transformer_config(checkpoint, spec)
    model = _build_and_load(FluxTransformer2DModel, config, bfl_to_diffusers_transformer(checkpoint), device, dtype)
    return model


def load_bfl_vae(path: Path, spec: ModelSpec, device: torch.device, dtype: torch.dtype):
    """An AutoencoderKL from BFL's ae.safetensors (LDM key layout)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state_dict = convert_ldm_vae_checkpoint(load_file(path), spec.vae)
    # LDM's attention projections are 1x1 convolutions; diffusers' are linear layers.
    for key, value in state_dict.items():
        if ".attentions." in key and key.endswith("weight") and value.ndim == 4:
            state_dict[key] = value[:, :, 0, 0]
    return _build_and_load(AutoencoderKL, spec.vae, state_dict, device, dtype)
