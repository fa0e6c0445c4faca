"""The training loss: its one definition, used by the training steps and by validation.

    L = (1 - alpha - beta) L_E + alpha L_F + beta L_S    (force mode; L = L_E in energy mode)
    L_E = S_E / C_E,  S_E = sum_s w_s e_s^2,  C_E = sum_s w_s
          e_s = (E_s - E_s^ref) / n_s  (per_atom)  or  E_s - E_s^ref  (per_structure)
    L_F = S_F / C_F,  S_F = sum_{s in F} w_s sum_{i in s, c} (F_ic - F_ic^ref)^2,
          C_F = sum_{s in F} 3 n_s w_s
    L_S = S_S / C_S,  S_S = sum_{s in S} w_s sum_{k,l} v_{s,kl}^2,  C_S = sum_{s in S} 9 w_s
          v_s = V_s (sigma_s - sigma_s^ref) / n_s  (per_atom)  or  V_s (sigma_s - sigma_s^ref)
          (per_structure): the error of the virial dE/d(strain), in the units of e_s

In energy mode on GPR-augmented data a copy-difference term joins (``difference_weight`` gamma):

    L = (1 - gamma) L_E + gamma L_D
    L_D = S_D / C_D,  S_D = sum_{c in D} w_c r_c^2,  C_D = sum_{c in D} w_c
          r_c = [(E_c - E_p) - (E_c^ref - E_p^ref)] / |x_c - x_p|

D is the set of synthetic copies c whose parent p is in the same split (they share a batch:
data/stream.py groups); r_c is the error of the energy rise from parent to copy per Angstrom of
displacement, i.e. of the directional derivative of the energy along the displacement, in the
units of a force component (eV/A): for random displacements its mean square is the force mean
square error.  The absolute energies of a parent's copies carry their displacement information
only in differences of a few meV per atom, which the energy term weighs like any other energy
error; L_D weighs it as a force (docs/gpr.md).

F is the set of structures that carry forces and were selected for the force loss
(:func:`force_selection`, deterministic per structure and seed); S the set of periodic
structures that carry a stress and were selected for the stress loss (the same selection with
``stress_fraction`` and its own seed, :func:`stress_selection`).  The stress term enters only
with beta > 0; stress in eV/A^3 with ASE's sign (docs/data_format.md).

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


def stress_selection(index, seed: int, fraction: float) -> np.ndarray:
    """bool per data-set structure index: does it carry stress loss (if it has a stress)?  The
    force selection's rule with a seed of its own, so the two shares are independent."""
    return force_selection(index, (int(seed) ^ 0x5354524553) & _M64, fraction)


def stress_structure_mask(batch, selected: torch.Tensor | None) -> torch.Tensor | None:
    """[B] bool: structures whose stress enters the stress loss (None: the batch has no stress
    field, e.g. cached descriptors)."""
    hs = getattr(batch, "has_stress", None)
    if hs is None:
        return None
    return hs if selected is None else (hs & selected)


def force_atom_mask(batch, selected: torch.Tensor | None) -> torch.Tensor:
    """[N] bool: atoms whose force components enter the force loss."""
    s = batch.has_forces if selected is None else (batch.has_forces & selected)
    return s[batch.structure]


class _WeightedSquares(torch.autograd.Function):
    """a_E sum_s wE_s (E_s - E_s^ref)^2 + a_F sum_i wF_i |F_i - F_i^ref|^2
    (+ a_S sum_s wS_s |sigma_s - sigma_s^ref|^2) as one autograd node (the dozen small operations
    of the loss written out cost more than the loss's arithmetic on the batches of small
    molecules).  Once differentiable."""

    @staticmethod
    def forward(ctx, E, E_ref, wE, aE, F, F_ref, wF, aF, S=None, S_ref=None, wS=None, aS=0.0):
        dE = E.detach().to(torch.float64) - E_ref
        loss = aE * (wE * dE * dE).sum()
        dF = dS = None
        if F is not None:
            dF = F.detach().to(torch.float64) - F_ref
            loss = loss + aF * (wF.unsqueeze(1) * dF * dF).sum()
        if S is not None:
            dS = S.detach().to(torch.float64) - S_ref
            loss = loss + aS * (wS[:, None, None] * dS * dS).sum()
        ctx.save_for_backward(dE, wE, dF, wF, dS, wS)
        ctx.coef = (aE, aF, aS)
        ctx.dtypes = (E.dtype, None if F is None else F.dtype, None if S is None else S.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gL):
        dE, wE, dF, wF, dS, wS = ctx.saved_tensors
        aE, aF, aS = ctx.coef
        gE = (dE * wE).mul_(gL * (2.0 * aE)).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        gF = gS = None
        if dF is not None and ctx.needs_input_grad[4]:
            gF = (dF * wF.unsqueeze(1)).mul_(gL * (2.0 * aF)).to(ctx.dtypes[1])
        if dS is not None and ctx.needs_input_grad[8]:
            gS = (dS * wS[:, None, None]).mul_(gL * (2.0 * aS)).to(ctx.dtypes[2])
        return gE, None, None, None, gF, None, None, None, gS, None, None, None


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


