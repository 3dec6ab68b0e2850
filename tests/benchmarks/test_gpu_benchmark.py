"""benchmarks/gpu.py on the CPU with the tiny model: the code path the GPU run takes, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_quick_run_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--model", "tiny", "--device", "cpu", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["env"]["device_type"] == "cpu" and report["config"]["model"] == "tiny"
    assert list(report["modes"]) == ["diffusers", "fluxray-float32", "fluxray-int8"]
    sizes = ["96x96", "64x64", "64x112"]
    for label, mode in report["modes"].items():
        assert "error" not in mode, mode
        assert list(mode["sizes"]) == sizes
        for entry in mode["sizes"].values():
            assert entry["seconds_per_image"] > entry["step_seconds"] > 0
            # (graphs_compiled_after_warmup is not checked here: compile is off on the CPU, so it is 0
            # whatever the code does; tests/fluxray/test_acceleration.py checks recompiles with compile on.)
            assert entry["tflop_per_step"] > 0
        if label != "diffusers":
            assert mode["ratio"] == mode["sizes"]["96x96"]["ratio"] > 0
    fp32, int8 = report["modes"]["fluxray-float32"], report["modes"]["fluxray-int8"]
    for size in sizes:
        # CPU fp32 eager is the peer's arithmetic: the latents agree to float rounding.
        assert fp32["sizes"][size]["max_latent_diff_vs_diffusers"] <= 1e-4
        # int8 moves latents a little (~0.01 of a ~7 range when measured) and images by ~62 dB.
        assert 0 < int8["sizes"][size]["max_latent_diff_vs_diffusers"] < 0.1
        assert int8["sizes"][size]["psnr_db_vs_bf16"] > 40


def run_benchmark(script: str, *args: str) -> dict:
    out = Path(args[args.index("--out") + 1])
    result = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_load_memory_benchmark_on_cpu(tmp_path):
    report = run_benchmark("load_memory.py", "--spec", "tiny", "--device", "cpu", "--out", str(tmp_path / "m.json"))
    # fp8 and nf4 need a GPU; on the CPU the path runs with what works there, and memory is not read.
    assert list(report["modes"]) == ["none", "int8"]
    assert report["config"]["params"] > 0
    for entry in report["modes"].values():
        assert entry["on_device"] is True and entry["load_seconds"] > 0 and "peak_gib" not in entry


def test_step_profile_on_cpu(tmp_path):
    report = run_benchmark(
        "step_profile.py",
        "--model",
        "tiny",
        "--device",
        "cpu",
        "--size",
        "64x64",
        "--modes",
        "bf16,int8",
        "--out",
        str(tmp_path / "p.json"),
    )
    assert list(report["modes"]) == ["bf16", "int8"]
    for mode in report["modes"].values():
        assert mode["step_ms"] > 0
        assert mode["kernel_ms"].get("gemm", 0) > 0 and mode["kernel_ms"].get("attention", 0) > 0
        assert mode["top_kernels"] and all(ms > 0 for _, ms in mode["top_kernels"])
