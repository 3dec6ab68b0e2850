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

from fluxray.speed.apply import accelerate_transformer, accelerate_vae, tile_threshold, warm_up
from fluxray.speed.options import (
    ATTENTION_BACKENDS,
    VAE_TILE_ABOVE,
    WARMUP_BATCHES,
    ResolvedSpeed,
    SpeedOptionError,
    SpeedOptions,
    resolve,
)

__all__ = [
    "ATTENTION_BACKENDS",
    "VAE_TILE_ABOVE",
    "WARMUP_BATCHES",
    "ResolvedSpeed",
    "SpeedOptionError",
    "SpeedOptions",
    "accelerate_transformer",
    "accelerate_vae",
    "resolve",
    "tile_threshold",
    "warm_up",
]
