# Set-up and the two main jobs. Every target creates .venv and installs the kit when missing.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-stamp
PROFILE ?= smoke
# One torch thread: the models here are small, and two threads on two busy cores were measured 20x slower.
export OMP_NUM_THREADS ?= 1

.PHONY: install reproduce test lint bench clean-runs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

reproduce: $(STAMP)  ## main job: execute every notebook (smoke profile) and regenerate figures/ (WORKERS=N: N at a time)
	$(VENV)/bin/hilal reproduce --profile $(PROFILE) $(if $(WORKERS),--workers $(WORKERS))

test: $(STAMP)  ## lint, layer contracts, stripped-notebook check, unit tests, every notebook at the smoke profile
	$(VENV)/bin/ruff check hilal tests bench
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -ra --durations=15 -n 2 --dist loadfile

lint: $(STAMP)  ## ruff, and the one-way layer order of docs/design.md ([tool.importlinter] in pyproject.toml)
	$(VENV)/bin/ruff check hilal tests bench
	$(VENV)/bin/lint-imports --no-cache

bench: $(STAMP)
	$(VENV)/bin/hilal bench hessian --out bench/results/hessian.json
	$(VENV)/bin/hilal bench search --out bench/results/search.json
	$(VENV)/bin/hilal bench analog --out bench/results/analog.json
