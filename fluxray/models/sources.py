"""Where a model's weights come from, and loading each stage's components from there.

One resolver (`resolve_model`) turns what a user typed into a `ModelSource`:

- nothing, or ``tiny``: the embedded tiny model shipped inside this package;
- ``random:<spec>``: the spec's architecture with fixed-seed random weights (benchmarks);
- ``flux-dev`` / ``flux-schnell`` or a repo id such as ``black-forest-labs/FLUX.1-dev``: the
  Hugging Face cache, offline only (fluxray never downloads);
- a diffusers-layout directory (``model_index.json`` + component folders);
- a BFL single-file transformer checkpoint (``flux1-dev.safetensors``) with ``ae.safetensors``
  beside it, the text encoders coming from a diffusers layout in the same folder or the HF cache.

Weights are safetensors only. Each `load_*` function loads only its own components, so a
process that runs one stage holds only that stage's weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from fluxray.models.single_file import load_bfl_transformer, load_bfl_vae
from fluxray.models.specs import SPECS, ModelSpec, get_spec

TINY_DIR = Path(__file__).resolve().parents[1] / "tiny"  # fluxray/tiny/: the embedded models and LoRAs
TINY_MODEL_DIR = TINY_DIR / "model"
# The embedded models, by name: the tiny model and its Fill and Kontext variants (same text encoders and VAE).
EMBEDDED_MODELS = {
    "tiny": TINY_MODEL_DIR,
    "tiny-fill": TINY_DIR / "fill",
    "tiny-kontext": TINY_DIR / "kontext",
}
# The embedded LoRAs, by the embedded model they fit: `lora_root: tiny` (scripts/make_tiny_loras.py made them).
EMBEDDED_LORA_ROOTS = {"tiny": TINY_DIR / "loras"}

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SPEC_MARKER = "fluxray_spec.json"


class ModelSourceError(ValueError):
    """The model named cannot be found or used; the message says why and what to do."""


class UnsafeCheckpointError(ModelSourceError):
    """A pickle-based checkpoint was offered where only safetensors are accepted."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: its spec and where each component's weights live."""

    spec: ModelSpec
    kind: Literal["diffusers", "single-file", "random"]
    # Diffusers layout holding the tokenizers and text encoders (and, for kind "diffusers",
    # the transformer and VAE too). For "random" it is the tiny model, for its tokenizers.
    root: Path
    transformer_file: Path | None = None
    vae_file: Path | None = None

    @property
    def name(self) -> str:
        if self.kind == "random":
            return f"random:{self.spec.name}"
        return self.spec.name

    def weights_files(self, transformer: bool = True) -> list[Path]:
        """Every safetensors file this source's stages load (none for random weights); without the
        transformer's when `transformer` is False (what FLUX.1 variants share)."""
        if self.kind == "random":
            return []
        folders = ["text_encoder", "text_encoder_2"]
        if self.kind == "diffusers":
            folders += ["transformer", "vae"] if transformer else ["vae"]
        files = [f for folder in folders for f in sorted((self.root / folder).glob("*.safetensors"))]
        singles = (self.transformer_file if transformer else None, self.vae_file)
        return files + [f for f in singles if f is not None]

    def weights_digest(self, transformer: bool = True) -> str:
        """A short digest of which weights these are: each file's name, size and safetensors header
        (tensor names, dtypes, shapes), and its first and last MiB of tensor data. Never the whole
        file (reading 30 GB to name a model would take minutes); a retrain changes every value, so
        the sampled bytes tell two trainings of one architecture apart. Without the transformer: which
        text encoders and VAE these are, which FLUX.1 variants served together must share."""
        digest = hashlib.sha256(f"{self.kind}:{self.spec.name}".encode() if transformer else b"shared")
        for path in self.weights_files(transformer):
            size = path.stat().st_size
            with path.open("rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                digest.update(f"{path.parent.name}/{path.name}:{size}:".encode())
                digest.update(f.read(min(length, 100 << 20)))
                digest.update(f.read(1 << 20))
                f.seek(max(f.tell(), size - (1 << 20)))
                digest.update(f.read())
        return digest.hexdigest()[:16]

    def describe(self) -> str:
        if self.kind == "random":
            return f"{self.name} (random weights)"
        if self.kind == "single-file":
            return f"{self.spec.name} from {self.transformer_file} + {self.vae_file}"
        return f"{self.spec.name} from {self.root}"


def refuse_pickle(path: Path) -> None:
    """Raise UnsafeCheckpointError for a pickle checkpoint: loading one can run arbitrary code."""
    raise UnsafeCheckpointError(
        f"refusing to load {path}: it is a pickle checkpoint ({path.suffix}), and unpickling can run "
        "arbitrary code; fluxray loads safetensors only (convert it with safetensors.torch.save_file)"
    )


def _check_safetensors_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise ModelSourceError(f"model component folder {folder} does not exist")
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        refuse_pickle(pickles[0])
    raise ModelSourceError(f"no .safetensors weights in {folder}")


def _spec_of_diffusers_dir(root: Path, default: ModelSpec | None) -> ModelSpec:
    marker = root / _SPEC_MARKER
    if marker.is_file():
        return get_spec(json.loads(marker.read_text())["spec"])
    if default is not None:
        return default
    index = root / "model_index.json"
    if index.is_file() and json.loads(index.read_text()).get("_class_name") == "FluxKontextPipeline":
        return SPECS["flux-kontext"]
    config = root / "transformer" / "config.json"
    transformer = json.loads(config.read_text()) if config.is_file() else {}
    if transformer.get("in_channels") == SPECS["flux-fill"].transformer["in_channels"]:
        return SPECS["flux-fill"]
    if config.is_file() and not transformer.get("guidance_embeds", False):
        return SPECS["flux-schnell"]
    return SPECS["flux-dev"]


def _hf_cache_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        # HF_HUB_CACHE is read here, not only at import, so a cache chosen at run time is honoured.
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=os.environ.get("HF_HUB_CACHE")))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as e:
        raise ModelSourceError(
            f"{repo_id} is not in the local Hugging Face cache and fluxray never downloads at run time; "
            f"fetch it beforehand (huggingface-cli download {repo_id}) or pass a local directory"
        ) from e


