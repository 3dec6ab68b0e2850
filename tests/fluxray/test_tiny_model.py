"""The embedded tiny model: its frozen parts are what scripts/make_tiny_model.py makes, its VAE and
transformer what scripts/train_tiny_model.py trains from there, and it has FLUX.1's structure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fluxray.models.sources import TINY_MODEL_DIR
from fluxray.models.specs import get_spec

ROOT = Path(__file__).resolve().parents[2]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=ROOT)


def files(root: Path) -> dict[Path, bytes]:
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# The library that wrote a config stamps its own version in it; a newer transformers or diffusers
# release writes the same model with another stamp.
VERSION_STAMPS = ("transformers_version", "_diffusers_version")


def same_file(rel: Path, made: bytes, shipped: bytes) -> bool:
    if rel.suffix != ".json" or made == shipped:
        return made == shipped
    a, b = json.loads(made), json.loads(shipped)
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return False
    return {k: v for k, v in a.items() if k not in VERSION_STAMPS} == {
        k: v for k, v in b.items() if k not in VERSION_STAMPS
    }


def test_untrained_model_gives_the_shipped_frozen_parts(tmp_path):
    out = tmp_path / "untrained"
    result = run_script("scripts/make_tiny_model.py", "--out", str(out))
    assert result.returncode == 0, result.stderr
    made, shipped = files(out), files(TINY_MODEL_DIR)
    assert sorted(made) == sorted(shipped)
    # Tokenizers, text encoders and scheduler are frozen in training: byte for byte the same.
    trained = {"transformer", "vae"}
    for rel in shipped:
        if rel.parts[0] not in trained:
            assert same_file(rel, made[rel], shipped[rel]), rel
    # The trained parts keep the architecture, and the spec holds the trained VAE's latent
    # normalisation (training measures it; single files have no config to carry it).
    for config in ("transformer/config.json", "vae/config.json"):
        assert same_file(Path(config), made[Path(config)], shipped[Path(config)]), config
    vae_weights = Path("vae/diffusion_pytorch_model.safetensors")
    assert made[vae_weights] != shipped[vae_weights]
    # The shipped model is small enough to ship.
    assert sum(len(b) for b in shipped.values()) <= 10 * 2**20
    result = run_script("scripts/make_tiny_model.py", "--out", str(TINY_MODEL_DIR))
    assert result.returncode != 0 and "refusing to overwrite" in result.stderr


def test_training_script_runs_end_to_end_and_repeats_itself(tmp_path):
    # The whole recipe at a sliver of its steps (the real run takes ~50 min): it must still write
    # a model diffusers loads and a log of each stage's losses, and a second run must write the
    # very same weights (fixed seeds, fixed thread count).
    from diffusers import FluxPipeline

    # A third run takes the first run's VAE (--vae-from, which skips the VAE stage) and must still write
    # the same bytes: nothing after the VAE stage depends on its having run.
    runs = []
    for name, more in (("a", ()), ("b", ()), ("c", ("--vae-from", str(tmp_path / "a")))):
        out, log = tmp_path / name, tmp_path / f"{name}.json"
        args = ("--scale", "0.003", "--out", str(out), "--log", str(log), *more)
        result = run_script("scripts/train_tiny_model.py", *args)
        assert result.returncode == 0, result.stderr[-2000:]
        runs.append(files(out))
        record = json.loads(log.read_text())
        assert all(record[stage]["loss_curve"] for stage in ("flow", "distill"))
    assert json.loads((tmp_path / "a.json").read_text())["vae"]["loss_curve"] and record["vae"]["from"] == "--vae-from"
    assert runs[0] == runs[1] == runs[2]
    pipe = FluxPipeline.from_pretrained(out, local_files_only=True)
    # Re-measured from this run's latents (a few steps of training: not the shipped values).
    assert pipe.vae.config.scaling_factor != get_spec("tiny").vae["scaling_factor"]


def test_real_flux_structure():
    index = json.loads((TINY_MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    assert index["tokenizer_2"][1].startswith("T5Tokenizer")
    transformer = json.loads((TINY_MODEL_DIR / "transformer" / "config.json").read_text())
    assert transformer["guidance_embeds"] is True and transformer["in_channels"] == 64
    vae = json.loads((TINY_MODEL_DIR / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 16 and len(vae["block_out_channels"]) == 4  # 8x downsampling
    assert not list(TINY_MODEL_DIR.rglob("*.bin"))


def test_edit_variants_are_what_the_script_makes_and_share_the_frozen_parts(tmp_path):
    """tiny-fill and tiny-kontext: remade byte for byte from the shipped tiny model, with its text
    encoders, tokenizers and VAE as they are (one app serves all three with one TextEncoder and VAE)."""
    from diffusers import FluxFillPipeline, FluxKontextPipeline

    from fluxray.models.sources import EMBEDDED_MODELS

    shipped = {name: files(EMBEDDED_MODELS[name]) for name in ("tiny-fill", "tiny-kontext")}
    copy = tmp_path / "fluxray"
    import shutil

    shutil.copytree(ROOT / "fluxray", copy, ignore=shutil.ignore_patterns("fill", "kontext", "__pycache__"))
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "make_tiny_model.py", tmp_path / "scripts")
    result = subprocess.run(
        [sys.executable, "scripts/make_tiny_model.py", "--edit-variants"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    base = files(TINY_MODEL_DIR)
    for name, folder in (("tiny-fill", "fill"), ("tiny-kontext", "kontext")):
        assert files(copy / "tiny" / folder) == shipped[name], name
        for rel, data in shipped[name].items():
            if rel.parts[0] in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler"):
                assert data == base[rel], (name, rel)
        assert sum(len(b) for b in shipped[name].values()) <= 6 * 2**20
    fill = FluxFillPipeline.from_pretrained(EMBEDDED_MODELS["tiny-fill"], local_files_only=True)
    assert fill.transformer.config.in_channels == 384 and fill.transformer.config.out_channels == 64
    kontext = FluxKontextPipeline.from_pretrained(EMBEDDED_MODELS["tiny-kontext"], local_files_only=True)
    assert kontext.transformer.config.in_channels == 64
