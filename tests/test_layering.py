"""The engine reads bottom-up: no import circles, every engine import at the top of its module, and
no Ray anywhere in it; deployments/ and jobs/ never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Modules allowed a function-level import: the CLI defers loading torch-heavy code until a
# command needs it, so `fluxray --help` and a usage error answer at once.
DEFERRED_OK = {"fluxray.cli"}


def modules(package: str) -> dict[str, ast.Module]:
    out = {}
    for path in (ROOT / package).rglob("*.py"):
        if {"model", "fill", "kontext", "loras"} & set(path.parts) and "tiny" in path.parts:
            continue  # the embedded models' data
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text())
    return out


def imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module]
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return []


def test_engine_imports_form_no_circle_and_sit_at_the_top():
    engine = modules("fluxray")
    graph, deferred = {name: set() for name in engine}, []
    for name, tree in engine.items():
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            for target in imported(node):
                if target in engine and target != name:
                    if id(node) in top:
                        graph[name].add(target)
                    elif name not in DEFERRED_OK:
                        deferred.append(f"{name}:{node.lineno} imports {target}")
    assert deferred == [], "engine imports inside functions (a circle being dodged?): " + "; ".join(deferred)

    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            assert state.get(target) != 1, "import circle: " + " -> ".join([*path, name, target])
            if target not in state:
                visit(target, [*path, name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_the_engine_never_imports_ray_and_the_apps_never_import_each_other():
    rules = {"fluxray": ("ray",), "deployments": ("jobs",), "jobs": ("deployments",)}
    for package, forbidden in rules.items():
        for name, tree in modules(package).items():
            for node in ast.walk(tree):
                for target in imported(node):
                    assert target.split(".")[0] not in forbidden, f"{name} imports {target}"


# The rooms of deployments/: stages/ (the Serve stages and the messages between them); http/ (the ingress,
# what only it uses, and a request's graph and the rules of running it); async_jobs/ (HTTP async jobs, their
# store and webhooks, run through http's graph runner); the app's top (app, config, metrics, warmup). A stage
# hands the next what stages.messages defines, never importing another stage, and no stage imports http/ or
# async_jobs/; of the top, only the app (the builder binds the ingress) and the config (the guard's
# defaults) import http/.
STAGE_MODULES = ("text_encoder", "denoiser", "vae_encoder", "vae_decoder")


def room(module: str) -> str:
    """deployments.<room>.x -> <room>; a top module is its own room, 'top'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else "top"


def test_stages_import_no_other_stage_nor_the_http_side_and_the_top_does_not_reach_into_http():
    found = []
    for name, tree in modules("deployments").items():
        targets = {t for node in ast.walk(tree) for t in imported(node) if t.startswith("deployments.")}
        for target in targets:
            if room(name) == "stages" and room(target) in ("http", "async_jobs"):
                found.append(f"{name} imports {target}")
            stage = name.rsplit(".", 1)[-1]
            if room(name) == "stages" and stage in STAGE_MODULES and target.rsplit(".", 1)[-1] in STAGE_MODULES:
                if target != name:
                    found.append(f"{name} imports {target}")
            if room(name) == "top" and room(target) == "http" and name not in ("deployments.app", "deployments.config"):
                found.append(f"{name} imports {target}")
    assert found == []
    # And the ingress reaches the stages' types through stages.messages, not through a stage module.
    ingress = modules("deployments")["deployments.http.ingress"]
    stage_imports = {t for node in ast.walk(ingress) for t in imported(node) if t.startswith("deployments.stages.")}
    assert {t.rsplit(".", 1)[-1] for t in stage_imports}.isdisjoint(STAGE_MODULES), stage_imports
