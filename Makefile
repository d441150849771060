# The README's commands. Each target creates .venv on first use and reuses it.
#   make repro          run the whole DVC pipeline (dvc repro)
#   make test           run the test suite
#   make lint           ruff check + format check
#   make repro GPU=1    the same, with the CUDA build of TensorFlow installed
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
GPU ?= 0
EXTRAS := dev$(if $(filter 1 yes true,$(GPU)),$(comma)gpu,)
comma := ,
# Reinstall when the dependencies change; the stamp records which extras are in.
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: repro test test-fast lint venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed-*
	touch $@

repro: venv
	$(BIN)/dvc repro

test: venv
	$(BIN)/python -m pytest

test-fast: venv
	$(BIN)/python -m pytest -m 'not slow'

lint: venv
	$(BIN)/ruff check pipeline tests
	$(BIN)/ruff format --check pipeline tests

clean-venv:
	rm -rf $(VENV)
