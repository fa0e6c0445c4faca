"""ASE calculator on a saved distmlip model: energy and forces (autograd), molecules and
periodic systems of any cell shape.

    from distmlip.calculator import DistmlipCalculator
    atoms.calc = DistmlipCalculator("run/model.pt")
"""
from __future__ import annotations

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes


class DistmlipCalculator(Calculator):
    implemented_properties = ["energy", "free_energy", "forces", "energies"]

    def __init__(self, model, device="cpu", backend=None, **kwargs):
        """``model``: a model file path or a BPNN instance; ``backend``: descriptor backend override."""
        super().__init__(**kwargs)
        from ..models.bpnn import BPNN

        self.device = torch.device(device)
        if isinstance(model, BPNN):
            self.model = model.to(self.device)
        else:
            self.model = BPNN.load(model, device=self.device, backend=backend)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        from ..data.structure import Structure
        from ..descriptors.batch import collate

        a = self.atoms
        cell = np.array(a.cell[:], dtype=np.float64)
        s = Structure(numbers=np.asarray(a.numbers), positions=np.asarray(a.positions, dtype=np.float64),
                      cell=cell, pbc=np.asarray(a.pbc, dtype=bool))
        m = self.model
        batch = collate([s], species=m.species, cutoff=m.cutoff, dtype=torch.float64, device=self.device)
        batch.positions.requires_grad_(True)
        with torch.enable_grad():
            e_at = m.atomic_energies(batch)
            E = e_at.sum()
            (g,) = torch.autograd.grad(E, batch.positions)
        energy = float(E.detach().cpu())
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        self.results["energies"] = e_at.detach().cpu().numpy()
        self.results["forces"] = -g.detach().cpu().numpy()
