# The README's commands. `make run` and `make test` each install everything they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU installs pin torch (a plain `torch` pulls a multi-GB CUDA build); GPU images override TORCH.
TORCH ?= torch==2.13.0
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: install install-test install-redis install-browser run serve generate test test-fast lint format bench bench-serve bench-failover bench-quality tiny-model crds clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(PIP) "$(TORCH)"
	$(PIP) -e .

install-test: $(BIN)/python
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[test]"

# The cluster tests run a real redis-server (GCS fault tolerance, cluster/local_cluster.sh --gcs-redis):
# installed once with apt-get (Debian, Ubuntu), as root or through sudo; the package lists are
# refreshed only if the install fails without it. Nothing to do where redis-server is on PATH.
APT := $(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive apt-get
install-redis:
	@command -v redis-server >/dev/null || { \
		echo "installing redis-server (apt-get)"; \
		$(APT) install -y -qq redis-server >/dev/null 2>&1 || \
			{ $(APT) update -qq && $(APT) install -y -qq redis-server >/dev/null; }; \
		command -v redis-server >/dev/null || { echo "make: the tests need redis-server on PATH" >&2; exit 1; }; }

# The page's tests drive a real headless Chromium (Debian's chromium and chromium-driver, through selenium).
install-browser:
	@{ command -v chromium >/dev/null && command -v chromedriver >/dev/null; } || { \
		echo "installing chromium and chromium-driver (apt-get)"; \
		$(APT) install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
			{ $(APT) update -qq && $(APT) install -y -qq chromium chromium-driver >/dev/null; }; \
		command -v chromedriver >/dev/null || { echo "make: the tests need chromium and chromedriver on PATH" >&2; exit 1; }; }

## The main job: the online service (Serve graph, tiny model, CPU) on http://127.0.0.1:8000.
run: serve

serve: install
	$(BIN)/serve run deployments/configs/local.yaml

## One image in-process with the CLI, written to out/square.png.
generate: install
	$(BIN)/fluxray generate --prompt "a green square in the center, white background" --output out/square.png --seed 42

## Lint, then the whole test suite (CPU, tiny model).
test: install-test install-redis install-browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

## The working loop's subset (<= 6 min on 2 cores): every in-process test and one live check, the run
## command's (tests/as_shipped/); `make test` runs everything.
test-fast: install-test install-redis install-browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests -m "not live or smoke"

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python benchmarks/engine.py

bench-serve: install-test
	$(BIN)/python benchmarks/serve_load.py

## The head killed, the config rolled out and the Denoiser scaled down under load (needs redis-server).
bench-failover: install-test install-redis
	$(BIN)/python benchmarks/failover.py

## Prompt adherence of the tiny model on held-out prompts (JSON + PNGs in benchmarks/results/).
bench-quality: install
	$(PIP) -e ".[bench]"
	$(BIN)/python benchmarks/quality.py

## Retrain the embedded tiny model on the synthetic scenes (CPU, ~50 min on 2 cores).
tiny-model: install
	$(BIN)/python scripts/train_tiny_model.py

## Refresh the vendored KubeRay CRDs (k8s/crds/) from a KubeRay tag or commit: make crds KUBERAY_REF=v1.5.0
KUBERAY_REF ?=
CRDS_URL ?= https://raw.githubusercontent.com/ray-project/kuberay/$(KUBERAY_REF)/ray-operator/config/crd/bases
CRD_FILES := ray.io_rayclusters.yaml ray.io_rayjobs.yaml ray.io_rayservices.yaml

crds:
	@test -n "$(KUBERAY_REF)" || { echo "usage: make crds KUBERAY_REF=<KubeRay tag or commit, e.g. v1.5.0>" >&2; exit 2; }
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	for f in $(CRD_FILES); do curl -fsSL "$(CRDS_URL)/$$f" -o "$$tmp/$$f" || exit 1; done && \
	cp $(addprefix "$$tmp"/,$(CRD_FILES)) k8s/crds/ && \
	echo "k8s/crds/: KubeRay CRDs at $(KUBERAY_REF); now update its README.md's version row and run make test"

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache *.egg-info
