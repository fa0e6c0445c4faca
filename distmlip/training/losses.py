"""Losses normalised by GLOBAL counts, so that summing the per-rank contributions (and the
gradients, with one all-reduce) gives exactly the loss and gradient of the union batch.

    L = (1 - alpha) L_E + alpha L_F          (force mode; L = L_E in energy mode)
    L_E = sum_s w_s e_s^2 / sum_s w_s         e_s = (E_s - E_s^ref) / n_s  (per_atom)  or  E_s - E_s^ref
    L_F = sum_{s in F} w_s sum_{i in s, c} (F_ic - F_ic^ref)^2 / sum_{s in F} 3 n_s w_s

F is the set of structures that carry forces and were selected for the force loss
(:func:`force_selection`, deterministic per structure and seed)."""
from __future__ import annotations

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


def energy_errors(E: torch.Tensor, batch, per_atom: bool = True) -> torch.Tensor:
    err = E - batch.energy
    return err / batch.natoms.to(err.dtype) if per_atom else err


def force_atom_mask(batch, selected: torch.Tensor | None) -> torch.Tensor:
    """[N] bool: atoms whose force components enter the force loss."""
    s = batch.has_forces if selected is None else (batch.has_forces & selected)
    return s[batch.structure]


def local_counts(batch, selected: torch.Tensor | None, with_forces: bool) -> torch.Tensor:
    """[2] float64: (sum of structure weights, weighted number of force components)."""
    w = batch.weight.to(torch.float64)
    out = torch.zeros(2, dtype=torch.float64, device=w.device)
    out[0] = w.sum()
    if with_forces:
        m = force_atom_mask(batch, selected)
        out[1] = 3.0 * (w[batch.structure] * m.to(torch.float64)).sum()
    return out
