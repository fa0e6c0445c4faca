"""Export a BPNN to aenet potential files (one ``<El>.<arch>.nn`` per element).

The files are written in aenet's binary layout by default (what predict.x, train.x restarts and
the aenet LAMMPS interfaces read; :mod:`.aenet_nn` describes the records) and in aenet's ASCII
layout with ``ascii=True`` (readable as text, convertible by aenet-PyTorch's nnASCII2bin.x).

aenet evaluates, with avg = sfval_avg, cov = sfval_cov (the second moment) of the central atom's
file and scale/shift/E_atom of its training-set record,

    E_i = (1/scale) * net((G_i - avg) / sqrt(cov - avg^2)) + shift + E_atom(type_i)

and distmlip  E_i = ref[t] + shift[t] + energy_scale * net_t((G_i - mean[t]) / std[t]).

Mapping (exact up to float64 round-off):

* descriptor normalisation: avg = mean, cov = mean^2 + std^2; the first-layer weights are
  multiplied column-wise by s/std with s = sqrt(cov - avg^2) evaluated as aenet does (so the
  cancellation in cov - avg^2 costs nothing).  A model's mean/std are the statistics of its
  training descriptors, which are what aenet's generate.x records for the same structures.
* energy: scale and shift are those train.x derives from a training set (``ts_energy_norm_simple``):
  scale = 2 / (E_max - E_min), shift = (E_max + E_min) / 2 with E_min/E_max the extreme cohesive
  energies per atom of the training structures.  The model's own energy_scale and per-element
  shift are folded into the output layer: W_out' = scale * energy_scale * W_out,
  b_out' = scale * (energy_scale * b_out + shift[t] - shift).  So a train.x run restarted from the
  files on a training set of the same structures (and the same atomic energies) starts from the
  model instead of rescaling it.  E_atom = the model's reference energies.
* header: description, the training-set file name, structure and atom counts, evaluations per
  element (atoms of that element in the training set) and E_min/E_max/E_avg in train.x's
  normalised units (as train.x writes them), taken from the model file's ``training_set``
  metadata (written by ``distmlip train``) or from a data set given to the export.  Without
  either, scale = 1/energy_scale and shift = the mean of the per-element shifts, the counts are
  0 and a warning says that train.x restarts need them.
* sfval_min/max are not used by aenet's evaluation and are written as mean -/+ std.

Committees (several networks per element) cannot be expressed and are refused; so are activations
aenet does not have (softplus, silu).  A ZBL term (no pair term in aenet) is left out with a warning
naming the radii below which the files differ from the model.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..models import activations as act_table
from . import aenet_nn

# aenet's file-name letters of the activations (train.x's 'tanh','t' / 'sigmoid','s' / ...)
ARCH_LETTER = {"tanh": "t", "sigmoid": "s", "linear": "l", "mtanh": "m", "twist": "w"}
RC_MIN = 0.5


def architecture_name(model) -> str:
    ann = model.ann
    return "-".join(f"{h}{ARCH_LETTER.get(a, a[0])}" for h, a in zip(ann.hidden, ann.activations)) or "linear"


def _check_exportable(model):
    if getattr(model, "zbl", None) is not None:
        # ZBL is on by default; the networks were fitted to E - E_ZBL, and E_ZBL vanishes beyond
        # the outer radii, so the networks alone are the model wherever no pair is that close
        # (every training structure, as a rule): the export writes them and says what is left out
        from ..utils.log import warn

        radii = ", ".join(f"{k} {v[1]:.2f} A" for k, v in model.zbl.to_dict()["radii"].items())
        warn("aenet export: aenet has no pair potential, so the .nn files hold the networks without the "
             f"model's ZBL repulsion: they equal the model only where no pair is closer than {radii} "
             "(closer pairs get no repulsion in aenet); --format torchscript keeps ZBL")
    if model.spec.type != "chebyshev":
        raise InputError(f"aenet export: descriptor type {model.spec.type!r}: aenet files hold Chebyshev "
                         "descriptors only")
    for a in model.ann.activations:
        if act_table.get(a).aenet_code is None:
            known = [x.name for x in act_table.ACTIVATIONS.values() if x.aenet_code is not None]
            raise InputError(f"aenet export: activation {a!r} has no aenet equivalent (aenet has "
                             f"{', '.join(known)}); retrain with one of those")


def _layers(model, t: int) -> list:
    lin = [m for m in model.ann.nets[t] if isinstance(m, torch.nn.Linear)]
    return [(m.weight.detach().to(torch.float64).cpu().numpy().copy(),
             m.bias.detach().to(torch.float64).cpu().numpy().copy()) for m in lin]


def training_statistics(model, data=None) -> dict | None:
    """The training-set record for the headers: from data set file(s) ``data`` if given, else
    the model file's ``training_set`` metadata, else None."""
    if data:
        from ..data.h5store import H5Dataset
        from ..data.info import energy_statistics

        ds = H5Dataset(data)
        try:
            missing = [s for s in ds.species if s not in model.species]
            if missing:
                raise InputError(f"aenet export: data set {', '.join(map(str, ds.paths))} holds {missing}, "
                                 f"which the model ({model.species}) has no network for")
            st = energy_statistics(ds, None, model.ann.reference_energies())
        finally:
            ds.close()
        st["source"] = ",".join(Path(p).name for p in ds.paths)
        return st
    st = (getattr(model, "metadata", None) or {}).get("training_set")
    return dict(st) if st else None


