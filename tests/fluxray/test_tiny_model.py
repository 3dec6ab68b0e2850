"""The embedded tiny model is what scripts/make_tiny_model.py makes, and has FLUX.1's structure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fluxray.sources import TINY_MODEL_DIR

ROOT = Path(__file__).resolve().parents[2]


def test_regenerating_gives_the_shipped_files(tmp_path):
    out = tmp_path / "tiny"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    shipped = sorted(p.relative_to(TINY_MODEL_DIR) for p in TINY_MODEL_DIR.rglob("*") if p.is_file())
    made = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert made == shipped
    for rel in shipped:
        assert (out / rel).read_bytes() == (TINY_MODEL_DIR / rel).read_bytes(), rel


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
