# The README's commands. Each target creates .venv on first use and reuses it.
#   make repro          run the whole DVC pipeline (dvc repro)
#   make test           run the test suite
#   make lint           ruff check + format check
#   make bench          training throughput benchmark (BENCHMARKS.md)
#   make ui             mlflow ui on the local store (http://127.0.0.1:5000)
#   make repro GPU=1    the same, with the CUDA build of TensorFlow installed
#   make venv REMOTE=s3 the environment with DVC's S3 plugin (gs, azure, ssh likewise)
#   make tracking-server  a team's MLflow server: PostgreSQL, proxied artifacts, logins
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
GPU ?= 0
# REMOTE=s3 (or gs, azure, ssh; several: REMOTE="s3 ssh"): DVC's plugin for that kind of
# remote, without which `dvc pull` refuses it (README, "A DVC remote").
# Read from make's command line only: an exported REMOTE (a git remote's name, say) is not this.
ifeq ($(origin REMOTE),environment)
REMOTE :=
endif
REMOTES := s3 gs azure ssh
comma := ,
space := $(subst ,, )
$(if $(filter-out $(REMOTES),$(REMOTE)),$(error REMOTE=$(REMOTE): must be one of $(REMOTES)))
EXTRAS := dev$(if $(filter 1 yes true,$(GPU)),$(comma)gpu,)$(if $(strip $(REMOTE)),$(comma)$(subst $(space),$(comma),$(strip $(REMOTE))),)
# Reinstall when the dependencies change; the stamp records which extras are in.
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
# The venv's programs first on PATH, as `source .venv/bin/activate` would: dvc runs each
# stage's `python -m pipeline...` from PATH, which must be the venv's, not the system's.
IN_VENV := PATH="$(abspath $(BIN)):$$PATH"

.PHONY: repro test test-fast lint bench ui tracking-server venv clean-venv

venv: $(STAMP)

# The versions CI tested (.ci/constraints.txt): newer releases wait until they are tested;
# the setuptools and wheel pip builds with (.ci/build-constraints.txt) too.
CONSTRAINTS := .ci/constraints.txt
BUILD_CONSTRAINTS := .ci/build-constraints.txt

# A .venv whose creation failed half-way (python3.11 without its venv package writes
# bin/python, then stops at ensurepip) is made again, not reused for ever.
# So is one of another Python (3.12, say), which every install would refuse.
VENV_WORKS := { $(BIN)/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' && \
	$(BIN)/python -m pip --version; } >/dev/null 2>&1

$(STAMP): pyproject.toml $(CONSTRAINTS) $(BUILD_CONSTRAINTS)
	@# $(PYTHON) only to make a .venv: one made by make PYTHON=... stays, without it.
	@$(VENV_WORKS) || command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(VENV_WORKS) || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip -c $(CONSTRAINTS)
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]' -c $(CONSTRAINTS) \
	  --build-constraint $(BUILD_CONSTRAINTS)
	rm -f $(VENV)/.installed-*
	touch $@

repro: venv
	$(IN_VENV) $(BIN)/dvc repro

test: venv
	$(IN_VENV) $(BIN)/python -m pytest --durations=10

test-fast: venv
	$(IN_VENV) $(BIN)/python -m pytest -m 'not slow'

# The local MLflow store at the repository root: every run, experiment and model version.
ui: venv
	$(IN_VENV) $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --port $(or $(PORT),5000)

# A team's MLflow tracking server (README, "Scaling out"). Settings from the environment,
# e.g. export MLFLOW_BACKEND_STORE_URI=postgresql://... (a password on make's command line
# shows in `ps` while the server runs), then make tracking-server MLFLOW_SERVER_HOST=0.0.0.0
# MLFLOW_ARTIFACTS_DESTINATION=s3://...; MLFLOW_AUTH_ADMIN_PASSWORD on the first start;
# ARGS='...' for any other option.
tracking-server: venv
	$(IN_VENV) $(BIN)/python -m pipeline.server $(ARGS)

# Training throughput: bare Keras vs this pipeline vs the tutorial's recipe (BENCHMARKS.md).
bench: venv
	$(IN_VENV) $(BIN)/python -m benchmarks.throughput $(ARGS)

lint: venv
	$(BIN)/ruff check pipeline tests benchmarks
	$(BIN)/ruff format --check pipeline tests benchmarks

clean-venv:
	rm -rf $(VENV)
