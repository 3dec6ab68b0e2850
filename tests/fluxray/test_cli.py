"""The fluxray command as a user runs it: real files, exit codes, one line per mistake (through `main(argv)`, and
in real processes where the process itself is what is checked)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fluxray.cli import main
from fluxray.images import read_metadata
from fluxray.models.sources import TINY_MODEL_DIR
from fluxray.params import GenerationParams


def fluxray(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """`python -m fluxray ...` in a real process."""
    return subprocess.run(
        [sys.executable, "-m", "fluxray", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """The same command through `main(argv)` in this process (what `python -m fluxray` calls), without a
    process' ~5 s of imports: its exit code and what it printed. test_mistakes_in_a_real_process and the
    docs' CLI examples (docs/cli.md) run real processes."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["fluxray", *args], code, out, err)


def test_generate_writes_images_with_seed_suffixes(tmp_path, capsys):
    out = tmp_path / "sub" / "cat.png"
    result = in_process(
        capsys,
        "generate",
        "--prompt",
        "a cat",
        "--output",
        str(out),
        "--n",
        "2",
        "--seed",
        "9",
        "--width",
        "96",
        "--height",
        "64",
        "--steps",
        "3",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    files = sorted(p.name for p in out.parent.iterdir())
    assert files == ["cat-0.png", "cat-1.png"]
    assert f"{out.parent / 'cat-1.png'}\tseed=10" in result.stdout
    first = (out.parent / "cat-0.png").read_bytes()
    assert read_metadata(first)["seed"] == 9
    assert Image.open(out.parent / "cat-1.png").size == (96, 64)
    # The same command again makes the same bytes.
    again = in_process(
        capsys,
        "generate",
        "--prompt",
        "a cat",
        "--output",
        str(tmp_path / "again.png"),
        "--n",
        "2",
        "--seed",
        "9",
        "--width",
        "96",
        "--height",
        "64",
        "--steps",
        "3",
        "--no-progress",
    )
    assert again.returncode == 0 and (tmp_path / "again-0.png").read_bytes() == first


def test_generate_jpeg_with_true_cfg_and_progress(tmp_path, capsys):
    out = tmp_path / "x.jpg"
    result = in_process(
        capsys,
        "generate",
        "--prompt",
        "a cat",
        "--negative-prompt",
        "blurry",
        "--true-cfg",
        "3",
        "--output",
        str(out),
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
    )
    assert result.returncode == 0, result.stderr
    assert "denoising" in result.stderr and "2/2" in result.stderr
    assert out.read_bytes()[:3] == b"\xff\xd8\xff"
    assert np.asarray(Image.open(out)).shape == (64, 64, 3)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--width", "100"], "--width: width must be a multiple of 16 (got 100)"),
        (["--steps", "0"], "--steps:"),
        (["--guidance", "25"], "--guidance:"),
        (["--n", "9"], "--n:"),
        (["--seed", "-3"], "--seed:"),
        (["--seed", "abc"], "argument --seed: invalid int value"),
        (["--true-cfg", "2"], "--true-cfg: true CFG (> 1) needs a negative prompt"),
        (["--model", "/no/such/model"], "unknown model"),
        (["--model", "some-org/some-model"], "not in the local Hugging Face cache"),
    ],
)
def test_user_mistakes_print_one_line_and_exit_2(tmp_path, capsys, args, message):
    # In-process (the same main() the console script runs) to keep the matrix fast; the
    # subprocess test below checks a real process prints no traceback either.
    code = main(["generate", "--prompt", "a cat", "--output", str(tmp_path / "o.png"), *args])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fluxray: error: ")
    assert message in lines[0]
    assert not (tmp_path / "o.png").exists()


