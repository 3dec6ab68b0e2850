"""Render the benchmark tables of docs/benchmarks.md from benchmarks/results/*.json.

    python scripts/render_benchmark_tables.py            # rewrite the tables in place
    python scripts/render_benchmark_tables.py --check    # exit 1, naming the stale table, if they differ

Each table sits between `<!-- table: NAME -->` and `<!-- /table -->`; NAME says which JSON report it
is rendered from (TABLES below). Everything outside the markers is left as written. The figures that
the docs site shows from benchmarks/results/ (PNG_FILES) are copied into docs/img/, since mkdocs only
serves files under docs/; --check verifies those copies too.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"
IMAGES = ROOT / "docs" / "img"
PNG_FILES = ("quality-steps-cpu.png", "tiny-model-examples.png")

MARKER = re.compile(r"<!-- table: ([a-z0-9-]+) -->\n(.*?)<!-- /table -->", re.S)


def load(results: Path, name: str) -> dict:
    return json.loads((results / f"{name}.json").read_text())


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def side(width: int, height: int) -> str:
    return f"{width}²" if width == height else f"{width}×{height}"


def device(env: dict) -> str:
    return f"{env['cpu_threads']}-core CPU" if env["device"] == "cpu" else env["device"].replace("NVIDIA ", "")


def by_mode(results: list[dict]) -> tuple[dict, dict, dict]:
    """(diffusers, fluxray one per call, fluxray batched) of an engine report's results."""
    peer = next(r for r in results if r["impl"] != "fluxray")
    alone = next(r for r in results if r["impl"] == "fluxray" and r["mode"] == "one image per call")
    batch = next(r for r in results if r["impl"] == "fluxray" and r["mode"] != "one image per call")
    return peer, alone, batch


def engine(results: Path) -> str:
    rows = []
    for name in ("engine-cpu", "engine-cuda-1024", "engine-cuda-512"):
        report = load(results, name)
        env, config = report["env"], report["config"]
        peer, alone, batch = by_mode(report["results"])
        speedup, diff = report["speedup_vs_diffusers"], report["max_pixel_diff_vs_diffusers"]
        run = (
            f"{device(env)}, `{config['model']}`, {side(config['width'], config['height'])}, {config['steps']} steps, "
            f"{config['images']} images, {env['dtype']} (`{name}.json`)"
        )
        rows.append(
            [
                run,
                f"{peer['seconds_per_image']:.3f}",
                f"{alone['seconds_per_image']:.3f} ({speedup['one image per call']:.3f}×)",
                f"{batch['seconds_per_image']:.3f} ({speedup[batch['mode']]:.3f}×, {batch['mode']})",
                f"{diff['one image per call']} / {diff['batched']}",
            ]
        )
    header = [
        "run",
        "diffusers s/image",
        "fluxray s/image, one per call",
        "fluxray s/image, batched",
        "max pixel diff (alone / batched)",
    ]
    return table(header, rows)


def edits(results: Path) -> str:
    rows = []
    for edit in load(results, "engine-cpu")["edits"]:
        peer, alone, batch = by_mode(edit["results"])
        speedup, diff = edit["speedup_vs_diffusers"], edit["max_pixel_diff_vs_diffusers"]
        rows.append(
            [
                f"{edit['method']} (`{edit['model']}`, `{peer['impl'].split('.')[-1]}`)",
                f"{peer['seconds_per_image']:.3f}",
                f"{alone['seconds_per_image']:.3f} ({speedup['one image per call']:.2f}×)",
                f"{batch['seconds_per_image']:.3f} ({speedup[batch['mode']]:.2f}×)",
                f"{max(diff.values())}/255",
            ]
        )
    header = ["method", "diffusers, one per call", "fluxray, one per call", "fluxray, batch of 2", "max diff"]
    return table(header, rows)


def lora(results: Path) -> str:
    steps = load(results, "lora-cpu")["seconds_per_image_step"]
    rows = []
    for case, figures in steps["fluxray"].items():
        peer = steps["diffusers"].get(case)
        ours = f"{figures['mean_s']:.4f}"
        if case.startswith("bare"):
            ours += f" (± {figures['stdev_s']:.3f})"
        rows.append([case, f"{peer['mean_s']:.4f}" if peer else "(cannot)", ours])
    return table(["seconds per image-step", "diffusers", "fluxray"], rows)


