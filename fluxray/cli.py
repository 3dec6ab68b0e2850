"""The `fluxray` command: generate (or, with --image, edit) images in-process, list models, locate the tiny model.

A user mistake (bad parameter, unknown model, unwritable output) prints one line on stderr and
exits with status 2; it never shows a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# fluxray never downloads at run time, and the libraries' info chatter is not for CLI users.
from pydantic import ValidationError

from fluxray.editing import EditError, EditParams, default_size, edit_method, fit_size, read_edit_inputs
from fluxray.images import InputImageError
from fluxray.lora import LoraError, LoraRegistry, attach_loras, check_lora_file, read_lora
from fluxray.models.sources import PICKLE_SUFFIXES, ModelSourceError, resolve_model
from fluxray.models.specs import SPECS
from fluxray.params import MAX_LORA_SCALE, GenerationParams, describe_validation_error
from fluxray.speed import SpeedOptionError
from fluxray.speed.flags import add_speed_arguments, speed_options_from_args
from fluxray.usage import ArgumentParser, UsageError

FLAG_OF_FIELD = {
    "prompt": "--prompt",
    "prompt_2": "--prompt-2",
    "negative_prompt": "--negative-prompt",
    "width": "--width",
    "height": "--height",
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance",
    "guidance_scale_end": "--guidance-end",
    "true_cfg_scale": "--true-cfg",
    "n": "--n",
    "seed": "--seed",
    "strength": "--strength",
    "loras": "--lora",
}
FORMAT_OF_SUFFIX = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="fluxray", description="FLUX.1 text-to-image generation")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    gen = sub.add_parser("generate", help="generate images in this process")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--output", required=True, help="file to write; .png, .jpg/.jpeg or .webp")
    gen.add_argument("--model", default=None, help="tiny (default), flux-dev, flux-schnell, a path, a repo id")
    gen.add_argument("--prompt-2", default=None, help="separate prompt for the T5 encoder")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument("--guidance", type=float, default=None)
    gen.add_argument("--guidance-end", type=float, default=None, help="ramp guidance linearly to this value")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--true-cfg", type=float, default=1.0, help="true CFG scale (> 1 with --negative-prompt)")
    gen.add_argument("--n", type=int, default=1, help="number of images; files get -0, -1, ...")
    gen.add_argument("--image", default=None, help="edit this image (PNG, JPEG, WebP): img2img, or as the model edits")
    gen.add_argument("--mask", default=None, help="with --image: repaint where white (or transparent, with alpha)")
    gen.add_argument("--strength", type=float, default=None, help="with --image: how far toward noise (0-1]")
    gen.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME_OR_PATH[=SCALE]",
        help="apply a LoRA (a .safetensors file, or a name in --lora-root) at SCALE (default 1); repeatable",
    )
    gen.add_argument("--lora-root", default=None, help="directory whose *.safetensors --lora may name by stem")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_speed_arguments(gen)

    sub.add_parser("models", help="list the known model specs")
    path = sub.add_parser("model-path", help="print the directory a model loads from")
    path.add_argument("name")
    return parser


def _output_paths(output: Path, n: int) -> list[Path]:
    if n == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(n)]


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _edit_inputs(args: argparse.Namespace, spec):
    """--image and --mask, read and checked (None, None without --image); UsageError for a mistake."""
    if args.image is None:
        if spec.edit == "fill":
            raise UsageError(f"--model: {spec.name} (FLUX.1 Fill) only fills a masked image: give --image and --mask")
        for flag, value in (("--mask", args.mask), ("--strength", args.strength)):
            if value is not None:
                raise UsageError(f"{flag} needs --image")
        return None, None

    def read(path: str, field: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise UsageError(f"--{field}: cannot read {path}: {e.strerror}") from None

    image_data = read(args.image, "image")
    mask_data = read(args.mask, "mask") if args.mask is not None else None
    try:
        image, mask = read_edit_inputs(spec, image_data, mask_data)
    except InputImageError as e:
        raise UsageError(f"--{e}") from None
    try:
        edit_method(spec, mask is not None, args.strength)
    except EditError as e:
        raise UsageError(f"--{e}") from None
    return image, mask


def _lora_files(args: argparse.Namespace) -> dict[str, tuple[Path, float]]:
    """{name: (file, scale)} of the --lora options; UsageError for a mistake."""
    registry = None
    chosen: dict[str, tuple[Path, float]] = {}
    for text in args.lora:
        target, scale = text, 1.0
        head, sep, tail = text.rpartition("=")
        if sep:
            try:
                target, scale = head, float(tail)
            except ValueError:
                raise UsageError(f"--lora: {text!r}: the scale after '=' must be a number") from None
        if not -MAX_LORA_SCALE <= scale <= MAX_LORA_SCALE:
            raise UsageError(f"--lora: {text!r}: the scale must be within [-{MAX_LORA_SCALE:g}, {MAX_LORA_SCALE:g}]")
        if target.endswith(".safetensors") or "/" in target or Path(target).suffix in PICKLE_SUFFIXES:
            try:
                path = check_lora_file(target)
            except (LoraError, ModelSourceError) as e:
                raise UsageError(f"--lora: {e}") from None
            name = path.stem
        else:
            if registry is None:
                if args.lora_root is None:
                    raise UsageError(f"--lora: {target!r} is not a file path; name LoRAs by stem with --lora-root DIR")
                try:
                    registry = LoraRegistry(args.lora_root)
                except LoraError as e:
                    raise UsageError(f"--lora-root: {e}") from None
            try:
                name, path = target, registry.path(target)
            except LoraError as e:
                raise UsageError(f"--lora: {e} in {args.lora_root}") from None
        if name in chosen:
            raise UsageError(f"--lora: {name!r} given twice")
        chosen[name] = (path, scale)
    return chosen


def _attach_loras(pipeline, loras: dict[str, tuple[Path, float]]) -> None:
    """Read the --lora files against the model's transformer and load them (one-line errors)."""
    try:
        adapters = [read_lora(path, pipeline.transformer, name) for name, (path, _) in loras.items()]
    except LoraError as e:
        raise UsageError(f"--lora: {e}") from None
    bank = attach_loras(pipeline.transformer, len(adapters), max(a.rank for a in adapters), slots=len(adapters))
    for adapter in adapters:
        bank.add(adapter)


