# Two commands for a fresh machine:
#   make demo   - set up .venv (if missing) and run the main job
#   make test   - set up .venv (if missing) and run every test (nbdev_test + pytest)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARCH := $(shell uname -m)
ifeq ($(ARCH),aarch64)
TORCH_PINS := torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
endif
STAMP := $(VENV)/.installed

.PHONY: install demo test nbtest pytest sync-check bench notebooks clean-venv

install: $(STAMP)

$(STAMP): settings.ini setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	@# one OpenCV wheel only: the contrib build (EPIC, fast global smoother) replaces the plain one
	$(PY) -m pip uninstall -y -q opencv-python-headless opencv-python opencv-contrib-python 2>/dev/null || true
	$(PY) -m pip install -q -e ".[dev]" $(TORCH_PINS)
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cmp_demo --out outputs/demo

nbtest: $(STAMP)
	$(VENV)/bin/nbdev_test --n_workers 1 --timing

pytest: $(STAMP)
	@$(PY) -m pytest tests -ra; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

test: $(STAMP)
	$(MAKE) --no-print-directory nbtest
	$(MAKE) --no-print-directory pytest

# The library must be what the notebooks say, and notebooks must be clean.
sync-check: $(STAMP)
	$(VENV)/bin/nbdev_export
	$(VENV)/bin/nbdev_clean
	$(PY) tools/make_readme.py
	@if [ -n "$$(git status --porcelain -- nbs cmp_nb README.md)" ]; then \
	  echo "nbdev_export/nbdev_clean changed files: notebooks and library are out of step"; \
	  git status --porcelain -- nbs cmp_nb README.md; git --no-pager diff --stat; exit 1; fi
	@echo "sync-check: notebooks, library and metadata agree"

# Re-run the notebooks and store their outputs (pictures, tables) in them; skips #| slow / #| cuda cells.
notebooks: $(STAMP)
	$(PY) tools/run_notebooks.py
	$(VENV)/bin/nbdev_clean

bench: $(STAMP)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