def _weights(batch, per_atom: bool, mask, smask=None):
    """(w [B], wE [B], wF [N] or None, wS [B] or None): the structure weights, the weight of each
    structure's squared energy error in S_E (w / n^2 per atom), of each atom's squared force
    error in S_F (the structure's weight where the mask selects the atom, else 0) and of each
    structure's squared stress error in S_S (w V^2 / n^2 per atom, w V^2 per structure, where
    ``smask`` selects the structure, else 0)."""
    w = batch.weight.to(torch.float64)
    wE = w
    if per_atom:
        n = batch.natoms.to(torch.float64)
        wE = w / (n * n)
    wF = None if mask is None else w[batch.structure] * mask.to(torch.float64)
    wS = None
    if smask is not None:
        from ..descriptors.batch import cell_volumes

        V = cell_volumes(batch)
        wS = wE * V * V * smask.to(torch.float64)
    return w, wE, wF, wS


N_SUMS = 8   # (S_E, C_E, S_F, C_F, S_S, C_S, S_D, C_D)


def difference_residuals(E, batch, pairs):
    """(r [P], w [P]) of the copy-difference term (module docstring) for ``pairs`` = (copy
    positions, parent positions, displacement norms |x_c - x_p| in A) of the batch's structures,
    or None when there are none."""
    if pairs is None or len(pairs[0]) == 0:
        return None
    c, p, dx = pairs
    E = E.to(torch.float64)
    Er = batch.energy.to(torch.float64)
    r = ((E[c] - E[p]) - (Er[c] - Er[p])) / dx
    return r, batch.weight.to(torch.float64)[c]


def difference_term(E, batch, pairs, C_D: float, gamma: float):
    """gamma S_D / C_D of a batch given the GLOBAL count C_D (None without pairs)."""
    rw = difference_residuals(E, batch, pairs)
    if rw is None or C_D <= 0 or gamma <= 0:
        return None
    r, w = rw
    return (w * r * r).sum() * (gamma / C_D)


def loss_sums(E, batch, *, per_atom: bool, F=None, mask=None, S=None, smask=None, pairs=None) -> torch.Tensor:
    """[8] float64: (S_E, C_E, S_F, C_F, S_S, C_S, S_D, C_D) of a batch (module docstring); ``F``
    None: energy mode (S_F = C_F = 0); ``S`` (stress [B, 3, 3]) None: no stress term (S_S = C_S =
    0), else ``smask`` [B] (:func:`stress_structure_mask`) selects the structures; ``pairs``: the
    copy-parent pairs of the difference term (:func:`difference_residuals`)."""
    use_s = S is not None and smask is not None
    w, wE, wF, wS = _weights(batch, per_atom, mask if F is not None else None, smask if use_s else None)
    dE = E.to(torch.float64) - batch.energy.to(torch.float64)
    out = torch.zeros(N_SUMS, dtype=torch.float64, device=w.device)
    out[0] = (wE * dE * dE).sum()
    out[1] = w.sum()
    if F is not None:
        dF = F.to(torch.float64) - batch.forces.to(torch.float64)
        out[2] = (wF[:, None] * dF * dF).sum()
        out[3] = 3.0 * wF.sum()
    if use_s:
        dS = S.to(torch.float64) - batch.stress.to(torch.float64)
        out[4] = (wS[:, None, None] * dS * dS).sum()
        out[5] = 9.0 * (w * smask.to(torch.float64)).sum()
    rw = difference_residuals(E, batch, pairs)
    if rw is not None:
        r, wd = rw
        out[6] = (wd * r * r).sum()
        out[7] = wd.sum()
    return out


