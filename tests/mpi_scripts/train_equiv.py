"""Worker for tests/test_mpi_training.py: 20 synchronous steps of the real Trainer on the SAME
global batches, whatever the number of ranks (each global batch is split over the ranks by atoms).

usage: python train_equiv.py DATA.h5 WORKDIR MODE [MODE...]     (MODE: energy | force | difference)

``difference``: energy mode with the copy-difference term on a GPR-augmented DATA.h5; the global
batches are unions of whole groups (a reference and its copies), split over the ranks by groups
writes WORKDIR/<MODE>_w<world>.pt (rank 0): the model's state dict after the steps
(and <MODE>_w<world>_init.pt before them)
"""
import sys
from pathlib import Path

import numpy as np
import torch

from distmlip.distributed import balanced_partition, init_distributed, run_guarded, shutdown
from distmlip.training.config import load_train_config
from distmlip.training.trainer import Trainer

N_STEPS = 20


def global_batches(train_idx, seed=7):
    """20 global batches of 1..7 structures (a 1-structure batch leaves one rank empty)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(N_STEPS):
        k = 1 if s == 3 else int(rng.integers(2, 8))
        out.append(np.sort(rng.choice(train_idx, size=k, replace=False)))
    return out


def group_batches(tr):
    """20 global batches of 1..3 whole groups (reference + copies) of the training split."""
    parent, _ = tr._diff[id(tr.ds)]
    key = np.where(parent >= 0, parent, np.arange(len(parent)))
    groups = {}
    for i in np.sort(tr.train_idx):
        groups.setdefault(int(key[i]), []).append(int(i))
    glist = [np.array(v) for _, v in sorted(groups.items())]
    rng = np.random.default_rng(11)
    return [[glist[k] for k in rng.choice(len(glist), size=int(rng.integers(1, 4)), replace=False)]
            for _ in range(N_STEPS)]


def run_mode(ctx, h5, work, mode):
    out = Path(work) / f"run_{mode}_w{ctx.world_size}"
    yaml = Path(work) / f"cfg_{mode}_w{ctx.world_size}_r{ctx.rank}.yaml"
    yaml.write_text(f"""
data: {{train: [{h5}], fractions: [0.8, 0.2, 0.0], prefetch: false}}
descriptor: {{rc_radial: 4.0, n_radial: 4, rc_angular: 3.0, n_angular: 2, backend: reference}}
model: {{hidden: [6, 6]}}
training: {{mode: {"energy" if mode == "difference" else mode}, alpha: 0.3, difference_weight: 0.3, epochs: 1, batch_atoms: 16, lr: 0.05, optimizer: sgd,
           output: {out}, progress_bar: 'off', seed: 3}}
""")
    cfg = load_train_config(yaml)
    tr = Trainer(cfg, ctx, quiet=True)
    if ctx.rank == 0:
        torch.save({k: v.detach().cpu().clone() for k, v in tr.model.state_dict().items()},
                   Path(work) / f"{mode}_w{ctx.world_size}_init.pt")
    acc = torch.zeros(16, dtype=torch.float64)
    if mode == "difference":
        assert tr._gamma == 0.3
        for gs in group_batches(tr):
            parts = balanced_partition(np.array([int(tr.ds.natoms[g].sum()) for g in gs]), ctx.world_size)
            mine = np.sort(np.concatenate([gs[k] for k in parts[ctx.rank]])) if len(parts[ctx.rank]) else []
            gb = np.sort(np.concatenate(gs))
            tr.train_step(tr.ds.read(list(mine)) if len(mine) else [], acc, counts=tr.counts_of(gb))
        if ctx.rank == 0:
            torch.save({k: v.detach().cpu().clone() for k, v in tr.model.state_dict().items()},
                       Path(work) / f"{mode}_w{ctx.world_size}.pt")
        return
    for gb in global_batches(tr.train_idx):
        parts = balanced_partition(tr.ds.natoms[gb], ctx.world_size)
        mine = gb[parts[ctx.rank]]
        structures = tr.ds.read(mine.tolist()) if len(mine) else []
        tr.train_step(structures, acc, counts=tr.counts_of(gb))
    if ctx.rank == 0:
        state = {k: v.detach().cpu().clone() for k, v in tr.model.state_dict().items()}
        torch.save(state, Path(work) / f"{mode}_w{ctx.world_size}.pt")


def main():
    h5, work, modes = sys.argv[1], sys.argv[2], sys.argv[3:]
    ctx = init_distributed("cpu")
    for mode in modes:
        run_mode(ctx, h5, work, mode)
    ctx.barrier()
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
