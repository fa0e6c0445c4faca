"""Export a BPNN (with its ZBL term, if any) as a ``torch.export`` program: the deployment format
that replaces TorchScript in torch 2.x.

    ep = torch.export.load("model.pt2")            # torch only, no distmlip import
    energy, forces = ep.module()(positions, numbers, cell, pair_i, pair_j, cell_shifts)

inputs   positions [N, 3] float64 (Angstrom); numbers [N] int64 (atomic numbers, each one of the
         model's species); cell [3, 3] float64 (rows = lattice vectors; any value for a
         molecule); pair_i, pair_j [P] int64 and cell_shifts [P, 3] float64: a full neighbour
         list (both directions i->j and j->i, periodic images included) of every pair closer
         than the model's cutoff (more pairs are allowed: they are ignored), with
         r_ij = positions[pair_j] - positions[pair_i] + cell_shifts @ cell
         (cell_shifts: the integer image offsets, as ASE's and vesin's neighbour lists give them).
outputs  energy [] float64 (eV), forces [N, 3] float64 (eV/Angstrom).

N and P are dynamic.  ``<path>.json``, written next to the program, gives the cutoff, the
species and the input names.  The atomic numbers must be the model's elements: an atom of another
element makes the energy and every force NaN (a program cannot raise an error).  With ``aoti=True`` the program is also compiled with
AOTInductor into ``<name>.aoti.pt2`` (``torch._inductor.aoti_load_package(path)(...)``: the same
call, native code, loadable from C++ through ``torch::inductor::AOTIModelPackageLoader``).

How it is built: the function traced is the package's own code, not a copy - the reference
Chebyshev descriptor (:func:`distmlip.descriptors.chebyshev.chebyshev_reference`, written without
size-dependent branches so that torch.export can trace its triplet list with symbolic sizes),
the activation functions of the table (:mod:`distmlip.models.activations`; float32 networks run
in float64 arithmetic on float32 inputs and outputs, as the compiled CPU networks do) and the ZBL pair
function (:func:`distmlip.models.zbl.switched_pair_energy`); the forces are its autograd
derivative.  torch.export (torch 2.13) cannot yet trace ``torch.autograd.grad`` itself, so the
energy-and-forces function is first traced to aten operations with
``torch.fx.experimental.proxy_tensor.make_fx`` (symbolic shapes: the backward is recorded as
ordinary operations) and that graph is exported.  The networks run for every element on every
atom and the element's output is selected (no data-dependent gather; fine for a few elements).
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch

from ..descriptors.chebyshev import chebyshev_reference, typespin
from ..errors import InputError
from ..models import activations as act_table
from ..models.zbl import switched_pair_energy

INPUT_NAMES = ["positions", "numbers", "cell", "pair_i", "pair_j", "cell_shifts"]


def _constants(model) -> tuple[list, dict]:
    """The model's numbers as a flat list of float64/int64 tensors and how to read them."""
    from ase.data import atomic_numbers

    spec, ann = model.spec, model.ann
    if spec.type != "chebyshev":
        raise InputError(f"exported-program: descriptor type {spec.type!r} is not supported")
    T = len(model.species)
    z2i = torch.full((119,), -1, dtype=torch.long)
    for k, s in enumerate(model.species):
        z2i[atomic_numbers[s]] = k
    consts = [z2i, torch.tensor(typespin(T), dtype=torch.float64),
              ann.feature_mean.detach().cpu().to(torch.float64).clone(),
              ann.feature_std.detach().cpu().to(torch.float64).clone(),
              (ann.energy_shift + ann.reference_energy).detach().cpu().to(torch.float64).clone(),
              ann.energy_scale.detach().cpu().to(torch.float64).reshape(()).clone()]
    n_layers = None
    for t in range(T):
        lin = [m for m in ann.nets[t] if isinstance(m, torch.nn.Linear)]
        n_layers = len(lin)
        for m in lin:
            # float64 arithmetic also for float32 networks, as the compiled CPU networks do
            consts += [m.weight.detach().cpu().to(torch.float64).clone(), m.bias.detach().cpu().to(torch.float64).clone()]
    zbl = getattr(model, "zbl", None)
    if zbl is not None:
        consts += [torch.tensor([atomic_numbers[s] for s in model.species], dtype=torch.long),
                   zbl.r_in.detach().cpu().to(torch.float64).clone(), zbl.r_out.detach().cpu().to(torch.float64).clone()]
    layout = {"T": T, "n_layers": n_layers, "activations": list(ann.activations), "zbl": zbl is not None,
              "rc_radial": spec.rc_radial, "n_radial": spec.n_radial, "rc_angular": spec.rc_angular,
              "n_angular": spec.n_angular, "float32": ann.net_dtype == torch.float32}
    return consts, layout


