# distmlip: `make demo` runs the main job end to end, `make test` runs the test suite.
# Both create .venv on first use and install the pinned dependencies and the package
# (with its compiled extension) into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.distmlip-installed
NP     ?= 2
PYTEST_ARGS ?=

.PHONY: all venv install test test-fast demo bench clean

all: test

$(STAMP): requirements.txt setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-build-isolation -e .
	@touch $(STAMP)

venv install: $(STAMP)

# Unit tests and MPI tests (the MPI tests start real `mpirun -n 2` jobs).
test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -ra tests $(PYTEST_ARGS)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" NP=$(NP) bash examples/demo/run_demo.sh

bench: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/io.py --size-gb 1.1

clean:
	rm -rf build *.egg-info distmlip/_C*.so demo_output
