"""Quantized stand-ins for the transformer blocks' nn.Linear layers: fp8, int8 weight-only, NF4.

fp8 and int8 use torch alone, so the same code runs wherever torch does; NF4 needs bitsandbytes.
Only the Linear layers inside the repeated blocks are swapped: they hold ~99% of the weights and
FLOPs, while the embedders and the final projection stay in the model's dtype, where a small error
would touch every token.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
_TINY = 1e-12  # an all-zero row gets this scale instead of dividing by zero


def _rowwise_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, K) -> (fp8 values, float32 scale per row) with values * scale ~= t."""
    scale = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=_TINY) / FP8_MAX
    return (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Float8Linear(nn.Module):
    """nn.Linear with an fp8 weight (one scale per output row) and activations quantized per token
    at run time (dynamic rowwise scaling), multiplied by torch._scaled_mm.

    Eagerly, the activation quantization is a few extra passes over memory and can cost more than
    the faster GEMM saves; under torch.compile it fuses into one kernel, which is where fp8 pays.
    """

    def __init__(self, linear: nn.Linear, fast_accum: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.out_dtype = linear.weight.dtype
        # Hopper's fp8 tensor cores accumulate in ~22-bit precision unless the kernel promotes the
        # partial sums to fp32 every few k-steps; fast accumulation skips that promotion (faster, lossier).
        self.fast_accum = fast_accum
        weight, scale = _rowwise_fp8(linear.weight.detach())
        self.register_buffer("weight", weight)  # (N, K); .t() is the column-major operand _scaled_mm wants
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, N)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, x_scale = _rowwise_fp8(x.reshape(-1, shape[-1]))
        y = torch._scaled_mm(
            xq,
            self.weight.t(),
            scale_a=x_scale,
            scale_b=self.weight_scale,
            out_dtype=self.out_dtype,
            use_fast_accum=self.fast_accum,
        )
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        fast = ", fast accumulation" if self.fast_accum else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 rowwise{fast}"


class Int8WeightOnlyLinear(nn.Module):
    """nn.Linear with an int8 weight (symmetric, one scale per output row) and activations in the
    model's dtype: half the weight memory of bf16 (a quarter of fp32) for a small error.

    x @ (Wq * s)^T equals (x @ Wq^T) * s, so the scale is applied to the output, not the weight.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1).float().clamp(min=_TINY) / 127
        self.register_buffer("weight", (w.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("weight_scale", scale.to(w.dtype))  # (N,)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.weight_scale
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def nf4_linear(linear: nn.Linear, device: torch.device) -> nn.Module:
    """bitsandbytes' 4-bit NormalFloat Linear holding this layer's weights (quantized on the GPU)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=linear.weight.dtype,
        quant_type="nf4",
        device="meta",
    )
    # Params4bit quantizes when it is moved to a CUDA device.
    layer.weight = bnb.nn.Params4bit(linear.weight.detach(), requires_grad=False, quant_type="nf4").to(device)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    return layer


def replace_linears(
    root: nn.Module, make: Callable[[nn.Linear], nn.Module], keep: Callable[[nn.Module], bool] = lambda _: False
) -> int:
    """Swap every nn.Linear under root for make(linear), one at a time (so the peak memory is the
    model plus one layer), except those whose parent module keep() accepts; returns the count."""
    count = 0
    for name, child in list(root.named_children()):
        if type(child) is nn.Linear:
            if not keep(root):
                setattr(root, name, make(child))
                count += 1
        else:
            count += replace_linears(child, make, keep)
    return count


def is_modulation(module: nn.Module) -> bool:
    """AdaLayerNorm* modules: their Linear turns one vector per image into shift/scale/gate.
    A GEMV with a batch-sized M is bound by reading its weight, not by tensor-core FLOPs: at
    FLUX.1 size the 3.2B modulation weights take ~2 ms of a ~100 ms step to read in bf16, so fp8
    would save ~1% while its rounding would scale every token."""
    return type(module).__name__.startswith("AdaLayerNorm")


@functools.cache
def fp8_matmul_works(device: torch.device) -> str | None:
    """None when this device runs rowwise-scaled fp8 matmuls, else the reason it does not.

    Probed once per device and process: every stage's check (Pipeline.load checks them all up
    front, then the transformer's loader again) asks the same question."""
    try:
        layer = Float8Linear(nn.Linear(32, 16, device=device, dtype=torch.bfloat16))
        for rows in (1, 16):  # one row: a batch-of-one GEMV
            layer(torch.ones(rows, 32, device=device, dtype=torch.bfloat16))
        return None
    except (RuntimeError, NotImplementedError) as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
