# One-command set-up for vlmkern: `make test` and `make bench` create .venv, install torch and the
# build deps, build the extension (CUDA kernels too when nvcc and a CUDA torch are present), then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(abspath $(VENV))/bin/python
TORCH_SPEC ?= torch==2.14.1
DEPS := numpy pytest hypothesis transformers==5.23.0 cmake ninja pybind11 setuptools wheel ruff
BUILD_LOG := build/build.log
PYTEST_ARGS ?=

.PHONY: venv build build-cpu test test-fast bench info gpu-check lint clean

venv: $(VENV)/.stamp
$(VENV)/.stamp: Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(DEPS)
	$(PY) -m pip install -q --no-deps nvidia-cutlass
	@touch $@

# Editable install: python/vlmkern/_C*.so is built in place; CMake state lives in build/cmake-*.
build: venv
	@mkdir -p build
	@echo "== build (log: $(BUILD_LOG))"; start=$$(date +%s); \
	VLMKERN_PTXAS_VERBOSE=1 $(PY) -m pip install --no-build-isolation --no-deps -v -e . \
	  > $(BUILD_LOG) 2>&1 || { tail -n 80 $(BUILD_LOG); exit 1; }; \
	grep -E "^ *vlmkern build:" $(BUILD_LOG) || true; \
	echo "== ptxas resource report (our kernels)"; $(PY) tools/ptxas_report.py $(BUILD_LOG); \
	echo "== build took $$(( $$(date +%s) - start )) s"
	@$(PY) -m vlmkern info

build-cpu:
	$(MAKE) build VLMKERN_CUDA=0

test: build
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

bench: build
	$(PY) -m vlmkern.bench all

info:
	@$(PY) -m vlmkern info

gpu-check:
	bash bench/gpu_check.sh

lint:
	$(PY) -m ruff check python tests bench

clean:
	rm -rf build python/vlmkern/_C*.so *.egg-info python/*.egg-info
