"""Print a comparison table of several `distmlip evaluate` outputs: name=EVAL_DIR[,RUN_DIR] ...

With RUN_DIR (the training's output folder) the table also gives the optimizer steps and the
summed epoch time of the training (its log.csv), so that the rows are read with their budgets:
the demo trains each method for its own number of epochs, not for equal time."""
import csv
import json
import sys
from pathlib import Path

rows = []
for arg in sys.argv[1:]:
    name, dirs = arg.split("=", 1)
    d, _, run = dirs.partition(",")
    m = json.loads((Path(d) / "metrics.json").read_text())
    o = dict(m.get("metrics", m).get("overall", m))
    log = Path(run) / "log.csv" if run else None
    if log is not None and log.is_file():
        lines = list(csv.DictReader(log.open()))
        if lines:
            o["steps"] = float(lines[-1]["steps"])
            o["train_s"] = sum(float(r["time_s"]) for r in lines)
    rows.append((name, o))
cols = [("E_mae_meV_atom", "E MAE meV/atom", "17.4f"), ("E_rmse_meV_atom", "E RMSE meV/atom", "17.4f"),
        ("F_mae", "F MAE eV/A", "17.4f"), ("F_magnitude_mae", "|F| MAE eV/A", "17.4f"),
        ("F_direction_deg", "F angle deg", "17.4f"), ("steps", "steps", "10.0f"), ("train_s", "train s", "10.1f")]
if not any("steps" in o for _, o in rows):
    cols = cols[:5]
w = max(len(r[0]) for r in rows) + 2
print("method".ljust(w) + "".join(c[1].rjust(int(c[2].split(".")[0])) for c in cols))
for name, o in rows:
    print(name.ljust(w) + "".join((format(o[k], f) if k in o else "-".rjust(int(f.split(".")[0]))) for k, _, f in cols))
if any("steps" in o for _, o in rows):
    print("(steps, train s: optimizer steps and summed epoch time of each training; the methods are trained "
          "for their own epochs, not equal time: the equal-budget comparison is benchmarks/gpr_ann.py demo)")
