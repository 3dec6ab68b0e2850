"""The response headers fluxray adds: the seed of a raw image, the stages' timings (W3C Server-Timing)
and the encoders that cut the prompt."""

from __future__ import annotations

SEED_HEADER = "X-Seed"
TIMING_HEADER = "Server-Timing"  # W3C Server Timing: queue, encode, denoise, decode, total (ms)
TIMING_ORDER = ("queue", "encode", "encode_image", "denoise", "decode", "total")
TRUNCATED_HEADER = "X-Prompt-Truncated"  # the encoders that read only the start of the prompt


def timings_ms(seconds: dict[str, float]) -> dict[str, float]:
    """A request's stage timings in milliseconds, in graph order."""
    return {name: round(seconds[name] * 1000, 1) for name in TIMING_ORDER if name in seconds}


def server_timing(seconds: dict[str, float]) -> str:
    """The Server-Timing header value: `queue;dur=12.5, encode;dur=3.1, ...` (milliseconds).
    queue: waiting in the denoiser before the first step; denoise: first step to last (paused
    steps included); encode and decode: time in those stages (their batch waits included)."""
    return ", ".join(f"{name};dur={ms}" for name, ms in timings_ms(seconds).items())