# The goals for srpt against fifo at load 0.8 (not in the report): (label, key, goal text, met?).
SCHEDULER_GOALS = (
    ("mean latency", "mean_latency", "≤ 0.65", lambda v: v <= 0.65),
    ("p99, short requests", "p99_short", "≤ 0.4", lambda v: v <= 0.4),
    ("p99, long requests", "p99_long", "≤ 1.2", lambda v: v <= 1.2),
    ("SLO attainment", "slo_attainment_points", "≥ +25 points", lambda v: v >= 25),
    ("throughput", "throughput", "≥ 0.97", lambda v: v >= 0.97),
)


def scheduler(results: Path) -> str:
    load_08 = load(results, "scheduler-cpu")["loads"]["0.8"]
    runs = (load_08["srpt_over_fifo"], load_08["srpt_over_fifo_engine"], load_08["srpt_over_fifo_simulated"])
    rows = []
    for label, key, goal, met in SCHEDULER_GOALS:
        cells = []
        for run in runs:
            value = run[key]
            text = f"{value:+.1f}" if key == "slo_attainment_points" else f"{value:.3f}"
            cells.append(text if met(value) else f"{text} — missed")
        rows.append([label, goal, *cells])
    header = ["srpt / fifo at load 0.8", "goal", "Serve app (HTTP)", "Denoiser in-process", "simulated"]
    return table(header, rows)


GPU_MODES = {
    "diffusers": "diffusers `FluxPipeline`, eager (the peer)",
    "fluxray-bf16": "fluxray bf16 (compile, fused QKV)",
    "fluxray-fp8": "fluxray fp8",
    "fluxray-bf16-cudagraphs": "fluxray bf16 + CUDA graphs",
    "fluxray-nf4": "fluxray NF4 (memory, not speed)",
    "fluxray-bf16-fa3": "fluxray bf16, FlashAttention-3",
    "fluxray-fp8-fast": "fluxray fp8, fast accumulation",
    "fluxray-fp8-fast-fa3fp8": "fluxray fp8, fast accumulation, fp8 attention (FA3)",
}


def gpu_levers(results: Path) -> str:
    """One 1024² run of the levers beside diffusers (gpu-levers-nvidia-h200.json)."""
    report = load(results, "gpu-levers-nvidia-h200")
    size = report["config"]["sizes"][0]
    rows = []
    for mode, figures in report["modes"].items():
        at = figures["sizes"][size]
        ratio = f" ({at['ratio']:.3f}×)" if "ratio" in at else ""
        psnr = at.get("psnr_db_vs_bf16")
        rows.append(
            [
                GPU_MODES.get(mode, mode),
                f"{at['seconds_per_image']:.2f} s{ratio}",
                f"{at['step_seconds'] * 1000:.1f} ms",
                f"{psnr:.1f} dB" if psnr is not None else "—",
            ]
        )
    header = [
        "mode",
        f"{side(*(int(x) for x in size.split('x')))}, {report['config']['steps']} steps",
        "step",
        "PSNR vs fluxray bf16",
    ]
    return table(header, rows)


STEP_PROFILES = [  # (file, mode, label): one transformer call, kernel time by group
    ("step-profile-levers-nvidia-h200", "bf16-fa3", "dev 1024², bf16 + FA3"),
    ("step-profile-levers-nvidia-h200", "fp8-fa3fp8", "dev 1024², fp8 + fast acc. + fp8 FA3"),
    ("step-profile-fill-nvidia-h200", "bf16", "Fill 1024², bf16 (dev's step with 384 input channels)"),
    ("step-profile-kontext-nvidia-h200", "bf16", "Kontext 1024² + 1024² reference, bf16"),
]


def step_profile(results: Path) -> str:
    rows = []
    for name, mode, label in STEP_PROFILES:
        m = load(results, name)["modes"][mode]
        k = m["kernel_ms"]
        gap = m.get("gap_ms")
        gap = gap if gap is not None else m["step_ms"] - sum(k.values())
        rows.append(
            [
                label,
                f"{m['step_ms']:.0f}",
                f"{k.get('gemm', 0):.1f}",
                f"{k.get('attention', 0):.1f}",
                f"{k.get('fp8_quant', 0):.1f}",
                f"{k.get('other', 0):.1f}",
                f"{gap:.1f}",
            ]
        )
    header = ["step", "wall (ms)", "GEMM", "attention", "fp8 quantisation", "other kernels", "gaps"]
    return table(header, rows)


