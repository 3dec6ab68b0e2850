"""The repository stands alone: a clone with nothing beside it builds, tests and reads completely.

No file of the repository may refer to a path outside it — a folder beside the checkout (as the
KubeRay CRDs and the design notes once were), the folder a developer happened to work in, or a
relative path that climbs above the repository's root. Its relative markdown links must also lead
to files that exist.
"""

from __future__ import annotations

import os
import posixpath
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SELF = Path(__file__).resolve().relative_to(ROOT).as_posix()  # its examples are the references it looks for

# Folders that are never the project's own: build output, caches, the virtual environment.
NOT_OURS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache", "out", "build", "dist"}

# A relative path containing `..` as a whole component: `../x`, `a/../../b`; not `...`, not `x..y`.
RELATIVE = re.compile(r"(?<![\w.\-/~$])(?:[\w.\-]+/)*\.\.(?:/[\w.\-]*)+")
# The folder the project's workplace lays beside each checkout, however it is reached.
SIBLING = re.compile(r"(?<![\w.\-])(?:\.\./)+shared\b")
# Absolute paths into the workplace the project was developed in.
WORKPLACE = re.compile(r"(?<![\w.\-~])/work/[\w.\-]")
# Python: the parent of the repository root (ROOT.parent, REPO_ROOT.parents[0], ...).
ROOT_PARENT = re.compile(r"\b[A-Z_]*ROOT\w*\.parents?\b")
# Python: Path(__file__) climbed to some level, by .parents[N] or a chain of .parent.
FILE_PARENTS = re.compile(r"Path\(__file__\)(?:\.(?:resolve|absolute)\(\))?((?:\.parent\b)+|\.parents\[(\d+)\])")
# Shell: the script's own folder, then `..` components.
SCRIPT_DIR = re.compile(r"dirname[ (\"]+\$\{?(?:0|BASH_SOURCE\[0\])\}?\"?\)\"?((?:/\.\.)+)")
# Path-traversal probes (hostile inputs that the security tests send and docs/reliability.md quotes):
# they aim at the system's /etc/passwd on purpose, and name nothing the project uses.
TRAVERSAL_PROBE = re.compile(r"(?:^|/)etc/passwd$")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


def repository_files() -> list[str]:
    """Every file of the repository as git sees it (tracked, and new files not ignored), or every
    file under the root outside NOT_OURS when this is not a git checkout (an unpacked archive)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        names = sorted({n for n in listed.split("\0") if n})
    except (OSError, subprocess.CalledProcessError):
        names = []
        for folder, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in NOT_OURS and not d.endswith(".egg-info")]
            names += [(Path(folder) / f).relative_to(ROOT).as_posix() for f in files]
    return [n for n in sorted(names) if os.path.lexists(ROOT / n)]


def read_text(path: Path) -> str | None:
    """The file's text, or None for a binary file (weights, images)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def escapes(folder: str, relative: str) -> bool:
    """Whether `relative`, taken from `folder` (both relative to the root), leads above the root."""
    target = posixpath.normpath(posixpath.join(folder, relative))
    return target == ".." or target.startswith("../")


def outside_references(name: str, text: str) -> list[str]:
    """'line N: what' for every reference in file `name` (relative to the root) to a path outside
    the repository.

    A relative path counts from the file's own folder, as a markdown link, a script's
    `$(dirname "$0")` or a module's `Path(__file__)` does. In code and configs outside tests/ it
    counts from the root too, where the README's and the Makefile's commands run; tests/ is spared
    that reading because its hostile inputs (ids like `../x`) are data, not paths of the project.
    """
    folder = posixpath.dirname(name)
    depth = len(Path(name).parts) - 1  # levels from the file's folder up to the root
    bases = [folder]
    if folder and not name.startswith("tests/") and not name.endswith(".md"):
        bases.append("")
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in RELATIVE.finditer(line):
            path = match.group(0)
            if TRAVERSAL_PROBE.search(posixpath.normpath(path)):
                continue
            if SIBLING.search(path) or any(escapes(base, path) for base in bases):
                found.append(f"line {number}: {path} (a relative path above the repository)")
        for match in WORKPLACE.finditer(line):
            found.append(f"line {number}: {line[match.start() :].split()[0]} (an absolute path outside it)")
        if name.endswith(".py"):
            for match in ROOT_PARENT.finditer(line):
                found.append(f"line {number}: {match.group(0)} (the folder above the repository)")
            for match in FILE_PARENTS.finditer(line):
                # .parent once is the file's folder; .parents[0] is too.
                up = int(match.group(2)) if match.group(2) is not None else match.group(1).count(".parent") - 1
                if up > depth:
                    found.append(f"line {number}: {match.group(0)} ({up - depth} above the repository)")
        for match in SCRIPT_DIR.finditer(line):
            if match.group(1).count("..") > depth:
                found.append(f"line {number}: {match.group(0)} (a script path above the repository)")
    return found