def _spec_of_file_name(name: str) -> ModelSpec:
    """BFL's single files say what they are in their names: flux1-dev, flux1-schnell, flux1-fill-dev,
    flux1-kontext-dev."""
    name = name.lower()
    for word, spec in (("schnell", "flux-schnell"), ("fill", "flux-fill"), ("kontext", "flux-kontext")):
        if word in name:
            return SPECS[spec]
    return SPECS["flux-dev"]


def _single_file_source(transformer_file: Path, spec: ModelSpec | None) -> ModelSource:
    if transformer_file.suffix in PICKLE_SUFFIXES:
        refuse_pickle(transformer_file)
    vae_file = transformer_file.parent / "ae.safetensors"
    if not vae_file.is_file():
        raise ModelSourceError(f"single-file checkpoint {transformer_file} needs ae.safetensors beside it")
    if spec is None:
        spec = _spec_of_file_name(transformer_file.name)
    folder = transformer_file.parent
    if (folder / "text_encoder").is_dir() and (folder / "text_encoder_2").is_dir():
        root = folder
        spec = _spec_of_diffusers_dir(folder, None) if (folder / _SPEC_MARKER).is_file() else spec
    else:
        root = _hf_cache_snapshot(spec.repo_id or "")
    return ModelSource(spec=spec, kind="single-file", root=root, transformer_file=transformer_file, vae_file=vae_file)


def resolve_model(model: str | None = None) -> ModelSource:
    """Turn a model name, path or repo id into a ModelSource; ModelSourceError if it cannot be used."""
    if model is None or model == "":
        model = "tiny"
    if model in EMBEDDED_MODELS:
        return ModelSource(spec=SPECS[model], kind="diffusers", root=EMBEDDED_MODELS[model])
    if model.startswith("random:"):
        try:
            spec = get_spec(model.removeprefix("random:"))
        except ValueError as e:
            raise ModelSourceError(str(e)) from None
        return ModelSource(spec=spec, kind="random", root=TINY_MODEL_DIR)
    if model.startswith("s3://"):
        raise ModelSourceError(f"{model}: s3:// model sources are not supported yet; copy it to a local directory")
    if model in SPECS:
        spec = SPECS[model]
        root = _hf_cache_snapshot(spec.repo_id or "")
        return ModelSource(spec=spec, kind="diffusers", root=root)

    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix == ".safetensors":
            return _single_file_source(path.resolve(), None)
        if path.suffix in PICKLE_SUFFIXES:
            refuse_pickle(path)
        raise ModelSourceError(f"{path} is not a model: expected a directory or a .safetensors checkpoint")
    if path.is_dir():
        path = path.resolve()
        if (path / "model_index.json").is_file():
            return ModelSource(spec=_spec_of_diffusers_dir(path, None), kind="diffusers", root=path)
        singles = sorted(path.glob("flux1-*.safetensors"))
        if singles:
            return _single_file_source(singles[0], None)
        pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            refuse_pickle(pickles[0])
        raise ModelSourceError(
            f"{path} holds no FLUX model: expected model_index.json (diffusers layout) or flux1-*.safetensors"
        )
    if _REPO_ID.match(model) and not model.startswith((".", "/")):
        root = _hf_cache_snapshot(model)
        default = next((s for s in SPECS.values() if s.repo_id == model), None)
        return ModelSource(spec=_spec_of_diffusers_dir(root, default), kind="diffusers", root=root)
    known = ", ".join([*EMBEDDED_MODELS, *[s for s in SPECS if s not in EMBEDDED_MODELS], "random:<spec>"])
    raise ModelSourceError(f"unknown model {model!r}: not a path, a repo id or one of {known}")


