"""Model sources: one resolver, safetensors only, offline only, each stage loading only its part."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from image_checks import max_pixel_diff

from fluxray.models.sources import (
    TINY_MODEL_DIR,
    ModelSourceError,
    UnsafeCheckpointError,
    load_text_encoders,
    load_transformer_module,
    load_vae,
    resolve_model,
)
from fluxray.params import GenerationParams
from fluxray.pipeline import Pipeline
from fluxray.text_encoding import TextEncoder


def copy_tiny(dest: Path, parts=None) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for item in TINY_MODEL_DIR.iterdir():
        if parts is not None and item.is_dir() and item.name not in parts:
            continue
        (shutil.copytree if item.is_dir() else shutil.copy)(item, dest / item.name)
    return dest


def test_default_is_the_embedded_tiny_model():
    source = resolve_model(None)
    assert source.spec.name == "tiny" and source.kind == "diffusers"
    assert (source.root / "model_index.json").is_file()
    size = sum(p.stat().st_size for p in source.root.rglob("*") if p.is_file())
    assert size <= 5 * 1024 * 1024


def test_diffusers_directory_is_resolved_with_its_spec(tmp_path):
    source = resolve_model(str(copy_tiny(tmp_path / "model")))
    assert source.kind == "diffusers" and source.spec.name == "tiny" and source.root == tmp_path / "model"


def test_hf_repo_id_resolves_from_the_local_cache_only(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--black-forest-labs--FLUX.1-dev"
    copy_tiny(repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    source = resolve_model("black-forest-labs/FLUX.1-dev")
    assert source.root == repo / "snapshots" / "0123abcd"
    assert resolve_model("flux-dev").root == source.root
    with pytest.raises(ModelSourceError, match="not in the local Hugging Face cache.*never downloads"):
        resolve_model("black-forest-labs/FLUX.1-schnell")


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.bin", "model.pth"])
def test_pickle_checkpoint_file_is_refused(tmp_path, name):
    path = tmp_path / name
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(UnsafeCheckpointError, match="pickle.*arbitrary code.*safetensors only"):
        resolve_model(str(path))


def test_pickle_component_in_a_diffusers_directory_is_refused(tmp_path):
    root = copy_tiny(tmp_path / "model")
    weights = root / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    torch.save({"w": torch.zeros(2)}, root / "transformer" / "diffusion_pytorch_model.bin")
    source = resolve_model(str(root))
    with pytest.raises(UnsafeCheckpointError, match="diffusion_pytorch_model.bin"):
        load_transformer_module(source)
    # Stages that do not need the transformer still load.
    assert load_vae(source) is not None


def test_each_stage_loads_only_its_own_components(tmp_path):
    encoders_only = copy_tiny(tmp_path / "enc", parts={"tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"})
    source = resolve_model(str(encoders_only))
    encoder = TextEncoder.load(source)
    assert encoder.encode(["a cat"]).sequence.shape == (1, 64, 32)  # the tiny spec's T5 length
    with pytest.raises(ModelSourceError, match="transformer"):
        load_transformer_module(source)
    with pytest.raises(ModelSourceError, match="vae"):
        load_vae(source)


def test_random_weights_have_the_spec_architecture_and_are_reproducible():
    source = resolve_model("random:tiny")
    a, b = load_transformer_module(source), load_transformer_module(source)
    assert a.config.num_layers == 2 and a.config.guidance_embeds
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    _, clip, _, t5 = load_text_encoders(source)
    assert clip.config.hidden_size == 32 and t5.config.d_model == 32
    image = Pipeline.load("random:tiny").generate(
        GenerationParams(prompt="x", width=64, height=64, num_inference_steps=2, seed=1)
    )[0]
    assert image.pixels.shape == (64, 64, 3) and image.model == "random:tiny"


@pytest.mark.parametrize("bad", ["nope", "random:flux-pro", "s3://bucket/model", "./missing/dir"])
def test_unknown_models_get_a_clear_error(bad):
    with pytest.raises(ModelSourceError):
        resolve_model(bad)


def test_model_path_loads_in_flux_pipeline_offline(tiny_pipeline, diffusers_pipe):
    # diffusers_pipe was loaded with FluxPipeline.from_pretrained(TINY_MODEL_DIR) under HF_HUB_OFFLINE=1.
    assert type(diffusers_pipe).__name__ == "FluxPipeline"
    assert diffusers_pipe.tokenizer_2.__class__.__name__.startswith("T5Tokenizer")
    params = GenerationParams(prompt="a cat", width=64, height=64, num_inference_steps=2, seed=3)
    out = diffusers_pipe(
        "a cat",
        width=64,
        height=64,
        num_inference_steps=2,
        max_sequence_length=tiny_pipeline.source.spec.max_sequence_length,  # the tiny model's 64
        generator=torch.Generator().manual_seed(3),
    ).images[0]
    import numpy as np

    assert max_pixel_diff(tiny_pipeline.generate(params)[0].pixels, np.asarray(out)) <= 2


def test_fill_and_kontext_are_recognised_by_their_files(tmp_path):
    """A diffusers directory says Fill by its transformer's 384 input channels and Kontext by its pipeline
    class; BFL single files by their names. The embedded variants resolve by name."""
    import json

    from fluxray.models.sources import EMBEDDED_MODELS
    from fluxray.models.specs import SPECS

    for name in ("tiny-fill", "tiny-kontext"):
        assert resolve_model(name).spec.name == name and resolve_model(name).root == EMBEDDED_MODELS[name]
    fill = tmp_path / "fill"
    shutil.copytree(EMBEDDED_MODELS["tiny-fill"], fill)
    (fill / "fluxray_spec.json").unlink()
    assert resolve_model(str(fill)).spec.name == "flux-fill"
    kontext = tmp_path / "kontext"
    shutil.copytree(EMBEDDED_MODELS["tiny-kontext"], kontext)
    (kontext / "fluxray_spec.json").unlink()
    assert resolve_model(str(kontext)).spec.name == "flux-kontext"
    index = json.loads((kontext / "model_index.json").read_text())
    assert index["_class_name"] == "FluxKontextPipeline"
    from fluxray.models.sources import _spec_of_file_name

    assert _spec_of_file_name("flux1-fill-dev.safetensors") is SPECS["flux-fill"]
    assert _spec_of_file_name("flux1-kontext-dev.safetensors") is SPECS["flux-kontext"]
    assert _spec_of_file_name("flux1-schnell.safetensors") is SPECS["flux-schnell"]
    assert _spec_of_file_name("flux1-dev.safetensors") is SPECS["flux-dev"]
