# Set-up and entry points. On a fresh machine: `make demo`, `make test`.
#
# The virtualenv is created on first use and re-synced whenever pyproject.toml changes
# (the stamp file records the last install). torch is pinned and installed FIRST: the CPU
# wheel is available locally, and a looser spec would pull a multi-GB CUDA build.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.zero-ckpt-installed
TORCH  := torch==2.13.0

export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_NO_INPUT := 1

.PHONY: all demo test fixtures clean venv

all: test

venv: $(STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VPY)
	$(VPY) -m pip install $(TORCH)
	$(VPY) -m pip install -e '.[test]'
	touch $@

demo: $(STAMP)
	$(VPY) scripts/demo.py

test: $(STAMP)
	$(VPY) -m pytest -q -p no:cacheprovider

# Rewrite the committed golden checkpoint fixtures/dp8 (after an intended format change).
fixtures: $(STAMP)
	$(VPY) fixtures/make_fixtures.py

clean:
	rm -rf demo-out
