# The two commands of the README: `make demo` and `make test`.
# Each creates .venv and installs what it needs the first time.
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of torch 2.13.0 (on this project's machines it comes from local disk).
# For a GPU server: make TORCH='torch==2.13.0 --index-url <your CUDA wheel index>' demo
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: demo test install clean gpu-check

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test,cluster]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/menos-demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest

# On a GPU machine (install a CUDA build of torch with TORCH=...): the CUDA path in one report.
gpu-check: $(VENV)/.installed
	$(BIN)/python -m tools.gpu_check

clean:
	rm -rf $(VENV) *.egg-info
