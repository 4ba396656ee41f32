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

# The peers' environment (DeepSpeed, CPU, no compiled ops) that the interop tests run real
# DeepSpeed in: DeepSpeed resumes our resharded checkpoints, its loss-scale rule. Never a
# runtime dependency; built by `make test` so CI proves the interop on every landing.
PEERS       := .venv-peers
PEERS_PY    := $(PEERS)/bin/python
PEERS_STAMP := $(PEERS)/.peers-installed
DEEPSPEED   := deepspeed==0.19.8

export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_NO_INPUT := 1

.PHONY: all demo test fixtures clean venv peers

all: test

venv: $(STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VPY)
	$(VPY) -m pip install $(TORCH)
	$(VPY) -m pip install -e '.[test]'
	touch $@

peers: $(PEERS_STAMP)

$(PEERS_STAMP): Makefile
	test -x $(PEERS_PY) || $(PYTHON) -m venv $(PEERS)
	$(PEERS_PY) -m pip install $(TORCH)
	$(PEERS_PY) -m pip install numpy safetensors psutil wheel ninja packaging huggingface_hub
	DS_BUILD_OPS=0 $(PEERS_PY) -m pip install $(DEEPSPEED) --no-build-isolation
	touch $@

demo: $(STAMP)
	$(VPY) scripts/demo.py

test: $(STAMP) $(PEERS_STAMP)
	$(VPY) -m pytest -q -p no:cacheprovider

# Rewrite the committed golden checkpoint fixtures/dp8 (after an intended format change).
fixtures: $(STAMP)
	$(VPY) fixtures/make_fixtures.py

clean:
	rm -rf demo-out
