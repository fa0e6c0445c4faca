"""``distmlip import-aenet NN_FILES... -o model.pt``: an aenet potential as a distmlip model.

Reads one ``.nn`` file per element, binary (as train.x writes them) or ASCII (aenet's or
aenet-PyTorch's layout; :mod:`.aenet_nn`), and builds the BPNN that predicts the same energies
and forces: the inverse of the mapping in :mod:`.export_aenet`.

* species: the environment types of the setups, in their order (which fixes the typespins of
  the weighted descriptor terms); every file must list the same ones, and every one needs a file.
* descriptor: Chebyshev (radial Rc and order, angular Rc and order from sfparam(1:4, 1)), equal in
  all files.  Behler-Parrinello symmetry functions (sftype Behler2011) are refused: distmlip has
  no such descriptor yet.
* normalisation: feature_mean = sfval_avg, feature_std = sqrt(sfval_cov - sfval_avg^2) as aenet
  computes it; where that is <= 1e-10 aenet multiplies the feature by 0, which the model does by a
  zero column of the first-layer weights (and std 1).
* networks: the layers of each file; networks of different widths are padded to the widest with
  zero weights (exact: a padded node has no input and no output weight), different depths or
  activations per layer between elements are refused (a distmlip model has one architecture).
  The output layer must be linear with one node (train.x always makes it so).
* energy: energy_scale = 1/scale of the first file (the files of one train.x run share it; other
  ratios are folded into the output layer), energy_shift[t] = shift of element t's file,
  reference_energies[t] = its E_atom.

The model is float64 and records in its metadata where it came from and the training-set record
of the headers (so exporting it again writes the same header), and can be used as
``training.warm_start``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..models import activations as act_table
from ..utils.log import log, warn
from . import aenet_nn


def add_arguments(p) -> None:
    p.add_argument("files", nargs="+", help="aenet potential files, one per element (binary or ASCII .nn)")
    p.add_argument("--output", "-o", required=True, help="distmlip model file to write (e.g. model.pt)")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                   help="precision of the model's networks (default float64, which reproduces aenet)")


def _refuse_descriptor(pot: aenet_nn.Potential) -> None:
    sft = pot.setup.sftype.strip().lower()
    if sft == "chebyshev":
        return
    if sft.startswith("behler"):
        raise InputError(f"{pot.path}: the descriptor is Behler-Parrinello symmetry functions "
                         f"({pot.setup.sftype.strip()}); distmlip imports aenet potentials on Chebyshev "
                         "descriptors only (symmetry functions are not supported yet)")
    raise InputError(f"{pot.path}: unknown descriptor type {pot.setup.sftype.strip()!r} (expected Chebyshev)")


def _activation_name(code: int, path: str) -> str:
    act = act_table.by_aenet_code(int(code))
    if act is None:
        known = ", ".join(f"{a.aenet_code} {a.name}" for a in act_table.ACTIVATIONS.values() if a.aenet_code is not None)
        raise InputError(f"{path}: activation code {code} is not one aenet defines ({known})")
    return act.name


def potentials_to_model(pots: list, dtype: str = "float64"):
    """A :class:`~distmlip.models.bpnn.BPNN` equal to the aenet potential ``pots``."""
    from ..descriptors.spec import DescriptorSpec
    from ..models.bpnn import BPNN

    if not pots:
        raise InputError("import-aenet: no potential files given")
    for p in pots:
        _refuse_descriptor(p)
    first = pots[0]
    species = list(first.setup.envtypes)
    by_el: dict = {}
    for p in pots:
        el = p.setup.atomtype
        if el in by_el:
            raise InputError(f"import-aenet: {by_el[el].path} and {p.path} are both potentials of {el}")
        if list(p.setup.envtypes) != species:
            raise InputError(f"import-aenet: {p.path} lists the environment types {list(p.setup.envtypes)}, "
                             f"{first.path} {species}; a distmlip model has one species order (the typespins "
                             "of the descriptor depend on it)")
        if p.setup.chebyshev() != first.setup.chebyshev():
            raise InputError(f"import-aenet: {p.path} has the Chebyshev parameters {p.setup.chebyshev()}, "
                             f"{first.path} {first.setup.chebyshev()}; a distmlip model has one descriptor")
        by_el[el] = p
    missing = [s for s in species if s not in by_el]
    if missing:
        raise InputError(f"import-aenet: no potential file for {missing} (the environment types are {species}; "
                         "give one file per element)")
    extra = [el for el in by_el if el not in species]
    if extra:
        raise InputError(f"import-aenet: potentials for {extra}, which are not among the environment types {species}")
    rc_r, n_r, rc_a, n_a = first.setup.chebyshev()
    try:
        spec = DescriptorSpec("chebyshev", rc_r, n_r, rc_a, n_a)
    except Exception as exc:
        raise InputError(f"import-aenet: {first.path}: Chebyshev parameters {first.setup.chebyshev()}: {exc}") from None
    D = spec.dim(len(species))
    ordered = [by_el[s] for s in species]
    depth = None
    acts = None
    widths = []
    for p in ordered:
        net = p.network
        if net.nnodes[0] != D or p.setup.nsf != D:
            raise InputError(f"{p.path}: {net.nnodes[0]} network inputs and {p.setup.nsf} descriptor functions; "
                             f"the Chebyshev parameters give {D}")
        if net.nnodes[-1] != 1 or net.f_a[-1] != act_table.get("linear").aenet_code:
            raise InputError(f"{p.path}: the output layer must be one linear node (it has {net.nnodes[-1]} "
                             f"node(s), activation code {net.f_a[-1]})")
        a = [_activation_name(c, p.path) for c in net.f_a[:-1]]
        if depth is None:
            depth, acts = len(net.nnodes), a
        elif len(net.nnodes) != depth or a != acts:
            raise InputError(f"import-aenet: {p.path} has the hidden layers {net.nnodes[1:-1]} {a}, "
                             f"{ordered[0].path} {ordered[0].network.nnodes[1:-1]} {acts}; a distmlip model "
                             "has one depth and one activation per layer for all elements")
        widths.append(net.nnodes[1:-1])
    hidden = [max(w[k] for w in widths) for k in range(depth - 2)]
    if any(w != hidden for w in widths):
        warn(f"import-aenet: hidden widths {widths} differ between elements; the narrower networks are "
             f"padded with zero weights to {hidden} (same energies)")
    scale0 = float(ordered[0].trainset.scale)
    if not (scale0 > 0 and np.isfinite(scale0)):
        raise InputError(f"{ordered[0].path}: energy scaling factor {scale0} is not positive")
    refs = {s: p.e_atom for s, p in zip(species, ordered)}
    model = BPNN(species, spec, hidden, acts, dtype, reference_energies={k: v for k, v in refs.items() if v != 0.0})
    ann = model.ann
    with torch.no_grad():
        for t, p in enumerate(ordered):
            stp, ts = p.setup, p.trainset
            avg = np.asarray(stp.sfval_avg, np.float64)
            s = np.sqrt(np.asarray(stp.sfval_cov, np.float64) - avg * avg)
            dead = ~(s > 1e-10)
            std = np.where(dead, 1.0, s)
            layers = p.network.layers()
            W0, b0 = layers[0]
            layers[0] = (np.where(dead[None, :], 0.0, W0), b0)
            WL, bL = layers[-1]
            ratio = scale0 / float(ts.scale)
            layers[-1] = (WL * ratio, bL * ratio)
            lin = [m for m in ann.nets[t] if isinstance(m, torch.nn.Linear)]
            for k, (m, (W, b)) in enumerate(zip(lin, layers)):
                m.weight.zero_()
                m.bias.zero_()
                m.weight[: W.shape[0], : W.shape[1]] = torch.from_numpy(W).to(m.weight.dtype)
                m.bias[: b.shape[0]] = torch.from_numpy(b).to(m.bias.dtype)
            ann.feature_mean[t] = torch.from_numpy(avg)
            ann.feature_std[t] = torch.from_numpy(std)
            ann.energy_shift[t] = float(ts.shift)
            if dead.any():
                warn(f"{p.path}: {int(dead.sum())} descriptor function(s) of {stp.atomtype} never varied in "
                     "aenet's training set; aenet (and the imported model) ignore them")
        ann.energy_scale.fill_(1.0 / scale0)
    ts = ordered[0].trainset
    if ts.normalized:   # train.x writes E_min/E_max/E_avg normalised
        e3 = [e / ts.scale + ts.shift for e in (ts.e_min, ts.e_max, ts.e_avg)]
    else:
        e3 = [ts.e_min, ts.e_max, ts.e_avg]
    model.metadata = {
        "source": "aenet",
        "aenet_files": [str(p.path) for p in ordered],
        "description": ordered[0].setup.description.strip(),
        "training_set": {"n_structures": int(ts.nstrucs), "n_atoms": int(ts.natomtot),
                         "species_atoms": {s: int(p.setup.neval) for s, p in zip(species, ordered)},
                         "e_min": e3[0], "e_max": e3[1], "e_avg": e3[2], "source": ts.file.strip(),
                         "reference_energies": refs},
    }
    return model


def import_aenet(paths, dtype: str = "float64"):
    pots = [aenet_nn.read_potential(p) for p in paths]
    return potentials_to_model(pots, dtype=dtype), pots


def run(args) -> int:
    model, pots = import_aenet(args.files, dtype=args.dtype)
    out = Path(args.output)
    if out.is_dir():
        raise InputError(f"import-aenet: output {out} is a folder; give a model file name (e.g. {out / 'model.pt'})")
    model.save(out, metadata=model.metadata)
    for p in pots:
        log(f"read {p.path} ({p.layout}): {p.setup.atomtype}, network {p.network.nnodes}")
    log(f"wrote {out}: {model.describe()}")
    log("use it as training.warm_start to retrain (training.refit_normalization: false keeps aenet's "
        "normalisation), or with `distmlip evaluate` / the ASE calculator")
    return 0
