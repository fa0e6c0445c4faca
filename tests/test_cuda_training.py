"""Training on a GPU gives the CPU's numbers: one force-training step (loss, energies, forces, the
flat weight gradient, the weights after two Adam steps) and a whole `distmlip train` run in force
mode, each on the GPU against the CPU in float64 to 1e-9; the gradient all-reduce of two ranks over
NCCL, one GPU each.  All skip without a GPU (the NCCL test without two), and the first two also
without a CUDA build of the extension; benchmarks/gpu_check.sh runs them where a GPU is."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from distmlip import _ext
from helpers import REPO, distmlip_cli

TOL = 1e-9


def _cuda_build():
    return torch.cuda.is_available() and _ext.has_kernel("chebyshev_forward", "cuda")


needs_cuda_build = pytest.mark.skipif(not _cuda_build(), reason="no GPU or extension built without CUDA")


def _close(gpu, cpu, name):
    gpu, cpu = gpu.detach().cpu(), cpu.detach().cpu()
    assert gpu.dtype == cpu.dtype == torch.float64 and gpu.shape == cpu.shape, name
    err = float((gpu - cpu).abs().max()) if cpu.numel() else 0.0
    scale = max(1.0, float(cpu.abs().max())) if cpu.numel() else 1.0
    assert err <= TOL * scale, f"{name}: GPU differs from CPU by {err:.3g} (scale {scale:.3g})"


def _batch_and_model():
    from distmlip.data.examples import rattled_cu_au
    from distmlip.descriptors.batch import collate
    from distmlip.models.bpnn import BPNN

    # rc_angular 4.0 in fcc Cu: 18 neighbours, so the CPU kernels take their moment form for
    # the forward while the CUDA kernels sum over neighbour pairs
    desc = {"rc_radial": 4.5, "n_radial": 6, "rc_angular": 4.0, "n_angular": 4}
    structures = rattled_cu_au(8, seed=3)
    torch.manual_seed(0)
    model = BPNN(["Cu", "Au"], desc, hidden=[8, 8], activation="tanh", dtype="float64")
    batch = collate(structures, model.species, model.cutoff, dtype=torch.float64)
    model.fit_normalization([batch])
    return batch, model


def _two_steps(model, batch, device):
    """The trainer's force step (Trainer.train_step on one rank) twice on ``device``: what the
    first step computed and the weights after the second."""
    from distmlip.training.flat import FlatParameters, optimizer_step
    from distmlip.training.force_step import force_loss_and_gradients
    from distmlip.training.losses import force_atom_mask, local_counts
    from distmlip.training.trainer import fused_adam_kwargs

    m = copy.deepcopy(model).to(device)
    flat = FlatParameters(m)
    opt = torch.optim.Adam(flat.tensors, lr=1e-2, **fused_adam_kwargs(flat.tensors))
    b = batch.to(device)
    counts = local_counts(b, None, True)
    mask = force_atom_mask(b, None)
    first = None
    for _ in range(2):
        fb = dataclasses.replace(b, positions=b.positions.detach().clone().requires_grad_())
        flat.zero_grad()
        loss, E, F = force_loss_and_gradients(m, flat, fb, counts, per_atom=True, alpha=0.7, mask=mask)
        flat.sync()
        if first is None:
            first = {"loss": loss, "E": E, "F": F, "grad": flat.tensors[0].grad.clone()}
        optimizer_step(opt)
    first["weights"] = flat.tensors[0].detach().clone()
    return first, m.plan()


@needs_cuda_build
def test_force_training_step_on_gpu_matches_cpu():
    batch, model = _batch_and_model()
    cpu, cpu_plan = _two_steps(model, batch, torch.device("cpu"))
    gpu, gpu_plan = _two_steps(model, batch, torch.device("cuda"))
    # the GPU runs its own plan (fused CUDA descriptor kernels, torch networks and loss) and the
    # CPU its compiled operators: two implementations of the same arithmetic
    assert gpu_plan.device == "cuda" and gpu_plan.descriptor == "fused", gpu_plan.describe()
    assert float(cpu["loss"]) > 0 and float(cpu["grad"].abs().max()) > 0
    for key in ("loss", "E", "F", "grad", "weights"):
        _close(gpu[key], cpu[key], key)


def _train(tmp_path, device):
    from distmlip.data.examples import rattled_cu_au
    from distmlip.data.h5store import write_dataset

    h5 = tmp_path / "emt.h5"
    if not h5.exists():
        write_dataset(h5, rattled_cu_au(24))
    out = tmp_path / f"run_{device}"
    cfg = tmp_path / f"{device}.yaml"
    cfg.write_text(f"""