LOSS_FORMS = ("mse", "rmse", "normalized")


def loss_from_sums(sums: torch.Tensor, *, alpha: float, force_mode: bool, form: str = "mse",
                   spread=(1.0, 1.0, 1.0), beta: float = 0.0, gamma: float = 0.0) -> float:
    """The loss of the structures whose :func:`loss_sums` add up to ``sums``, in ``form``:
    'mse' (1-a-b) MSE_E + a MSE_F + b MSE_S; 'rmse' the same with root mean squares
    (aenet-PyTorch's form); 'normalized' the mean squares over the reference spreads ``spread``
    (s_E, s_F[, s_S]).  Energy mode with copy pairs (C_D > 0) and ``gamma`` > 0:
    (1-g) MSE_E + g MSE_D ('normalized': MSE_D over s_F^2; not offered with 'rmse')."""
    s = sums.tolist() + [0.0] * (N_SUMS - len(sums))
    spread = tuple(spread) + (1.0,) * (3 - len(spread))
    mse_e = s[0] / s[1] if s[1] > 0 else float("nan")
    mse_f = s[2] / s[3] if s[3] > 0 else 0.0
    mse_s = s[4] / s[5] if s[5] > 0 else 0.0
    if form == "rmse":
        e, f, st = math.sqrt(mse_e) if mse_e == mse_e else mse_e, math.sqrt(mse_f), math.sqrt(mse_s)
    elif form == "normalized":
        e, f, st = mse_e / spread[0] ** 2, mse_f / spread[1] ** 2, mse_s / spread[2] ** 2
    else:
        e, f, st = mse_e, mse_f, mse_s
    if not force_mode:
        if gamma > 0 and s[7] > 0 and form != "rmse":
            d = s[6] / s[7] / (spread[1] ** 2 if form == "normalized" else 1.0)
            return (1.0 - gamma) * e + gamma * d
        return e
    return (1.0 - alpha - beta) * e + alpha * f + beta * st


def term_weights(form: str, alpha: float, force_mode: bool, spread, previous=None,
                 beta: float = 0.0) -> tuple[float, float, float]:
    """(c_E, c_F, c_S): the weights of the step's mean squares MSE_E = S_E/C_E, MSE_F = S_F/C_F
    and MSE_S = S_S/C_S whose gradient is that of the loss ``form`` (see :func:`loss_from_sums`).

    mse: (1-a-b, a, b).  normalized: ((1-a-b)/s_E^2, a/s_F^2, b/s_S^2).  rmse: the chain rule of
    d sqrt(MSE) = d MSE / (2 RMSE), with the RMSEs of the PREVIOUS step's global batch
    (``previous``; the reference spreads before the first step): the current step's global RMSEs
    would need a collective before the backward pass, and one step of lag changes the weights
    by the change of the error over one step."""
    aE, aF, aS = (1.0 - alpha - beta, alpha, beta) if force_mode else (1.0, 0.0, 0.0)
    spread = tuple(spread) + (1.0,) * (3 - len(spread))
    if form == "mse":
        return aE, aF, aS
    if form == "normalized":
        return aE / spread[0] ** 2, aF / spread[1] ** 2, aS / spread[2] ** 2
    prev = tuple(previous) + (spread[2],) * (3 - len(previous)) if previous is not None else spread
    rE, rF, rS = prev[:3]
    return aE / (2.0 * max(rE, 1e-12)), aF / (2.0 * max(rF, 1e-12)), aS / (2.0 * max(rS, 1e-12))


def local_counts(batch, selected: torch.Tensor | None, with_forces: bool,
                 stress_selected: torch.Tensor | None = None, with_stress: bool = False) -> torch.Tensor:
    """[3] float64: this batch's (C_E, C_F, C_S) (sum of structure weights, weighted number of
    force components, weighted number of stress components), to be all-reduced into the global
    counts of a step."""
    w, _, wF, _ = _weights(batch, False, force_atom_mask(batch, selected) if with_forces else None)
    out = torch.zeros(3, dtype=torch.float64, device=w.device)
    out[0] = w.sum()
    if with_forces:
        out[1] = 3.0 * wF.sum()
    sm = stress_structure_mask(batch, stress_selected) if with_stress else None
    if sm is not None:
        out[2] = 9.0 * (w * sm.to(torch.float64)).sum()
    return out


