"""FlashAttention-3 for FLUX.1's attention layers, in bf16 or with fp8 q/k/v (Hopper).

diffusers' dispatcher reaches FA3 only through the `flash_attn_interface` package (built from
source) and has no fp8 path. Here a FluxAttention layer gets `FA3FluxProcessor`: the steps of diffusers'
`FluxAttnProcessor` (0.42.1, the pinned release) with the attention call itself made by FA3, from
either `flash_attn_interface` or the `fa3-fwd` wheel on PyPI (`fa3_fwd_interface`, the same
function, forward only). Both work under torch.compile (their forward is a custom op with a fake
implementation), so the QK-norm, RoPE and, in fp8, the q/k/v quantisation before it fuse into
the kernels inductor makes around the attention.

fp8 attention quantises q, k and v to float8_e4m3 with one scale per (image, head): the scale is
the head's absolute maximum over its tokens and channels over 448, so nothing saturates, and FA3
takes the inverse scales (`*_descale`) and returns the model's dtype. It is lossy: benchmarks/gpu.py
measures it against bf16 by PSNR before anyone turns it on.

diffusers' Flux module is imported when a processor is made, not with this module: the speed switches
(fluxray.speed) import this one, and the CLI, the ingress and the job's driver import those
without ever building a transformer (importing it costs ~3 s).
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
INTERFACES = ("flash_attn_interface", "fa3_fwd_interface")  # upstream's build, then the fa3-fwd wheel


def fa3_interface_name() -> str | None:
    """The installed FA3 interface module's name, or None."""
    return next((name for name in INTERFACES if importlib.util.find_spec(name) is not None), None)


def quantize_heads(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, tokens, heads, dim) -> (fp8 values, float32 descale of shape (batch, heads)) with
    values * descale ~= t, one scale per image and head."""
    amax = t.abs().amax(dim=(1, 3)).float().clamp(min=1e-12)  # (batch, heads)
    descale = amax / FP8_MAX
    values = (t.float() / descale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return values, descale


def dequantize_heads(values: torch.Tensor, descale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (values.float() * descale[:, None, :, None]).to(dtype)


class FA3FluxProcessor:
    """diffusers' FluxAttnProcessor with its attention made by FlashAttention-3, bf16 or fp8 q/k/v (see
    the module).

    `kernel` is the FA3 `flash_attn_func`; tests pass another function with its signature (q, k, v
    as (batch, tokens, heads, dim), softmax_scale, *_descale) to check the processor's own steps
    on machines without FA3. An attention mask (which FLUX.1 never passes) goes to diffusers'
    dispatcher instead."""

    _attention_backend = None  # what diffusers sets on every processor (set_attention_backend)
    _parallel_config = None

    def __init__(self, fp8: bool = False, kernel=None):
        from diffusers.models.transformers import transformer_flux

        self.flux = transformer_flux  # its helpers, step for step as FluxAttnProcessor calls them
        self.fp8 = fp8
        if kernel is None:
            name = fa3_interface_name()
            if name is None:
                raise RuntimeError(f"FlashAttention-3 needs one of the packages {', '.join(INTERFACES)}")
            kernel = importlib.import_module(name).flash_attn_func
        self.kernel = kernel

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        scale = query.shape[-1] ** -0.5
        if not self.fp8:
            out = self.kernel(query, key, value, softmax_scale=scale)
        else:
            (q, q_descale), (k, k_descale), (v, v_descale) = map(quantize_heads, (query, key, value))
            out = self.kernel(
                q, k, v, softmax_scale=scale, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale
            )
        out = out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the LSE
        return out.to(query.dtype)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # diffusers 0.42.1's FluxAttnProcessor.__call__, step for step, with the attention call swapped.
        flux = self.flux
        query, key, value, encoder_query, encoder_key, encoder_value = flux._get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = flux.apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = flux.apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if attention_mask is None:
            hidden_states = self.attend(query, key, value)
        else:
            hidden_states = flux.dispatch_attention_fn(query, key, value, attn_mask=attention_mask)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


def use_fa3(model, fp8: bool = False, kernel=None) -> int:
    """Give every FluxAttention layer of `model` an FA3FluxProcessor; returns how many."""
    processor = FA3FluxProcessor(fp8=fp8, kernel=kernel)
    layers = [m for m in model.modules() if isinstance(m, processor.flux.FluxAttention)]
    for layer in layers:
        layer.set_processor(processor)
    return len(layers)
