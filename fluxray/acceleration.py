"""Speed switches: one pydantic model (`SpeedOptions`) and the functions that apply it to the loaded
transformer, VAE and text encoders. Every switch is applied in one place and can be turned off.

Switches that do not change the image beyond float rounding (regional torch.compile, fused QKV,
channels-last VAE, the attention kernel) are `auto`: on with a CUDA GPU, off on the CPU, where
compiling costs more than it saves. Lossy ones (fp8, int8, NF4) are only ever on when asked for.
A switch that cannot work where the stage runs (fp8 on the CPU, NF4 without bitsandbytes, ...)
fails before any weight is loaded, with one line naming the option.

The same names serve every entry point: `fluxray generate --quantize fp8`, the serve config's
`speed: {quantize: fp8}` and `python -m jobs.generate --quantize fp8`.
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fluxray.flash_attention import INTERFACES, fa3_interface_name, use_fa3
from fluxray.lora import LoraSlots, attach_loras
from fluxray.params import MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE, parse_size
from fluxray.quantization import (
    Float8Linear,
    Int8WeightOnlyLinear,
    fp8_matmul_works,
    is_modulation,
    nf4_linear,
    replace_linears,
)
from fluxray.sampling import image_ids, text_ids

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
    # FlashAttention-3 (Hopper), bf16 or with fp8 q/k/v: fluxray's own processor (fluxray.flash_attention),
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


# --- applying them ------------------------------------------------------------------------


def _fuse_qkv(model) -> None:
    model.fuse_qkv_projections()
    # diffusers keeps the unfused projections beside the fused one; at FLUX.1 size they are
    # 4 GiB of bf16 that nothing reads once `fused_projections` is set, so they go.
    from diffusers.models.attention import AttentionModuleMixin

    for module in model.modules():
        if isinstance(module, AttentionModuleMixin) and module.fused_projections:
            for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
                if hasattr(module, name):
                    delattr(module, name)


def _quantize(model, mode: str, device: torch.device, fast_accum: bool = False) -> int:
    """Quantize the repeated blocks' Linears, moving each block to `device` just before its turn:
    a model that arrives on the CPU reaches the GPU already quantized, holding at most one block in
    full precision there (NF4 exists to fit FLUX.1-dev's 24 GB of bf16 on a 24 GB card)."""
    make = {
        "fp8": lambda linear: Float8Linear(linear, fast_accum=fast_accum),
        "int8": Int8WeightOnlyLinear,
        "nf4": lambda linear: nf4_linear(linear, device),
    }[mode]
    # int8 and nf4 are for memory, so they take every block Linear; fp8 is for speed, so it leaves
    # the modulation GEMVs (see is_modulation) in the model's dtype.
    keep = is_modulation if mode == "fp8" else (lambda _: False)
    count = 0
    for block in [m for m in model.modules() if type(m).__name__ in model._repeated_blocks]:
        count += replace_linears(block.to(device), make, keep)
    return count


def _compile(model, speed: ResolvedSpeed) -> None:
    if speed.compile_dynamic:
        # Duck sizing gives equal-sized dims one symbol, so a token count that happens to equal a
        # fixed width (a 64x64 tiny image's 16 tokens and its head_dim 16; 3072 image tokens and
        # FLUX's 3072 channels) would pin that resolution and recompile for the next one.
        import torch.fx.experimental._config as fx_config

        fx_config.use_duck_shape = False
    # Static shapes compile one graph per (resolution, batch), and the limit counts per code object, so
    # every compiled transformer in one process (a test session, the LoRA bank's two paths) adds to the
    # same blocks' count: the default of 8 would fall back to eager (or fail, with fullgraph) past it.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # Regional compilation: the 57 blocks share two graphs, so compiling takes seconds, not minutes.
    # bitsandbytes' layers break the graph, the rest traces whole.
    model.compile_repeated_blocks(
        fullgraph=speed.quantize != "nf4", dynamic=speed.compile_dynamic, mode=speed.compile_mode
    )
    if speed.cuda_graphs:
        # CUDA graph trees reuse their output buffers; marking each transformer call as a new
        # step tells them the previous step's outputs are no longer read.
        model.register_forward_pre_hook(lambda *_: torch.compiler.cudagraph_mark_step_begin())


@torch.inference_mode()
def warm_up(model, sizes, max_sequence_length: int, batches=WARMUP_BATCHES) -> None:
    """Run the transformer once per (size, batch) on random inputs shaped as denoise_step shapes
    them (same dtypes, inference mode), so compiling happens now and not on a request."""
    config = model.config
    device, dtype = model.device, model.dtype
    bank = getattr(model, "fluxray_loras", None)
    for width, height, batch, lora in (
        (w, h, b, lora) for w, h in sizes for b in batches for lora in ((False, True) if bank else (False,))
    ):
        img, txt = image_ids(height, width, device, dtype), text_ids(max_sequence_length, device, dtype)
        if lora:  # the adapter path too (fluxray.lora), with every row on the zero slot
            bank.dry(batch)
        try:
            model(
                hidden_states=torch.randn(batch, img.shape[0], config.in_channels, device=device, dtype=dtype),
                timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
                guidance=torch.full((batch,), 3.5, device=device) if config.guidance_embeds else None,
                pooled_projections=torch.randn(batch, config.pooled_projection_dim, device=device, dtype=dtype),
                encoder_hidden_states=torch.randn(
                    batch, max_sequence_length, config.joint_attention_dim, device=device, dtype=dtype
                ),
                txt_ids=txt,
                img_ids=img,
                return_dict=False,
            )
        finally:
            if lora:
                bank.select([])


def _set_attention_backend(model, backend: str) -> None:
    """The attention kernel of this model's layers only. diffusers' set_attention_backend also makes
    it the process-wide default, which every other model in the process then runs with (a diffusers
    peer in the same benchmark run, another pipeline in the same test session); that default is put
    back, and this model's layers keep their own backend."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    default = _AttentionBackendRegistry._active_backend
    try:
        model.set_attention_backend(backend)
    finally:
        _AttentionBackendRegistry.set_active_backend(default)


def accelerate_transformer(
    model, speed: ResolvedSpeed, max_sequence_length: int, device=None, loras: LoraSlots | None = None
):
    """Apply the transformer's switches in place, in the order they compose: fuse QKV (so the fused
    weight is what gets quantized), quantize, pick the attention kernel, compile, warm up.

    `device` (default: where the model is) is where it runs; a model loaded on the CPU for a GPU is
    quantized block by block on its way there (see _quantize), then moved whole."""
    device = torch.device(device) if device is not None else model.device
    if speed.fuse_qkv:
        _fuse_qkv(model)
    if speed.quantize != "none":
        _quantize(model, speed.quantize, device, fast_accum=speed.fp8_fast_accum)
    model.to(device)
    if speed.attention in ("fluxray:fa3", "fluxray:fa3-fp8"):
        use_fa3(model, fp8=speed.attention == "fluxray:fa3-fp8")
    elif speed.attention is not None:
        _set_attention_backend(model, speed.attention)
    if loras is not None:
        # Under compile every block Linear is wrapped before compiling, at fixed shapes (fluxray.lora).
        attach_loras(model, loras.max_per_row, loras.max_rank, loras.resident, wrap_all=speed.compile)
    if speed.compile:
        _compile(model, speed)
        if speed.warmup_sizes:
            warm_up(model, speed.warmup_sizes, max_sequence_length)
    return model


def tile_threshold(vae, speed: ResolvedSpeed) -> int | None:
    """The image side in pixels above which VAEDecoder decodes in tiles: 2048 for auto, the VAE's
    own tile (1024 for FLUX.1, as diffusers' enable_tiling) for on, None (never) for off."""
    tile = vae.tile_sample_min_size
    tile = min(tile) if isinstance(tile, (list, tuple)) else int(tile)
    return {"auto": max(VAE_TILE_ABOVE, tile), "on": tile, "off": None}[speed.vae_tiling]


def accelerate_vae(vae, speed: ResolvedSpeed):
    """Apply the VAE's switches in place (tiling is the decoder's: see tile_threshold)."""
    if speed.fuse_qkv:
        vae.fuse_qkv_projections()
    if speed.channels_last_vae:
        vae.to(memory_format=torch.channels_last)
    return vae


# --- command-line flags, shared by `fluxray generate` and `python -m jobs.generate` -----------

_FLAGS = {
    "compile": ("--compile", dict(choices=("auto", "on", "off"))),
    "compile_dynamic": ("--compile-dynamic", dict(choices=("on", "off"))),
    "compile_mode": ("--compile-mode", dict(choices=("default", "max-autotune-no-cudagraphs"))),
    "cuda_graphs": ("--cuda-graphs", dict(choices=("auto", "on", "off"))),
    "attention": ("--attention", dict(choices=tuple(["auto", *ATTENTION_BACKENDS]))),
    "fuse_qkv": ("--fuse-qkv", dict(choices=("auto", "on", "off"))),
    "channels_last_vae": ("--channels-last-vae", dict(choices=("auto", "on", "off"))),
    "quantize": ("--quantize", dict(choices=("none", "fp8", "int8", "nf4"))),
    "fp8_fast_accum": ("--fp8-fast-accum", dict(choices=("auto", "on", "off"))),
    "vae_tiling": ("--vae-tiling", dict(choices=("auto", "on", "off"))),
    "t5_device": ("--t5-device", dict(metavar="DEVICE")),
    "warmup_sizes": ("--warmup-sizes", dict(metavar="WxH,...")),
}


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """The speed switches as flags (each defaults to SpeedOptions' default)."""
    group = parser.add_argument_group("speed switches (see fluxray.acceleration)")
    for field, (flag, kwargs) in _FLAGS.items():
        info = SpeedOptions.model_fields[field]
        default = info.default if info.default_factory is None else info.default_factory()
        shown = {True: "on", False: "off"}.get(default, default) if isinstance(default, bool) else default
        help_text = f"{info.description} [{shown or 'none'}]"
        group.add_argument(flag, dest=f"speed_{field}", default=None, help=help_text, **kwargs)


def speed_options_from_args(args: argparse.Namespace) -> SpeedOptions:
    """SpeedOptions from parsed flags; SpeedOptionError naming the flag if a value is invalid."""
    values = {f: getattr(args, f"speed_{f}") for f in _FLAGS if getattr(args, f"speed_{f}", None) is not None}
    if "compile_dynamic" in values:
        values["compile_dynamic"] = values["compile_dynamic"] == "on"
    try:
        return SpeedOptions(**values)
    except ValidationError as e:
        error = e.errors()[0]
        flag = _FLAGS[str(error["loc"][0])][0]
        raise SpeedOptionError(f"{flag}: {error['msg'].removeprefix('Value error, ')}") from None