def stress_term_and_gradient(W, batch, counts, *, per_atom: bool, beta: float, smask):
    """(beta S_S / C_S, its gradient in the virial W [B, 3, 3], the stress [B, 3, 3]): the stress
    term of :func:`energy_force_loss` from the virial W = dE/d(strain) in closed form, without
    autograd, for the CPU's one-node training step (the written-out loss's autograd costs more
    than a force step's kernels on a small batch).  ``counts``: the GLOBAL (C_E, C_F, C_S).

    In numpy: on [B]- and [B, 3, 3]-sized arrays torch's per-call cost was a third of the
    kernels' time of a dense 256-atom step, so the stress sym(W) / V
    (``descriptors.batch.stress_from_virial``) and the weights w V^2 (/ n^2) of :func:`_weights`
    are written here once more; tests/test_stress.py holds both to the written-out loss."""
    from ..descriptors.batch import cell_volumes

    V = cell_volumes(batch).numpy()
    W = W.numpy()
    inv = np.divide(1.0, V, out=np.zeros_like(V), where=V > 0)
    S = 0.5 * (W + W.transpose(0, 2, 1)) * inv[:, None, None]
    c2 = float(counts[2]) if counts.numel() > 2 else 0.0
    if c2 <= 0 or beta == 0:
        return torch.zeros((), dtype=torch.float64), torch.zeros(W.shape, dtype=torch.float64), torch.from_numpy(S)
    w = batch.weight.numpy().astype(np.float64) * smask.numpy()
    if per_atom:
        n = batch.natoms.numpy().astype(np.float64)
        w = w / (n * n)
    dS = S - batch.stress.numpy()
    wdS = (w * V * V / c2)[:, None, None] * dS
    gS = (2.0 * beta) * wdS
    return (torch.tensor(beta * float((wdS * dS).sum()), dtype=torch.float64),
            torch.from_numpy(0.5 * (gS + gS.transpose(0, 2, 1)) * inv[:, None, None]), torch.from_numpy(S))


def energy_force_loss(E, batch, counts, *, per_atom: bool, alpha: float = 0.0, F=None, mask=None,
                      compiled: bool = False, beta: float = 0.0, S=None, smask=None):
    """The training loss of a batch (module docstring) given the GLOBAL ``counts`` (C_E, C_F[, C_S])
    (:func:`local_counts`, all-reduced), as one autograd node, once differentiable in E, F and S.
    ``F`` None: energy mode (L = L_E); else force mode with ``mask`` [N] (:func:`force_atom_mask`);
    ``S`` (stress [B, 3, 3]) with ``smask`` [B] (:func:`stress_structure_mask`) and ``beta``: the
    stress term.  ``compiled``: the compiled CPU operator (the plan's ``loss``; no stress term),
    else torch operators."""
    use_s = S is not None and smask is not None and F is not None
    if compiled and not use_s:
        fields = ((batch.forces, batch.structure, mask) if F is not None else (None, None, None))
        return _CompiledLoss.apply(E, F, batch.energy, batch.weight, batch.natoms, bool(per_atom), *fields,
                                   counts[:2], float(alpha))
    _, wE, wF, wS = _weights(batch, per_atom, mask if F is not None else None, smask if use_s else None)
    E_ref = batch.energy.to(torch.float64)
    if F is None:
        return _WeightedSquares.apply(E, E_ref, wE / counts[0], 1.0, None, None, None, 0.0)
    c1 = float(counts[1])
    wF = wF / c1 if c1 > 0 else torch.zeros_like(wF)
    if not use_s:
        return _WeightedSquares.apply(E, E_ref, wE / counts[0], 1.0 - alpha - beta, F,
                                      batch.forces.to(torch.float64), wF, alpha)
    c2 = float(counts[2]) if counts.numel() > 2 else 0.0
    wS = wS / c2 if c2 > 0 else torch.zeros_like(wS)
    return _WeightedSquares.apply(E, E_ref, wE / counts[0], 1.0 - alpha - beta, F, batch.forces.to(torch.float64),
                                  wF, alpha, S, batch.stress.to(torch.float64), wS, beta)
