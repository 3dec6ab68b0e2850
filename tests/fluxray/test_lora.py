"""LoRA per request in the engine: files read through diffusers' converters, the images equal to diffusers'
FluxPipeline with load_lora_weights + set_adapters on the same tiny weights, and rows with different
adapters sharing one transformer call give each row its own image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from image_checks import diffusers_image, max_pixel_diff

from fluxray.lora import LoraChoice, LoraError, attach_loras, read_lora
from fluxray.params import GenerationParams
from fluxray.pipeline import Pipeline
from scripts.make_tiny_loras import TARGETS, make_lora

PROMPT = "a red circle on the left, blue background"


@pytest.fixture(scope="module")
def loras(tiny_loras):
    return tiny_loras


@pytest.fixture(scope="module")
def lora_pipeline(loras):
    pipeline = Pipeline.load("tiny", device="cpu")
    bank = attach_loras(pipeline.transformer, max_per_row=2, max_rank=8)
    for name in ("style", "subject", "ink-kohya", "ink-xlabs"):
        bank.add(read_lora(loras / f"{name}.safetensors", pipeline.transformer))
    return pipeline


def peer_image(loras, adapters: dict[str, float], seed: int, **kwargs) -> np.ndarray:
    from diffusers import FluxPipeline

    from fluxray.models.sources import TINY_MODEL_DIR

    pipe = FluxPipeline.from_pretrained(TINY_MODEL_DIR, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for name in adapters:
        pipe.load_lora_weights(str(loras / f"{name}.safetensors"), adapter_name=name)
    pipe.set_adapters(list(adapters), adapter_weights=list(adapters.values()))
    return diffusers_image(pipe, PROMPT, seed, **kwargs)


KW = dict(width=64, height=64, num_inference_steps=4)


@pytest.mark.parametrize(
    "adapters",
    [
        {"style": 1.0},
        {"subject": 0.7},
        {"style": 0.6, "subject": 1.3},
        {"ink-kohya": 1.0},  # kohya sd-scripts keys, BFL's fused q/k/v, alpha tensors
        {"ink-xlabs": 0.8, "style": 0.5},  # XLabs keys beside a PEFT one
    ],
)
def test_loras_match_diffusers_set_adapters(loras, lora_pipeline, adapters):
    choices = [{"name": n, "scale": s} for n, s in adapters.items()]
    ours = lora_pipeline.generate(GenerationParams(prompt=PROMPT, seed=5, loras=choices, **KW))[0]
    theirs = peer_image(loras, adapters, 5, **KW)
    assert max_pixel_diff(ours.pixels, theirs) <= 2
    plain = lora_pipeline.generate(GenerationParams(prompt=PROMPT, seed=5, **KW))[0]
    assert max_pixel_diff(ours.pixels, plain.pixels) > 4  # the adapters did something
    assert ours.metadata()["loras"] == choices


def test_a_mixed_adapter_batch_equals_each_request_alone(lora_pipeline):
    requests = [
        GenerationParams(prompt=PROMPT, seed=1, loras=[{"name": "style", "scale": 1.0}], **KW),
        GenerationParams(prompt=PROMPT, seed=2, loras=[{"name": "subject", "scale": 0.5}], n=2, **KW),
        GenerationParams(prompt=PROMPT, seed=3, **KW),
        GenerationParams(
            prompt=PROMPT,
            seed=4,
            negative_prompt="blurry",
            true_cfg_scale=2.0,
            loras=[{"name": "style", "scale": 0.5}, {"name": "subject", "scale": 1.0}],
            **KW,
        ),
    ]
    together = lora_pipeline.generate(requests)  # one transformer call per step for all five images
    alone = [image for r in requests for image in lora_pipeline.generate(r)]
    assert len(together) == len(alone) == 5
    for a, b in zip(together, alone):
        assert max_pixel_diff(a.pixels, b.pixels) <= 1


def test_scale_zero_equals_no_lora(lora_pipeline):
    zero = lora_pipeline.generate(GenerationParams(prompt=PROMPT, seed=9, loras=[{"name": "style", "scale": 0}], **KW))
    none = lora_pipeline.generate(GenerationParams(prompt=PROMPT, seed=9, **KW))
    assert max_pixel_diff(zero[0].pixels, none[0].pixels) == 0


def test_unusable_files_are_refused_with_the_reason(tmp_path, lora_pipeline):
    transformer = lora_pipeline.transformer
    (tmp_path / "evil.pt").write_bytes(b"not even a pickle")
    with pytest.raises(Exception, match="pickle"):
        read_lora(tmp_path / "evil.pt", transformer)
    from safetensors.torch import save_file

    save_file({"transformer.no_such_block.lora_A.weight": torch.zeros(2, 3)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(LoraError, match="do not fit this model's transformer"):
        read_lora(tmp_path / "wrong.safetensors", transformer)
    save_file(
        {
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32),
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 2),
        },
        str(tmp_path / "te.safetensors"),
    )
    with pytest.raises(LoraError, match="text-encoder LoRA keys"):
        read_lora(tmp_path / "te.safetensors", transformer)
    big = {}
    make_lora(tmp_path / "big.safetensors", transformer, seed=3, rank=16, targets=TARGETS[:1])
    with pytest.raises(LoraError, match="rank 16"):
        read_lora(tmp_path / "big.safetensors", transformer, max_rank=8)
    assert big == {}


def test_requests_name_loaded_adapters_only(lora_pipeline):
    from pydantic import ValidationError

    with pytest.raises(LoraError, match="not loaded"):
        lora_pipeline.generate(GenerationParams(prompt=PROMPT, loras=[{"name": "nope", "scale": 1}], **KW))
    with pytest.raises(ValidationError, match="loras"):
        GenerationParams(prompt=PROMPT, loras=[{"name": f"a{i}", "scale": 1} for i in range(5)])
    with pytest.raises(ValidationError, match="scale"):
        GenerationParams(prompt=PROMPT, loras=[{"name": "style", "scale": float("nan")}])
    assert LoraChoice("style").scale == 1.0


def test_only_the_targeted_linears_are_wrapped_and_fused_qkv_is_refused(loras):
    from fluxray.lora import LoraLinear

    pipeline = Pipeline.load("tiny", device="cpu")
    bank = attach_loras(pipeline.transformer, max_per_row=2, max_rank=8)
    assert not any(isinstance(m, LoraLinear) for m in pipeline.transformer.modules())  # nothing until an adapter
    bank.add(read_lora(loras / "style.safetensors", pipeline.transformer))
    wrapped = sorted(m.module_name for m in pipeline.transformer.modules() if isinstance(m, LoraLinear))
    assert wrapped == sorted(TARGETS)
    fused = Pipeline.load("tiny", device="cpu")
    fused.transformer.fuse_qkv_projections()
    with pytest.raises(LoraError, match="fuse_qkv off"):
        read_lora(loras / "style.safetensors", fused.transformer)  # it targets to_q and to_v


def test_under_compile_new_adapters_and_new_mixes_never_recompile(loras, lora_pipeline):
    # The bank is attached before compiling: every block Linear wrapped, shapes fixed (max_per_row x max_rank,
    # all slots), and the warm-up ran both paths. Adapters loaded afterwards and mixes never seen before only
    # change values, so the stance that fails on any recompilation never fires.
    from fluxray.lora import LoraLinear, LoraSlots
    from fluxray.speed import SpeedOptions

    speed = SpeedOptions(compile="on", fuse_qkv="off", warmup_sizes=["64x64"])
    compiled = Pipeline.load("tiny", device="cpu", speed=speed, loras=LoraSlots(max_per_row=2, max_rank=8, resident=4))
    bank = compiled.transformer.fluxray_loras
    assert bank.fixed_shapes and not bank.adapters
    blocks = [*compiled.transformer.transformer_blocks, *compiled.transformer.single_transformer_blocks]
    plain = [m for b in blocks for m in b.modules() if type(m) is torch.nn.Linear]
    wrapped = [m for b in blocks for m in b.modules() if isinstance(m, LoraLinear)]
    assert len(wrapped) == len(plain) > 20  # each block Linear sits inside its wrapper

    def request(seed: int, adapters: dict[str, float], **kw) -> GenerationParams:
        return GenerationParams(
            prompt=PROMPT, seed=seed, loras=[{"name": n, "scale": s} for n, s in adapters.items()], **{**KW, **kw}
        )

    batches = [
        [request(1, {"style": 1.0}), request(2, {})],
        [request(3, {"subject": 0.7, "style": 0.6}), request(4, {"ink-kohya": 1.0}), request(5, {})],
        [request(6, {"ink-xlabs": 0.8}, width=96)],
    ]
    with torch.compiler.set_stance("fail_on_recompile"):
        for name in ("style", "subject", "ink-kohya", "ink-xlabs"):
            bank.add(read_lora(loras / f"{name}.safetensors", compiled.transformer))
        for batch in batches:
            for ours, eager in zip(compiled.generate(batch), lora_pipeline.generate(batch)):
                assert max_pixel_diff(ours.pixels, eager.pixels) <= 2


@pytest.mark.parametrize("quantize", ["int8", "fp8"])
def test_a_quantized_transformer_takes_loras_each_row_its_own_delta(quantize, loras, lora_pipeline):
    # The speed switches' quantized layers stand in for Linears: an adapter sits on them as on a Linear, its
    # delta computed in the activations' dtype, equal to the delta on the full-precision layer.
    import dataclasses

    from fluxray.lora import LoraLinear
    from fluxray.speed import SpeedOptions, accelerate_transformer, resolve

    quantized = Pipeline.load("tiny", device="cpu")
    # fp8 is refused on the CPU for users (a GPU switch); its block path runs on torch's CPU _scaled_mm.
    speed = dataclasses.replace(resolve(SpeedOptions(), "cpu"), quantize=quantize)
    accelerate_transformer(quantized.transformer, speed, quantized.source.spec.max_sequence_length)
    bank = attach_loras(quantized.transformer, max_per_row=2, max_rank=8)
    bank.add(read_lora(loras / "style.safetensors", quantized.transformer))
    name = "single_transformer_blocks.0.proj_mlp"
    ours, theirs = quantized.transformer.get_submodule(name), lora_pipeline.transformer.get_submodule(name)
    assert isinstance(ours, LoraLinear) and not isinstance(ours.base, torch.nn.Linear)
    x = torch.randn(2, 5, ours.in_features, generator=torch.Generator().manual_seed(0))
    rows = [[LoraChoice("style", 0.7)], []]
    bank.select(rows)
    lora_pipeline.transformer.fluxray_loras.select(rows)
    with torch.inference_mode():
        delta, want = ours(x) - ours.base(x), theirs(x) - theirs.base(x)
    torch.testing.assert_close(delta, want, rtol=1e-4, atol=1e-5)
    assert delta[0].abs().max() > 1e-3 and delta[1].abs().max() == 0  # the row without adapters: exactly none
    params = GenerationParams(prompt=PROMPT, seed=5, loras=[{"name": "style", "scale": 1.0}], **KW)
    plain = quantized.generate(params.model_copy(update={"loras": ()}))[0]
    assert max_pixel_diff(quantized.generate(params)[0].pixels, plain.pixels) > 4


def test_the_embedded_loras_are_what_the_script_makes_and_the_registry_names_them(tiny_loras):
    """fluxray/tiny/loras/ (what `lora_root: tiny` serves, make serve's config) holds the script's two
    adapters, tensor for tensor with their adapter metadata; a directory named like it is still a directory."""
    from safetensors import safe_open

    from fluxray.lora import LoraRegistry
    from fluxray.models.sources import EMBEDDED_LORA_ROOTS

    registry = LoraRegistry("tiny")
    assert registry.names() == ["style", "subject"]
    for name in registry.names():
        shipped, made = registry.path(name), tiny_loras / f"{name}.safetensors"
        assert shipped.parent == EMBEDDED_LORA_ROOTS["tiny"]
        with safe_open(str(shipped), "pt") as a, safe_open(str(made), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys()) and a.metadata() == b.metadata()
            for key in a.keys():
                assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    assert LoraRegistry(str(tiny_loras)).names() == ["ink-kohya", "ink-xlabs", "style", "subject"]
    with pytest.raises(LoraError, match="no such directory"):
        LoraRegistry("./tiny")