def model_to_potentials(model, stats: dict | None = None, description: str = "distmlip-export") -> list:
    """One :class:`aenet_nn.Potential` per element of ``model`` (see the module docstring)."""
    _check_exportable(model)
    spec, ann = model.spec, model.ann
    species = list(model.species)
    T = len(species)
    nsf = (spec.n_radial + 1 + spec.n_angular + 1) * (2 if T > 1 else 1)
    if nsf != model.dim:
        raise InputError(f"aenet export: descriptor size {model.dim} does not match aenet's {nsf}")
    sigma = float(ann.energy_scale)
    if not (sigma > 0 and math.isfinite(sigma)):
        raise InputError(f"aenet export: energy scale {sigma} must be positive")
    mu = ann.energy_shift.detach().cpu().numpy().astype(np.float64)
    ref = ann.reference_energy.detach().cpu().numpy().astype(np.float64)
    if stats and stats.get("e_max", 0.0) > stats.get("e_min", 0.0):
        e_min, e_max, e_avg = float(stats["e_min"]), float(stats["e_max"]), float(stats["e_avg"])
        scale = 2.0 / (e_max - e_min)
        shift = 0.5 * (e_max + e_min)
    else:   # no training-set record (or one structure): the model's own scale, the mean shift
        scale = 1.0 / sigma
        shift = float(mu.mean())
        e_min, e_max, e_avg = shift - 1.0 / scale, shift + 1.0 / scale, shift
    stats = stats or {}
    species_atoms = stats.get("species_atoms") or {}
    trainset = aenet_nn.TrainsetInfo(
        file=aenet_nn._token(stats.get("source") or "distmlip-model"), normalized=True, scale=scale, shift=shift,
        type_names=species, e_atom=ref.copy(), natomtot=int(stats.get("n_atoms", 0) or 0),
        nstrucs=int(stats.get("n_structures", 0) or 0),
        e_min=(e_min - shift) * scale, e_max=(e_max - shift) * scale, e_avg=(e_avg - shift) * scale)
    out = []
    for t, el in enumerate(species):
        layers = _layers(model, t)
        mean = ann.feature_mean[t].detach().cpu().numpy().astype(np.float64)
        std = ann.feature_std[t].detach().cpu().numpy().astype(np.float64)
        avg = mean.copy()
        cov = mean * mean + std * std
        s_aenet = np.sqrt(cov - avg * avg)
        if np.any(s_aenet <= 1e-10):
            raise InputError(f"aenet export: element {el}: a descriptor standard deviation is too small "
                             f"for aenet's normalisation (min {s_aenet.min():.3e})")
        W0, b0 = layers[0]
        layers[0] = (W0 * (s_aenet / std)[None, :], b0)
        WL, bL = layers[-1]
        layers[-1] = (WL * (scale * sigma), scale * (sigma * bL + (mu[t] - shift)))
        codes = [act_table.get(a).aenet_code for a in ann.activations] + [act_table.get("linear").aenet_code]
        net = aenet_nn.Network.from_layers(layers, codes)
        sfparam = np.zeros((nsf, aenet_nn.NSFPARAM))
        sfparam[0] = [spec.rc_radial, spec.n_radial, spec.rc_angular, spec.n_angular]
        setup = aenet_nn.Setup(
            description=description, atomtype=el, envtypes=species, rc_min=RC_MIN,
            rc_max=max(spec.rc_radial, spec.rc_angular), sftype="Chebyshev",
            sf=np.zeros(nsf, dtype=np.int64), sfparam=sfparam,
            sfenv=np.zeros(aenet_nn.NENV_MAX * nsf, dtype=np.int64),
            neval=int(species_atoms.get(el, 0) or 0) or 1,
            sfval_min=mean - std, sfval_max=mean + std, sfval_avg=avg, sfval_cov=cov)
        out.append(aenet_nn.Potential(net, setup, trainset))
    return out


def write_aenet(model, out_dir, prefix: str | None = None, description: str = "distmlip-export",
                ascii: bool = False, data=None, stats: dict | None = None) -> list[Path]:
    """Write ``<out_dir>/<El>.<prefix>.nn`` for every element (binary unless ``ascii``); returns
    the paths.  ``data``: data set file(s) whose statistics fill the headers (default: the model
    file's ``training_set`` metadata)."""
    if stats is None:
        stats = training_statistics(model, data)
    pots = model_to_potentials(model, stats, description=aenet_nn._token(description))
    prefix = prefix or architecture_name(model)
    if "/" in prefix or not prefix:
        raise InputError(f"aenet export: prefix {prefix!r} must be a non-empty file-name part")
    out_dir = Path(out_dir)
    return [aenet_nn.write_potential(p, out_dir / f"{p.element}.{prefix}.nn", ascii=ascii) for p in pots]