data: {{train: [{h5}], fractions: [0.75, 0.25, 0.0]}}
descriptor: {{rc_radial: 4.5, n_radial: 6, rc_angular: 4.0, n_angular: 4, cache: off}}
model: {{hidden: [8, 8]}}
training: {{mode: force, alpha: 0.5, force_fraction: 1.0, epochs: 3, batch_atoms: 24, lr: 0.005,
           device: {device}, output: {out}, progress_bar: 'off'}}
""")
    res = distmlip_cli(["train", str(cfg)], timeout=600)
    return out, res.stdout + res.stderr


@needs_cuda_build
def test_force_training_run_on_gpu_matches_cpu(tmp_path):
    """`distmlip train` in force mode for 3 epochs (9 optimizer steps, validation, checkpoints) on
    the GPU ends with the CPU run's weights and losses."""
    out_cpu, _ = _train(tmp_path, "cpu")
    out_gpu, log_gpu = _train(tmp_path, "cuda")
    assert "(cuda)" in log_gpu and "descriptor fused" in log_gpu, log_gpu[-3000:]
    a = torch.load(out_cpu / "last_model.pt", weights_only=True)["state_dict"]
    b = torch.load(out_gpu / "last_model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        _close(b[k].to(torch.float64), a[k].to(torch.float64), k)
    rows_cpu = (out_cpu / "log.csv").read_text().splitlines()
    rows_gpu = (out_gpu / "log.csv").read_text().splitlines()
    assert len(rows_cpu) == len(rows_gpu) == 4 and rows_cpu[0] == rows_gpu[0]
    header = rows_cpu[0].split(",")
    for rc, rg in zip(rows_cpu[1:], rows_gpu[1:]):
        for name, x, y in zip(header, rc.split(","), rg.split(",")):
            if name in ("epoch", "steps", "lr"):
                assert x == y, (name, x, y)
            elif name != "time_s" and x:
                # the log's metrics are rounded for printing: equal up to the last printed digit
                digits = len(x.split(".")[1]) if "." in x else 0
                assert abs(float(x) - float(y)) <= 1.01 * 10.0 ** -digits, (name, x, y)


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.device_count() >= 2), reason="needs 2 GPUs")
def test_nccl_two_ranks_one_gpu_each():
    """Two ranks started as torchrun does, device cuda: the process group is NCCL, rank r runs on
    GPU r, float64 sums of GPU tensors are bit-identical to numpy's, and the flat gradient
    all-reduce equals the sum of every rank's own gradients."""
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    script = str(REPO / "tests" / "mpi_scripts" / "dist_check.py")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "PMIX_", "SLURM_"))}
    base.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", DISTMLIP_DIST_TIMEOUT="60", DIST_CHECK_DEVICE="cuda")
    procs = [subprocess.Popen([sys.executable, script, "device", "grads"],
                              env=dict(base, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    text = outs[0][0] + "\n" + outs[1][0]
    rows = [json.loads(line[7:]) for line in text.splitlines() if line.startswith("RESULT ")]
    dev = sorted((r for r in rows if r["kind"] == "mode_device"), key=lambda r: r["rank"])
    assert [r["rank"] for r in dev] == [0, 1], text
    for r in dev:
        assert r["backend"] == "nccl" and r["device"] == f"cuda:{r['rank']}", r
        assert r["sum_exact"], r["sum_maxdiff"]
        assert r["max"] == [2.5, -0.0]
    grads = sorted((r for r in rows if r["kind"] == "mode_grads"), key=lambda r: r["rank"])
    assert [r["rank"] for r in grads] == [0, 1], text
    for r in grads:
        assert all(d is not None and d <= 1e-12 for d in r["diffs"]), r["diffs"]
        assert r["extra_has_grad"] and r["unused_grad_none"]
    assert grads[0]["checksum"] == grads[1]["checksum"]
