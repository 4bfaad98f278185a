# Quick start: `make demo` (the main job on embedded synthetic data) and `make test`.
# Both build .venv from nothing; the stamp file re-installs only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test test-slow demo nuaa clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned in pyproject.toml (==2.13.0, the CPU build); installing it first keeps pip
	# from ever resolving a CUDA build for a dependency that names torch without a version.
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

demo: $(STAMP)
	$(BIN)/ptanet demo --out runs/demo

nuaa: $(STAMP)
	$(BIN)/ptanet nuaa --out runs/nuaa

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
