"""Print a comparison table of several `distmlip evaluate` outputs: name=DIR ..."""
import json
import sys
from pathlib import Path

rows = []
for arg in sys.argv[1:]:
    name, d = arg.split("=", 1)
    m = json.loads((Path(d) / "metrics.json").read_text())
    o = m.get("metrics", m).get("overall", m)
    rows.append((name, o))
cols = [("E_mae_meV_atom", "E MAE meV/atom"), ("E_rmse_meV_atom", "E RMSE meV/atom"),
        ("F_mae", "F MAE eV/A"), ("F_magnitude_mae", "|F| MAE eV/A"), ("F_direction_deg", "F angle deg")]
w = max(len(r[0]) for r in rows) + 2
print("method".ljust(w) + "".join(c[1].rjust(17) for c in cols))
for name, o in rows:
    print(name.ljust(w) + "".join((f"{o[k]:17.4f}" if k in o else "-".rjust(17)) for k, _ in cols))
