"""The TorchScript module of the metatomic export (imported only when metatomic-torch is
installed; :mod:`.export_metatomic` builds and saves it).

It wraps the TorchScript core of :mod:`.export_torchscript` (descriptor, networks and ZBL on pair
vectors) in metatomic's model interface: the simulation engine (metatomic-ase, LAMMPS, i-PI, ...)
gives each system a full neighbour list of the model's cutoff whose pair vectors are connected to
the positions and the cell by autograd, so the engine's derivatives of the energy are the forces
and the virial."""

from typing import Dict, List, Optional

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import ModelOutput, NeighborListOptions, System

from .export_torchscript import ExportedPotential


class MetatomicPotential(torch.nn.Module):
    def __init__(self, core: ExportedPotential):
        super().__init__()
        self.core = core
        self.nl = NeighborListOptions(cutoff=float(core.cutoff), full_list=True, strict=True,
                                      requestor="distmlip")

    def requested_neighbor_lists(self) -> List[NeighborListOptions]:
        return [self.nl]

    def forward(self, systems: List[System], outputs: Dict[str, ModelOutput],
                selected_atoms: Optional[Labels] = None) -> Dict[str, TensorMap]:
        results: Dict[str, TensorMap] = {}
        if "energy" not in outputs:
            return results
        per_atom = outputs["energy"].sample_kind == "atom"
        values: List[torch.Tensor] = []
        samples: List[torch.Tensor] = []
        for s, system in enumerate(systems):
            nl = system.get_neighbor_list(self.nl)
            pi = nl.samples.column("first_atom").to(torch.long)
            pj = nl.samples.column("second_atom").to(torch.long)
            vec = nl.values.reshape(-1, 3)
            e = self.core.atomic_energies_from_vectors(system.types.to(torch.long), vec, pi, pj)
            atoms = torch.arange(e.shape[0], device=e.device)
            if selected_atoms is not None:
                sel = selected_atoms.values
                mine = sel[sel[:, 0] == s][:, 1].to(torch.long)
                e = e[mine]
                atoms = mine
            e = e.to(system.positions.dtype)
            if per_atom:
                values.append(e.reshape(-1, 1))
                samples.append(torch.stack([torch.full_like(atoms, s), atoms], dim=1))
            else:
                values.append(e.sum().reshape(1, 1))
                samples.append(torch.tensor([[s]], device=e.device))
        names = ["system", "atom"] if per_atom else ["system"]
        block = TensorBlock(values=torch.cat(values, dim=0),
                            samples=Labels(names, torch.cat(samples, dim=0).to(torch.int32)),
                            components=torch.jit.annotate(List[Labels], []),
                            properties=Labels(["energy"], torch.tensor([[0]], device=values[0].device)))
        results["energy"] = TensorMap(keys=Labels(["_"], torch.tensor([[0]], device=values[0].device)),
                                      blocks=[block])
        return results
