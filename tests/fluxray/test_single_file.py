"""BFL single-file checkpoints (flux1-dev.safetensors + ae.safetensors) load and give the same images.

The BFL-format files are written here from the tiny model with an inverse mapping kept in this test;
diffusers' own converter checks that mapping at the real FLUX.1 widths.
"""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from image_checks import max_pixel_diff
from safetensors.torch import save_file

from fluxray.models.single_file import bfl_to_diffusers_transformer
from fluxray.models.sources import TINY_MODEL_DIR, UnsafeCheckpointError, resolve_model
from fluxray.params import GenerationParams
from fluxray.pipeline import Pipeline

PAIRS = [
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    ("context_embedder", "txt_in"),
    ("x_embedder", "img_in"),
    ("proj_out", "final_layer.linear"),
]


def to_bfl_transformer(sd: dict) -> dict:
    out = {}
    for src, dst in PAIRS:
        for s in ("weight", "bias"):
            out[f"{dst}.{s}"] = sd[f"{src}.{s}"]
    for s in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{s}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{s}"] = torch.cat([shift, scale])
    n_double = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    n_single = len({k.split(".")[1] for k in sd if k.startswith("single_transformer_blocks.")})
    for i in range(n_double):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for s in ("weight", "bias"):
            out[f"{b}img_mod.lin.{s}"] = sd[f"{d}norm1.linear.{s}"]
            out[f"{b}txt_mod.lin.{s}"] = sd[f"{d}norm1_context.linear.{s}"]
            out[f"{b}img_attn.qkv.{s}"] = torch.cat([sd[f"{d}attn.to_{x}.{s}"] for x in "qkv"])
            out[f"{b}txt_attn.qkv.{s}"] = torch.cat([sd[f"{d}attn.add_{x}_proj.{s}"] for x in "qkv"])
            out[f"{b}img_mlp.0.{s}"] = sd[f"{d}ff.net.0.proj.{s}"]
            out[f"{b}img_mlp.2.{s}"] = sd[f"{d}ff.net.2.{s}"]
            out[f"{b}txt_mlp.0.{s}"] = sd[f"{d}ff_context.net.0.proj.{s}"]
            out[f"{b}txt_mlp.2.{s}"] = sd[f"{d}ff_context.net.2.{s}"]
            out[f"{b}img_attn.proj.{s}"] = sd[f"{d}attn.to_out.0.{s}"]
            out[f"{b}txt_attn.proj.{s}"] = sd[f"{d}attn.to_add_out.{s}"]
        out[f"{b}img_attn.norm.query_norm.scale"] = sd[f"{d}attn.norm_q.weight"]
        out[f"{b}img_attn.norm.key_norm.scale"] = sd[f"{d}attn.norm_k.weight"]
        out[f"{b}txt_attn.norm.query_norm.scale"] = sd[f"{d}attn.norm_added_q.weight"]
        out[f"{b}txt_attn.norm.key_norm.scale"] = sd[f"{d}attn.norm_added_k.weight"]
    for i in range(n_single):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for s in ("weight", "bias"):
            out[f"{b}modulation.lin.{s}"] = sd[f"{d}norm.linear.{s}"]
            parts = [sd[f"{d}attn.to_{x}.{s}"] for x in "qkv"] + [sd[f"{d}proj_mlp.{s}"]]
            out[f"{b}linear1.{s}"] = torch.cat(parts)
            out[f"{b}linear2.{s}"] = sd[f"{d}proj_out.{s}"]
        out[f"{b}norm.query_norm.scale"] = sd[f"{d}attn.norm_q.weight"]
        out[f"{b}norm.key_norm.scale"] = sd[f"{d}attn.norm_k.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def to_ldm_vae(sd: dict, blocks: int = 4) -> dict:
    out = {}
    for key, value in sd.items():
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.block.", k)
        k = re.sub(
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.upsample.", k
        )
        k = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
        k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if "mid_block.attentions.0." in k:
            k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
            for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
                k = k.replace(f".{a}.", f".{b}.")
            if value.ndim == 2:
                value = value[:, :, None, None]  # LDM attention uses 1x1 convolutions
        out[k] = value.contiguous()
    return out


def test_converter_agrees_with_diffusers_at_flux_dev_widths():
    # Only the first dimension of each tensor matters to the conversion (splits and chunks along
    # dim 0), so (rows, 1) tensors stand in for the real 12B checkpoint.
    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)
    generator = torch.Generator().manual_seed(0)
    reference = {
        k: torch.randn((v.shape[0],) if v.ndim == 1 else (v.shape[0], 1), generator=generator)
        for k, v in model.state_dict().items()
    }
    bfl = to_bfl_transformer(reference)
    assert "double_blocks.1.img_attn.qkv.weight" in bfl and bfl["single_blocks.0.linear1.weight"].shape[0] == 21504
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = bfl_to_diffusers_transformer(dict(bfl))
    assert theirs.keys() == ours.keys() == reference.keys()
    for key in reference:
        assert torch.equal(ours[key], theirs[key]), key
        assert torch.equal(ours[key], reference[key]), key


@pytest.fixture(scope="module")
def bfl_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bfl")
    for part in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"):
        shutil.copytree(TINY_MODEL_DIR / part, folder / part)
    shutil.copy(TINY_MODEL_DIR / "fluxray_spec.json", folder)
    pipeline = Pipeline.load("tiny", device="cpu")
    bfl = to_bfl_transformer(pipeline.transformer.state_dict())
    prefixed = {f"model.diffusion_model.{k}": v for k, v in bfl.items()}
    save_file(prefixed, folder / "flux1-dev.safetensors")
    save_file(to_ldm_vae(pipeline.decoder.vae.state_dict()), folder / "ae.safetensors")
    return folder


def test_single_file_checkpoint_generates_the_same_image(bfl_dir, tiny_pipeline):
    source = resolve_model(str(bfl_dir / "flux1-dev.safetensors"))
    assert source.kind == "single-file" and source.spec.name == "tiny" and source.root == bfl_dir
    assert resolve_model(str(bfl_dir)).transformer_file == bfl_dir / "flux1-dev.safetensors"
    single = Pipeline.load(str(bfl_dir), device="cpu")
    params = GenerationParams(prompt="a photo of a cat", width=96, height=64, num_inference_steps=4, seed=21)
    reference = tiny_pipeline.generate(params)[0].pixels
    # Within 1/255, as the parity tests: the converted weights are equal, but the trained model
    # turns float summation-order differences into the odd pixel off by one.
    assert max_pixel_diff(single.generate(params)[0].pixels, reference) <= 1


def test_single_file_without_ae_or_as_pickle_is_refused(tmp_path, bfl_dir):
    lone = tmp_path / "flux1-dev.safetensors"
    shutil.copy(bfl_dir / "flux1-dev.safetensors", lone)
    with pytest.raises(ValueError, match="ae.safetensors"):
        resolve_model(str(lone))
    pickled = tmp_path / "flux1-dev.ckpt"
    torch.save({"img_in.weight": torch.zeros(1)}, pickled)
    with pytest.raises(UnsafeCheckpointError):
        resolve_model(str(pickled))
