# Everyday targets. `make demo` and `make test` work on a fresh machine: they create .venv,
# install torch 2.14.1 (a CUDA 13.0 build that brings Triton) and the project, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.14.1
# Compile the CUDA kernels whenever nvcc exists, GPU or not (so a CUDA compile error fails CI).
ifneq ($(shell command -v nvcc 2>/dev/null),)
export FORCE_CUDA ?= 1
endif
export MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' 2>/dev/null)

.PHONY: demo test test-fast test-gpu-versions build bench lint format clean help

help:
	@echo "make demo   - set up .venv, build, restore the bundled samples"
	@echo "make test   - set up .venv, build, run the test suite"
	@echo "make build  - (re)build moce_kernels._C incrementally"
	@echo "make bench  - op and model benchmarks on this machine's providers"
	@echo "make lint   - ruff check + format check"
	@echo "make test-gpu-versions - the tests under the GPU machines' torch and Triton (CPU)"

# Third-party dependencies, once per change of pyproject.toml.
$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "torch==$(TORCH_VERSION)" setuptools wheel ninja pybind11
	$(PIP) install --quiet numpy pillow scikit-image scipy safetensors tqdm matplotlib \
		pytest hypothesis expecttest ruff
	touch $@

# The project itself (editable) with its compiled module.
$(VENV)/.installed: $(VENV)/.deps setup.py $(CSRC)
	$(PIP) install --quiet --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.installed

demo: build
	$(PY) -m moceir demo

test: build
	$(PY) -m pytest -q

test-fast: build
	$(PY) -m pytest -q -x -m "not slow"

bench: build
	$(PY) -m benchmarks.run --output benchmarks/results

# The GPU machines' torch and Triton, on this machine's CPU: before a GPU run, catch what those
# versions break (Triton's interpreter, Dynamo, the C++17 build) without spending device time.
# A second environment and a copy of the tree (its own build of moce_kernels._C).
GPU_TORCH_VERSION ?= 2.11.0
GPU_TRITON_VERSION ?= 3.6.0
GPU_VENV ?= .venv-gpu-versions
GPU_TREE ?= build/gpu-versions
GPU_PY := $(abspath $(GPU_VENV))/bin/python
PYTEST_ARGS ?=

# numpy < 2.4: Triton 3.6's interpreter takes int() of 1-element arrays, an error from numpy 2.4.
$(GPU_VENV)/.deps: pyproject.toml
	test -x $(GPU_PY) || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_PY) -m pip install --quiet --upgrade pip
	$(GPU_PY) -m pip install --quiet "torch==$(GPU_TORCH_VERSION)" "triton==$(GPU_TRITON_VERSION)" \
		"numpy<2.4" setuptools wheel ninja pybind11 pillow scikit-image scipy safetensors tqdm \
		matplotlib pytest hypothesis expecttest
	touch $@

test-gpu-versions: $(GPU_VENV)/.deps
	rm -rf $(GPU_TREE) && mkdir -p $(GPU_TREE)
	git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C $(GPU_TREE)
	cd $(GPU_TREE) && $(GPU_PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	cd $(GPU_TREE) && $(GPU_PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: $(VENV)/.deps
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.deps
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf build *.egg-info moce_kernels/_C*.so $(VENV)/.installed
