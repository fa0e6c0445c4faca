"""CUDA Chebyshev kernels: csrc/chebyshev_cuda.cu must compile with a plain `nvcc -c` (no torch
headers) wherever nvcc exists, and, on a machine with a GPU and a CUDA build of the extension,
the CUDA operators must agree with the CPU operators (forward, VJP, JVP and HVP)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_cuda_source_compiles_with_plain_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    out = tmp_path / "chebyshev_cuda.o"
    res = subprocess.run([nvcc, "-c", "-std=c++17", str(REPO / "csrc" / "chebyshev_cuda.cu"), "-o", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, f"nvcc failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert out.stat().st_size > 0
    # the file must stay free of torch headers
    src = (REPO / "csrc" / "chebyshev_cuda.cu").read_text() + (REPO / "csrc" / "chebyshev.h").read_text()
    assert "torch/" not in src and "ATen/" not in src


def _cuda_ready():
    if not torch.cuda.is_available():
        return False
    try:
        from distmlip import _C
        from distmlip.descriptors import fused  # noqa: F401
    except ImportError:
        return False
    return bool(_C.with_cuda())


@pytest.mark.skipif(not _cuda_ready(), reason="no GPU or extension built without CUDA")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_angular", [4, 10])
def test_cuda_ops_match_cpu(dtype, n_angular):
    from ase import Atoms

    from distmlip.descriptors.batch import collate
    from distmlip.descriptors.chebyshev import typespin

    rng = np.random.default_rng(0)
    cell = np.diag([7.0, 7.5, 6.8]) + rng.normal(0, 0.3, (3, 3))
    atoms = Atoms(numbers=rng.choice([3, 6, 1, 8], 40), scaled_positions=rng.uniform(0, 1, (40, 3)),
                  cell=cell, pbc=True)
    mol = Atoms("CO", positions=[[0, 0, 0], [1.2, 0.1, 0.0]])   # molecule + isolated-ish pair
    b = collate([atoms, mol], ["Li", "C", "H", "O"], cutoff=5.5, dtype=dtype)
    ts = torch.tensor(typespin(4), dtype=torch.float64)
    args = (b.species, b.pair_ptr, b.pair_j, b.pair_shift, ts, 5.5, 8, 4.5, n_angular)
    ops = torch.ops.distmlip
    dev = torch.device("cuda")
    gargs = tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args)
    x = b.positions
    G_cpu = ops.chebyshev_forward(x, *args)
    G_gpu = ops.chebyshev_forward(x.to(dev), *gargs)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    scale = float(G_cpu.abs().max())
    assert float((G_gpu.cpu() - G_cpu).abs().max()) <= tol * scale
    g = torch.randn(G_cpu.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    v = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
    dR_cpu = ops.chebyshev_backward(g, x, *args)
    dR_gpu = ops.chebyshev_backward(g.to(dev), x.to(dev), *gargs)
    assert float((dR_gpu.cpu() - dR_cpu).abs().max()) <= tol * max(1.0, float(dR_cpu.abs().max()))
    jv_cpu, hv_cpu = ops.chebyshev_double_backward(g, v, x, *args, True, True)
    jv_gpu, hv_gpu = ops.chebyshev_double_backward(g.to(dev), v.to(dev), x.to(dev), *gargs, True, True)
    assert float((jv_gpu.cpu() - jv_cpu).abs().max()) <= tol * max(1.0, float(jv_cpu.abs().max()))
    assert float((hv_gpu.cpu() - hv_cpu).abs().max()) <= tol * max(1.0, float(hv_cpu.abs().max()))
    # autograd through the wrapper on the GPU
    from distmlip.descriptors import fused

    def second_derivative(device):
        xd = x.to(device).clone().requires_grad_()
        G = fused.chebyshev(xd, b.species.to(device), b.pair_i.to(device), b.pair_j.to(device),
                            b.pair_shift.to(device), typespin=ts, rc_radial=5.5, n_radial=8, rc_angular=4.5,
                            n_angular=n_angular)
        (F,) = torch.autograd.grad((G * g.to(device)).sum(), xd, create_graph=True)
        (F * v.to(device)).sum().backward()
        return F.detach().cpu(), xd.grad.cpu()

    F_gpu, h_gpu = second_derivative(dev)
    torch.cuda.synchronize()
    F_cpu, h_cpu = second_derivative(torch.device("cpu"))
    # the wrapper's autograd on the GPU equals the CPU's: first derivative and the Hessian term
    assert float((F_gpu - F_cpu).abs().max()) <= tol * max(1.0, float(F_cpu.abs().max()))
    assert float((h_gpu - h_cpu).abs().max()) <= tol * max(1.0, float(h_cpu.abs().max()))
