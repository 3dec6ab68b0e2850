"""Reading a LoRA file into an adapter: diffusers' own `lora_state_dict` (every FLUX layout its converters
know), safetensors only, text-encoder keys and keys that do not fit the transformer refused with their names,
ranks capped, PEFT's alpha / r folded into B."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fluxray.lora.adapters import MAX_FILE_BYTES, MAX_RANK, LoraAdapter, LoraError
from fluxray.lora.bank import LoraLinear, linear_like
from fluxray.models.sources import PICKLE_SUFFIXES, refuse_pickle

TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.")
# Projections that diffusers' fuse_qkv_projections replaces by to_qkv / to_added_qkv while keeping the
# originals: a LoRA on them would be wrapped on modules the fused forward no longer calls.
FUSED_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def _module_scales(keys: Sequence[str], ranks: dict[str, int], alphas: dict | None, metadata: dict | None):
    """PEFT's scaling (lora_alpha / r) of each module, as diffusers configures it: from the file's adapter
    metadata when it has it, else from its `<module>.alpha` tensors, else 1."""
    scales = {}
    # diffusers keeps each component's LoraConfig in the file's metadata, keys prefixed by the component
    config = {
        k.removeprefix("transformer."): v
        for k, v in (metadata or {}).items()
        if "." not in k or k.startswith("transformer.")
    }
    default_r = config.get("r")
    default_alpha = config.get("lora_alpha")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for module in keys:
        r = ranks[module]
        alpha = None
        if alphas:
            for candidate in (f"transformer.{module}.alpha", f"{module}.alpha"):
                if candidate in alphas:
                    alpha = float(alphas[candidate])
        if alpha is None and config:
            pattern_alpha = next((v for k, v in alpha_pattern.items() if _matches(module, k)), None)
            pattern_r = next((v for k, v in rank_pattern.items() if _matches(module, k)), None)
            alpha = pattern_alpha if pattern_alpha is not None else default_alpha
            r = pattern_r if pattern_r is not None else (default_r or r)
        scales[module] = 1.0 if alpha is None else alpha / r
    return scales


def _matches(module: str, pattern: str) -> bool:
    pattern = pattern.lstrip("^").removeprefix("transformer.")
    return module == pattern or module.endswith("." + pattern)


def check_lora_file(path: str | Path) -> Path:
    """The path of a LoRA file that may be read: an existing .safetensors within the size cap (a pickle
    checkpoint is refused by fluxray.models.sources' rule, UnsafeCheckpointError); LoraError otherwise."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        refuse_pickle(path)
    if path.suffix != ".safetensors":
        raise LoraError(f"{path.name}: LoRA files must be .safetensors")
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise LoraError(f"{path.name}: {path.stat().st_size} bytes, over the {MAX_FILE_BYTES} bytes a LoRA may have")
    return path


def read_lora(
    path: str | Path, transformer: nn.Module, name: str | None = None, max_rank: int = MAX_RANK
) -> LoraAdapter:
    """An adapter from a LoRA file in any layout diffusers reads; LoraError when it cannot be used here."""
    from diffusers import FluxPipeline

    path = check_lora_file(path)
    try:
        state, alphas, metadata = FluxPipeline.lora_state_dict(
            str(path), return_alphas=True, return_lora_metadata=True, local_files_only=True
        )
    except Exception as error:  # noqa: BLE001 - a file diffusers cannot read: its message, one line
        raise LoraError(f"{path.name}: not a FLUX LoRA diffusers can read ({type(error).__name__}: {error})") from None
    text_keys = sorted(k for k in state if k.startswith(TEXT_ENCODER_PREFIXES))
    if text_keys:
        raise LoraError(
            f"{path.name}: has text-encoder LoRA keys ({', '.join(text_keys[:3])}, ...), which fluxray does not apply "
            "(the text encoders are shared by every request); use a transformer-only LoRA"
        )
    modules = dict(transformer.named_modules())
    weights: dict[str, dict[str, torch.Tensor]] = {}
    unmatched = []
    for key, tensor in state.items():
        plain = key.removeprefix("transformer.")
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if plain.endswith(marker):
                weights.setdefault(plain.removesuffix(marker), {})[part] = tensor
                break
        else:
            unmatched.append(key)
    fused = []
    for module, pair in weights.items():
        target = modules.get(module)
        if isinstance(target, LoraLinear):
            target = target.base
        parent = modules.get(module.rpartition(".")[0])
        if getattr(parent, "fused_projections", False) and module.rpartition(".")[2] in FUSED_PROJECTIONS:
            fused.append(f"transformer.{module}")
        ok = linear_like(target) and set(pair) == {"lora_A", "lora_B"}
        if ok:
            a, b = pair["lora_A"], pair["lora_B"]
            ok = a.ndim == 2 and b.ndim == 2 and a.shape[1] == target.in_features and b.shape[0] == target.out_features
            ok = ok and a.shape[0] == b.shape[1]
        if not ok:
            unmatched.append(f"transformer.{module}.lora_A.weight")
    if fused:
        raise LoraError(
            f"{path.name}: targets q/k/v projections this transformer runs fused "
            f"({', '.join(sorted(fused)[:3])}); serve LoRAs with the speed switch fuse_qkv off"
        )
    if unmatched:
        raise LoraError(
            f"{path.name}: its keys do not fit this model's transformer (first: {', '.join(sorted(unmatched)[:3])})"
        )
    if not weights:
        raise LoraError(f"{path.name}: no transformer LoRA weights in it")
    ranks = {m: p["lora_A"].shape[0] for m, p in weights.items()}
    if max(ranks.values()) > max_rank:
        raise LoraError(f"{path.name}: rank {max(ranks.values())}, over this server's max_lora_rank of {max_rank}")
    meta = metadata if isinstance(metadata, dict) else (json.loads(metadata) if metadata else None)
    scales = _module_scales(list(weights), ranks, alphas, meta)
    pairs = {}
    for module, pair in weights.items():
        a = pair["lora_A"].to(torch.float32)
        b = pair["lora_B"].to(torch.float32) * scales[module]
        pairs[module] = (a, b)
    return LoraAdapter(name or path.stem, max(ranks.values()), pairs)