def make_energy_forces(layout: dict):
    """f(positions, numbers, cell, pair_i, pair_j, cell_shifts, *constants) -> (energy, forces)."""
    T, L = layout["T"], layout["n_layers"]
    fns = [act_table.get(a).function for a in layout["activations"]]

    def energy(pos, numbers, cell, pi, pj, cell_shifts, consts):
        z2i, spins, mean, std, base, escale = consts[:6]
        rest = consts[6:]
        species = z2i[numbers]
        shift = cell_shifts.to(pos.dtype) @ cell.to(pos.dtype)
        G = chebyshev_reference(pos, species, pi, pj, shift, spins, layout["rc_radial"], layout["n_radial"],
                                layout["rc_angular"], layout["n_angular"])
        e = base[species]
        for t in range(T):
            x = (G - mean[t]) / std[t]
            if layout["float32"]:
                x = x.to(torch.float32).to(torch.float64)
            for k in range(L):
                W, b = rest[2 * (t * L + k)], rest[2 * (t * L + k) + 1]
                x = x @ W.T + b
                if k < L - 1:
                    x = fns[k](x)
            y = x.reshape(-1)
            if layout["float32"]:
                y = y.to(torch.float32).to(torch.float64)
            e = e + torch.where(species == t, escale * y, torch.zeros_like(y))
        E = e.sum()
        if layout["zbl"]:
            zs, r_in, r_out = rest[2 * T * L:2 * T * L + 3]
            vec = pos[pj] - pos[pi] + shift
            r = torch.linalg.vector_norm(vec, dim=-1)
            ti, tj = species[pi], species[pj]
            E = E + 0.5 * switched_pair_energy(r, zs[ti], zs[tj], r_in[ti, tj], r_out[ti, tj]).sum()
        return E

    def energy_forces(pos, numbers, cell, pi, pj, cell_shifts, *consts):
        with torch.enable_grad():
            p = pos.detach().requires_grad_(True)
            E = energy(p, numbers, cell, pi, pj, cell_shifts, consts)
            (g,) = torch.autograd.grad([E], [p])
        # an element the model lacks maps to -1, which indexing wraps to the last species: a
        # finite wrong energy.  NaN instead (no data-dependent branch, so it exports): a
        # deployed model cannot raise, but a NaN stops the MD code where a wrong number would not
        unknown = (consts[0][numbers] < 0).any()
        poison = torch.where(unknown, torch.full((), float("nan"), dtype=E.dtype), torch.zeros((), dtype=E.dtype))
        return E.detach() + poison, -g + poison

    return energy_forces


class ExportedPotential(torch.nn.Module):
    """The traced energy-and-forces graph with the model's numbers as buffers."""

    def __init__(self, graph: torch.nn.Module, consts: list):
        super().__init__()
        self.graph = graph
        self.n_consts = len(consts)
        for k, c in enumerate(consts):
            self.register_buffer(f"c{k}", c)

    def forward(self, positions, numbers, cell, pair_i, pair_j, cell_shifts):
        consts = [getattr(self, f"c{k}") for k in range(self.n_consts)]
        return self.graph(positions, numbers, cell, pair_i, pair_j, cell_shifts, *consts)


def _example(model):
    """A small periodic structure of the model's species with its neighbour list (tracing input)."""
    import numpy as np
    from ase.data import atomic_numbers

    from ..descriptors.neighbors import neighbor_list

    rng = np.random.default_rng(0)
    n = max(4, 2 * len(model.species))
    L = 2.2 * n ** (1 / 3)
    pos = rng.uniform(0, L, (n, 3))
    cell = np.eye(3) * L
    i, j, S = neighbor_list(pos, cell, np.ones(3, bool), model.cutoff)
    numbers = [atomic_numbers[model.species[k % len(model.species)]] for k in range(n)]
    return (torch.tensor(pos), torch.tensor(numbers, dtype=torch.long), torch.tensor(cell),
            torch.as_tensor(i, dtype=torch.long), torch.as_tensor(j, dtype=torch.long),
            torch.as_tensor(S, dtype=torch.float64))


def build_program(model):
    """The ``torch.export.ExportedProgram`` of ``model`` (see the module docstring)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    consts, layout = _constants(model)
    fn = make_energy_forces(layout)
    args = _example(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # tracing chatter (symbolic shapes), not for users
        graph = make_fx(fn, tracing_mode="symbolic")(*args, *consts)
        mod = ExportedPotential(graph, consts).eval()
        N = torch.export.Dim("n_atoms", min=1)
        P = torch.export.Dim("n_pairs", min=1)
        dyn = {"positions": {0: N}, "numbers": {0: N}, "cell": None, "pair_i": {0: P}, "pair_j": {0: P},
               "cell_shifts": {0: P}}
        ep = torch.export.export(mod, args, dynamic_shapes=dyn, strict=False)
    # the traced graph must reproduce the function it was traced from
    E0, F0 = fn(*args, *consts)
    E1, F1 = ep.module()(*args)
    if not (math.isclose(float(E0), float(E1), rel_tol=1e-12, abs_tol=1e-10)
            and float((F0 - F1).abs().max()) < 1e-9):
        raise RuntimeError("exported-program: the exported graph does not reproduce the model on its example")
    return ep


def metadata(model) -> dict:
    return {"format": "distmlip-exported-program", "version": 1, "inputs": INPUT_NAMES,
            "outputs": ["energy", "forces"], "species": list(model.species), "cutoff": float(model.cutoff),
            "units": {"energy": "eV", "length": "Angstrom"}, "zbl": getattr(model, "zbl", None) is not None}


def write_exported_program(model, path, aoti: bool = False) -> list[Path]:
    """Save the exported program to ``path`` (``.pt2``) and its metadata to ``path + '.json'``;
    with ``aoti`` also the AOTInductor package ``<stem>.aoti.pt2``.  Returns the paths written."""
    from ..utils.io import atomic_path, atomic_write_text

    path = Path(path)
    ep = build_program(model)
    with atomic_path(path, suffix=".pt2") as tmp:
        torch.export.save(ep, str(tmp))
    meta = metadata(model)
    out = [path]
    if aoti:
        apath = path.with_name(path.stem + ".aoti.pt2")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with atomic_path(apath, suffix=".pt2") as tmp:
                torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp))
        meta["aoti_package"] = apath.name
        out.append(apath)
    jpath = Path(str(path) + ".json")
    atomic_write_text(jpath, json.dumps(meta, indent=1) + "\n")
    out.append(jpath)
    return out
