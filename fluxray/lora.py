"""LoRA adapters on the transformer, chosen per row: requests with different adapters share one transformer
call, each row getting its own low-rank deltas on top of the shared base matmul (punica / S-LoRA style).

Files are read by diffusers' own `FluxLoraLoaderMixin.lora_state_dict`, which converts the FLUX LoRA layouts
in the wild (diffusers/PEFT, kohya sd-scripts, XLabs, BFL control, fal Kontext) to diffusers' keys; fluxray
never converts keys itself. Safetensors only. Each adapter becomes, per target Linear, a pair A (r, in) and
B (out, r) with its alpha / r folded into B, the scaling PEFT applies (`lora_alpha / r`, alpha = r when the
file has none).

`attach_loras(transformer)` gives the transformer one `LoraBank`; adding an adapter wraps the Linears it
targets (only those, once each) in `LoraLinear` and copies its pairs into a free slot of the bank. Before a
call the step function gives the bank the rows' adapters (`LoraBank.select`: slot indices and scales per
row); each wrapped Linear then adds `scale * (x @ A_slot^T) @ B_slot^T` for each of its row's slots, as two
batched products over the rows (a gathered low-rank delta per row on top of the shared base matmul). Slot 0
is all zeros: a row without adapters adds exact zeros. See LoraBank for what keeps shapes fixed under
torch.compile.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fluxray.sources import EMBEDDED_LORA_ROOTS, PICKLE_SUFFIXES, refuse_pickle
from fluxray.storage import S3FileError, S3Folder

MAX_LORAS_PER_ROW = 4
MAX_RANK = 128
MAX_FILE_BYTES = 2 << 30
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.")
# Projections that diffusers' fuse_qkv_projections replaces by to_qkv / to_added_qkv while keeping the
# originals: a LoRA on them would be wrapped on modules the fused forward no longer calls.
FUSED_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")  # attach_loras(wrap_all=True) wraps these


@dataclass(frozen=True)
class LoraSlots:
    """How a transformer is made ready for LoRAs when it loads (fluxray.transformer.load_transformer): adapters
    per row, their highest rank, and how many stay resident before the bank grows."""

    max_per_row: int = MAX_LORAS_PER_ROW
    max_rank: int = MAX_RANK
    resident: int = 8


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


def check_lora_file(path: str | Path) -> Path:
    """The path of a LoRA file that may be read: an existing .safetensors within the size cap (a pickle
    checkpoint is refused by fluxray.sources' rule, UnsafeCheckpointError); LoraError otherwise."""
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


def linear_like(module: nn.Module | None) -> bool:
    """An nn.Linear, or a layer that stands in for one (fluxray.quantization's fp8 and int8 Linears): what an
    adapter's pair can sit on, its delta added to the layer's output in the activations' dtype."""
    if isinstance(module, nn.Linear):
        return True
    sizes = (getattr(module, "in_features", None), getattr(module, "out_features", None))
    return module is not None and not isinstance(module, LoraLinear) and all(isinstance(n, int) for n in sizes)


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


class LoraBank:
    """The adapters resident on the transformer, in fixed slots, and the current call's rows.

    Every wrapped Linear (LoraLinear) holds one tensor per side for all slots, A (slots + 1, max_rank, in) and
    B (slots + 1, out, max_rank); slot 0 stays zero (rows without an adapter, unused positions). Adding an
    adapter copies its pairs into a free slot (zeros where it does not touch a module) and removing one frees
    the slot; neither changes a shape. `select(rows)` turns each row's adapters into slot indices and scales
    (rows, max_per_row); each wrapped Linear gathers its rows' slots, so the per-row weights exist only for
    the Linear running. With `fixed_shapes` (torch.compile) every call uses all max_per_row positions and
    max_rank columns, so neither a new adapter nor a new mix changes a shape the graphs were compiled for;
    without it a call uses just the positions and rank its rows need.
    """

    def __init__(
        self,
        max_per_row: int = MAX_LORAS_PER_ROW,
        max_rank: int = MAX_RANK,
        slots: int = 8,
        transformer: nn.Module | None = None,
        fixed_shapes: bool = False,
        dtype: torch.dtype | None = None,
    ):
        self.max_per_row, self.max_rank, self.slots = max_per_row, max_rank, slots
        self.transformer, self.fixed_shapes = transformer, fixed_shapes
        self.dtype = dtype  # of the slots: the activations' (a quantized layer's weight is not)
        self.adapters: dict[str, LoraAdapter] = {}  # the resident ones (their float32 pairs on the host)
        self.slot_of: dict[str, int] = {}
        self.modules: dict[str, LoraLinear] = {}
        self.rows: tuple[tuple[LoraChoice, ...], ...] = ()
        self.active = False  # whether the current call's rows use any adapter
        self.index: torch.Tensor | None = None  # (rows, positions) slot of each row's adapters
        self.scale: torch.Tensor | None = None  # (rows, positions * rank) each column's scale
        self.rank = max_rank  # columns per position this call
        self.shared = False  # every row of this call has the same adapters (eager only: one pair, no gather)

    def dry(self, rows: int) -> None:
        """The adapter path with every row on the zero slot at full width (torch.compile's warm-up)."""
        self.rows, self.active, self.rank, self.shared = (), True, self.max_rank, False
        device = next(iter(self.modules.values())).lora_a.device
        self.index = torch.zeros(rows, self.max_per_row, dtype=torch.long, device=device)
        self.scale = torch.zeros(rows, self.max_per_row * self.max_rank, device=device)

    def add(self, adapter: LoraAdapter) -> None:
        """Load the adapter into a free slot (growing the slots when none is free); the Linears it targets are
        wrapped now if they are not yet."""
        if adapter.rank > self.max_rank:
            raise LoraError(f"{adapter.name}: rank {adapter.rank}, over max_lora_rank {self.max_rank}")
        if self.transformer is not None:
            wrap_targets(self.transformer, adapter)
        if adapter.name in self.slot_of:
            self.remove(adapter.name)
        free = sorted(set(range(1, self.slots + 1)) - set(self.slot_of.values()))
        if not free:
            self._grow(self.slots * 2)
            free = [len(self.slot_of) + 1]
        slot = free[0]
        for name, module in self.modules.items():
            module.load_slot(slot, adapter.pairs.get(name))
        self.adapters[adapter.name], self.slot_of[adapter.name] = adapter, slot
        self.rows = ()  # the next select() rebuilds its indices

    def remove(self, name: str) -> None:
        """Free the adapter's slot (its values stay until another adapter takes it; no row points there)."""
        self.adapters.pop(name, None)
        self.slot_of.pop(name, None)
        self.rows = ()

    def _grow(self, slots: int) -> None:
        for module in self.modules.values():
            module.grow(slots)
        self.slots = slots

    def register(self, module: LoraLinear) -> None:
        """A newly wrapped Linear: its slots, filled from the resident adapters that target it."""
        self.modules[module.module_name] = module
        for name, slot in self.slot_of.items():
            module.load_slot(slot, self.adapters[name].pairs.get(module.module_name))

    def select(self, rows: Sequence[Sequence[LoraChoice]]) -> None:
        """The adapters of each row of the next call (in the order of its batch)."""
        rows = tuple(tuple(r) for r in rows)
        for choices in rows:
            if len(choices) > self.max_per_row:
                raise LoraError(f"{len(choices)} LoRAs on one image, over max_loras_per_request {self.max_per_row}")
            for choice in choices:
                if choice.name not in self.adapters:
                    raise LoraError(f"LoRA {choice.name!r} is not loaded")
        if rows == self.rows and self.index is not None and self.index.shape[0] == len(rows):
            return
        self.rows = rows
        self.active = any(choice.scale != 0 for choices in rows for choice in choices)
        if not self.active:
            return
        self.shared = not self.fixed_shapes and len(set(rows)) == 1
        if self.fixed_shapes:
            positions, self.rank = self.max_per_row, self.max_rank
        else:
            positions = max(len(choices) for choices in rows)
            self.rank = max(self.adapters[c.name].rank for choices in rows for c in choices)
        index = torch.zeros(len(rows), positions, dtype=torch.long)
        scale = torch.zeros(len(rows), positions)
        for i, choices in enumerate(rows):
            for j, choice in enumerate(choices):
                index[i, j], scale[i, j] = self.slot_of[choice.name], choice.scale
        device = next(iter(self.modules.values())).lora_a.device
        self.index = index.to(device)
        self.scale = scale.repeat_interleave(self.rank, dim=1).to(device)


class LoraLinear(nn.Module):
    """A Linear plus the current rows' low-rank deltas (see LoraBank); the base weights are untouched."""

    def __init__(self, base: nn.Module, module: str, bank: LoraBank):
        super().__init__()
        self.base, self.module_name, self.bank = base, module, bank
        weight = base.weight
        dtype = bank.dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
        self.lora_a = torch.zeros(bank.slots + 1, bank.max_rank, base.in_features, device=weight.device, dtype=dtype)
        self.lora_b = torch.zeros(bank.slots + 1, base.out_features, bank.max_rank, device=weight.device, dtype=dtype)

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

    def load_slot(self, slot: int, pair: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if pair is not None:
            a, b = pair
            self.lora_a[slot, : a.shape[0]] = a.to(self.lora_a.dtype)
            self.lora_b[slot, :, : b.shape[1]] = b.to(self.lora_b.dtype)

    def grow(self, slots: int) -> None:
        a = self.lora_a.new_zeros(slots + 1, *self.lora_a.shape[1:])
        b = self.lora_b.new_zeros(slots + 1, *self.lora_b.shape[1:])
        a[: self.lora_a.shape[0]], b[: self.lora_b.shape[0]] = self.lora_a, self.lora_b
        self.lora_a, self.lora_b = a, b

    def _apply(self, fn, recurse=True):  # .to(device/dtype) moves the slots with the weights
        super()._apply(fn, recurse)
        self.lora_a, self.lora_b = fn(self.lora_a), fn(self.lora_b)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        bank = self.bank
        if not bank.active:
            return out
        rows, positions = bank.index.shape
        rank = bank.rank
        if bank.shared:  # every row the same adapters: one low-rank pair for the whole call, no gather
            a = self.lora_a[bank.index[0]][:, :rank].reshape(positions * rank, self.base.in_features)
            b = self.lora_b[bank.index[0]][..., :rank].permute(1, 0, 2).reshape(self.base.out_features, -1)
            low = (x @ a.transpose(0, 1)) * bank.scale[0].to(x.dtype)
            return out + low @ b.transpose(0, 1)
        a = self.lora_a[bank.index][:, :, :rank].reshape(rows, positions * rank, self.base.in_features)
        b = self.lora_b[bank.index][..., :rank].permute(0, 2, 1, 3).reshape(rows, self.base.out_features, -1)
        flat = x.reshape(rows, -1, x.shape[-1])
        low = torch.bmm(flat, a.transpose(1, 2)) * bank.scale.to(flat.dtype)[:, None, :]
        delta = torch.bmm(low, b.transpose(1, 2))
        return out + delta.reshape(out.shape)


def attach_loras(
    transformer: nn.Module,
    max_per_row: int = MAX_LORAS_PER_ROW,
    max_rank: int = MAX_RANK,
    slots: int = 8,
    wrap_all: bool = False,
) -> LoraBank:
    """The transformer's bank (made once) with `slots` adapters resident at most before it grows. Without
    `wrap_all`, no Linear is wrapped until an adapter that targets it is added (`wrap_targets`), so a
    transformer whose requests use no LoRA runs exactly as before; with it (for torch.compile, before
    compiling) every Linear of the transformer's blocks is wrapped now and calls use fixed shapes, so no later
    adapter or mix changes the module tree or a shape."""
    existing = getattr(transformer, "fluxray_loras", None)
    if existing is not None:
        return existing
    dtype = getattr(transformer, "dtype", None)
    bank = LoraBank(max_per_row, max_rank, slots, transformer=transformer, fixed_shapes=wrap_all, dtype=dtype)
    transformer.fluxray_loras = bank
    if wrap_all:
        for name, module in list(transformer.named_modules()):
            if linear_like(module) and name.startswith(BLOCK_PREFIXES):
                _wrap(transformer, name, module, bank)
    return bank


def _wrap(transformer: nn.Module, path: str, target: nn.Module, bank: LoraBank) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = transformer.get_submodule(parent_path) if parent_path else transformer
    wrapped = LoraLinear(target, path, bank)
    setattr(parent, child, wrapped)
    bank.register(wrapped)


def wrap_targets(transformer: nn.Module, adapter: LoraAdapter) -> None:
    """Wrap the Linears the adapter targets (once each) around the transformer's bank."""
    bank = transformer.fluxray_loras
    modules = dict(transformer.named_modules())
    for path in adapter.pairs:
        target = modules[path]
        if not isinstance(target, LoraLinear):
            _wrap(transformer, path, target, bank)


class LoraRegistry:
    """The adapters a server may load, by name: each `*.safetensors` directly in `root` (named by its stem; a
    directory, an s3:// prefix, or `tiny` for the embedded tiny model's) and the `files` given by name (paths
    or s3:// URIs). Requests name adapters; they never point at files or URLs. A file on S3 is fetched into a
    local cache when first needed (`path`)."""

    def __init__(
        self, root: str | Path | None = None, files: dict[str, str] | None = None, endpoint_url: str | None = None
    ):
        self.files: dict[str, str] = {}
        self.endpoint_url = endpoint_url  # of the S3 API (else AWS_ENDPOINT_URL, else AWS's)
        if root and str(root).startswith("s3://"):
            try:
                folder = S3Folder(str(root), endpoint_url=endpoint_url)
                self.files.update({Path(n).stem: folder.uri + n for n in folder.names(".safetensors")})
            except S3FileError as error:
                raise LoraError(f"lora_root {error}") from None
        elif root:
            # An embedded model's name is its adapters (`tiny`: fluxray/tiny_loras/); `./tiny` is a directory.
            folder = EMBEDDED_LORA_ROOTS.get(str(root), Path(root))
            if not folder.is_dir():
                raise LoraError(f"lora_root {root}: no such directory")
            self.files.update({p.stem: str(p) for p in sorted(folder.glob("*.safetensors"))})
        for name, path in (files or {}).items():
            self.files[name] = str(path)

    def names(self) -> list[str]:
        return sorted(self.files)

    def __bool__(self) -> bool:
        return bool(self.files)

    def path(self, name: str) -> Path:
        """The adapter's local file (fetched from S3 first if it lives there: call it off the event loop)."""
        try:
            where = self.files[name]
        except KeyError:
            raise LoraError(f"unknown LoRA {name!r}") from None
        if not where.startswith("s3://"):
            return Path(where)
        folder, _, file = where.rpartition("/")
        try:
            return S3Folder(folder, endpoint_url=self.endpoint_url).fetch(file, MAX_FILE_BYTES)
        except S3FileError as error:
            raise LoraError(str(error)) from None
