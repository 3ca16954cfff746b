# Two commands on a fresh machine: `make serve` and `make test`. Each creates .venv if missing.
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
