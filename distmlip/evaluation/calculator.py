"""ASE calculator on a saved distmlip model or committee: energy and forces (autograd),
molecules and periodic systems of any cell shape; the stress of periodic systems (eV/A^3, ASE's
Voigt order and sign; ``BPNN.energy_forces_stress``), so that cell relaxations
(``FrechetCellFilter``) and NPT dynamics run.  A structure without a periodic direction, or a slab
or wire whose non-periodic cell vectors are zero (no volume), has no stress (ASE's
PropertyNotImplementedError).

    from distmlip.calculator import DistmlipCalculator
    atoms.calc = DistmlipCalculator("run/model.pt")          # one model
    atoms.calc = DistmlipCalculator("run/committee.pt")      # committee of K models

With a committee, ``energy``/``forces``/``energies`` are the committee means and ``results`` also
holds ``energy_std`` (eV, ddof=1), ``forces_std`` [N, 3] (per atom and component, eV/A),
``forces_std_norm`` [N] (sqrt of the summed component variances per atom), ``energies_all``
[K] and ``forces_all`` [K, N, 3] (and ``stress_all`` [K, 6] when the stress was asked for).  One
model: the std entries are zeros.

Pairs shorter than the shortest distance of their element pair in the model's training data
(the record ``distmlip train`` stores in the model file; models/data_record.py) are where the
potential extrapolates: ``results['below_training_pairs']`` lists them ({pair: distance}) and a
warning is printed the first time each element pair goes below (and again at each new low
below 0.9 x the previous warning's distance).
"""
from __future__ import annotations

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes


class DistmlipCalculator(Calculator):
    implemented_properties = ["energy", "free_energy", "forces", "energies", "energy_std", "forces_std", "stress"]

    def __init__(self, model, device="cpu", backend=None, **kwargs):
        """``model``: a model or committee file path, a BPNN, or a list of BPNN (committee);
        ``backend``: descriptor backend override."""
        super().__init__(**kwargs)
        from ..models.bpnn import BPNN, load_models

        self.device = torch.device(device)
        if isinstance(model, BPNN):
            models = [model]
        elif isinstance(model, (list, tuple)):
            models = list(model)
        else:
            models = load_models(model, device=self.device, backend=backend)
        self.models = [m.to(self.device).eval() for m in models]
        for m in self.models:
            for p in m.parameters():
                p.requires_grad_(False)
        self.model = self.models[0]
        self.training_record = getattr(self.model, "training_record", None)
        self._warned: dict = {}

    @property
    def K(self) -> int:
        return len(self.models)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        from ..data.structure import Structure
        from ..descriptors.batch import collate

        a = self.atoms
        if len(a) == 0:
            from ..errors import InputError
            raise InputError("calculator: the structure has no atoms")
        cell = np.array(a.cell[:], dtype=np.float64)
        s = Structure(numbers=np.asarray(a.numbers), positions=np.asarray(a.positions, dtype=np.float64),
                      cell=cell, pbc=np.asarray(a.pbc, dtype=bool))
        want_stress = "stress" in properties and bool(np.any(a.pbc)) and abs(np.linalg.det(cell)) > 0
        if "stress" in properties and np.any(a.pbc) and not want_stress:
            # a slab or wire whose non-periodic cell vectors are zero has no volume for the virial;
            # ASE's own message ("stress not present in this calculation") did not say why
            from ase.calculators.calculator import PropertyNotImplementedError
            raise PropertyNotImplementedError(
                f"calculator: no stress for {a.get_chemical_formula()} (pbc {a.pbc.tolist()}): its cell has no "
                "volume (a non-periodic cell vector is zero); give that direction a vacuum vector")
        Es, Fs, eas, Ss = [], [], [], []
        batch = species = cutoff = None
        for m in self.models:
            if batch is None or m.cutoff != cutoff or m.species != species:
                species, cutoff = m.species, m.cutoff
                batch = collate([s], species=m.species, cutoff=m.cutoff, dtype=torch.float64, device=self.device)
            pos = batch.positions.detach().requires_grad_(True)
            batch.positions = pos
            if want_stress:
                with torch.no_grad():
                    e_at = m.atomic_energies(batch)
                E, F, S = m.energy_forces_stress(batch)
                Ss.append(S[0].cpu().numpy())
                E, g = E[0], -F
            else:
                with torch.enable_grad():
                    e_at = m.atomic_energies(batch)
                    E = e_at.sum()
                    (g,) = torch.autograd.grad(E, pos)
            Es.append(float(E.detach().cpu()))
            Fs.append(-g.detach().cpu().numpy())
            eas.append(e_at.detach().cpu().numpy())
        self.results["below_training_pairs"] = self._check_record(a.numbers, batch)
        Es, Fs, eas = np.array(Es), np.stack(Fs), np.stack(eas)
        if not (np.isfinite(Es).all() and np.isfinite(Fs).all() and all(np.isfinite(x).all() for x in Ss)):
            # an optimiser or MD would carry the NaN on: stop here, naming the likely cause
            from ..errors import NonFiniteError
            where = ""
            if batch is not None and batch.pair_i.numel():
                with torch.no_grad():
                    p = batch.positions.detach()
                    d = torch.linalg.norm(p[batch.pair_j] - p[batch.pair_i] + batch.pair_shift, dim=1)
                k = int(torch.argmin(d))
                where = (f"; its shortest pair is atoms {int(batch.pair_i[k])} and {int(batch.pair_j[k])} at "
                         f"{float(d[k]):.3g} A")
            raise NonFiniteError(f"calculator: non-finite energy, forces or stress for {a.get_chemical_formula()} "
                                 f"({len(a)} atoms){where}")
        energy = float(Es.mean())
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        self.results["energies"] = eas.mean(0)
        self.results["forces"] = Fs.mean(0)
        K = len(Es)
        self.results["energy_std"] = float(Es.std(ddof=1)) if K > 1 else 0.0
        fstd = Fs.std(0, ddof=1) if K > 1 else np.zeros_like(Fs[0])
        self.results["forces_std"] = fstd
        self.results["forces_std_norm"] = np.sqrt((fstd * fstd).sum(1))
        self.results["energies_all"] = Es
        self.results["forces_all"] = Fs
        if want_stress:
            from ase.stress import full_3x3_to_voigt_6_stress

            Sv = np.stack([full_3x3_to_voigt_6_stress(x) for x in Ss])
            self.results["stress"] = Sv.mean(0)
            self.results["stress_all"] = Sv

    def _check_record(self, numbers, batch) -> dict:
        """{pair: distance} of the pairs below the training data's shortest distances; warns."""
        if not self.training_record or batch is None or batch.pair_i.numel() == 0:
            return {}
        from ..models.data_record import pairs_below
        from ..utils.log import warn

        with torch.no_grad():
            pos = batch.positions.detach()
            d = torch.linalg.norm(pos[batch.pair_j] - pos[batch.pair_i] + batch.pair_shift, dim=1)
        i, j = batch.pair_i.cpu().numpy(), batch.pair_j.cpu().numpy()
        below = pairs_below(self.training_record, numbers, i, j, d.cpu().numpy())
        for k, dist in below.items():
            last = self._warned.get(k)
            if last is None or dist < 0.9 * last:
                self._warned[k] = dist
                lim = (self.training_record.get("pair_min_distance_A") or {}).get(k)
                warn(f"calculator: a {k} pair at {dist:.3f} A is shorter than the shortest {k} distance in the "
                     f"model's training data ({'none within %.2f A' % self.training_record['cutoff_A'] if lim is None else '%.3f A' % lim}): "
                     f"the potential extrapolates there")
        return below
