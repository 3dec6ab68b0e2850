"""The speed switches as options: one pydantic model (`SpeedOptions`), what each resolves to where a stage
runs (`resolve`, `ResolvedSpeed`), and the checks that fail before any weight is loaded."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fluxray.params import MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE, parse_size
from fluxray.speed.flash_attention import INTERFACES, fa3_interface_name
from fluxray.speed.quantization import fp8_matmul_works

Switch = Literal["auto", "on", "off"]
Quantize = Literal["none", "fp8", "int8", "nf4"]
Attention = Literal["auto", "sdpa", "cudnn", "flash", "efficient", "math", "flash-attn", "flash3", "flash3-fp8", "sage"]

# Our names -> diffusers' attention dispatcher backends. The dispatcher's *_hub backends are left
# out on purpose: they download kernels at run time, which fluxray never does.
ATTENTION_BACKENDS = {
    "sdpa": "native",  # torch's scaled_dot_product_attention, which picks a kernel itself
    "cudnn": "_native_cudnn",
    "flash": "_native_flash",  # torch's built-in FlashAttention-2
    "efficient": "_native_efficient",
    "math": "_native_math",
    "flash-attn": "flash",  # the flash-attn package
    # FlashAttention-3 (Hopper), bf16 or with fp8 q/k/v: fluxray's own processor (fluxray.speed.flash_attention),
    # from the flash_attn_interface package or the fa3-fwd wheel.
    "flash3": "fluxray:fa3",
    "flash3-fp8": "fluxray:fa3-fp8",
    "sage": "sage",  # SageAttention (int8 QK), the sageattention package
}
_ATTENTION_PACKAGES = {"flash-attn": "flash_attn", "sage": "sageattention"}
_FA3 = ("flash3", "flash3-fp8")
_CPU_ATTENTION = ("auto", "sdpa", "math")

VAE_TILE_ABOVE = 2048  # vae_tiling=auto tiles images with a side above this many pixels
WARMUP_BATCHES = (1, 2)  # dynamic shapes still specialise batch 1, so both get compiled at warm-up


class SpeedOptionError(ValueError):
    """A speed switch that cannot work here; the one-line message names the option."""


class SpeedOptions(BaseModel):
    """Engine speed switches, shared by the CLI, the serve config (`speed:`) and the offline job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    compile: Switch = Field(
        default="auto", description="torch.compile of the transformer's repeated blocks (auto: on with a GPU)."
    )
    compile_dynamic: bool = Field(
        default=True,
        description="Compile with symbolic shapes: one graph serves every resolution and batch size "
        "(off: one graph per shape, each compiled on first use).",
    )
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = Field(
        default="default", description="torch.compile mode; max-autotune compiles for minutes."
    )
    cuda_graphs: Switch = Field(
        default="auto",
        description="Replay each compiled block as a CUDA graph (auto: off; pays only where launches, "
        "not GEMMs, bound a step: small images).",
    )
    attention: Attention = Field(
        default="auto", description="Attention kernel through diffusers' dispatcher (auto: torch SDPA's choice)."
    )
    fuse_qkv: Switch = Field(default="auto", description="One GEMM for Q, K and V (auto: on with a GPU).")
    channels_last_vae: Switch = Field(
        default="auto", description="channels-last VAE convolutions (auto: on with a GPU)."
    )
    quantize: Quantize = Field(
        default="none",
        description="Transformer block weights: fp8 (dynamic activation + weight scaling, GPU 8.9+), "
        "int8 (weight-only, any device), nf4 (bitsandbytes, GPU).",
    )
    fp8_fast_accum: Switch = Field(
        default="auto",
        description="fp8 GEMMs accumulate without fp32 promotion (auto: on with quantize=fp8; on one H200 "
        "3% faster at 1024x1024, 47.9 dB against bf16 where bf16's own compiled-vs-eager floor is 48.2 dB).",
    )
    vae_tiling: Switch = Field(
        default="auto",
        description=f"Decode in overlapping tiles (auto: above {VAE_TILE_ABOVE} px; on: above the VAE's tile, "
        "1024 px for FLUX.1).",
    )
    t5_device: str = Field(
        default="auto", description="Where T5 runs: auto (the text encoder's device), cpu, cuda, cuda:1, ..."
    )
    warmup_sizes: list[str] = Field(
        default_factory=list,
        description="Sizes ('WxH') compiled at load, so no request pays for compiling (with compile on).",
    )

    @field_validator("warmup_sizes", mode="before")
    @classmethod
    def _split_sizes(cls, value):
        return [s for s in value.replace(" ", "").split(",") if s] if isinstance(value, str) else value

    @field_validator("warmup_sizes")
    @classmethod
    def _check_sizes(cls, sizes: list[str]) -> list[str]:
        for size in sizes:
            try:
                sides = parse_size(size)
            except ValueError:
                sides = ()
            if not sides or any(s < MIN_SIDE or s > MAX_SIDE or s % SIDE_MULTIPLE for s in sides):
                raise ValueError(
                    f"warmup size {size!r} must be WIDTHxHEIGHT, multiples of {SIDE_MULTIPLE} in {MIN_SIDE}-{MAX_SIDE}"
                )
        return sizes