def gpu(results: Path) -> str:
    report = load(results, "gpu-nvidia-h200")
    sizes = report["config"]["sizes"]
    rows = []
    for mode, figures in report["modes"].items():
        cells = [GPU_MODES.get(mode, mode)]
        for size in sizes:
            at = figures["sizes"][size]
            ratio = f" ({at['ratio']:.2f}×)" if "ratio" in at else ""
            cells.append(f"{at['seconds_per_image']:.2f} s{ratio}")
        first = figures["sizes"][sizes[0]]
        cells.append(f"{first['step_seconds'] * 1000:.0f} ms ({first['mfu']:.2f})")
        warm = figures.get("warmup_seconds", 0)
        cells.append(f"{warm:.0f} s" if mode != "diffusers" and warm else "—")
        psnr = first.get("psnr_db_vs_bf16")
        cells.append(f"{psnr:.1f} dB" if psnr is not None else "—")
        rows.append(cells)  # one row per mode, in the report's order
    w, h = (int(x) for x in sizes[0].split("x"))
    head = [f"{side(w, h)}, {report['config']['steps']} steps"]
    head += [side(*(int(x) for x in s.split("x"))) for s in sizes[1:]]
    header = ["mode", *head, f"step at {side(w, h)} (MFU)", "warm-up", "PSNR vs bf16"]
    return table(header, rows)


def first_request(results: Path) -> str:
    rows = []
    for run in load(results, "first_request-cpu")["runs"]:
        first = run["first"]
        stage_ms = sum(v for k, v in first["stages_ms"].items() if k != "total")
        rows.append(
            [
                "on (the default)" if run["warm_up"] else "off",
                f"{run['deploy_to_ready_s']:.1f}",
                f"{first['seconds']:.2f}",
                f"{stage_ms / 1000:.2f}",
                f"{run['warm_median_s']:.2f}",
                f"{run['first_over_warm']:.2f}×",
            ]
        )
    header = ["warm_up", "deploy → ready (s)", "first request (s)", "its stages (s)", "warm median (s)", "first / warm"]
    return table(header, rows)


TABLES = {
    "engine": engine,
    "edits": edits,
    "lora": lora,
    "scheduler": scheduler,
    "gpu": gpu,
    "gpu-levers": gpu_levers,
    "step-profile": step_profile,
    "first-request": first_request,
}


def render(text: str, results: Path) -> tuple[str, list[str]]:
    """The page with every table re-rendered, and the names of the tables whose text changed."""
    stale: list[str] = []

    def replace(match: re.Match) -> str:
        name, old = match.group(1), match.group(2)
        if name not in TABLES:
            raise SystemExit(f"render_benchmark_tables: unknown table {name!r} (known: {', '.join(TABLES)})")
        new = TABLES[name](results)
        if new != old:
            stale.append(name)
        return f"<!-- table: {name} -->\n{new}<!-- /table -->"

    rendered = MARKER.sub(replace, text)
    missing = [name for name in TABLES if f"<!-- table: {name} -->" not in text]
    return rendered, stale + [f"{name} (missing)" for name in missing]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page or an image copy is stale")
    parser.add_argument("--page", type=Path, default=PAGE, help=f"the page (default {PAGE.relative_to(ROOT)})")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the JSON reports' directory")
    parser.add_argument("--images", type=Path, default=IMAGES, help="where the site's copies of the PNGs go")
    args = parser.parse_args(argv)

    text = args.page.read_text()
    rendered, stale = render(text, args.results)
    images = [
        name
        for name in PNG_FILES
        if not (args.images / name).is_file() or (args.images / name).read_bytes() != (args.results / name).read_bytes()
    ]
    if args.check:
        if stale:
            print(
                f"{args.page}: table {stale[0]} is stale; run python scripts/render_benchmark_tables.py",
                file=sys.stderr,
            )
            return 1
        if images:
            print(
                f"{args.images / images[0]} differs from {args.results / images[0]}; run "
                "python scripts/render_benchmark_tables.py",
                file=sys.stderr,
            )
            return 1
        return 0
    if rendered != text:
        args.page.write_text(rendered)
    for name in images:
        args.images.mkdir(parents=True, exist_ok=True)
        (args.images / name).write_bytes((args.results / name).read_bytes())
    return 0


if __name__ == "__main__":
    sys.exit(main())
