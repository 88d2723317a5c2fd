# Two commands set everything up on a fresh machine: `make sweep` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install install-ray train sweep test test-all bench gpu-check wheels tensorboard lint clean

EXTRAS := dev,launchers,optuna
PIP_INSTALL = $(PY) -m pip install --quiet --disable-pip-version-check

# .installed-ray: the `ray` extra (Hydra's Ray launcher) too, in the same pip call as the others
# where nothing is installed yet (one resolution: 8 s less than two on the 2-core machine)
$(VENV)/.installed-ray: EXTRAS := $(EXTRAS),ray
$(VENV)/.installed $(VENV)/.installed-ray: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP_INSTALL) -e '.[$(EXTRAS)]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed

install-ray: $(VENV)/.installed-ray  ## then: python -m cxr.train -m hydra/launcher=ray_local (or ray_cluster) ...

train: install  ## one run: make train ARGS="model.dense=16"
	$(PY) -m cxr.train $(ARGS)

sweep: install  ## the seed's seven variants: make sweep ARGS="data=chest_xray data.root=..."
	$(PY) -m cxr.train -m 'experiment=glob(resultset*)' $(ARGS)

# one worker per core (pytest-xdist); a test file stays on one worker, so its fixtures run once
XDIST ?= -n auto --dist loadfile

test: install  ## the fast suite: under 4 minutes on 2 cores
	$(PY) -m pytest -q -m "not slow" $(XDIST) $(PYTEST_ARGS)

test-all: install  ## everything, the slow end-to-end checks too (CI runs this)
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

bench: install  ## every suite into outputs/bench/<suite>.json: make bench ARGS="--quick" (docs/benchmark.md)
	$(PY) -m cxr.bench all $(ARGS)

# The GPU check (docs/gpu-check.md): outputs/bench/gpu.json. No `install`: a GPU host often has
# torch but no network, so it runs on the host's own Python (this venv's where there is one, else
# python3; or PY=...) with the Hydra wheels of `make wheels` carried in .whl/, unpacked into
# .whl/site (pure-Python wheels: unzipping is installing them, no pip or network needed)
GPU_PY = $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:  ## make gpu-check [PY=python3] [ARGS="--budget-s 480"]
	@for wheel in $(wildcard .whl/*.whl); do $(GPU_PY) -m zipfile -e $$wheel .whl/site || exit 1; done
	PYTHONPATH=$(CURDIR)/.whl/site$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) -m cxr.bench gpu $(ARGS)

# Hydra as pure-Python wheels in .whl/ (git-ignored), the versions installed here, for a GPU
# machine that has torch but neither Hydra nor a network (antlr4's 4.9.3 is built from its sdist)
wheels: install
	rm -rf .whl
	$(PY) -m pip freeze | grep -iE '^(hydra-core|omegaconf|antlr4-python3-runtime|hydra-joblib-launcher)==' \
	  | xargs $(PY) -m pip wheel --quiet --disable-pip-version-check --no-deps -w .whl

tensorboard: install
	$(VENV)/bin/tensorboard --logdir outputs

lint: install
	$(VENV)/bin/ruff check cxr tests

clean:
	rm -rf outputs/runs outputs/sweeps .pytest_cache
