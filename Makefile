# Quick start: `make demo` (the main job on embedded synthetic data) and `make test`.
# Both build .venv from nothing; the stamp file re-installs only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install system-deps test test-slow screenshot demo nuaa clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# constraints.txt pins the CPU build of torch (torch==2.13.0): the package declares a range, and
	# an unconstrained install would resolve a multi-GB CUDA build.
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The web page's test drives Debian's chromium through Playwright (Playwright's own browser download
# is never used). Installed when missing; needs root (CI runs as root).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

test: $(STAMP)
	$(BIN)/python -m pytest -q

screenshot: $(STAMP)  # docs/screenshot.png, from the page's test in headless Chromium
	PTANET_SCREENSHOT=docs/screenshot.png $(BIN)/python -m pytest -q tests/test_page.py

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

demo: $(STAMP)
	$(BIN)/ptanet demo --out runs/demo

nuaa: $(STAMP)
	$(BIN)/ptanet nuaa --out runs/nuaa

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