# --- loading -----------------------------------------------------------------------------


def _random_weights(build, device: torch.device, dtype: torch.dtype):
    # Built directly on the target device in the target dtype so that a 12B model never
    # passes through fp32 host memory; the seed makes two builds identical.
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            module = build()
    finally:
        torch.set_default_dtype(previous)
    return module.eval().requires_grad_(False)


def load_tokenizers(source: ModelSource):
    """The CLIP and T5 tokenizers (offline, from the source's diffusers layout)."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip = CLIPTokenizer.from_pretrained(source.root / "tokenizer", local_files_only=True)
    t5 = T5TokenizerFast.from_pretrained(source.root / "tokenizer_2", local_files_only=True)
    return clip, t5


def load_text_encoders(
    source: ModelSource,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    t5_device: str | torch.device | None = None,
):
    """(clip_tokenizer, clip_model, t5_tokenizer, t5_model) and nothing else; T5 on t5_device
    when given (e.g. the CPU, to keep its 9 GiB off a small GPU), else on device."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    device = torch.device(device)
    t5_device = torch.device(t5_device) if t5_device is not None else device
    clip_tok, t5_tok = load_tokenizers(source)
    if source.kind == "random":
        clip = _random_weights(lambda: CLIPTextModel(CLIPTextConfig(**source.spec.clip)), device, dtype)
        t5 = _random_weights(lambda: T5EncoderModel(T5Config(**source.spec.t5)), t5_device, dtype)
        return clip_tok, clip, t5_tok, t5
    for folder in ("text_encoder", "text_encoder_2"):
        _check_safetensors_folder(source.root / folder)
    kwargs = {"torch_dtype": dtype, "use_safetensors": True, "local_files_only": True}
    clip = CLIPTextModel.from_pretrained(source.root / "text_encoder", **kwargs)
    t5 = T5EncoderModel.from_pretrained(source.root / "text_encoder_2", **kwargs)
    return clip_tok, clip.to(device).eval(), t5_tok, t5.to(t5_device).eval()


def load_transformer_module(
    source: ModelSource, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
):
    """The FluxTransformer2DModel alone, as released (fluxray.transformer applies the speed switches)."""
    from diffusers import FluxTransformer2DModel

    device = torch.device(device)
    if source.kind == "random":
        return _random_weights(lambda: FluxTransformer2DModel(**source.spec.transformer), device, dtype)
    if source.kind == "single-file":
        return load_bfl_transformer(source.transformer_file, source.spec, device, dtype)
    _check_safetensors_folder(source.root / "transformer")
    model = FluxTransformer2DModel.from_pretrained(
        source.root / "transformer", torch_dtype=dtype, use_safetensors=True, local_files_only=True
    )
    return model.to(device).eval()


def load_vae(source: ModelSource, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The AutoencoderKL alone."""
    from diffusers import AutoencoderKL

    device = torch.device(device)
    if source.kind == "random":
        return _random_weights(lambda: AutoencoderKL(**source.spec.vae), device, dtype)
    if source.kind == "single-file":
        return load_bfl_vae(source.vae_file, source.spec, device, dtype)
    _check_safetensors_folder(source.root / "vae")
    model = AutoencoderKL.from_pretrained(
        source.root / "vae", torch_dtype=dtype, use_safetensors=True, local_files_only=True
    )
    return model.to(device).eval()