def _generate(args: argparse.Namespace) -> int:
    output = Path(args.output)
    fmt = FORMAT_OF_SUFFIX.get(output.suffix.lower())
    if fmt is None:
        raise UsageError(f"--output must end in .png, .jpg, .jpeg or .webp (got {output.name!r})")
    source = resolve_model(args.model)
    spec = source.spec
    image, mask = _edit_inputs(args, spec)
    loras = _lora_files(args)
    if image is not None and (args.width is None or args.height is None):
        width, height = fit_size(*default_size(spec, image), spec.default_size**2)
        args.width, args.height = args.width or width, args.height or height
    fields = {
        "prompt": args.prompt,
        "prompt_2": args.prompt_2,
        "negative_prompt": args.negative_prompt,
        "width": args.width or spec.default_size,
        "height": args.height or spec.default_size,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "guidance_scale_end": args.guidance_end,
        "true_cfg_scale": args.true_cfg,
        "n": args.n,
        "seed": args.seed,
        "output_format": fmt,
        "loras": [{"name": name, "scale": scale} for name, (_, scale) in loras.items()],
    }
    if image is None:
        params = GenerationParams(**fields).resolve(spec)
    else:
        params = EditParams(**fields, strength=args.strength).resolve(spec)
    speed = speed_options_from_args(args)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {output.parent}: {e.strerror}") from None

    import torch
    from tqdm import tqdm

    from fluxray.pipeline import Pipeline

    torch.set_grad_enabled(False)
    pipeline = Pipeline.load(args.model, device=args.device, speed=speed)
    if loras:
        _attach_loras(pipeline, loras)
    for encoder in pipeline.text_encoder.length.truncated(params.prompt, params.prompt_2):
        limit = "77" if encoder == "clip" else str(spec.max_sequence_length)
        print(
            f"fluxray: warning: the prompt is longer than {encoder.upper()}'s {limit} tokens; it reads the start only",
            file=sys.stderr,
        )
    with tqdm(total=params.num_inference_steps, desc="denoising", unit="step", disable=args.no_progress) as bar:
        if image is None:
            images = pipeline.generate(params, on_step=lambda: bar.update(1))
        else:
            images = pipeline.edit(params, image, mask, on_step=lambda: bar.update(1))
    for image, path in zip(images, _output_paths(output, params.n)):
        try:
            _write_atomically(path, image.encode(fmt))
        except OSError as e:
            raise UsageError(f"cannot write {path}: {e.strerror}") from None
        print(f"{path}\tseed={image.seed}")
    return 0


def _models() -> int:
    for spec in SPECS.values():
        guidance = "guidance embedding" if spec.guidance_embeds else "no guidance embedding"
        where = spec.repo_id or "embedded in the package"
        print(
            f"{spec.name:13} steps={spec.default_steps:<3} guidance={spec.default_guidance:<4} "
            f"t5_max_length={spec.max_sequence_length:<4} {guidance:22} {where}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.command == "generate":
            return _generate(args)
        if args.command == "models":
            return _models()
        print(resolve_model(args.name).root)
        return 0
    except ValidationError as e:
        message = describe_validation_error(e, FLAG_OF_FIELD)
    except (UsageError, ModelSourceError, SpeedOptionError) as e:
        message = str(e)
    except EditError as e:  # what the model cannot do (FLUX.1 Fill without an image)
        message = f"--{e}"
    except KeyboardInterrupt:
        message = "interrupted"
    print(f"fluxray: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
