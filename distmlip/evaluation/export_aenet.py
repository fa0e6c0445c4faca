"""Export a BPNN to aenet ``.nn`` ASCII potential files (one per element).

Layout (aenet's ``save_Network_ASCII`` / ``save_Setup_ASCII`` / ``save_TrnSet_info_ASCII`` and the
list-directed reader of ``nnASCII2bin.x``), three sections in this order:

network     nlayers / nnodes_max / Wsize / nvalues (one per line), then nnodes(1:nlayers),
            f_a(2:nlayers), iw(1:nlayers), iv(1:nlayers) as '(4(1x,I17))' records and W(1:Wsize) as
            '(4(1x,ES24.17))' records.  Layer l's block W(iw(l)+1 : iw(l+1)) is the
            nnodes(l+1) x (nnodes(l)+1) matrix in column-major order, its last column the bias
            (the bias node value is 1).  f_a: 0 linear, 1 tanh, 2 sigmoid.
setup       description / atomtype / nenv / envtypes (one per line) / Rc_min / Rc_max / sftype
            ('Chebyshev') / nsf / nsfparam (4) / sf(nsf) / sfparam(4, nsf) (column 1 = radial Rc,
            radial order, angular Rc, angular order; the rest 0) / sfenv / neval / sfval_min /
            sfval_max / sfval_avg / sfval_cov.
trainset    file / normalized (T) / scale / shift / ntypes / type names (one per line) /
            E_atom(ntypes) / natomtot / nstrucs / E_min E_max E_avg.

aenet evaluates  E_i = (1/scale) * net((G_i - avg) / sqrt(cov - avg^2)) + shift + E_atom(type_i)
with avg = sfval_avg, cov = sfval_cov (the second moment) of the central atom's file and
scale/shift of that file.  distmlip evaluates
E_i = ref[t] + shift[t] + energy_scale * net_t((G_i - mean[t]) / std[t]).  Mapping (exact up to
float64 round-off): avg = mean, cov = mean^2 + std^2, and the first-layer weights are multiplied
column-wise by s_aenet/std with s_aenet = sqrt(cov - avg^2) evaluated as aenet does (so the
cancellation in cov - avg^2 costs nothing); scale = 1/energy_scale, shift = shift[t] per file,
E_atom = the model's reference energies.  sfval_min/max are not used by aenet's evaluation and are
written as mean -/+ std.

The sfenv block: aenet's formatted reader reads nenv*nsf integers, nnASCII2bin's list-directed
reader 2*nsf.  Both are satisfied by ceil(nenv*nsf/4) records of which the last holds 2*nsf zeros
separated by blanks and the others are blank (a formatted I17 read of blanks or of '0 0 0' gives 0).
Strings are written as single tokens (list-directed reads stop at blanks and slashes).

Committees (several networks per element) cannot be expressed and are refused; so are activations
other than tanh, sigmoid and linear.  A ZBL term (no pair term in aenet) is left out with a warning
naming the radii below which the files differ from the model.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..models import activations as act_table



def _ints(values) -> list[str]:
    vals = [int(v) for v in values]
    return ["".join(f" {v:17d}" for v in vals[k:k + 4]) for k in range(0, len(vals), 4)] or [""]


def _reals(values) -> list[str]:
    vals = [float(v) for v in values]
    for v in vals:
        if not math.isfinite(v) or abs(v) >= 1e99:
            raise InputError(f"aenet export: value {v} in the model does not fit aenet's ES24.17 fields")
    vals = [0.0 if abs(v) < 1e-99 else v for v in vals]  # three-digit exponents do not fit either
    return ["".join(f" {v:24.17E}" for v in vals[k:k + 4]) for k in range(0, len(vals), 4)] or [""]


def _token(s: str) -> str:
    t = "".join(c if (c.isalnum() or c in "._-+") else "_" for c in str(s))
    return t or "distmlip"


def aenet_network(model, t: int):
    """(layer sizes, activation codes f_a(2:), list of (W [out, in] float64, b [out]))."""
    acts = list(model.ann.activations)
    for a in acts:
        if act_table.get(a).aenet_code is None:
            known = [x.name for x in act_table.ACTIVATIONS.values() if x.aenet_code is not None]
            raise InputError(f"aenet export: activation {a!r} has no aenet equivalent (aenet has "
                             f"{', '.join(known)}); retrain with one of those")
    lin = [m for m in model.ann.nets[t] if isinstance(m, torch.nn.Linear)]
    layers = [(m.weight.detach().to(torch.float64).cpu().numpy().copy(),
               m.bias.detach().to(torch.float64).cpu().numpy().copy()) for m in lin]
    sizes = [layers[0][0].shape[1]] + [W.shape[0] for W, _ in layers]
    codes = [act_table.get(a).aenet_code for a in acts] + [act_table.get("linear").aenet_code]
    return sizes, codes, layers


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


def write_aenet(model, out_dir, prefix: str | None = None, description: str = "distmlip-export",
                n_structures: int = 0) -> list[Path]:
    """Write ``<out_dir>/<El>.<prefix>.nn`` for every element; returns the paths."""
    from ..utils.io import atomic_write_text

    _check_exportable(model)
    spec, ann = model.spec, model.ann
    if spec.type != "chebyshev":
        raise InputError(f"aenet export: descriptor type {spec.type!r}: aenet files hold Chebyshev descriptors only")
    species = list(model.species)
    T = len(species)
    rc_r, n_r = spec.rc_radial, spec.n_radial
    rc_a, n_a = spec.rc_angular, spec.n_angular
    nsf = (n_r + 1 + n_a + 1) * (2 if T > 1 else 1)
    if nsf != model.dim:
        raise InputError(f"aenet export: descriptor size {model.dim} does not match aenet's {nsf}")
    hid = "-".join(f"{h}{a[0]}" for h, a in zip(ann.hidden, ann.activations))
    prefix = prefix or (hid or "linear")
    meta = getattr(model, "metadata", {}) or {}
    out_dir = Path(out_dir)
    paths = []
    scale = float(ann.energy_scale)
    if not (scale > 0 and math.isfinite(scale)):
        raise InputError(f"aenet export: energy scale {scale} must be positive")
    ref = ann.reference_energy.detach().cpu().numpy().astype(np.float64)
    for t, el in enumerate(species):
        sizes, codes, layers = aenet_network(model, t)
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
        # network section
        nl = len(sizes)
        iw, iv = [0], [0]
        wsize = nvalues = 0
        for k in range(nl - 1):
            wsize += (sizes[k] + 1) * sizes[k + 1]
            iw.append(wsize)
            nvalues += sizes[k] + 1
            iv.append(nvalues)
        nvalues += sizes[-1]
        W = np.concatenate([np.concatenate([Wl, bl[:, None]], axis=1).flatten(order="F") for Wl, bl in layers])
        assert W.size == wsize
        lines = [f" {nl}", f" {max(sizes)}", f" {wsize}", f" {nvalues}"]
        lines += _ints(sizes) + _ints(codes) + _ints(iw) + _ints(iv) + _reals(W)
        # setup section
        sfparam = np.zeros((nsf, 4))
        sfparam[0] = [rc_r, n_r, rc_a, n_a]
        n_env_records = max(1, -(-T * nsf // 4))
        sfenv = [""] * (n_env_records - 1) + [" " + " ".join(["0"] * (2 * nsf))]
        neval = int((meta.get("species_atoms") or {}).get(el, 1) or 1)
        lines += [_token(description), el, f" {T}"] + species
        lines += [f" {0.5:.17E}", f" {max(rc_r, rc_a):.17E}", "Chebyshev", f" {nsf}", " 4"]
        lines += _ints([0] * nsf) + _reals(sfparam.reshape(-1)) + sfenv + [f" {neval}"]
        lines += _reals(mean - std) + _reals(mean + std) + _reals(avg) + _reals(cov)
        # training-set section
        lines += [_token(meta.get("source", "distmlip-model")), " T", f" {1.0 / scale:.17E}",
                  f" {float(ann.energy_shift[t]):.17E}", f" {T}"] + species + _reals(ref)
        lines += [f" {int(meta.get('n_atoms', 0) or 0)}", f" {int(n_structures or meta.get('n_structures', 0) or 0)}",
                  f" {0.0:.17E} {0.0:.17E} {0.0:.17E}"]
        path = out_dir / f"{el}.{prefix}.nn"
        atomic_write_text(path, "\n".join(lines) + "\n")
        paths.append(path)
    return paths
