# The two commands of the README: `make demo` and `make test`.
# Each creates .venv and installs what it needs the first time.
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of torch 2.13.0 (on this project's machines it comes from local disk).
# For a GPU server: make TORCH='torch==2.13.0 --index-url <your CUDA wheel index>' demo
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: demo test install clean gpu-check gpu-bundle test-oldest

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test,cluster,qlora]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/menos-demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -n 2 --dist loadfile

# The oldest transformers that setup.cfg admits (menos/versions.py), beside the same torch:
# the tests that touch transformers' internals, so that a break shows here, not on a lent GPU.
OLDEST := .venv-oldest
$(OLDEST)/.installed: setup.cfg pyproject.toml menos/versions.py
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install --quiet $(TORCH)
	$(OLDEST)/bin/pip install --quiet -e ".[test,qlora]" "transformers==$$($(PYTHON) -c 'exec(open("menos/versions.py").read()); print(OLDEST_TRANSFORMERS)')"
	touch $@

test-oldest: $(OLDEST)/.installed
	$(OLDEST)/bin/python -m pytest -p no:cacheprovider $$($(OLDEST)/bin/python -c 'from tools.gpu_check import TESTS; print(*TESTS)')

# On a GPU machine (install a CUDA build of torch with TORCH=...): the CUDA path in one report.
gpu-check: $(VENV)/.installed
	$(BIN)/python -m tools.gpu_check

# For a lent GPU machine with no registry (README, "On a GPU machine without network"):
# the wheels its image lacks, for CPython 3.12 on manylinux x86-64, into .gpu-wheels/.
# The image has torch, transformers, peft, numpy, psutil, safetensors, prometheus-client,
# nvidia-ml-py, matplotlib and pytest; setuptools and wheel build the project there.
GPU_WHEELS   ?= .gpu-wheels
# bitsandbytes (40 MB, its CUDA kernels included) and accelerate: the QLoRA tests (menos[qlora]).
GPU_PACKAGES ?= pyzmq msgspec pytest-timeout setproctitle setuptools wheel "bitsandbytes>=0.50,<0.51" accelerate
gpu-bundle:
	rm -rf $(GPU_WHEELS)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --dest $(GPU_WHEELS) \
	  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 --platform any $(GPU_PACKAGES)
	@du -sh $(GPU_WHEELS); ls $(GPU_WHEELS)

clean:
	rm -rf $(VENV) $(OLDEST) $(GPU_WHEELS) .gpu-site *.egg-info
