"""GPR energy standard deviation of MD frames: the uncertainty of a GPR-ANN model.

The GPR-ANN's GPRs are fitted per homogeneous subset (same atoms in the same order; docs/gpr.md),
so an MD trajectory, whose frames keep the atom order of its starting structure, has one natural
GPR: the one fitted on the reference (non-synthetic) training structures with the start's atom
sequence and boundary conditions.  :class:`GPRSigma` fits it once (with forces, hyperparameters
by marginal likelihood as in ``distmlip augment``) and returns the predicted energy standard
deviation (eV, whole structure, like ``augment``'s ``max_uncertainty``) of any frame.

Fingerprint: ``auto`` takes inverse distances for molecules (as ``augment``) and the
concatenated Chebyshev descriptor otherwise; unlike augment's displaced copies, MD frames drift
and rotate, so the Cartesian fingerprint would report uncertainty for a mere translation.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..utils.log import log


def matching_structures(ds, numbers, pbc, max_structures: int | None = None, seed: int = 0):
    """Reference structures of ``ds`` (not synthetic, with forces) whose atom sequence equals
    ``numbers`` and whose pbc equals ``pbc``; at most ``max_structures`` (a seeded subsample)."""
    numbers = np.asarray(numbers, dtype=np.int64)
    cand = np.flatnonzero(np.asarray(ds.natoms) == len(numbers))
    if len(cand) == 0:
        return []
    synth = np.asarray(ds.column("synthetic"))[cand].astype(bool)
    hf = np.asarray(ds.column("has_forces"))[cand].astype(bool)
    cand = cand[~synth & hf]
    out = [s for s in ds.read(cand) if np.array_equal(np.asarray(s.numbers), numbers)
           and np.array_equal(np.asarray(s.pbc, bool), np.asarray(pbc, bool))]
    if max_structures and len(out) > max_structures:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(out), max_structures, replace=False))
        out = [out[k] for k in keep]
    return out


class GPRSigma:
    """GPR on the training structures with ``template``'s atom sequence; ``sigma(frames)``."""

    def __init__(self, data_paths, template, settings=None, seed: int = 0, max_structures: int | None = 400,
                 extra_structures=()):
        from ..data.h5store import H5Dataset
        from ..gpr.augment import GPRSettings
        from ..gpr.fingerprints import make_fingerprint
        from ..gpr.model import LocalGPR

        g = settings if settings is not None else GPRSettings()
        ds = H5Dataset(data_paths)
        numbers = np.asarray(template.numbers, dtype=np.int64)
        pbc = np.asarray(template.pbc, dtype=bool)
        structs = matching_structures(ds, numbers, pbc, max_structures, seed) + [
            s for s in extra_structures if np.array_equal(np.asarray(s.numbers), numbers)]
        if len(structs) < 2:
            raise InputError(f"GPR uncertainty: {len(structs)} training structure(s) in {list(data_paths)} have the "
                             f"atom sequence and boundary conditions of the MD start ({len(numbers)} atoms); "
                             f"the GPR needs at least 2 (use a committee for other structures)")
        kind = g.fingerprint
        if kind == "auto":
            kind = "inverse" if (not pbc.any() and len(numbers) <= 64) else "chebyshev"
        self.kind = kind
        self.template = structs[0]
        self.fp = make_fingerprint(kind, species=list(ds.species),
                                   **({"spec": g.chebyshev.spec, "mode": g.chebyshev.mode}
                                      if kind == "chebyshev" else {}))
        X, J = self.fp.compute([s.positions for s in structs], self.template)
        X, J = self.fp.fit_scale(X, J)
        groups = None
        if kind == "cartesian" and g.length_scales == "element" and g.length_scale is None:
            from ase.data import chemical_symbols
            groups = np.repeat([chemical_symbols[int(z)] for z in numbers], 3)
        self.model = LocalGPR(max_obs=g.max_kernel_obs, memory_fraction=g.memory_fraction, seed=seed,
                              weight=g.weight, length_scale=g.length_scale, noise_energy=g.noise_energy,
                              noise_force=g.noise_force, device=g.device, fit_max_obs=g.fit_max_obs,
                              fit_iterations=g.fit_iterations, fit_restarts=g.fit_restarts, select=g.select,
                              fit_subsample=g.fit_subsample, groups=groups,
                              refine_iterations=g.refine_iterations)
        E = np.array([s.energy for s in structs])
        F = np.stack([s.forces for s in structs]).reshape(len(structs), -1)
        # the search takes minutes on a few hundred structures: say so, with an ETA
        from ..gpr.augment import _progress_printer
        log(f"GPR uncertainty: fitting a {kind} GPR on {len(structs)} structures ({len(numbers)} atoms) ...")
        self.model.progress = _progress_printer(f"GPR uncertainty ({kind})", 0)
        self.model.assembly_progress = _progress_printer(
            f"GPR uncertainty ({kind})", 0, what="final kernel, rows of {done}/{total} structures")
        self.model.fit(X, J, E, F)
        self.n_structures = len(structs)
        log(f"GPR uncertainty: {kind} fingerprint, fitted on {len(structs)} structures with the start's atom "
            f"sequence ({len(numbers)} atoms)")

    def predict(self, frames):
        """(energies [M], sigmas [M]) in eV for ASE Atoms ``frames`` (the template's atom order)."""
        if not frames:
            return np.zeros(0), np.zeros(0)
        X, _ = self.fp.compute([np.asarray(a.positions) for a in frames], self.template, with_jacobian=False)
        e, _, s = self.model.predict(X, None, forces=False, variance=True)
        return e.numpy().astype(np.float64), s.numpy().astype(np.float64)

    def sigma(self, atoms) -> float:
        return float(self.predict([atoms])[1][0])
