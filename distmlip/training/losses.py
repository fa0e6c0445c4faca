"""The training loss: its one definition, used by the training steps and by validation.

    L = (1 - alpha) L_E + alpha L_F          (force mode; L = L_E in energy mode)
    L_E = S_E / C_E,  S_E = sum_s w_s e_s^2,  C_E = sum_s w_s
          e_s = (E_s - E_s^ref) / n_s  (per_atom)  or  E_s - E_s^ref  (per_structure)
    L_F = S_F / C_F,  S_F = sum_{s in F} w_s sum_{i in s, c} (F_ic - F_ic^ref)^2,
          C_F = sum_{s in F} 3 n_s w_s

F is the set of structures that carry forces and were selected for the force loss
(:func:`force_selection`, deterministic per structure and seed).

The sums S and the counts C are additive over structures, so the loss of a union of batches
(the ranks' shares of a global batch, the batches of a validation set) follows from the sums of
its parts: a training step computes its local S against the GLOBAL counts (all-reduced), so that
summing the per-rank losses and gradients (one all-reduce) gives exactly the loss and gradient of
the union batch (:func:`energy_force_loss`); validation all-reduces S and C over the whole set
(:func:`loss_sums`, :func:`loss_from_sums`).

On the CPU the step's loss and its gradients in E and F come from one compiled operator
(``torch.ops.distmlip.energy_force_loss``, csrc/bpnn_forces_cpu.cpp; the plan's ``loss``), an
implementation of the same formula that the tests check against :func:`loss_sums`."""
from __future__ import annotations

import math

import numpy as np
import torch

_M64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def force_selection(index, seed: int, fraction: float) -> np.ndarray:
    """bool per data-set structure index: does it carry force loss?  Depends only on
    (seed, index), so it is identical on every rank and every epoch."""
    index = np.asarray(index, dtype=np.int64)
    if fraction >= 1.0:
        return np.ones(index.shape, dtype=bool)
    if fraction <= 0.0:
        return np.zeros(index.shape, dtype=bool)
    h = _splitmix64(_splitmix64(np.full(index.shape, seed & _M64, dtype=np.uint64)) ^ index.astype(np.uint64))
    u = (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return u < fraction


def force_atom_mask(batch, selected: torch.Tensor | None) -> torch.Tensor:
    """[N] bool: atoms whose force components enter the force loss."""
    s = batch.has_forces if selected is None else (batch.has_forces & selected)
    return s[batch.structure]


class _WeightedSquares(torch.autograd.Function):
    """a_E sum_s wE_s (E_s - E_s^ref)^2 + a_F sum_i wF_i |F_i - F_i^ref|^2 as one autograd node
    (the dozen small operations of the loss written out cost more than the loss's arithmetic on
    the batches of small molecules).  Once differentiable."""

    @staticmethod
    def forward(ctx, E, E_ref, wE, aE, F, F_ref, wF, aF):
        dE = E.detach().to(torch.float64) - E_ref
        loss = aE * (wE * dE * dE).sum()
        dF = None
        if F is not None:
            dF = F.detach().to(torch.float64) - F_ref
            loss = loss + aF * (wF.unsqueeze(1) * dF * dF).sum()
        ctx.save_for_backward(dE, wE, dF, wF)
        ctx.coef = (aE, aF)
        ctx.dtypes = (E.dtype, None if F is None else F.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gL):
        dE, wE, dF, wF = ctx.saved_tensors
        aE, aF = ctx.coef
        gE = (dE * wE).mul_(gL * (2.0 * aE)).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        gF = None
        if dF is not None and ctx.needs_input_grad[4]:
            gF = (dF * wF.unsqueeze(1)).mul_(gL * (2.0 * aF)).to(ctx.dtypes[1])
        return gE, None, None, None, gF, None, None, None


class _CompiledLoss(torch.autograd.Function):
    """The loss and its gradients in E and F from one compiled CPU operator
    (``torch.ops.distmlip.energy_force_loss``, csrc/bpnn_forces_cpu.cpp); the backward scales
    them by the incoming gradient.  Once differentiable."""

    @staticmethod
    def forward(ctx, E, F, E_ref, weight, natoms, per_atom, F_ref, structure, mask, counts, alpha):
        loss, gE, gF = torch.ops.distmlip.energy_force_loss(E, E_ref, weight, natoms, per_atom, F, F_ref,
                                                            structure, mask, counts, alpha)
        ctx.save_for_backward(gE, gF)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gL):
        gE, gF = ctx.saved_tensors
        return (gE * gL, (gF * gL if ctx.needs_input_grad[1] else None)) + (None,) * 9


def _weights(batch, per_atom: bool, mask):
    """(w [B], wE [B], wF [N] or None): the structure weights, the weight of each structure's
    squared energy error in S_E (w / n^2 per atom) and of each atom's squared force error in S_F
    (the structure's weight where the mask selects the atom, else 0)."""
    w = batch.weight.to(torch.float64)
    wE = w
    if per_atom:
        n = batch.natoms.to(torch.float64)
        wE = w / (n * n)
    wF = None if mask is None else w[batch.structure] * mask.to(torch.float64)
    return w, wE, wF


