"""fluxray.speed.flash_attention: the FA3 processor does diffusers' FluxAttnProcessor's steps, and its fp8
path quantises q/k/v per image and head. FA3 itself needs a Hopper GPU (benchmarks/gpu.py measures it
there); here the kernel is a reference with FA3's signature, so the processor's own code is checked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fluxray.models.sources import load_transformer_module, resolve_model
from fluxray.speed.flash_attention import FP8_MAX, FA3FluxProcessor, dequantize_heads, quantize_heads, use_fa3

CALLS = []


def reference_fa3(q, k, v, softmax_scale=None, q_descale=None, k_descale=None, v_descale=None):
    """flash_attn_func's contract on the CPU: (batch, tokens, heads, dim) in and out; fp8 inputs come
    with per-(batch, head) descales and the output is bf16/fp32."""
    CALLS.append(q.dtype)
    if q.dtype == torch.float8_e4m3fn:
        q, k, v = (dequantize_heads(t, s, torch.float32) for t, s in ((q, q_descale), (k, k_descale), (v, v_descale)))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale)
    return out.transpose(1, 2)


def transformer_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    img, txt = 16, 8
    return dict(
        hidden_states=torch.randn(2, img, c.in_channels, generator=g),
        timestep=torch.tensor([0.3, 0.9]),
        guidance=torch.tensor([3.5, 2.0]) if c.guidance_embeds else None,
        pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=g),
        encoder_hidden_states=torch.randn(2, txt, c.joint_attention_dim, generator=g),
        txt_ids=torch.zeros(txt, 3),
        img_ids=torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1
        ).reshape(-1, 3),
        return_dict=False,
    )


@pytest.fixture(scope="module")
def model():
    return load_transformer_module(resolve_model("tiny"), torch.device("cpu"), torch.float32).eval()


@torch.inference_mode()
def test_the_processor_computes_what_diffusers_does(model):
    inputs = transformer_inputs(model)
    expected = model(**inputs)[0]
    processors = model.attn_processors
    try:
        CALLS.clear()
        layers = use_fa3(model, kernel=reference_fa3)
        assert layers == model.config.num_layers + model.config.num_single_layers
        got = model(**inputs)[0]
        assert CALLS == [torch.float32] * layers  # every layer's attention went through the kernel
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # fp8 q/k/v: every layer hands the kernel fp8 tensors, and the image moves, but a little.
        CALLS.clear()
        use_fa3(model, fp8=True, kernel=reference_fa3)
        fp8 = model(**inputs)[0]
        assert CALLS == [torch.float8_e4m3fn] * layers
        error = ((fp8 - expected).norm() / expected.norm()).item()
        assert 1e-4 < error < 0.1, error
    finally:
        model.set_attn_processor(processors)


def test_head_scales_use_the_whole_fp8_range_without_saturating():
    t = torch.randn(2, 300, 4, 16) * torch.tensor([1.0, 10.0, 0.01, 1000.0])[None, None, :, None]
    values, descale = quantize_heads(t)
    assert values.dtype == torch.float8_e4m3fn and descale.shape == (2, 4)
    peak = values.float().abs().amax(dim=(1, 3))
    torch.testing.assert_close(peak, torch.full_like(peak, FP8_MAX))  # each head's max lands on 448
    back = dequantize_heads(values, descale, torch.float32)
    # e4m3 keeps 3 mantissa bits: a relative error of at most 1/16 per element above the subnormals.
    big = t.abs() > descale[:, None, :, None] * 2**-6
    assert ((back - t).abs()[big] <= t.abs()[big] / 16 + 1e-12).all()


def test_without_fa3_the_processor_says_which_package():
    import importlib.util

    if any(importlib.util.find_spec(m) for m in ("flash_attn_interface", "fa3_fwd_interface")):
        pytest.skip("an FA3 package is installed here")
    with pytest.raises(RuntimeError, match="fa3_fwd_interface"):
        FA3FluxProcessor()


@pytest.mark.gpu
def test_fa3_on_a_hopper_gpu_matches_sdpa():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs a Hopper GPU")
    import importlib.util

    if not any(importlib.util.find_spec(m) for m in ("flash_attn_interface", "fa3_fwd_interface")):
        pytest.skip("needs fa3-fwd or a flash-attention Hopper build")
    q, k, v = (torch.randn(1, 1024, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    for fp8, bound in ((False, 1e-2), (True, 0.1)):  # measured on one H200: 2.3e-3 and 5.3e-2
        out = FA3FluxProcessor(fp8=fp8).attend(q, k, v).float()
        assert ((out - ref).norm() / ref.norm()).item() < bound
