"""LoRA adapters on the transformer, chosen per row: requests with different adapters share one transformer
call, each row getting its own low-rank deltas on top of the shared base matmul (punica / S-LoRA style).

Files are read by diffusers' own `FluxLoraLoaderMixin.lora_state_dict`, which converts the FLUX LoRA layouts
in the wild (diffusers/PEFT, kohya sd-scripts, XLabs, BFL control, fal Kontext) to diffusers' keys; fluxray
never converts keys itself. Safetensors only. Each adapter becomes, per target Linear, a pair A (r, in) and
B (out, r) with its alpha / r folded into B, the scaling PEFT applies (`lora_alpha / r`, alpha = r when the
file has none).

`attach_loras(transformer)` gives the transformer one `LoraBank`; adding an adapter wraps the Linears it
targets (only those, once each) in `LoraLinear` around the bank:
the adapters loaded (by name) and, for the current call, each row's adapters and scales. Before a call the
step function gives the bank the rows' adapter sets (`LoraBank.select`); each wrapped Linear then adds
`(x @ A_row^T) @ B_row^T` with A_row, B_row the row's adapters stacked along the rank and padded to
`max_loras_per_row * max_rank` (zeros: a row without adapters adds exact zeros), so a new adapter or a new mix
changes values, never shapes. The stacked per-row weights are built once per distinct batch composition
and kept until the composition changes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fluxray.sources import PICKLE_SUFFIXES, refuse_pickle

MAX_LORAS_PER_ROW = 4
MAX_RANK = 128
MAX_FILE_BYTES = 2 << 30
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.")
# Projections that diffusers' fuse_qkv_projections replaces by to_qkv / to_added_qkv while keeping the
# originals: a LoRA on them would be wrapped on modules the fused forward no longer calls.
FUSED_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


class LoraError(ValueError):
    """A LoRA that cannot be used; the message names the file or adapter and why."""


@dataclass(frozen=True)
class LoraChoice:
    """One adapter a request asks for, and how strongly."""

    name: str
    scale: float = 1.0


@dataclass
class LoraAdapter:
    """An adapter's low-rank pairs by target module path (diffusers' names, e.g.
    transformer_blocks.0.attn.to_q): A (r, in) and B (out, r), PEFT's alpha / r folded into B."""

    name: str
    rank: int
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.pairs.values())


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


def read_lora(
    path: str | Path, transformer: nn.Module, name: str | None = None, max_rank: int = MAX_RANK
) -> LoraAdapter:
    """An adapter from a LoRA file in any layout diffusers reads; LoraError when it cannot be used here."""
    from diffusers import FluxPipeline

    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        refuse_pickle(path)
    if path.suffix != ".safetensors":
        raise LoraError(f"{path.name}: LoRA files must be .safetensors")
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise LoraError(f"{path.name}: {path.stat().st_size} bytes, over the {MAX_FILE_BYTES} bytes a LoRA may have")
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
        ok = isinstance(target, nn.Linear) and set(pair) == {"lora_A", "lora_B"}
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