def loss_sums(E, batch, *, per_atom: bool, F=None, mask=None) -> torch.Tensor:
    """[4] float64: (S_E, C_E, S_F, C_F) of a batch (module docstring); ``F`` None: energy
    mode (S_F = C_F = 0)."""
    w, wE, wF = _weights(batch, per_atom, mask if F is not None else None)
    dE = E.to(torch.float64) - batch.energy.to(torch.float64)
    out = torch.zeros(4, dtype=torch.float64, device=w.device)
    out[0] = (wE * dE * dE).sum()
    out[1] = w.sum()
    if F is not None:
        dF = F.to(torch.float64) - batch.forces.to(torch.float64)
        out[2] = (wF[:, None] * dF * dF).sum()
        out[3] = 3.0 * wF.sum()
    return out


LOSS_FORMS = ("mse", "rmse", "normalized")


def loss_from_sums(sums: torch.Tensor, *, alpha: float, force_mode: bool, form: str = "mse",
                   spread=(1.0, 1.0)) -> float:
    """The loss of the structures whose :func:`loss_sums` add up to ``sums``, in ``form``:
    'mse' (1-a) MSE_E + a MSE_F; 'rmse' (1-a) RMSE_E + a RMSE_F (aenet-PyTorch's form);
    'normalized' (1-a) MSE_E / s_E^2 + a MSE_F / s_F^2 with the reference spreads ``spread``."""
    s = sums.tolist()
    mse_e = s[0] / s[1] if s[1] > 0 else float("nan")
    mse_f = s[2] / s[3] if s[3] > 0 else 0.0
    if form == "rmse":
        e, f = math.sqrt(mse_e) if mse_e == mse_e else mse_e, math.sqrt(mse_f)
    elif form == "normalized":
        e, f = mse_e / spread[0] ** 2, mse_f / spread[1] ** 2
    else:
        e, f = mse_e, mse_f
    return e if not force_mode else (1.0 - alpha) * e + alpha * f


def term_weights(form: str, alpha: float, force_mode: bool, spread, previous=None) -> tuple[float, float]:
    """(c_E, c_F): the weights of the step's mean squares MSE_E = S_E/C_E and MSE_F = S_F/C_F whose
    gradient is that of the loss ``form`` (see :func:`loss_from_sums`).

    mse: (1-a, a).  normalized: ((1-a)/s_E^2, a/s_F^2).  rmse: the chain rule of
    d sqrt(MSE) = d MSE / (2 RMSE), with the RMSEs of the PREVIOUS step's global batch
    (``previous``; the reference spreads before the first step): the current step's global RMSEs
    would need a collective before the backward pass, and one step of lag changes the weights
    by the change of the error over one step."""
    aE, aF = (1.0 - alpha, alpha) if force_mode else (1.0, 0.0)
    if form == "mse":
        return aE, aF
    if form == "normalized":
        return aE / spread[0] ** 2, aF / spread[1] ** 2
    rE, rF = previous if previous is not None else spread
    return aE / (2.0 * max(rE, 1e-12)), aF / (2.0 * max(rF, 1e-12))


def local_counts(batch, selected: torch.Tensor | None, with_forces: bool) -> torch.Tensor:
    """[2] float64: this batch's (C_E, C_F) (sum of structure weights, weighted number of force
    components), to be all-reduced into the global counts of a step."""
    w, _, wF = _weights(batch, False, force_atom_mask(batch, selected) if with_forces else None)
    out = torch.zeros(2, dtype=torch.float64, device=w.device)
    out[0] = w.sum()
    if with_forces:
        out[1] = 3.0 * wF.sum()
    return out


def energy_force_loss(E, batch, counts, *, per_atom: bool, alpha: float = 0.0, F=None, mask=None,
                      compiled: bool = False):
    """The training loss of a batch (module docstring) given the GLOBAL ``counts`` (C_E, C_F)
    (:func:`local_counts`, all-reduced), as one autograd node, once differentiable in E and F.
    ``F`` None: energy mode (L = L_E); else force mode with ``mask`` [N] (:func:`force_atom_mask`).
    ``compiled``: the compiled CPU operator (the plan's ``loss``), else torch operators."""
    if compiled:
        fields = ((batch.forces, batch.structure, mask) if F is not None else (None, None, None))
        return _CompiledLoss.apply(E, F, batch.energy, batch.weight, batch.natoms, bool(per_atom), *fields,
                                   counts, float(alpha))
    _, wE, wF = _weights(batch, per_atom, mask if F is not None else None)
    E_ref = batch.energy.to(torch.float64)
    if F is None:
        return _WeightedSquares.apply(E, E_ref, wE / counts[0], 1.0, None, None, None, 0.0)
    c1 = float(counts[1])
    wF = wF / c1 if c1 > 0 else torch.zeros_like(wF)
    return _WeightedSquares.apply(E, E_ref, wE / counts[0], 1.0 - alpha, F, batch.forces.to(torch.float64), wF,
                                  alpha)
