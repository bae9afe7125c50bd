# Every target installs what it needs into a virtual environment (.venv by default,
# or the one that is active), so `make demo` and `make test` work on a fresh machine.
# torch is pinned in the same pip command as the package: BackPACK pulls in
# torchvision, and an unpinned resolution would replace torch with a CUDA build.

TORCH ?= torch==2.13.0
# The tests and the tutorial example_laplace.py also run laplace-torch, a client of
# curvlinops 3.0.1, on this package. It requires curvlinops-for-pytorch, whose
# `curvlinops` directory would overwrite ours, so it is installed without
# dependencies, then its other ones by name (the rest of its requirements comes with
# this package), torch pinned again.
LAPLACE := laplace-torch==0.3
LAPLACE_DEPS := asdfghjkl==0.1a4 opt-einsum torchmetrics
ifdef VIRTUAL_ENV
VENV ?= $(VIRTUAL_ENV)
else
VENV ?= .venv
endif
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip install --quiet
# exits 0 when every NAME or NAME==VERSION given is installed
HAS := $(PYTHON) -c "import sys, importlib.metadata as m; sys.exit(any(m.version(n) \
	!= (v or m.version(n)) for n, _, v in (a.partition('==') for a in sys.argv[1:])))"

.PHONY: install install-lint install-docs demo test lint format docs docs-check bench clean

$(PYTHON):
	python3 -m venv $(VENV)

install: $(PYTHON)
	$(PIP) "$(TORCH)" -e ".[test]"
	$(HAS) $(LAPLACE) $(LAPLACE_DEPS) 2>/dev/null || { \
		$(PIP) --no-deps --no-warn-conflicts "$(LAPLACE)" && \
		$(PIP) --no-warn-conflicts "$(TORCH)" $(LAPLACE_DEPS); }

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
test: install install-docs
	$(PYTHON) -m pytest -n auto

lint: install-lint
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: install-lint
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

# `install` brings laplace-torch for the tutorial example_laplace.py
docs: install install-docs
	$(PYTHON) -m sphinx -W --keep-going -b html docs docs/_build/html

# the browser test on the complete build: formulas, tutorial output, thumbnails
docs-check: docs
	CURVLINOPS_DOCS_HTML=docs/_build/html $(PYTHON) -m pytest -q test/test_docs_browser.py

bench: install
	$(PYTHON) benchmarks/run.py --markdown
	$(PYTHON) benchmarks/scaling.py
	$(PYTHON) benchmarks/ggn_diagonal.py
	$(PYTHON) benchmarks/ekfac_precompute.py
	$(PYTHON) benchmarks/discovery.py
	$(PYTHON) benchmarks/kfoc.py
	$(PYTHON) benchmarks/vivit.py
	$(PYTHON) benchmarks/distributed.py
	$(PYTHON) benchmarks/compile.py

clean:
	rm -rf docs/_build docs/auto_examples docs/gen_modules docs/sg_execution_times.rst benchmarks/results build/curvlinops_demo.png
