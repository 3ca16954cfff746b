# Two commands on a fresh machine: `make serve` and `make test`. Each creates .venv if missing.
# `make test-xla`: the device store on torch-xla's CPU runtime, in its own venv (see below).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint proto bench clean

VENV_DEPS := pyproject.toml setup.py $(wildcard kernel/backends/native/*.c kernel/backends/native/*.h)
# One environment creation at a time: `make serve` and `make test` started together on a fresh
# clone would otherwise both run pip into the same .venv (and one crash). The outer rule takes an
# exclusive flock on VENV_LOCK and runs make again inside it; that inner make decides afresh, so
# whoever waited finds the stamp up to date and installs nothing. Without flock (not Linux), unlocked.
VENV_LOCK := .venv.lock

ifeq ($(TKG_VENV_LOCKED),1)
# Reinstall when the project's metadata or native sources change.
$(STAMP): $(VENV_DEPS)
	test -x $(BIN)/python || { $(PY) -m venv $(VENV) && $(BIN)/python -m pip install -q --upgrade pip; }
	$(BIN)/python -m pip install -q -e '.[server,dev,transformers]'
	touch $(STAMP)
else
$(STAMP): $(VENV_DEPS)
	@if command -v flock >/dev/null 2>&1; then \
		flock $(VENV_LOCK) $(MAKE) --no-print-directory TKG_VENV_LOCKED=1 $(STAMP); \
	else \
		$(MAKE) --no-print-directory TKG_VENV_LOCKED=1 $(STAMP); \
	fi
endif

serve: $(STAMP)
	$(BIN)/tkg serve $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The lint gate is `ruff check` (also run by `make test`). No `ruff format --check`: tables of
# aligned arguments are kept by hand (`# fmt: skip`) and a check allowed to fail would gate nothing.
lint: $(STAMP)
	$(BIN)/ruff check .

proto: $(STAMP)
	$(BIN)/python -m tkg.protogen

bench: $(STAMP)
	$(BIN)/tkg bench kernel
	$(BIN)/tkg bench serve

clean:
	rm -rf $(VENV) $(VENV_LOCK) build *.egg-info

# `make test-xla`: the device store's residency checked on torch-xla's CPU runtime (PJRT_DEVICE=CPU,
# docs/trainium-store.md). torch-xla needs its own torch (2.9), so it gets its own venv, built once
# outside the repo (CI's fresh clone on the same machine finds it); the project's .venv keeps 2.13.
# The checkout under test is installed into it (no deps) whenever it is not the one installed last.
XLA_HOME ?= $(HOME)/.cache/tkg-xla
XLA_VENV := $(XLA_HOME)/venv
XLA_STAMP := $(XLA_VENV)/.installed
XLA_PINS := torch==2.9.0 torch-xla==2.9.0 'numpy>=1.26' 'ml-dtypes>=0.4' 'protobuf>=7.35.1,<8' 'pytest>=8' \
	'pytest-timeout>=2.3' 'hypothesis>=6.100' 'setuptools>=68' wheel

.PHONY: test-xla xla-env

$(XLA_STAMP):
	rm -rf $(XLA_VENV)
	$(PY) -m venv $(XLA_VENV)
	$(XLA_VENV)/bin/python -m pip install -q --upgrade pip
	$(XLA_VENV)/bin/python -m pip install -q $(XLA_PINS)
	touch $(XLA_STAMP)

xla-env: $(XLA_STAMP)

test-xla: $(XLA_STAMP)
	@if [ "$$(cat $(XLA_VENV)/.tkg-src 2>/dev/null)" != "$(CURDIR)" ]; then \
		$(XLA_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e . && echo "$(CURDIR)" > $(XLA_VENV)/.tkg-src; \
	fi
	PJRT_DEVICE=CPU $(XLA_VENV)/bin/python -m pytest tests/test_xla_store.py -m xla -p no:cacheprovider $(PYTEST_ARGS)
