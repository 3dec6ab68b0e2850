"""The speed switches on the tiny model: each changes what it should (and the image only as much as
it may), compiled blocks never recompile across warmed sizes, and a switch that cannot work here
fails with one line naming it. GPU-only checks (fp8 end to end, CUDA graphs) carry the gpu marker."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from image_checks import max_pixel_diff
from pydantic import ValidationError

from fluxray.images import psnr
from fluxray.models.sources import load_transformer_module, resolve_model
from fluxray.params import GenerationParams
from fluxray.pipeline import Pipeline
from fluxray.sampling import initial_noise
from fluxray.speed import SpeedOptionError, SpeedOptions, accelerate_transformer, resolve
from fluxray.speed.quantization import Float8Linear, Int8WeightOnlyLinear
from fluxray.transformer import staging_device
from fluxray.vae import VAEDecoder

PROMPT = "a red triangle at the top, green background"  # a scene of the tiny model's world
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def images(pipeline: Pipeline, width: int, height: int, n: int = 1, steps: int = 3) -> np.ndarray:
    params = GenerationParams(prompt=PROMPT, width=width, height=height, num_inference_steps=steps, seed=7, n=n)
    return np.stack([im.pixels for im in pipeline.generate(params)])


def block_linears(transformer) -> list[torch.nn.Module]:
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    return [
        m for b in blocks for m in b.modules() if isinstance(m, (torch.nn.Linear, Float8Linear, Int8WeightOnlyLinear))
    ]


# --- compile, fused QKV, channels-last -----------------------------------------------------------


@pytest.fixture(scope="module")
def compiled():
    # Every lossless switch on, as `auto` turns them on with a GPU; warmed at one size only.
    speed = SpeedOptions(compile="on", fuse_qkv="on", channels_last_vae="on", warmup_sizes=["64x64"])
    return Pipeline.load("tiny", device="cpu", speed=speed)


def test_lossless_switches_are_applied(compiled):
    attn = compiled.transformer.transformer_blocks[0].attn
    assert attn.fused_projections and hasattr(attn, "to_qkv") and not hasattr(attn, "to_q")
    for block in [*compiled.transformer.transformer_blocks, *compiled.transformer.single_transformer_blocks]:
        assert block._compiled_call_impl is not None
    conv = compiled.decoder.vae.decoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_compiled_images_equal_eager_and_sizes_never_recompile(compiled, tiny_pipeline):
    # Warm-up compiled 64x64 at batch 1 and 2; with symbolic shapes every other size and batch
    # reuses those graphs, so the stance that fails on any recompilation must never fire.
    with torch.compiler.set_stance("fail_on_recompile"):
        for width, height, n in ((64, 64, 1), (96, 64, 2), (128, 128, 1), (64, 256, 3)):
            fast = images(compiled, width, height, n)
            assert max_pixel_diff(fast, images(tiny_pipeline, width, height, n)) <= 2, (width, height, n)


def test_a_recompiling_call_would_be_caught(compiled):
    # The guard above is real: a dtype never warmed up forces a new graph, and the stance refuses it.
    block = compiled.transformer.single_transformer_blocks[0]
    x = torch.randn(1, 8, 32, dtype=torch.float64)
    with torch.compiler.set_stance("fail_on_recompile"), pytest.raises(RuntimeError, match="recompile"):
        block(x, x, torch.randn(1, 32, dtype=torch.float64), None)


# --- quantization -------------------------------------------------------------------------------


def test_int8_weight_only_is_within_tolerance(tiny_pipeline):
    pipeline = Pipeline.load("tiny", device="cpu", speed=SpeedOptions(quantize="int8"))
    quantized = block_linears(pipeline.transformer)
    assert quantized and all(isinstance(m, Int8WeightOnlyLinear) for m in quantized)
    assert all(m.weight.dtype == torch.int8 for m in quantized)
    assert pipeline.dtype == torch.float32  # activations stay in the model's dtype

    # Per-row symmetric int8 rounds each weight by at most max|row|/254, which puts a GEMM's output
    # about 0.4% off (measured on a random layer). The trained tiny model amplifies such changes
    # where its sampler is unsure (a shape's edge moves), so the bound is on PSNR, not on the worst
    # pixel: measured 59.3 dB at 64x64 and 50.0 dB at 128x96 (worst pixel 19) through 8 steps (on a
    # prompt outside its world, where it is unsure everywhere, as low as 26 dB at 4 steps).
    for width, height in ((64, 64), (128, 96)):
        ours, reference = images(pipeline, width, height, steps=8), images(tiny_pipeline, width, height, steps=8)
        assert psnr(ours, reference) > 30
    assert not np.array_equal(ours, reference), "int8 changed nothing: the quantized layers did not run"


def test_quantized_weights_reach_the_gpu_block_by_block():
    # A quantized model for a GPU loads on the CPU and is quantized on its way (NF4 exists for cards
    # that cannot hold the bf16 model; measured on an H200: NF4's load peak is 34% of the bf16
    # model's memory, benchmarks/results/load-memory-nvidia-h200.json). Random weights are built on
    # the device (benchmarks only), full precision is loaded where it runs.
    diffusers_source, random_source = resolve_model("tiny"), resolve_model("random:tiny")
    int8, none = resolve(SpeedOptions(quantize="int8"), "cpu"), resolve(SpeedOptions(), "cpu")
    cuda = torch.device("cuda")
    assert staging_device(diffusers_source, int8, cuda) == torch.device("cpu")
    assert staging_device(random_source, int8, cuda) == cuda
    assert staging_device(diffusers_source, none, cuda) == cuda
    assert staging_device(diffusers_source, int8, torch.device("cpu")) == torch.device("cpu")
    # The move itself, to a device with no GPU here: "meta" (shapes only). Every block Linear is
    # quantized and every tensor, quantized or kept, ends on the device.
    model = load_transformer_module(diffusers_source, "cpu", torch.float32)
    accelerate_transformer(model, int8, diffusers_source.spec.max_sequence_length, device="meta")
    layers = block_linears(model)
    assert layers and all(isinstance(m, Int8WeightOnlyLinear) and m.weight.is_meta for m in layers)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_fp8_blocks_on_the_cpu_kernel_stay_close(tiny_pipeline):
    # Users get fp8 on GPUs only (where it is fast); torch's CPU _scaled_mm computes the same
    # rowwise-scaled product, so the whole fp8 path (fuse, then quantize all but the modulation
    # Linears) is checked here short of the GPU kernel. Measured on the trained tiny model: PSNR
    # 35.8 dB at this size and prompt (36.8 dB over the held-out prompts at 256x256 in
    # benchmarks/quality.py, where fp8 reads every attribute as fp32 does); a wrong scale or layout
    # would leave little of the picture (well under 20 dB).
    pipeline = Pipeline.load("tiny", device="cpu")
    speed = dataclasses.replace(resolve(SpeedOptions(fuse_qkv="on"), "cpu"), quantize="fp8")
    accelerate_transformer(pipeline.transformer, speed, pipeline.source.spec.max_sequence_length)
    layers = block_linears(pipeline.transformer)
    kept = [m for m in layers if type(m) is torch.nn.Linear]
    assert len(kept) == 2 * 2 + 2  # norm1 + norm1_context per double block, norm per single block
    assert sum(isinstance(m, Float8Linear) for m in layers) == len(layers) - len(kept)
    ours, reference = images(pipeline, 128, 96, steps=8), images(tiny_pipeline, 128, 96, steps=8)
    assert 25 < psnr(ours, reference) < 80  # close, and not identical: fp8 really ran


@pytest.mark.parametrize("layer_cls, low, high", [(Int8WeightOnlyLinear, 1e-4, 0.01), (Float8Linear, 0.005, 0.06)])
def test_quantized_linear_error_matches_its_format(layer_cls, low, high):
    # fp8 e4m3 keeps 3 mantissa bits: each rounding is off by up to 1/16, ~3.5% over a dot product
    # of random values. int8 keeps 1/254 of the row's range: ~0.4%. Zero error would mean no rounding.
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 64).requires_grad_(False)
    x = torch.randn(2, 9, 96)
    reference = linear(x)
    out = layer_cls(linear)(x)
    assert out.shape == reference.shape
    error = float((out - reference).norm() / reference.norm())
    assert low < error < high, error


def test_fp8_linear_compiles_whole_with_dynamic_shapes():
    # On a GPU fp8 only pays once the activation quantization fuses under torch.compile, so the
    # layer must trace as one graph and serve new shapes without recompiling.
    torch.manual_seed(0)
    layer = Float8Linear(torch.nn.Linear(32, 48))
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    with torch.inference_mode():
        a = torch.randn(2, 5, 32)
        torch.testing.assert_close(compiled(a), layer(a))
        with torch.compiler.set_stance("fail_on_recompile"):
            b = torch.randn(3, 11, 32)
            torch.testing.assert_close(compiled(b), layer(b))


# --- attention, VAE tiling, T5 placement ----------------------------------------------------------


def test_attention_backend_reaches_every_block(tiny_pipeline):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    default = _AttentionBackendRegistry.get_active_backend()[0]
    pipeline = Pipeline.load("tiny", device="cpu", speed=SpeedOptions(attention="math"))
    backends = {m.processor._attention_backend for m in pipeline.transformer.modules() if hasattr(m, "processor")}
    assert {str(b.value) for b in backends} == {"_native_math"}
    # Only this model's: every other model in the process keeps the default kernel.
    assert _AttentionBackendRegistry.get_active_backend()[0] == default
    assert max_pixel_diff(images(pipeline, 64, 64), images(tiny_pipeline, 64, 64)) <= 1


def test_vae_tiling_is_diffusers_tiling_above_its_threshold():
    source = resolve_model("tiny")
    plain = VAEDecoder.load(source)
    tiled = VAEDecoder.load(source, speed=SpeedOptions(vae_tiling="on"))
    assert plain.tile_above == 2048 and tiled.tile_above == 64  # the tiny VAE's own tile
    assert VAEDecoder.load(source, speed=SpeedOptions(vae_tiling="off")).tile_above is None

    # Up to one tile, nothing changes; above it the pixels are exactly diffusers' enable_tiling()'s.
    small = initial_noise(3, 64, 64)
    assert max_pixel_diff(tiled.decode(small, 64, 64).numpy(), plain.decode(small, 64, 64).numpy()) == 0
    latents = initial_noise(3, 128, 128)
    ours = tiled.decode(latents, 128, 128).numpy()
    reference_vae = VAEDecoder.load(source)
    reference_vae.vae.enable_tiling()
    reference = reference_vae.decode(latents, 128, 128).numpy()  # vae.decode() tiles by itself now
    assert max_pixel_diff(ours, reference) == 0
    assert max_pixel_diff(ours, plain.decode(latents, 128, 128).numpy()) > 0


def test_t5_placement_is_resolved_per_stage():
    assert resolve(SpeedOptions(t5_device="cpu"), "cpu").t5_device == "cpu"
    assert resolve(SpeedOptions(), "cpu").t5_device is None
    # The transformer's switches are not the text encoder's: a CPU text stage beside an fp8 denoiser.
    assert resolve(SpeedOptions(quantize="fp8"), "cpu", "text").quantize == "fp8"


def test_auto_is_off_on_the_cpu():
    speed = resolve(SpeedOptions(), "cpu")
    assert not (speed.compile or speed.fuse_qkv or speed.channels_last_vae or speed.cuda_graphs)
    assert speed.attention is None and speed.quantize == "none" and speed.warmup_sizes == ()


# --- what cannot work fails, naming the option -----------------------------------------------------


def test_fp8_fast_accumulation_is_on_with_fp8_and_reaches_every_layer(tiny_pipeline):
    from fluxray.speed.apply import _quantize

    assert not resolve(SpeedOptions(quantize="int8"), "cpu").fp8_fast_accum
    transformer = load_transformer_module(resolve_model("tiny"), torch.device("cpu"), torch.bfloat16)
    count = _quantize(transformer, "fp8", torch.device("cpu"), fast_accum=True)
    layers = [m for m in transformer.modules() if isinstance(m, Float8Linear)]
    assert count == len(layers) > 0 and all(m.fast_accum for m in layers)
    assert "fast accumulation" in repr(layers[0])


@pytest.mark.parametrize(
    "options, named",
    [
        ({"quantize": "fp8"}, "quantize=fp8"),
        ({"quantize": "nf4"}, "quantize=nf4"),
        ({"cuda_graphs": "on"}, "cuda_graphs=on"),
        ({"attention": "cudnn"}, "attention=cudnn"),
        ({"attention": "flash3"}, "attention=flash3"),
        ({"attention": "flash3-fp8"}, "attention=flash3-fp8"),
        ({"fp8_fast_accum": "on"}, "fp8_fast_accum=on needs quantize=fp8"),
        ({"t5_device": "gpu"}, "t5_device="),
        ({"t5_device": "cuda:7"}, "t5_device=cuda:7"),
    ],
)
def test_unsupported_switch_fails_at_load_in_one_line(options, named):
    if torch.cuda.is_available():
        pytest.skip("these combinations are the CPU's")
    with pytest.raises(SpeedOptionError) as error:
        Pipeline.load("tiny", device="cpu", speed=SpeedOptions(**options))
    message = str(error.value)
    assert named in message and "\n" not in message


def test_invalid_values_are_refused_by_the_model():
    with pytest.raises(ValidationError, match="quantize"):
        SpeedOptions(quantize="fp4")
    with pytest.raises(ValidationError, match="warmup size '1000x7'"):
        SpeedOptions(warmup_sizes="1024x1024,1000x7")
    with pytest.raises(ValidationError, match="extra"):
        SpeedOptions(compile_everything=True)
    assert SpeedOptions(warmup_sizes="1024x1024, 768x1344").warmup_sizes == ["1024x1024", "768x1344"]


# --- every entry point reaches the loaders ----------------------------------------------------------


def test_cli_flags_reach_the_pipeline(tmp_path, capsys):
    from fluxray.cli import main

    common = ["generate", "--prompt", PROMPT, "--seed", "7", "--width", "64", "--height", "64", "--steps", "4"]
    common += ["--device", "cpu", "--no-progress"]
    assert main([*common, "--output", str(tmp_path / "plain.png")]) == 0
    assert main([*common, "--output", str(tmp_path / "int8.png"), "--quantize", "int8", "--t5-device", "cpu"]) == 0
    from PIL import Image

    plain, int8 = (np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("plain", "int8"))
    # int8 ran (the image moved), and stayed close (PSNR, as above: measured 59.9 dB, worst pixel 1)
    assert 30 < psnr(plain, int8) < float("inf")

    capsys.readouterr()
    assert main([*common, "--output", str(tmp_path / "x.png"), "--quantize", "fp8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fluxray: error: quantize=fp8 needs a CUDA GPU") and "\n" not in err
    assert main([*common, "--output", str(tmp_path / "x.png"), "--warmup-sizes", "64x65"]) == 2
    assert "--warmup-sizes: warmup size '64x65'" in capsys.readouterr().err


def test_serve_config_takes_the_switches():
    from deployments.config import AppConfig

    config = AppConfig.model_validate({"speed": {"quantize": "int8", "compile": "off", "warmup_sizes": "512x512"}})
    assert config.speed == SpeedOptions(quantize="int8", compile="off", warmup_sizes=["512x512"])
    assert AppConfig().speed == SpeedOptions()
    with pytest.raises(ValidationError, match=r"speed\.quantize"):
        AppConfig.model_validate({"speed": {"quantize": "int4"}})
    with pytest.raises(ValidationError, match=r"speed\.turbo"):
        AppConfig.model_validate({"speed": {"turbo": True}})


def test_job_options_reach_the_stages():
    from jobs.config import UsageError
    from jobs.config import load_config as parse_args
    from jobs.stages import DecodeStage, DenoiseStage

    base = ["--input", "in.jsonl", "--output", "out/"]
    args = parse_args([*base, "--quantize", "int8", "--vae-tiling", "on", "--compile", "off"])
    assert args.speed == SpeedOptions(quantize="int8", vae_tiling="on", compile="off")
    denoise = DenoiseStage("tiny", "cpu", None, None, "png", speed=args.speed)
    assert all(isinstance(m, Int8WeightOnlyLinear) for m in block_linears(denoise.transformer))
    assert DecodeStage("tiny", "cpu", None, None, "png", speed=args.speed).decoder.tile_above == 64

    # Stages without GPUs run on the CPU, so the driver refuses fp8 before starting anything ...
    with pytest.raises(UsageError, match="quantize=fp8 needs a CUDA GPU"):
        parse_args([*base, "--quantize", "fp8"])
    # ... but cannot judge a GPU stage from the driver: that one is checked where it loads.
    assert parse_args([*base, "--quantize", "fp8", "--denoise-gpus", "1"]).speed.quantize == "fp8"


# --- on a GPU -------------------------------------------------------------------------------------


@pytest.mark.gpu
@gpu
def test_gpu_auto_turns_lossless_switches_on():
    speed = resolve(SpeedOptions(), "cuda")
    assert speed.compile and speed.fuse_qkv and speed.channels_last_vae and not speed.cuda_graphs


@pytest.mark.gpu
@gpu
def test_gpu_fp8_and_compiled_bf16_images():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    eager = Pipeline.load("tiny", device="cuda", speed=SpeedOptions(compile="off", fuse_qkv="off"))
    fast = Pipeline.load("tiny", device="cuda", speed=SpeedOptions(warmup_sizes=["64x64"]))
    fp8 = Pipeline.load("tiny", device="cuda", speed=SpeedOptions(quantize="fp8", warmup_sizes=["64x64"]))
    layers = block_linears(fp8.transformer)
    kept = [m for m in layers if type(m) is torch.nn.Linear]  # the modulation GEMVs stay in bf16
    assert len(kept) == 2 * 2 + 2 and sum(isinstance(m, Float8Linear) for m in layers) == len(layers) - len(kept)
    # Bounds not yet measured on a GPU (none was at hand when this was written): bf16 compiled
    # kernels round differently from eager ones, and fp8 measured ~53 dB through the CPU kernel.
    with torch.compiler.set_stance("fail_on_recompile"):
        for width, height in ((64, 64), (128, 96)):
            reference = images(eager, width, height)
            assert psnr(images(fast, width, height), reference) > 35  # lossless switches: rounding only
            # fp8 must move the image (a quantizer that does nothing would leave it identical) but little.
            assert 30 < psnr(images(fp8, width, height), reference) < float("inf")
