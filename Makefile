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

.PHONY: install install-lint install-docs demo test lint format docs docs-check bench clean

$(PYTHON):
	python3 -m venv $(VENV)

install: $(PYTHON)
	$(PIP) "$(TORCH)" -e ".[test]"

install-lint: $(PYTHON)
	$(PIP) -e ".[lint]" "$(TORCH)"

# The docs serve their own MathJax (fetched with npm, see docs/_mathjax.py), and
# the test suite builds them, so the docs extras come with the test extras.
install-docs: $(PYTHON)
	$(PIP) "$(TORCH)" -e ".[test,docs]"
	$(PYTHON) docs/_mathjax.py

# the tour ends by drawing a picture (matplotlib comes with the test extras)
demo: install
	$(PYTHON) -m curvlinops.demo --picture build/curvlinops_demo.png

# test/test_docs_browser.py opens the docs in Chromium (Debian: apt-get install chromium)
test: install-docs
	$(PYTHON) -m pytest -n auto

lint: install-lint
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: install-lint
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

docs: install-docs
	$(PYTHON) -m sphinx -W --keep-going -b html docs docs/_build/html

# the browser test on the complete build: formulas, tutorial output, thumbnails
docs-check: docs
	CURVLINOPS_DOCS_HTML=docs/_build/html $(PYTHON) -m pytest -q test/test_docs_browser.py

bench: install
	$(PYTHON) benchmarks/run.py
	$(PYTHON) benchmarks/vivit.py
	$(PYTHON) benchmarks/distributed.py
	$(PYTHON) benchmarks/compile.py

clean:
	rm -rf docs/_build docs/auto_examples docs/gen_modules docs/sg_execution_times.rst benchmarks/results build/curvlinops_demo.png
