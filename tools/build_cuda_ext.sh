#!/usr/bin/env bash
# Build distmlip._C WITH its CUDA kernels (csrc/*.cu through nvcc, plus the torch glue) against the
# torch of PYTHON, into BUILD_DIR: the extension lands in BUILD_DIR/lib/distmlip/, the objects in
# BUILD_DIR/temp.  The source tree's distmlip/_C*.so (the build the checkout's own venv imports) is
# never touched.  Incremental: ninja recompiles only what changed (headers included).
#
# usage: tools/build_cuda_ext.sh PYTHON BUILD_DIR
#
# Environment:
#   CUDA_HOME              the CUDA toolkit (default: $CUDA_HOME, else /usr/local/cuda, else the
#                          folder above the bin/ holding nvcc); must hold include/cuda_runtime_api.h
#   TORCH_CUDA_ARCH_LIST   GPU architectures, e.g. "9.0" (H100/H200) or "8.0;9.0"; where unset,
#                          torch compiles for the visible GPUs, or for every architecture it knows
#                          when none is visible (slow: set it on a login node)
#   MAX_JOBS               parallel compile jobs (default: the number of cores)
# Used by `make cuda-build-check` and benchmarks/gpu_check.sh.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 PYTHON BUILD_DIR" >&2
    exit 2
fi
PY=$1
BUILD=$2
cd "$(dirname "$0")/.."
case "$BUILD" in /*) ;; *) BUILD="$PWD/$BUILD" ;; esac

has_headers() { [ -n "$1" ] && [ -f "$1/include/cuda_runtime_api.h" ]; }

if [ -z "${CUDA_HOME:-}" ]; then
    if has_headers /usr/local/cuda; then
        CUDA_HOME=/usr/local/cuda
    elif command -v nvcc >/dev/null 2>&1 && has_headers "$(dirname "$(dirname "$(command -v nvcc)")")"; then
        CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
    fi
fi
if ! has_headers "${CUDA_HOME:-}"; then
    echo "build_cuda_ext: no CUDA toolkit with headers found (CUDA_HOME='${CUDA_HOME:-}'): set CUDA_HOME" >&2
    exit 1
fi
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"     # the nvcc of that toolkit
# nproc alone honours OMP_NUM_THREADS (gpu_check.sh sets it to 1): count the cores themselves
export MAX_JOBS=${MAX_JOBS:-$(nproc --all 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}
export DISTMLIP_REQUIRE_CUDA=1         # setup.py: a C++-only build is an error here
unset DISTMLIP_NO_CUDA

"$PY" - <<'EOF'
import torch
if torch.version.cuda is None:
    raise SystemExit(f"build_cuda_ext: torch {torch.__version__} of {torch.__file__} has no CUDA; "
                     "install a CUDA build of torch in that Python first (make cuda-build-check does)")
EOF

echo "build_cuda_ext: CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -1))," \
     "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<torch default>}, MAX_JOBS=$MAX_JOBS, into $BUILD"
mkdir -p "$BUILD/lib" "$BUILD/temp"
t0=$(date +%s)
# --force: setuptools would skip the build when no .cpp/.cu is newer than the .so (it does not see
# the headers); ninja then rebuilds only what is out of date
"$PY" setup.py -q build_ext --force --build-lib "$BUILD/lib" --build-temp "$BUILD/temp"
so=$(ls "$BUILD"/lib/distmlip/_C*.so)
echo "build_cuda_ext: built $so in $(( $(date +%s) - t0 )) s"
