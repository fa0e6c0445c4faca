#!/usr/bin/env bash
# Run a distmlip command on N ranks of this machine with the project's own mpirun.
#
#   launch/mpirun_local.sh -n 4 distmlip train config.yaml --resume auto
#   launch/mpirun_local.sh -n 2 python my_script.py
#   launch/mpirun_local.sh -n 2 --map-by core --bind-to core -- distmlip train config.yaml
#
# - mpirun: $VIRTUAL_ENV/bin, then <repo>/.venv/bin, then PATH (DISTMLIP_MPIRUN overrides).
# - N: -n/-np, else $DISTMLIP_NP, else the number of cores.  Further mpirun options go before a
#   "--"; everything after the rank count (or after "--") is the command, passed through as is.
# - "distmlip ..." and "python ..." run with the venv's python (python -m distmlip ...).
# - OMP_NUM_THREADS = cores / ranks (at least 1) unless already set: ranks x threads should not
#   exceed the cores, or the ranks slow each other down.
# - Open MPI: --oversubscribe when ranks > cores, --allow-run-as-root when run by root (containers),
#   and --bind-to none (the default binding to one core would pile every OpenMP thread of a rank
#   on that core); pass your own --bind-to/--map-by before "--" to change it.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

venv_bin=""
for d in "${VIRTUAL_ENV:-}" "$repo/.venv"; do
    if [[ -n "$d" && -x "$d/bin/python" ]]; then venv_bin="$d/bin"; break; fi
done
python="${venv_bin:+$venv_bin/}python"
[[ -x "$python" ]] || python="$(command -v python3)"
mpirun="${DISTMLIP_MPIRUN:-}"
if [[ -z "$mpirun" ]]; then
    if [[ -n "$venv_bin" && -x "$venv_bin/mpirun" ]]; then mpirun="$venv_bin/mpirun"
    else mpirun="$(command -v mpirun || command -v mpiexec || true)"; fi
fi
[[ -n "$mpirun" ]] || { echo "mpirun_local.sh: no mpirun found (install openmpi or set DISTMLIP_MPIRUN)" >&2; exit 2; }

np="${DISTMLIP_NP:-}"
mpi_opts=()
cmd=()
if printf '%s\n' "$@" | grep -qx -- '--'; then
    while [[ $# -gt 0 && "$1" != "--" ]]; do
        case "$1" in
            -n|-np|--np|-c) np="$2"; shift 2 ;;
            *) mpi_opts+=("$1"); shift ;;
        esac
    done
    shift  # the "--"
    cmd=("$@")
else
    if [[ $# -ge 2 && ( "$1" == "-n" || "$1" == "-np" || "$1" == "--np" ) ]]; then np="$2"; shift 2; fi
    cmd=("$@")
fi
[[ ${#cmd[@]} -gt 0 ]] || { sed -n '2,8p' "${BASH_SOURCE[0]}" >&2; exit 2; }

cores="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN || echo 1)"
np="${np:-$cores}"
[[ "$np" =~ ^[0-9]+$ && "$np" -ge 1 ]] || { echo "mpirun_local.sh: bad rank count '$np'" >&2; exit 2; }
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    threads=$(( cores / np )); (( threads >= 1 )) || threads=1
    export OMP_NUM_THREADS="$threads"
fi
export MKL_NUM_THREADS="${MKL_NUM_THREADS:-$OMP_NUM_THREADS}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

case "${cmd[0]}" in
    distmlip) cmd=("$python" -m distmlip "${cmd[@]:1}") ;;
    python|python3) cmd=("$python" "${cmd[@]:1}") ;;
    *.py) cmd=("$python" "${cmd[@]}") ;;
esac

extra=()
if "$mpirun" --version 2>/dev/null | grep -qi "open mpi"; then
    (( np > cores )) && extra+=(--oversubscribe)
    [[ "$(id -u)" == 0 ]] && extra+=(--allow-run-as-root)
    printf '%s\n' "${mpi_opts[@]+"${mpi_opts[@]}"}" | grep -q -- '--bind-to' || extra+=(--bind-to none)
    for v in OMP_NUM_THREADS MKL_NUM_THREADS PYTHONPATH; do extra+=(-x "$v"); done
    for v in $(compgen -e | grep -E '^(DISTMLIP_|HDF5_|CUDA_|NCCL_|GLOO_)' || true); do extra+=(-x "$v"); done
fi

echo "mpirun_local.sh: $np rank(s) x OMP_NUM_THREADS=$OMP_NUM_THREADS on $cores core(s)" >&2
exec "$mpirun" -n "$np" "${extra[@]}" "${mpi_opts[@]+"${mpi_opts[@]}"}" "${cmd[@]}"
