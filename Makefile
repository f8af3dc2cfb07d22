# Two commands: `make demo` and `make test`. Each creates .venv/ on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch is installed first, alone, so no later step can pull the CUDA build.
TORCH_SPEC ?= torch==2.13.0
SPIKINGJELLY_SPEC ?= spikingjelly==2.0.0
# Brevitas, to make QCDQ test files: it declares torch, so it and unfoldNd come with --no-deps, and
# its ONNX export imports onnxoptimizer
BREVITAS_SPECS ?= brevitas==0.13.4 dependencies==2.0.1 unfoldNd==0.2.3 onnxoptimizer==0.4.2

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --no-deps "$(SPIKINGJELLY_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps $(BREVITAS_SPECS)
	$(BIN)/python -c "import torch, spikingjelly.activation_based.neuron; assert torch.version.cuda is None or torch.cuda.is_available(), 'a CUDA torch on a machine without a GPU'"
	touch $@

demo: setup
	$(BIN)/ann2snn demo

test: setup
	$(BIN)/python -m pytest -n 2 -q

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