@dataclass(frozen=True)
class ResolvedSpeed:
    """SpeedOptions decided for one device: every `auto` settled, every combination checked."""

    compile: bool
    compile_dynamic: bool
    compile_mode: str | None  # torch.compile's mode argument
    cuda_graphs: bool
    attention: str | None  # diffusers backend name; None leaves the model's default
    fuse_qkv: bool
    channels_last_vae: bool
    quantize: str
    fp8_fast_accum: bool
    vae_tiling: str  # auto, on or off: see tile_threshold
    t5_device: str | None  # None: the text encoder's device
    warmup_sizes: tuple[tuple[int, int], ...]  # (width, height)

    def describe(self) -> dict:
        return asdict(self)


Stage = Literal["all", "text", "transformer", "vae"]


def _fail(message: str) -> None:
    raise SpeedOptionError(message)


def _check_transformer(options: SpeedOptions, device: torch.device) -> None:
    gpu = device.type == "cuda"
    if options.quantize == "fp8":
        if not gpu:
            _fail(f"quantize=fp8 needs a CUDA GPU with fp8 tensor cores (L4, L40S, H100, H200); this runs on {device}")
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            name = torch.cuda.get_device_name(device)
            _fail(f"quantize=fp8 needs compute capability 8.9 or newer; {name} is {major}.{minor} (try quantize=int8)")
        reason = fp8_matmul_works(device)
        if reason is not None:
            _fail(f"quantize=fp8: this GPU cannot run rowwise-scaled fp8 matmuls (torch {torch.__version__}): {reason}")
    if options.quantize == "nf4":
        if not gpu:
            _fail(
                f"quantize=nf4 needs a CUDA GPU (bitsandbytes 4-bit kernels); this runs on {device}; try quantize=int8"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            _fail("quantize=nf4 needs the bitsandbytes package (pip install bitsandbytes)")
    if options.fp8_fast_accum == "on" and options.quantize != "fp8":
        _fail(f"fp8_fast_accum=on needs quantize=fp8 (quantize is {options.quantize})")
    if options.cuda_graphs == "on":
        if not gpu:
            _fail(f"cuda_graphs=on needs a CUDA GPU; this runs on {device}")
        if options.compile == "off":
            _fail("cuda_graphs=on needs compile (torch.compile captures the graphs); drop compile=off")
    if options.attention != "auto":
        if not gpu and options.attention not in _CPU_ATTENTION:
            _fail(f"attention={options.attention} needs a CUDA GPU; on the CPU use attention=sdpa or math")
        package = _ATTENTION_PACKAGES.get(options.attention)
        if package and importlib.util.find_spec(package) is None:
            _fail(f"attention={options.attention} needs the {package} package, which is not installed")
        if options.attention in _FA3:
            if fa3_interface_name() is None:
                _fail(
                    f"attention={options.attention} needs FlashAttention-3: the fa3-fwd wheel "
                    f"(pip install fa3-fwd) or a flash-attention hopper build ({' or '.join(INTERFACES)})"
                )


def _t5_device(options: SpeedOptions) -> str | None:
    if options.t5_device == "auto":
        return None
    try:
        t5 = torch.device(options.t5_device)
    except RuntimeError:
        _fail(f"t5_device={options.t5_device!r} is not a device (cpu, cuda, cuda:1, ...)")
    if t5.type not in ("cpu", "cuda"):
        _fail(f"t5_device={options.t5_device}: only cpu and cuda devices are supported")
    if t5.type == "cuda" and not torch.cuda.is_available():
        _fail(f"t5_device={options.t5_device} but this process sees no CUDA GPU")
    if t5.type == "cuda" and (t5.index or 0) >= torch.cuda.device_count():
        _fail(f"t5_device={options.t5_device} but this process sees {torch.cuda.device_count()} GPU(s)")
    return str(t5)


def resolve(options: SpeedOptions | None, device: torch.device | str, stage: Stage = "all") -> ResolvedSpeed:
    """Settle every `auto` for this device; SpeedOptionError if a switch of this stage cannot work
    here (a CPU text encoder beside an fp8 denoiser is fine: fp8 is the transformer's switch)."""
    options = options or SpeedOptions()
    device = torch.device(device)
    gpu = device.type == "cuda"
    if stage in ("all", "transformer"):
        _check_transformer(options, device)
    t5_device = _t5_device(options) if stage in ("all", "text") else None

    def switch(name: str, auto: bool) -> bool:
        value = getattr(options, name)
        return auto if value == "auto" else value == "on"

    cuda_graphs = gpu and switch("cuda_graphs", False)
    # bitsandbytes' 4-bit GEMMs are opaque kernels: compiling around them gains little by default.
    compile_ = cuda_graphs or switch("compile", gpu and options.quantize != "nf4")
    mode = None if options.compile_mode == "default" else options.compile_mode
    if cuda_graphs:
        mode = "reduce-overhead" if mode is None else "max-autotune"
    sizes = tuple(parse_size(size) for size in options.warmup_sizes)
    return ResolvedSpeed(
        compile=compile_,
        compile_dynamic=options.compile_dynamic,
        compile_mode=mode,
        cuda_graphs=cuda_graphs,
        attention=None if options.attention == "auto" else ATTENTION_BACKENDS[options.attention],
        fuse_qkv=switch("fuse_qkv", gpu),
        channels_last_vae=switch("channels_last_vae", gpu),
        quantize=options.quantize,
        fp8_fast_accum=options.quantize == "fp8" and switch("fp8_fast_accum", True),
        vae_tiling=options.vae_tiling,
        t5_device=t5_device,
        warmup_sizes=sizes if compile_ else (),
    )
