# Every target installs what it needs into a virtual environment (.venv by default,
# or the one that is active), so `make demo` and `make test` work on a fresh machine.
# torch is pinned in the same pip command as the package: BackPACK pulls in
# torchvision, and an unpinned resolution would replace torch with a CUDA build.

TORCH ?= torch==2.13.0
ifdef VIRTUAL_ENV
VENV ?= $(VIRTUAL_ENV)
else
VENV ?= .venv
endif
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip install --quiet

.PHONY: install install-lint install-docs demo test lint format docs bench clean

$(PYTHON):
	python3 -m venv $(VENV)

install: $(PYTHON)
	$(PIP) "$(TORCH)" -e ".[test]"

install-lint: $(PYTHON)
	$(PIP) -e ".[lint]" "$(TORCH)"

install-docs: $(PYTHON)
	$(PIP) "$(TORCH)" -e ".[docs]"

demo: install
	$(PYTHON) -m curvlinops.demo

test: install
	$(PYTHON) -m pytest -n auto

lint: install-lint
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: install-lint
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

docs: install-docs
	$(PYTHON) -m sphinx -W --keep-going -b html docs docs/_build/html

bench: install
	$(PYTHON) benchmarks/run.py --markdown
	$(PYTHON) benchmarks/scaling.py
	$(PYTHON) benchmarks/vivit.py
	$(PYTHON) benchmarks/distributed.py
	$(PYTHON) benchmarks/compile.py

clean:
	rm -rf docs/_build docs/auto_examples docs/gen_modules benchmarks/results
