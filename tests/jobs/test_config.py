"""JobConfig: a YAML file and flags over it, one set of bounds, errors that name the flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxray.models.specs import SPECS
from jobs.config import JobConfig, UsageError, load_config
from jobs.generate import check_resources, resource_needs


def test_flags_override_the_config_file_field_by_field(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "input: s3://b/prompts/\noutput: s3://b/run/\nmodel: random:tiny\nsteps: 4\nformat: webp\n"
        "denoise: {batch_size: 2, gpus: 1}\nspeed: {quantize: int8}\n"
    )
    config = load_config(["--config", str(path), "--steps", "6", "--denoise-actors", "3", "--overwrite"])
    assert (config.input, config.output, config.model, config.format) == (
        "s3://b/prompts/",
        "s3://b/run/",
        "random:tiny",
        "webp",
    )
    assert config.steps == 6 and config.overwrite and not config.strict
    assert (config.denoise.batch_size, config.denoise.actors, config.denoise.gpus, config.denoise.cpus) == (
        2,
        3,
        1,
        1.0,
    )
    assert config.encode == JobConfig.model_fields["encode"].default_factory()  # untouched stages keep defaults
    assert config.speed.quantize == "int8"
    assert load_config(["--config", str(path), "--quantize", "none"]).speed.quantize == "none"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--output", "o"], "--input is required"),
        (["--input", "i", "--output", "o", "--width", "100"], "--width: must be a multiple of 16 (got 100)"),
        (["--input", "i", "--output", "o", "--height", "4096"], "--height: Input should be less than or equal to 2048"),
        (["--input", "i", "--output", "o", "--decode-actors", "0"], "--decode-actors: Input should be greater than"),
        (["--input", "i", "--output", "o", "--max-retries", "-1"], "--max-retries: Input should be greater than"),
        (["--input", "i", "--output", "o", "--seed-base", "-3"], "--seed-base: Input should be greater than"),
        (["--input", "i", "--output", "o", "--format", "gif"], "--format: Input should be 'png', 'jpeg' or 'webp'"),
        (["--input", "i", "--output", "o", "--steps", "x"], "argument --steps: invalid int value: 'x'"),
        (["--input", "i", "--output", "o", "--nope"], "unrecognized arguments: --nope"),
    ],
)
def test_bad_options_are_one_line_naming_the_flag(argv, message):
    with pytest.raises(UsageError) as caught:
        load_config(argv)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_bad_config_files_name_the_key(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: a\noutput: b\ndenoise: {batch_sise: 4}\n")
    with pytest.raises(UsageError, match="--denoise-batch-sise: unknown option"):
        load_config(["--config", str(path)])
    path.write_text("input: a\noutput: b\nwrite: {gpus: 1}\n")
    with pytest.raises(UsageError, match="--write: the write stage takes no GPU"):
        load_config(["--config", str(path)])
    path.write_text("- a list\n")
    with pytest.raises(UsageError, match="must hold a mapping"):
        load_config(["--config", str(path)])
    with pytest.raises(UsageError, match="cannot read"):
        load_config(["--config", str(tmp_path / "missing.yaml")])


def test_the_default_size_comes_from_the_model_spec():
    assert SPECS["tiny"].default_size == 256 and SPECS["flux-dev"].default_size == 1024


def test_resources_refused_name_what_is_missing_and_what_is_busy():
    config = load_config(["--input", "i", "--output", "o", "--denoise-actors", "2", "--denoise-gpus", "1"])
    needs = resource_needs(config)
    assert needs == {"CPU": pytest.approx(0.1 + 0.25 + 2.0 + 0.25 + 0.1), "GPU": 2.0}
    check_resources(needs, {"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 2})
    with pytest.raises(UsageError, match=r"need 2 GPUs and the cluster has 1; lower --\*-gpus"):
        check_resources(needs, {"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1})
    with pytest.raises(UsageError, match=r"need 2 GPUs and the cluster has 4, of which 3 are busy \(1 free\)"):
        check_resources(needs, {"CPU": 8, "GPU": 4}, {"CPU": 8, "GPU": 1})
    with pytest.raises(UsageError, match=r"need 2.7 CPUs and the cluster has 2;"):
        check_resources(needs, {"CPU": 2, "GPU": 2}, {"CPU": 2, "GPU": 2})


def test_the_example_config_loads():
    config = load_config(["--config", str(Path(__file__).resolve().parents[2] / "examples" / "job.yaml")])
    assert (config.input, config.steps, config.denoise.batch_size) == ("examples/prompts.jsonl", 8, 8)