def test_mistakes_in_a_real_process(tmp_path):
    for args in (
        ["generate", "--output", "x.png"],
        ["generate", "--prompt", "a", "--output", "x.gif"],
        ["generate", "--prompt", "a", "--output", "x.png", "--height", "2050"],
        ["fly"],
    ):
        result = fluxray(*args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_models_and_model_path(capsys):
    models = in_process(capsys, "models")
    assert models.returncode == 0
    names = [line.split()[0] for line in models.stdout.splitlines()]
    assert names == ["flux-dev", "flux-schnell", "tiny", "flux-fill", "flux-kontext", "tiny-fill", "tiny-kontext"]
    assert "black-forest-labs/FLUX.1-dev" in models.stdout and "black-forest-labs/FLUX.1-Fill-dev" in models.stdout
    path = in_process(capsys, "model-path", "tiny")
    assert path.returncode == 0 and path.stdout.strip() == str(TINY_MODEL_DIR)
    path = in_process(capsys, "model-path", "tiny-kontext")
    assert path.returncode == 0 and path.stdout.strip() == str(TINY_MODEL_DIR.parent / "kontext")


def test_a_prompt_longer_than_clip_reads_is_warned_about(tmp_path, capsys):
    common = ["generate", "--output", str(tmp_path / "x.png"), "--width", "64", "--height", "64", "--steps", "1"]
    common += ["--no-progress", "--seed", "1", "--device", "cpu"]
    assert main([*common, "--prompt", " ".join(["triangle"] * 30)]) == 0  # within the tiny T5's 64
    assert capsys.readouterr().err.splitlines() == [
        "fluxray: warning: the prompt is longer than CLIP's 77 tokens; it reads the start only"
    ]
    assert main([*common, "--prompt", "a lighthouse"]) == 0
    assert capsys.readouterr().err == ""


def test_generate_with_an_image_edits_it_as_the_engine_does(tmp_path, tiny_pipeline):
    from image_checks import max_pixel_diff

    from fluxray.editing import EditParams
    from fluxray.tiny.scenes import Scene, render

    scene = render(Scene("yellow", "square", "right", "green"), 96, 64)
    scene.save(tmp_path / "scene.png")
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (0, 0, 48, 64))
    mask.save(tmp_path / "mask.png")
    prompt = "a red circle on the left, blue background"
    common = ["generate", "--prompt", prompt, "--seed", "4", "--steps", "3", "--no-progress", "--device", "cpu"]
    out = tmp_path / "edited.png"
    assert main([*common, "--output", str(out), "--image", str(tmp_path / "scene.png"), "--strength", "0.8"]) == 0
    assert Image.open(out).size == (96, 64)  # the input's size
    want = tiny_pipeline.edit(
        EditParams(prompt=prompt, width=96, height=64, seed=4, strength=0.8, num_inference_steps=3), scene
    )[0]
    assert max_pixel_diff(np.asarray(Image.open(out).convert("RGB")), want.pixels) <= 2
    assert read_metadata(out.read_bytes())["edit"] == "img2img"
    inpainted = tmp_path / "inpainted.png"
    args = [
        *common,
        "--output",
        str(inpainted),
        "--image",
        str(tmp_path / "scene.png"),
        "--mask",
        str(tmp_path / "mask.png"),
    ]
    assert main(args) == 0 and read_metadata(inpainted.read_bytes())["edit"] == "inpaint"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--mask", "m.png"], "--mask needs --image"),
        (["--strength", "0.5"], "--strength needs --image"),
        (["--image", "missing.png"], "--image: cannot read"),
        (["--image", "bad.png"], "--image: not an image"),
        (["--image", "scene.png", "--strength", "2"], "--strength:"),
        (["--image", "scene.png", "--model", "tiny-kontext", "--mask", "scene.png"], "--mask: tiny-kontext"),
        (["--model", "tiny-fill"], "--model: tiny-fill (FLUX.1 Fill) only fills"),
    ],
)
def test_edit_mistakes_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 64), (10, 200, 10)).save(tmp_path / "scene.png")
    (tmp_path / "bad.png").write_bytes(b"definitely not a png")
    args = ["generate", "--prompt", "x", "--output", str(tmp_path / "o.png"), "--steps", "1", "--no-progress"]
    assert main([*args, "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fluxray: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "o.png").exists()


def test_generate_with_loras_by_path_and_by_name(tmp_path, tiny_loras):
    from image_checks import max_pixel_diff

    from fluxray.lora import attach_loras, read_lora
    from fluxray.pipeline import Pipeline

    out = tmp_path / "lora.png"
    common = ["generate", "--prompt", "a red circle", "--seed", "6", "--steps", "3", "--width", "64", "--height", "64"]
    args = [*common, "--no-progress", "--device", "cpu", "--output", str(out)]
    by_path = str(tiny_loras / "subject.safetensors")
    assert main([*args, "--lora-root", str(tiny_loras), "--lora", "style=0.8", "--lora", f"{by_path}=1.2"]) == 0
    loras = [{"name": "style", "scale": 0.8}, {"name": "subject", "scale": 1.2}]
    assert read_metadata(out.read_bytes())["loras"] == loras
    engine = Pipeline.load("tiny", device="cpu")
    bank = attach_loras(engine.transformer, max_per_row=2, max_rank=8)
    for name in ("style", "subject"):
        bank.add(read_lora(tiny_loras / f"{name}.safetensors", engine.transformer))
    params = GenerationParams(prompt="a red circle", seed=6, num_inference_steps=3, width=64, height=64, loras=loras)
    got = np.asarray(Image.open(out).convert("RGB"))
    assert max_pixel_diff(got, engine.generate(params)[0].pixels) <= 2
    assert max_pixel_diff(got, engine.generate(params.model_copy(update={"loras": ()}))[0].pixels) > 4


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--lora", "style"], "--lora: 'style' is not a file path; name LoRAs by stem with --lora-root"),
        (["--lora", "nope", "--lora-root", "{loras}"], "--lora: unknown LoRA 'nope' in"),
        (["--lora", "style", "--lora-root", "no/such/dir"], "--lora-root: lora_root no/such/dir: no such directory"),
        (["--lora", "{loras}/style.safetensors=strong"], "--lora: '{loras}/style.safetensors=strong': the scale"),
        (["--lora", "{loras}/style.safetensors=9"], "--lora: '{loras}/style.safetensors=9': the scale must be within"),
        (["--lora", "evil.pt"], "--lora: refusing to load evil.pt: it is a pickle"),
        (["--lora", "missing.safetensors"], "--lora: missing.safetensors: no such LoRA file"),
        (["--lora", "{loras}/style.safetensors", "--lora", "{loras}/style.safetensors"], "--lora: 'style' given twice"),
    ],
)
def test_lora_mistakes_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys, tiny_loras, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.pt").write_bytes(b"not even a pickle")
    extra = [e.replace("{loras}", str(tiny_loras)) for e in extra]
    args = ["generate", "--prompt", "x", "--output", str(tmp_path / "o.png"), "--steps", "1", "--no-progress"]
    assert main([*args, "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fluxray: error: {message.replace('{loras}', str(tiny_loras))}") and err.count("\n") == 1, (
        err
    )
    assert not (tmp_path / "o.png").exists()
