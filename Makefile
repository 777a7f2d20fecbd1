# The two commands of the README. Each sets itself up from a fresh clone and is idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml runtime/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ./runtime -e ".[onnx,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pangu demo

test: $(STAMP)
	$(PY) -m pytest -n 2 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check pangu_fn export runtime tools tests

clean:
	rm -rf $(VENV)