def broken_links(name: str, text: str) -> list[str]:
    """'line N: target' for every relative markdown link in `name` that leads to no file."""
    folder = posixpath.dirname(name)
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in MARKDOWN_LINK.finditer(line):
            target = match.group(1).split("#", 1)[0]
            if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
                continue  # an anchor in the same page, a URL, an absolute path (WORKPLACE's business)
            if escapes(folder, target) or not (ROOT / folder / target).exists():
                found.append(f"line {number}: {match.group(1)}")
    return found


FILES = repository_files()


# --- the scanner finds what it should and nothing else ---------------------------------------------


@pytest.mark.parametrize(
    "name, text",
    [
        ("README.md", "See `../shared/DESIGN.md` for the architecture."),
        ("README.md", "#    the CRDs in ../shared/kuberay-crds)"),
        ("docs/x.md", "[design](../../DESIGN.md)"),
        ("docs/x.md", "the figures in `../../shared/reference/`"),
        ("tests/k8s/test_x.py", 'CRDS = ROOT.parent / "shared" / "kuberay-crds"'),
        ("tests/k8s/test_x.py", 'CRDS = REPO_ROOT.parents[0] / "shared"'),
        ("tests/k8s/test_x.py", "ROOT = Path(__file__).resolve().parents[3]"),
        ("tests/test_x.py", "ROOT = Path(__file__).parent.parent.parent"),
        ("scripts/x.sh", 'cd "$(dirname "$0")/../.."'),
        ("Makefile", "CRDS ?= ../kuberay/ray-operator/config/crd/bases"),
        ("tests/k8s/test_x.py", 'CRDS = "../shared/kuberay-crds"  # from the root, where pytest runs'),
        ("benchmarks/x.py", 'json.load(open("../reference/h200-diffusers-baseline.json"))'),
        ("deployments/configs/x.yaml", "working_dir: ../fluxray-weights"),
        ("cluster/Dockerfile", "COPY /work/shared/kuberay-crds /crds"),
        ("tests/test_x.py", 'Path("/work/wt17/k8s")'),
    ],
)
def test_a_reference_outside_the_repository_is_found(name, text):
    assert outside_references(name, text), text


@pytest.mark.parametrize(
    "name, text",
    [
        ("README.md", "[docs/reliability.md](docs/reliability.md), `k8s/crds/`, benchmarks/results/"),
        ("docs/x.md", "[the README](../README.md), [the job](../jobs/generate.py)"),
        ("tests/k8s/test_x.py", "ROOT = Path(__file__).resolve().parents[2]"),
        ("tests/test_x.py", "ROOT = Path(__file__).parent.parent"),
        ("k8s/render.py", "ROOT = Path(__file__).resolve().parents[1]"),
        (".ci/run", 'cd "$(dirname "$0")/.."'),
        ("cluster/x.sh", 'REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)'),
        ("tests/jobs/test_x.py", '"a/../../b.csv", "../x", "../etc/passwd", "....jsonl", "..\\\\..\\\\x.txt"'),
        ("k8s/crds/README.md", "[LICENSE](LICENSE), [the manifests](../rayservice.yaml)"),
        ("tests/deployments/test_x.py", '{"model": "../../../../etc/passwd"}'),
        ("docs/x.md", "`../../etc/passwd` as a model name is a 400"),
        ("README.md", "kubectl ... ; etc. ... and so on.. `x..y` ... https://example.com/a/../b"),
        ("README.md", "/tmp/fluxray-cluster-$(id -u)/state.env, /home/ray/fluxray, /models/FLUX.1-dev"),
        ("cluster/Dockerfile", "WORKDIR /home/ray/work/fluxray"),
    ],
)
def test_a_path_inside_the_repository_or_a_probe_is_not_a_reference(name, text):
    assert outside_references(name, text) == []


def test_a_broken_markdown_link_is_found():
    assert broken_links("docs/x.md", "[ok](../README.md) [gone](missing.md) [up](../../x.md)") == [
        "line 1: missing.md",
        "line 1: ../../x.md",
    ]
    assert broken_links("README.md", "[web](https://ray.io) [here](#the-cli) [doc](docs/architecture.md#layers)") == []


# --- the repository -----------------------------------------------------------------------------


def test_the_scan_sees_the_whole_repository():
    assert {"README.md", "Makefile", "pyproject.toml", "k8s/crds/ray.io_rayservices.yaml", SELF} <= set(FILES)
    assert not [n for n in FILES if Path(n).parts[0] in NOT_OURS]


def test_no_file_refers_to_a_path_outside_the_repository():
    found = {}
    for name in FILES:
        path = ROOT / name
        if path.is_symlink():
            target = os.path.realpath(path)
            if os.path.commonpath([target, str(ROOT)]) != str(ROOT):
                found[name] = [f"a symbolic link to {os.readlink(path)}"]
            continue
        text = read_text(path) if name != SELF else None
        if text is not None and (hits := outside_references(name, text)):
            found[name] = hits
    assert found == {}


def test_markdown_links_lead_to_files_in_the_repository():
    found = {}
    for name in FILES:
        path = ROOT / name
        if name.endswith(".md") and not path.is_symlink() and (hits := broken_links(name, path.read_text())):
            found[name] = hits
    assert found == {}