@dataclass
class LoraBank:
    """The adapters loaded on the transformer, and the current call's rows (see the module docstring)."""

    max_per_row: int = MAX_LORAS_PER_ROW
    max_rank: int = MAX_RANK
    adapters: dict[str, LoraAdapter] = field(default_factory=dict)
    rows: tuple[tuple[LoraChoice, ...], ...] = ()
    transformer: nn.Module | None = field(default=None, repr=False)  # whose Linears add() wraps
    _stacked: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return self.max_per_row * self.max_rank

    def add(self, adapter: LoraAdapter) -> None:
        """Load the adapter: the Linears it targets are wrapped now (once each; the rest stay plain)."""
        if adapter.rank > self.max_rank:
            raise LoraError(f"{adapter.name}: rank {adapter.rank}, over max_lora_rank {self.max_rank}")
        if self.transformer is not None:
            wrap_targets(self.transformer, adapter)
        self.adapters[adapter.name] = adapter
        self._stacked.clear()

    def remove(self, name: str) -> None:
        self.adapters.pop(name, None)
        self._stacked.clear()

    def select(self, rows: Sequence[Sequence[LoraChoice]]) -> None:
        """The adapters of each row of the next call (in the order of its batch)."""
        rows = tuple(tuple(r) for r in rows)
        for choices in rows:
            if len(choices) > self.max_per_row:
                raise LoraError(f"{len(choices)} LoRAs on one image, over max_loras_per_request {self.max_per_row}")
            for choice in choices:
                if choice.name not in self.adapters:
                    raise LoraError(f"LoRA {choice.name!r} is not loaded")
        if rows != self.rows:
            self.rows = rows
            self._stacked.clear()

    @property
    def active(self) -> bool:
        return any(self.rows)

    def stacked(self, module: str, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A (rows, K, in), B (rows, out, K)) of this module for the current rows; None when no row's
        adapters touch it."""
        if module in self._stacked:
            return self._stacked[module]
        if not any(c.name in self.adapters and module in self.adapters[c.name].pairs for r in self.rows for c in r):
            self._stacked[module] = None
            return None
        rows = len(self.rows)
        a = torch.zeros(rows, self.width, linear.in_features)
        b = torch.zeros(rows, linear.out_features, self.width)
        for i, choices in enumerate(self.rows):
            for slot, choice in enumerate(choices):
                pair = self.adapters[choice.name].pairs.get(module)
                if pair is None or choice.scale == 0:
                    continue
                lo = slot * self.max_rank
                a[i, lo : lo + pair[0].shape[0]] = pair[0]
                b[i, :, lo : lo + pair[1].shape[1]] = pair[1] * choice.scale
        device, dtype = linear.weight.device, linear.weight.dtype
        self._stacked[module] = (a.to(device, dtype), b.to(device, dtype))
        return self._stacked[module]


class LoraLinear(nn.Module):
    """A Linear plus the current rows' low-rank deltas (LoraBank); the base weights are untouched."""

    def __init__(self, base: nn.Linear, module: str, bank: LoraBank):
        super().__init__()
        self.base, self.module_name, self.bank = base, module, bank

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.bank.active:
            return out
        stacked = self.bank.stacked(self.module_name, self.base)
        if stacked is None:
            return out
        a, b = stacked
        if x.shape[0] != a.shape[0]:
            raise RuntimeError(f"{x.shape[0]} rows in the call, {a.shape[0]} in LoraBank.select")
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2))
        return out + delta.reshape(out.shape)


def attach_loras(transformer: nn.Module, max_per_row: int = MAX_LORAS_PER_ROW, max_rank: int = MAX_RANK) -> LoraBank:
    """The transformer's bank (made once). No Linear is wrapped until an adapter that targets it is added
    (`wrap_targets`), so a transformer whose requests use no LoRA runs exactly as before."""
    existing = getattr(transformer, "fluxray_loras", None)
    if existing is not None:
        return existing
    bank = LoraBank(max_per_row, max_rank, transformer=transformer)
    transformer.fluxray_loras = bank
    return bank


def wrap_targets(transformer: nn.Module, adapter: LoraAdapter) -> None:
    """Wrap the Linears the adapter targets (once each) around the transformer's bank."""
    bank = transformer.fluxray_loras
    modules = dict(transformer.named_modules())
    for path in adapter.pairs:
        target = modules[path]
        if isinstance(target, LoraLinear):
            continue
        parent_path, _, child = path.rpartition(".")
        parent = modules[parent_path] if parent_path else transformer
        setattr(parent, child, LoraLinear(target, path, bank))


class LoraRegistry:
    """The adapters a server may load, by name: each `*.safetensors` directly in `root` (named by its stem)
    and the `files` given by name. Requests name adapters; they never point at files or URLs."""

    def __init__(self, root: str | Path | None = None, files: dict[str, str] | None = None):
        self.files: dict[str, Path] = {}
        if root:
            if str(root).startswith("s3://"):
                raise LoraError(f"lora_root {root}: s3:// LoRA roots are not supported yet; sync them to a directory")
            folder = Path(root)
            if not folder.is_dir():
                raise LoraError(f"lora_root {root}: no such directory")
            self.files.update({p.stem: p for p in sorted(folder.glob("*.safetensors"))})
        for name, path in (files or {}).items():
            self.files[name] = Path(path)

    def names(self) -> list[str]:
        return sorted(self.files)

    def __bool__(self) -> bool:
        return bool(self.files)

    def path(self, name: str) -> Path:
        try:
            return self.files[name]
        except KeyError:
            raise LoraError(f"unknown LoRA {name!r}") from None
