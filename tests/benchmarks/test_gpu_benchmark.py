"""benchmarks/gpu.py on the CPU with the tiny model: the code path the GPU run takes, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
            # whatever the code does; tests/fluxray/test_speed.py checks recompiles with compile on.)
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
        assert mode["kernel_launches"] > 0 and mode["kernel_sum_ms"] > 0
        assert sum(mode["other_ms"].values()) == pytest.approx(mode["kernel_ms"].get("other", 0), abs=0.05)
        # Every GEMM shape's throughput is its 2*M*N*K over its time: positive and read from real shapes.
        assert mode["gemm_shapes"] and all(g["tflops_per_s"] > 0 and g["calls"] > 0 for g in mode["gemm_shapes"])


def test_gemm_flops_reads_the_matrices_not_inductors_out_buffer():
    from benchmarks.step_profile import gemm_flops

    # extern_kernels.addmm(bias, x, w, out=buf): the out= buffer's shape comes last.
    assert gemm_flops("aten::addmm", [[18432], [1, 3072], [3072, 18432], [], [], [1, 18432]]) == 2 * 3072 * 18432
    assert gemm_flops("aten::mm", [[64, 32], [32, 16]]) == 2 * 64 * 32 * 16
    assert gemm_flops("aten::_scaled_mm", [[8, 32], [32, 16], [8, 1], [1, 16]]) == 2 * 8 * 32 * 16
    assert gemm_flops("aten::mm", [[64]]) is None


def test_attention_kernels_and_multi_model_memory_on_cpu(tmp_path):
    report = run_benchmark(
        "attention_kernels.py", "--device", "cpu", "--tokens", "64", "--out", str(tmp_path / "a.json")
    )
    math = report["kernels"]["sdpa-math"]
    assert math["ms"] > 0 and math["rel_error_vs_fp32"] < 1e-5  # fp32 math against fp32 math
    report = run_benchmark("multi_model_memory.py", "--device", "cpu", "--tiny", "--out", str(tmp_path / "m.json"))
    assert list(report["held_gib"]) == ["text encoders + VAE + tiny", "+ tiny-kontext", "+ tiny-fill", "total"]
    assert list(report["peak_gib"]) == ["tiny step", "tiny-kontext step", "tiny-fill step", "VAE decode"]
