# Two commands on a fresh machine: `make serve` and `make test`. Each creates .venv if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint proto bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall when the project's metadata or native sources change.
$(STAMP): $(BIN)/python pyproject.toml setup.py $(wildcard kernel/backends/native/*.c kernel/backends/native/*.h)
	$(BIN)/python -m pip install -q -e '.[server,dev,transformers]'
	touch $(STAMP)

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
	rm -rf $(VENV) build *.egg-info
