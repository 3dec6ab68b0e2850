"""The speed switches applied, each in one place, to the loaded transformer, VAE and text encoders:
fused QKV, quantization, the attention kernel, regional torch.compile and its warm-up, the VAE's layout
and tiling."""

from __future__ import annotations

import torch

from fluxray.lora import LoraSlots, attach_loras
from fluxray.sampling import image_ids, text_ids
from fluxray.speed.flash_attention import use_fa3
from fluxray.speed.options import VAE_TILE_ABOVE, WARMUP_BATCHES, ResolvedSpeed
from fluxray.speed.quantization import Float8Linear, Int8WeightOnlyLinear, is_modulation, nf4_linear, replace_linears


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
