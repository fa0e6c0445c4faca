"""Worker for tests/test_committee.py (run under mpirun -n 2 and in one process).

usage: python committee_runs.py DATA.h5 WORKDIR
  every world size: committee K=2 with automatic groups -> WORKDIR/w<W>_auto/committee.pt
  world size 2 also: K=2 in ONE group of 2 ranks -> WORKDIR/w2_one/ ; plain K=1 -> WORKDIR/w2_plain/
"""
import sys
from pathlib import Path

from distmlip.distributed import init_distributed, run_guarded, shutdown
from distmlip.training.committee import train_committee
from distmlip.training.config import load_train_config
from distmlip.training.trainer import Trainer


def cfg_for(h5, work, name, rank, extra=""):
    y = Path(work) / f"{name}_r{rank}.yaml"
    y.write_text(f"""
data: {{train: [{h5}], fractions: [0.75, 0.25, 0.0], prefetch: false}}
descriptor: {{rc_radial: 4.0, n_radial: 4, rc_angular: 3.0, n_angular: 2, backend: reference, cache: off}}
model: {{hidden: [6, 6]}}
training: {{epochs: 2, batch_atoms: 16, lr: 0.01, optimizer: adam, output: {Path(work) / name},
           progress_bar: 'off', seed: 5}}
{extra}
""")
    return load_train_config(y)


def main():
    h5, work = sys.argv[1], sys.argv[2]
    ctx = init_distributed("cpu")
    W = ctx.world_size
    train_committee(cfg_for(h5, work, f"w{W}_auto", ctx.rank, "committee: {K: 2}"), ctx, quiet=True)
    if W == 2:
        train_committee(cfg_for(h5, work, "w2_one", ctx.rank, "committee: {K: 2, groups: 1}"), ctx, quiet=True)
        Trainer(cfg_for(h5, work, "w2_plain", ctx.rank), ctx, quiet=True).fit()
    ctx.barrier()
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
