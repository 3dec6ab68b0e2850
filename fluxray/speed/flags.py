"""The speed switches as command-line flags, shared by `fluxray generate` and `python -m jobs.generate`."""

from __future__ import annotations

import argparse

from pydantic import ValidationError

from fluxray.speed.options import ATTENTION_BACKENDS, SpeedOptionError, SpeedOptions

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
    group = parser.add_argument_group("speed switches (see fluxray.speed)")
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
