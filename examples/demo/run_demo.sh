#!/usr/bin/env bash
# distmlip main job, end to end on generated EMT data, with `mpirun -n $NP` at every parallel stage:
#   generate -> convert -> info -> augment (GPR) -> train (energy on augmented data; direct force;
#   energy-only baseline) -> evaluate on held-out structures -> comparison table + parity plots.
# Usage: bash examples/demo/run_demo.sh [OUTDIR]      (NP=2 by default; `make demo` runs this)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${1:-${DEMO_OUT:-demo_output}}"
NP="${NP:-2}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
MPIRUN=(mpirun -n "$NP" --oversubscribe)
[ "$(id -u)" = 0 ] && MPIRUN+=(--allow-run-as-root)
MPIRUN+=(-x OMP_NUM_THREADS)
DM=(distmlip)

mkdir -p "$OUT"
cd "$OUT"
t0=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - t0 )) s] $*"; }

stage "1/7 generate EMT data: rattled bulk Cu, Cu-Au alloy, Cu(100) slab, slab with Au adatoms, Cu-Au cluster"
python "$HERE/make_emt_data.py" raw/train --n-per-subset "${N_TRAIN:-24}" --seed 1
python "$HERE/make_emt_data.py" raw/test --n-per-subset "${N_TEST:-12}" --seed 2

stage "2/7 convert (mpirun -n $NP)"
"${MPIRUN[@]}" "${DM[@]}" convert raw/train -o train.h5
"${MPIRUN[@]}" "${DM[@]}" convert raw/test -o test.h5

stage "3/7 info"
"${DM[@]}" info train.h5

stage "4/7 augment: local GPR per subset on energies and forces, M copies per structure (mpirun -n $NP)"
cp "$HERE/augment.yaml" augment.yaml
"${MPIRUN[@]}" "${DM[@]}" augment augment.yaml

stage "5/7 train (mpirun -n $NP): GPR-ANN (energy on augmented data), direct force training (AdamW and L-BFGS), energy-only, hybrid, GPR-ANN with the paper's plain energy loss"
cp "$HERE"/train_*.yaml .
"${MPIRUN[@]}" "${DM[@]}" train train_gpr_ann.yaml
"${MPIRUN[@]}" "${DM[@]}" train train_force.yaml
"${MPIRUN[@]}" "${DM[@]}" train train_force_lbfgs.yaml
"${MPIRUN[@]}" "${DM[@]}" train train_energy.yaml
"${MPIRUN[@]}" "${DM[@]}" train train_hybrid.yaml
"${MPIRUN[@]}" "${DM[@]}" train train_gpr_ann_paper.yaml

stage "6/7 evaluate on the held-out test set"
for m in energy gpr_ann force force_lbfgs hybrid gpr_ann_paper; do
  "${DM[@]}" evaluate "run_$m/model.pt" test.h5 -o "eval_$m" > "eval_$m.log"
done

stage "7/7 comparison"
python "$HERE/compare.py" energy=eval_energy,run_energy gpr_ann=eval_gpr_ann,run_gpr_ann force=eval_force,run_force \
  force_lbfgs=eval_force_lbfgs,run_force_lbfgs hybrid=eval_hybrid,run_hybrid gpr_ann_paper=eval_gpr_ann_paper,run_gpr_ann_paper | tee comparison.txt
echo
echo "demo finished in $(( $(date +%s) - t0 )) s; outputs in $(pwd):"
echo "  train.h5 test.h5 train_aug.h5 (data sets), train_aug.report.txt (GPR report),"
echo "  run_*/ (models, logs, checkpoints), eval_*/ (metrics.json, structures.csv, parity_*.png), comparison.txt"
