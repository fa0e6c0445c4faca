"""Prediction and error metrics of one model or a committee of K models.

``predict(models, ds, indices)`` -> :class:`Predictions` with energies [K, S] and forces
[K, N, 3] (all float64); ``metrics(pred)`` uses the committee mean (K = 1: the model itself) and,
for K > 1, reports the committee spread too.  Units: energy errors in meV/atom and meV/structure,
force errors in eV/Angstrom, direction errors in degrees, stress errors (structures with a
reference stress) in eV/Angstrom^3 and GPa.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data.info import EV_A3_GPA


@dataclass
class Predictions:
    index: np.ndarray          # [S] data-set index
    natoms: np.ndarray         # [S]
    subset: np.ndarray         # [S] subset id
    energy_ref: np.ndarray     # [S]
    energies: np.ndarray       # [K, S]
    atom_offset: np.ndarray    # [S + 1] offsets into the atom arrays
    has_forces: np.ndarray     # [S] bool (reference forces present)
    forces_ref: np.ndarray | None   # [N, 3]
    forces: np.ndarray | None       # [K, N, 3]
    has_stress: np.ndarray | None = None   # [S] bool (reference stress present)
    stress_ref: np.ndarray | None = None   # [S, 3, 3] eV/A^3 (zeros where missing)
    stresses: np.ndarray | None = None     # [K, S, 3, 3] predicted (None: not computed)

    @property
    def stress(self) -> np.ndarray | None:
        return None if self.stresses is None else self.stresses.mean(0)

    @property
    def K(self) -> int:
        return int(self.energies.shape[0])

    @property
    def energy(self) -> np.ndarray:
        return self.energies.mean(0)

    @property
    def force(self) -> np.ndarray | None:
        return None if self.forces is None else self.forces.mean(0)

    def atom_structure(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.natoms)), self.natoms)


def predict(models, ds, indices=None, batch_atoms: int = 4096, forces: bool = True, device="cpu",
            progress: bool = False) -> Predictions:
    """Energies (and forces, by autograd; and the stress where the reference has one) of
    ``models`` (a BPNN or a list) on data set ``ds`` (H5Dataset or a list of Structure) at
    ``indices`` (default: all)."""
    from ..descriptors.batch import collate

    if not isinstance(models, (list, tuple)):
        models = [models]
    seq = ds if isinstance(ds, (list, tuple)) else None
    n_total = len(seq) if seq is not None else ds.n_structures
    idx = np.arange(n_total, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    natoms_all = np.array([s.natoms for s in seq]) if seq is not None else np.asarray(ds.natoms)
    natoms = natoms_all[idx].astype(np.int64)
    off = np.zeros(len(idx) + 1, dtype=np.int64)
    np.cumsum(natoms, out=off[1:])
    S, N, K = len(idx), int(off[-1]), len(models)
    E = np.zeros((K, S))
    F = np.zeros((K, N, 3)) if forces else None
    Eref = np.zeros(S)
    Fref = np.zeros((N, 3)) if forces else None
    hasf = np.zeros(S, dtype=bool)
    subset = np.zeros(S, dtype=np.int64)
    hass = np.zeros(S, dtype=bool)
    Sref = np.zeros((S, 3, 3))
    Sp = np.zeros((K, S, 3, 3)) if forces else None
    # batches of consecutive indices up to batch_atoms atoms
    bounds = [0]
    acc = 0
    for k in range(S):
        if acc and acc + natoms[k] > batch_atoms:
            bounds.append(k)
            acc = 0
        acc += int(natoms[k])
    bounds.append(S)
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=S, unit="struct", leave=False)
        except ImportError:
            bar = None
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b <= a:
            continue
        structs = [seq[i] for i in idx[a:b]] if seq is not None else ds.read(idx[a:b])
        for s_, st in zip(range(a, b), structs):
            Eref[s_] = st.energy
            subset[s_] = st.subset
            if st.forces is not None:
                hasf[s_] = True
                if forces:
                    Fref[off[s_]:off[s_ + 1]] = st.forces
            if getattr(st, "stress", None) is not None:
                hass[s_] = True
                Sref[s_] = st.stress
        with_stress = forces and bool(hass[a:b].any())
        for k, m in enumerate(models):
            batch = collate(structs, species=m.species, cutoff=m.cutoff, dtype=torch.float64, device=device)
            if with_stress:
                e, f, sp = m.energy_forces_stress(batch)
                F[k, off[a]:off[b]] = f.cpu().numpy()
                Sp[k, a:b] = sp.cpu().numpy()
            elif forces:
                with torch.enable_grad():
                    e, f = m.energy_and_forces(batch)
                F[k, off[a]:off[b]] = f.detach().cpu().numpy()
            else:
                with torch.no_grad():
                    e = m(batch)
            E[k, a:b] = e.detach().cpu().numpy()
        if bar is not None:
            bar.update(b - a)
    if bar is not None:
        bar.close()
    return Predictions(index=idx, natoms=natoms, subset=subset, energy_ref=Eref, energies=E,
                       atom_offset=off, has_forces=hasf, forces_ref=Fref, forces=F,
                       has_stress=hass, stress_ref=Sref, stresses=Sp if hass.any() else None)


def energy_metrics(e_pred, e_ref, natoms) -> dict:
    e_pred, e_ref = np.asarray(e_pred, float), np.asarray(e_ref, float)
    n = np.asarray(natoms, float)
    d = e_pred - e_ref
    da = d / n
    if len(d) == 0:
        return {"n_structures": 0}
    return {"n_structures": int(len(d)),
            "E_mae_meV_atom": float(1e3 * np.mean(np.abs(da))),
            "E_rmse_meV_atom": float(1e3 * np.sqrt(np.mean(da * da))),
            "E_mae_meV_struct": float(1e3 * np.mean(np.abs(d))),
            "E_rmse_meV_struct": float(1e3 * np.sqrt(np.mean(d * d))),
            "E_maxerr_meV_atom": float(1e3 * np.max(np.abs(da)))}


def force_metrics(f_pred, f_ref) -> dict:
    """Component MAE/RMSE, magnitude MAE and mean direction error over atoms [M, 3].
    The direction error (angle between predicted and reference force) averages over the atoms
    where both vectors are non-zero (|F| > 1e-8 eV/A)."""
    f_pred, f_ref = np.asarray(f_pred, float).reshape(-1, 3), np.asarray(f_ref, float).reshape(-1, 3)
    if len(f_ref) == 0:
        return {"n_force_atoms": 0}
    d = f_pred - f_ref
    mp, mr = np.linalg.norm(f_pred, axis=1), np.linalg.norm(f_ref, axis=1)
    ok = (mp > 1e-8) & (mr > 1e-8)
    cos = np.clip(np.sum(f_pred[ok] * f_ref[ok], axis=1) / (mp[ok] * mr[ok]), -1.0, 1.0)
    ang = np.degrees(np.arccos(cos))
    return {"n_force_atoms": int(len(f_ref)),
            "F_mae": float(np.mean(np.abs(d))),
            "F_rmse": float(np.sqrt(np.mean(d * d))),
            "F_magnitude_mae": float(np.mean(np.abs(mp - mr))),
            "F_direction_deg": float(np.mean(ang)) if len(ang) else float("nan")}


def stress_metrics(s_pred, s_ref) -> dict:
    """Component MAE/RMSE of stresses [M, 3, 3] (all nine components) in eV/A^3 and GPa."""
    d = (np.asarray(s_pred, float) - np.asarray(s_ref, float)).reshape(-1)
    if d.size == 0:
        return {"n_stress": 0}
    mae, rmse = float(np.mean(np.abs(d))), float(np.sqrt(np.mean(d * d)))
    return {"n_stress": int(d.size // 9), "S_mae": mae, "S_rmse": rmse,
            "S_mae_GPa": mae * EV_A3_GPA, "S_rmse_GPa": rmse * EV_A3_GPA}


def _angles_deg(a, b):
    """Angle (degrees) between the rows of a [..., M, 3] and b [M, 3]; NaN where either is ~0."""
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    ok = (na > 1e-8) & (nb > 1e-8)
    cos = np.sum(a * b, axis=-1) / np.where(ok, na * nb, 1.0)
    return np.where(ok, np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))), np.nan)


def committee_metrics(energies, natoms, forces=None, forces_ref=None) -> dict:
    """The paper's committee spread: MSD = mean over test points of the committee standard
    deviation (ddof=1, K >= 2).  energies [K, S]; forces [K, M, 3] and forces_ref [M, 3] over the
    atoms that have reference forces.

    E_msd_meV_struct / _atom: mean_s std_k E_ks (per atom: / n_s);
    F_msd: mean over atoms and components of std_k F_kic;
    F_magnitude_msd: mean_i std_k |F_ki|;
    F_direction_msd_deg: mean_i std_k angle(F_ki, F_ref_i), over atoms with |F| > 1e-8 for the
    reference and every member."""
    E = np.asarray(energies, float)
    out = {}
    if E.shape[0] < 2 or E.shape[1] == 0:
        return out
    sd = E.std(0, ddof=1)
    n = np.asarray(natoms, float)
    out["E_msd_meV_struct"] = float(1e3 * sd.mean())
    out["E_msd_meV_atom"] = float(1e3 * (sd / n).mean())
    if forces is not None and forces_ref is not None and len(forces_ref):
        F = np.asarray(forces, float).reshape(E.shape[0], -1, 3)
        out["F_msd"] = float(F.std(0, ddof=1).mean())
        out["F_magnitude_msd"] = float(np.linalg.norm(F, axis=-1).std(0, ddof=1).mean())
        ang = _angles_deg(F, np.asarray(forces_ref, float).reshape(-1, 3)[None])
        ok = np.all(np.isfinite(ang), axis=0)
        out["F_direction_msd_deg"] = float(ang[:, ok].std(0, ddof=1).mean()) if ok.any() else float("nan")
    return out


def metrics(pred: Predictions, mask_structures=None) -> dict:
    """Metrics of the committee mean over the structures selected by ``mask_structures``; for
    K > 1 also the committee spread (:func:`committee_metrics`: MSD of energy, force
    components, force magnitude and force direction)."""
    sel = np.ones(len(pred.natoms), dtype=bool) if mask_structures is None else np.asarray(mask_structures)
    out = energy_metrics(pred.energy[sel], pred.energy_ref[sel], pred.natoms[sel])
    amask = None
    if pred.forces is not None:
        amask = (sel & pred.has_forces)[pred.atom_structure()]
        out.update(force_metrics(pred.force[amask], pred.forces_ref[amask]))
    if pred.stresses is not None and (sel & pred.has_stress).any():
        sm = sel & pred.has_stress
        out.update(stress_metrics(pred.stress[sm], pred.stress_ref[sm]))
    if pred.K > 1:
        std = pred.energies[:, sel].std(0, ddof=1) / pred.natoms[sel]
        out["E_committee_std_meV_atom"] = float(1e3 * np.mean(std)) if sel.any() else float("nan")
        out["K"] = pred.K
        out.update(committee_metrics(pred.energies[:, sel], pred.natoms[sel],
                                     None if amask is None else pred.forces[:, amask],
                                     None if amask is None else pred.forces_ref[amask]))
    return out


def metrics_by_subset(pred: Predictions, subset_names=None) -> dict:
    """{'overall': {...}, '<subset name>': {...}, ...}"""
    res = {"overall": metrics(pred)}
    for sid in np.unique(pred.subset):
        name = subset_names[sid] if subset_names is not None and 0 <= sid < len(subset_names) else f"subset_{sid}"
        if name in res:
            name = f"{name}#{sid}"
        res[name] = metrics(pred, pred.subset == sid)
    return res
