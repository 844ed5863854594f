# One venv, one install step: every target below works on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: setup run test crds lint e2e bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[dev,serving]"
	$(PY) -c "import kmock, kopf, lightkube, pymilvus, helm_python, pilothouse.operator.api"
	touch $@

run: setup  ## install, then run the main job on embedded defaults (Milvus Lite, SQLite)
	$(BIN)/pilothouse run examples/invoice-triage/

test: setup  ## unit + integration suites (kopf operator against the Kubernetes emulator, Milvus Lite)
	$(PY) -m pytest

crds: setup  ## regenerate CRDs from the pydantic API models (crds/ and the Helm chart's copy)
	$(BIN)/pilothouse crds --out crds
	$(BIN)/pilothouse crds --out charts/pilothouse/crds

lint: setup
	$(BIN)/ruff check .

e2e: setup  ## against a real cluster: KUBECONFIG, or a throwaway kind cluster when kind + Docker exist
	bash tests/e2e/run.sh

bench: setup
	$(PY) bench/reconcile_scale.py
