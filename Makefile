# Every target installs what it needs first, so each works on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
PYTEST := $(BIN)/pytest
# pytest-xdist workers for test, test-fast and test-backends: 2 (the default) runs the suite on
# two isolated workers (tests/conftest.py), at most 2 (each takes 8 of a shared Redis's 16
# databases); 0 runs it in one process.
PYTEST_WORKERS ?= 2
XDIST  := -n $(PYTEST_WORKERS) --maxprocesses 2 --dist loadgroup

.PHONY: setup demo console-demo console-demo-stop test test-fast test-backends lint format up down clean bench evidence

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP) ## Create .venv and install Tessera with its dev and bench extras.

demo: setup ## Run the whole system on embedded servers, show it working, stop it.
	$(BIN)/tessera demo

console-demo: setup ## The demo's federation on a stack left running; prints the console's URL.
	$(BIN)/tessera console-demo

console-demo-stop: setup ## Stop the stack `make console-demo` left running.
	$(BIN)/tessera console-demo --stop

test: setup browser ## The whole suite, slow end-to-end tests included; needs no URL.
	$(PYTEST) $(XDIST)

test-fast: setup ## The suite without the slow end-to-end tests.
	$(PYTEST) $(XDIST) -m "not slow"

test-backends: setup ## Database, object store and queue tests only.
	$(PYTEST) $(XDIST) -m backend

bench: setup ## Benchmarks on this machine; tables and plots written to docs/.
	$(BIN)/python bench/model_speed.py --out docs
	$(BIN)/python bench/inference_speed.py --out docs
	$(BIN)/python bench/mixed_batches.py --out docs
	$(BIN)/python bench/federation_speed.py --out docs
	$(BIN)/python bench/aggregation_scale.py --out docs
	OMP_NUM_THREADS=1 $(BIN)/python bench/clustering_scale.py --threads 1 --out docs
	$(BIN)/python bench/load.py --out docs
	$(BIN)/python bench/real_model.py --out docs
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python bench/robustness.py --threads 1 --out docs
	$(BIN)/python bench/stragglers.py --out docs

evidence: setup ## Train a LoRA per style, score them and every pair's blends; writes docs/lora_evidence.*
	$(BIN)/python -m tessera.lora.evidence --out docs

lint: setup ## ruff (lint and format check) and mypy.
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy shared/tessera services

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

up: setup ## Start the stack in the background (embedded servers where no URL is set).
	$(BIN)/tessera up --detach

down: setup ## Stop the stack started by `make up`.
	$(BIN)/tessera down

clean:
	rm -rf .tessera .tessera-demo .tessera-console-demo .pytest_cache .mypy_cache .ruff_cache

# apt-get needs root: through sudo unless make runs as root (as CI does).
APT := $(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive apt-get

.PHONY: browser
browser: ## Debian's Chromium for the console's browser tests (Playwright drives it; no download).
	command -v chromium >/dev/null 2>&1 || \
		{ $(APT) update -qq && $(APT) install -y -qq --no-install-recommends chromium; }

.PHONY: k8s-check
k8s-check: setup ## docker-compose config, every kustomize overlay rendered and validated, yamllint.
	command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || \
		{ $(APT) update -qq && $(APT) install -y -qq --no-install-recommends docker-compose; }
	$(BIN)/python -m tests.deploy.check --install-tools
