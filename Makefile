# distmlip: `make demo` runs the main job end to end, `make test` runs the test suite.
# Both create .venv on first use and install the pinned dependencies and the package
# (with its compiled extension) into it.  `make cuda-build-check` builds the extension with its
# CUDA kernels in a separate venv (.venv-cuda, PyPI's CUDA torch) and build folder (.build-cuda),
# no GPU needed; `make gpu-check` runs benchmarks/gpu_check.sh (skips without a GPU).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.distmlip-installed
NP     ?= 2
PYTEST_ARGS ?=

.PHONY: all venv install test test-fast demo bench clean cuda-venv cuda-build-check gpu-check clean-cuda

all: test

$(STAMP): requirements.txt setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-build-isolation -e .
	# an editable install leaves the sources uncompiled; where PYTHONDONTWRITEBYTECODE is set (many
	# containers) every process would compile them again (0.07-0.1 s of a 2.4 s training run)
	$(BIN)/python -m compileall -q distmlip
	@touch $(STAMP)

venv install: $(STAMP)

# Unit tests and MPI tests (the MPI tests start real `mpirun -n 2` jobs).
test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -ra tests $(PYTEST_ARGS)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" NP=$(NP) bash examples/demo/run_demo.sh

bench: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/io.py --size-gb 1.1

# ---------------------------------------------------------------------------- CUDA build check
# torch===2.13.0 (PEP 440 arbitrary equality) takes PyPI's 2.13.0 wheel, the CUDA 13.0 build
# (2.13.0+cu130 with its nvidia-* libraries, about 4.7 GB), and never a local 2.13.0+cpu file that
# `torch==2.13.0` would prefer; download.pytorch.org/whl/cu130 gives the same wheel where reachable:
#   make cuda-build-check CUDA_TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130'
CUDA_VENV   := .venv-cuda
CUDA_BIN    := $(CUDA_VENV)/bin
CUDA_BUILD  := .build-cuda
CUDA_STAMP  := $(CUDA_VENV)/.distmlip-cuda-installed
CUDA_TORCH  ?= torch===2.13.0
# GPU architecture(s) to compile for: 9.0 = Hopper (H100/H200); "8.0;9.0" adds the A100
CUDA_ARCH   ?= 9.0

$(CUDA_STAMP):
	@test -x $(CUDA_BIN)/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_BIN)/python -m pip install -q --upgrade pip
	$(CUDA_BIN)/python -m pip install -q $(CUDA_TORCH) numpy setuptools wheel ninja
	$(CUDA_BIN)/python -c "import torch, sys; print('CUDA venv: torch', torch.__version__, 'CUDA', torch.version.cuda); sys.exit(torch.version.cuda is None)"
	@touch $(CUDA_STAMP)

cuda-venv: $(CUDA_STAMP)

# Builds csrc/ with nvcc and the torch glue into $(CUDA_BUILD)/lib (the checkout's CPU build in
# distmlip/ stays), loads it (no GPU needed) and checks that every operator with a CPU kernel has
# a CUDA kernel or is declared CPU-only in distmlip/_ext.py CPU_ONLY_OPS.
cuda-build-check: $(CUDA_STAMP)
	TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-$(CUDA_ARCH)}" bash tools/build_cuda_ext.sh $(CUDA_BIN)/python $(CUDA_BUILD)
	$(CUDA_BIN)/python tools/cuda_build_check.py $(CUDA_BUILD)/lib

# On a machine with a GPU: CUDA tests against the CPU, throughput (benchmarks/gpu_check.sh; it
# installs nothing: PYTHON must have a CUDA torch and the test dependencies).
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build *.egg-info distmlip/_C*.so demo_output $(CUDA_BUILD)

clean-cuda:
	rm -rf $(CUDA_VENV) $(CUDA_BUILD)
