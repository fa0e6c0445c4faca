"""``distmlip gpr fit|predict|test``: fit the per-subset GPRs of augment once, save them, use
them on any data set, and measure them against held-out labels.

    distmlip gpr fit  augment.yaml --out fits/           # one <subset>.gpr.pt per subset
    distmlip gpr test augment.yaml test.h5 [--load fits/] [--save fits/]
    distmlip gpr predict fits/ data.h5 -o pred.npz       # energy, forces, sigma per structure

The configuration is augment's (input data set, ``gpr:`` settings); the GPR data are the
training-split reference structures of each subset, as in augment.  ``augment`` reuses saved
fits with ``gpr.load: fits/`` (another delta or M without refitting).  ``test`` prints per subset
the energy MAE (eV per structure), its mean (bias), the force MAE (eV/A per component) and the
calibration: the share of energy errors within 1 and 2 predicted sigma (a Gaussian: 68 / 95 %).
The sigma here is the predictive one: the latent sigma and the fitted energy noise, scaled by the
factor that makes the fit's leave-one-out errors standard normal (``GPR._calibration``); augment's
copies carry the latent sigma (it ranks the copies by their distance from the data).
Subsets are fitted in augment's units: a group of subsets of one element set and atom count
(augment.composition_groups) is one fit, saved under its first subset's name, and a test or
prediction structure is matched to the fit that can take it (:func:`order_for`: the same atom
sequence, or for the local kernel the same composition in any order, or a group's elements and
atom count).  Runs in one process (subsets one after the other)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..config import load_config, parse_override
from ..errors import InputError
from ..utils.io import atomic_path


def _structs_of(ds, sid, cfg, name):
    from .augment import _parents_of

    idx, _ = _parents_of(ds, sid)
    if len(idx) == 0:
        return None
    structs = ds.read(idx)
    ref = structs[0]
    for s in structs:
        if s.natoms != ref.natoms or not np.array_equal(s.numbers, ref.numbers):
            raise InputError(f"{cfg.input}: subset '{name}' is not homogeneous (atom sequence)")
    return structs


def order_for(fit: dict, numbers):
    """The atom permutation that presents a structure of atomic numbers ``numbers`` to ``fit``
    (``structure[perm]`` has the fit's atom sequence where the fit needs one), or None when the
    fit cannot take the structure.  A global fingerprint compares atom i with atom i: the same
    sequence only.  The local kernel compares atoms of one element, whatever their order: a fit on
    one sequence takes the same composition in any order (atoms re-ordered element by element), a
    mixed group (several compositions) any structure of its elements and atom count (up to its
    padded count)."""
    numbers = np.asarray(numbers)
    fn = fit.get("numbers")
    fn = None if fn is None else np.asarray(fn)
    if fn is not None and np.array_equal(fn, numbers):
        return np.arange(len(numbers))
    if fit.get("kind") != "local":
        return None
    fp = fit["fingerprint"]
    if getattr(fp, "is_mixed", False):
        from ase.data import chemical_symbols

        if {chemical_symbols[int(z)] for z in numbers} != set(fp.species):
            return None
        n_pad = getattr(fp, "n_pad", None)
        if (n_pad is not None and len(numbers) > n_pad) or (n_pad is None and fn is not None and len(numbers) != len(fn)):
            return None
        return np.arange(len(numbers))
    if fn is None or len(fn) != len(numbers) or not np.array_equal(np.sort(fn), np.sort(numbers)):
        return None
    perm = np.empty(len(numbers), dtype=np.int64)
    perm[np.argsort(fn, kind="stable")] = np.argsort(numbers, kind="stable")
    return perm


def predict_structures(fit: dict, structs, forces=True):
    """(E [M], F [M, n, 3] or None, sigma [M]) of structures of one atom sequence that ``fit``
    takes (:func:`order_for`); sigma: the predictive (calibrated, label noise included) standard
    deviation of the energy error."""
    from .augment import permuted

    fp, model = fit["fingerprint"], fit["model"]
    n = structs[0].natoms
    perm = order_for(fit, structs[0].numbers)
    if perm is None:
        raise InputError(f"the GPR fit cannot take structures of atomic numbers {list(structs[0].numbers)[:12]}")
    shown = [permuted(s, perm) for s in structs]
    X, J = fp.compute([s.positions for s in shown], shown, with_jacobian=forces)
    e, f, sg = model.predict(X, J, forces=forces, variance=True, predictive=True)
    F = None
    if f is not None:      # the structure's own atoms (a padded fit predicts more), in its own order
        fp_ = f.numpy().reshape(len(structs), -1, 3)[:, :n]
        F = np.empty_like(fp_)
        F[:, perm] = fp_
    return e.numpy(), F, sg.numpy()


def fit_all(cfg, save=None, load=None):
    """Fit (or load) every subset's GPR, as augment does: subsets that share another's
    hyperparameters (``gpr.share``) come after the subset they take them from."""
    from ..data.h5store import H5Dataset
    from ..data.subsets import composition_of
    from ..utils.log import warn
    from .augment import (_estimated_cost, _hyper_given, _parents_of, composition_groups, describe_group,
                          fit_subset, nominal_delta, permuted, share_plan, shared_hyper)

    ds = H5Dataset(cfg.input)
    cfg.gpr.save = save or cfg.gpr.save
    cfg.gpr.load = load or cfg.gpr.load
    from .store import check_load_folder

    check_load_folder(cfg.gpr.load)
    parents = {sid: _parents_of(ds, sid)[0] for sid in range(len(ds.subsets))}
    names = [t["name"] for t in ds.subsets]
    # augment's units: a composition group is one fit, under its first subset's name
    groups = composition_groups(cfg, ds, parents)
    member_of = {m: h for h, ms in groups.items() for m in ms}
    units = {sid: groups.get(sid, [sid]) for sid in parents if member_of.get(sid, sid) == sid}
    uparents = {h: np.concatenate([parents[m] for m in ms]) for h, ms in units.items()}
    for h, ms in groups.items():
        print(f"gpr fit: {describe_group(ds, ms, parents, names)}", flush=True)
    plan = share_plan(cfg, ds, uparents, {h: _estimated_cost(cfg, ds, h, len(p)) for h, p in uparents.items()})
    fits = {}
    for sid in sorted(units, key=lambda s: (s in plan, s)):
        sub = ds.subsets[sid]
        name = sub["name"]
        if cfg.for_subset(name)["skip"]:
            continue
        structs = []
        for m in units[sid]:
            got = _structs_of(ds, m, cfg, names[m])
            if got and len(units[sid]) > 1:
                # as augment: a group's structures with their atoms sorted by element
                perm = np.argsort(got[0].numbers, kind="stable")
                got = [permuted(s, perm) for s in got]
            structs += got or []
        if not structs:
            print(f"subset {name}: no training structures with forces, skipped", flush=True)
            continue
        t0 = time.perf_counter()
        print(f"subset {name} ({sid + 1}/{len(ds.subsets)}): {len(structs)} structures of {structs[0].natoms} atoms ...",
              flush=True)
        shared = None
        if sid in plan and ds.subsets[plan[sid]]["name"] in fits:
            head = ds.subsets[plan[sid]]["name"]
            shared = shared_hyper(fits[head], head, fits[head]["natoms"])
        if len(structs) == 1 and shared is None and not cfg.gpr.load and not _hyper_given(cfg):
            warn(f"subset {name}: one structure: its GPR hyperparameters cannot be fitted and its labels "
                 f"would miss most of a copy's energy rise (augment gives it no copies; docs/gpr.md); "
                 f"fitted anyway for inspection")
        fit = fit_subset(ds, structs, cfg, name, shared=shared, delta=nominal_delta(cfg.for_subset(name)["delta"]),
                         mixed_orders=len(units[sid]) > 1)
        fit["time_s"] = time.perf_counter() - t0
        fit["natoms"] = structs[0].natoms
        fit["numbers"] = np.asarray(structs[0].numbers)
        info = fit["model"].info
        how = " (loaded)" if fit.get("loaded") else (f" (hyperparameters of {fit['shared_from']})"
                                                     if fit.get("shared_from") else "")
        # the LOO over every training structure when there is one (the search's sub-sample of a
        # few structures can be 5x too optimistic: 0.009 against 0.047 eV, sweep 5)
        if "loo_all_energy_mae_eV" in info:
            loo = f"LOO energy MAE {info['loo_all_energy_mae_eV']:.4f} eV over all {info.get('loo_all_n', '?')} structures"
            n_comp = len({composition_of(s.numbers) for s in structs})
            if n_comp > 1 and len(structs) < 3 * n_comp:
                # (11-100 eV on groups of two or three random alloys: not a sign of bad labels)
                loo += (f" (a group of {n_comp} compositions in {len(structs)} structures: each left out is "
                        f"predicted across compositions; its copies' labels are conditioned on their parent)")
        else:
            loo = f"LOO energy MAE {info.get('loo_energy_mae_eV', float('nan')):.4f} eV (search sub-sample)"
        print(f"subset {name}: fingerprint {fit['kind']}{how}, {loo}, {fit['time_s']:.1f} s", flush=True)
        fits[name] = fit
    return fits


def _fit_for(fits: dict, name: str, numbers):
    """The fit (its subset name) for test structures with atom sequence ``numbers``: the
    same-named fit when it takes them (:func:`order_for`), else a fit of their exact sequence,
    else any fit that takes them, else None."""
    numbers = np.asarray(numbers)
    ok = [k for k, f in fits.items() if order_for(f, numbers) is not None]
    if name in ok:
        return name
    exact = [k for k in ok if fits[k].get("numbers") is not None and np.array_equal(fits[k]["numbers"], numbers)]
    return (exact or ok or [None])[0]


def test_table(fits, test_path) -> dict:
    from ..data.h5store import H5Dataset

    ds = H5Dataset(test_path)
    rows, allE, allF, all1, all2, unmatched = [], [], [], [], [], []
    for sid, sub in enumerate(ds.subsets):
        name = sub["name"]
        structs = ds.read(np.flatnonzero(ds.subset_ids == sid))
        structs = [s for s in structs if not s.synthetic]
        if not structs:
            continue
        # by atom sequence, not by name: convert numbers the subsets of each file in the order
        # it meets them, so 'CH4_0' of a test file may be another atom order than the
        # training file's 'CH4_0' (a fit of another order scored 1.1 eV off, silently)
        fit_name = _fit_for(fits, name, structs[0].numbers)
        if fit_name is None:
            unmatched.append(name)
            continue
        fit = fits[fit_name]
        withf = [k for k, s in enumerate(structs) if s.has_forces]
        e, f, sg = predict_structures(fit, structs, forces=bool(withf))
        err = e - np.array([s.energy for s in structs])
        r = dict(subset=name, fit=fit_name, n=len(structs), fingerprint=fit["kind"], E_mae_eV=float(np.abs(err).mean()),
                 E_bias_eV=float(err.mean()), sigma_mean_eV=float(sg.mean()),
                 within_1sigma=float((np.abs(err) <= sg).mean()), within_2sigma=float((np.abs(err) <= 2 * sg).mean()),
                 sigma_calibration=float(fit["model"].info.get("sigma_calibration", 1.0)),
                 sigma_calibrated=bool(fit["model"].info.get("sigma_calibrated", True)))
        if f is not None:
            # over the structures that carry forces (one without them dropped the whole
            # subset's force error: sweep 8)
            ferr = np.abs(np.asarray(f)[withf] - np.stack([structs[k].forces for k in withf]))
            r["F_mae_eVA"] = float(ferr.mean())
            r["n_with_forces"] = len(withf)
            allF.append(ferr.ravel())
        rows.append(r)
        allE.append(np.abs(err))
        all1.append(np.abs(err) <= sg)
        all2.append(np.abs(err) <= 2 * sg)
    if not rows:
        from ..errors import InputError
        raise InputError(f"{test_path}: none of its subsets ({', '.join(unmatched[:8])}"
                         f"{', ...' if len(unmatched) > 8 else ''}) has a GPR fit (fitted: "
                         f"{', '.join(sorted(fits)[:8]) or 'none'}); test subsets are matched to fits by their "
                         f"atoms (the same sequence; for the local kernel the same composition in any order, or a "
                         f"group's elements and atom count)")
    if unmatched:
        from ..utils.log import warn
        warn(f"gpr test: {len(unmatched)} subset(s) of {test_path} have no GPR fit and are not in the table: "
             f"{', '.join(unmatched[:8])}{', ...' if len(unmatched) > 8 else ''}")
    tot = {}
    if rows:
        tot = dict(E_mae_eV=float(np.concatenate(allE).mean()),
                   F_mae_eVA=float(np.concatenate(allF).mean()) if allF else None,
                   within_1sigma=float(np.concatenate(all1).mean()), within_2sigma=float(np.concatenate(all2).mean()))
    return {"subsets": rows, "total": tot}


def format_test(res) -> str:
    hdr = (f"{'subset':<20} {'fp':<10} {'n':>5} {'E MAE eV':>9} {'E bias eV':>10} {'F MAE eV/A':>11} {'sigma eV':>9} "
           f"{'1 sig':>6} {'2 sig':>6} {'calib':>6}")
    out = ["sigma: predictive, calibrated by the factor 'calib' on the training structures' "
           "leave-one-out errors (1 / 2 sigma: 68 / 95 % when calibrated)", hdr, "-" * len(hdr)]
    for r in res["subsets"]:
        F = r.get("F_mae_eVA")
        out.append(f"{r['subset'][:20]:<20} {r['fingerprint']:<10} {r['n']:>5} {r['E_mae_eV']:>9.4f} {r['E_bias_eV']:>+10.4f} "
                   f"{(format(F, '11.4f') if F is not None else '-'):>11} {r['sigma_mean_eV']:>9.4f} "
                   f"{100 * r['within_1sigma']:>5.1f}% {100 * r['within_2sigma']:>5.1f}% "
                   + (f"{r['sigma_calibration']:>6.2f}" if r.get("sigma_calibrated", True) else f"{'-':>6}"))
    if any(not r.get("sigma_calibrated", True) for r in res["subsets"]):
        out.append("  (calib -: fewer than 5 training structures, too few leave-one-out errors to calibrate sigma; "
                   "it is the GPR's own, often too small)")
    others = [r for r in res["subsets"] if r.get("fit") not in (None, r["subset"])]
    for r in others[:10]:
        out.append(f"  ({r['subset']}: the fit of training subset {r['fit']}, which takes its atoms)")
    if len(others) > 10:
        out.append(f"  (and {len(others) - 10} more test subsets with the fit of another training subset)")
    t = res["total"]
    if t:
        F = t.get("F_mae_eVA")
        out.append(f"{'all':<20} {'':<10} {'':>5} {t['E_mae_eV']:>9.4f} {'':>10} "
                   f"{(format(F, '11.4f') if F is not None else '-'):>11} {'':>9} {100 * t['within_1sigma']:>5.1f}% "
                   f"{100 * t['within_2sigma']:>5.1f}%")
    return "\n".join(out)


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="gpr_command", metavar="fit|predict|test", required=True)
    p = sub.add_parser("fit", help="fit and save the GPR of every subset")
    p.add_argument("config", help="augment YAML (input data set and gpr settings)")
    p.add_argument("--out", required=True, help="directory for the fits (<subset>.gpr.pt)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p = sub.add_parser("test", help="fit (or load) the GPRs and measure them on a labelled data set")
    p.add_argument("config")
    p.add_argument("test", help="HDF5 data set with energies (and forces) of the same subsets")
    p.add_argument("--load", default=None, help="directory of saved fits")
    p.add_argument("--save", default=None, help="save the fits here")
    p.add_argument("--json", default=None, help="write the table as JSON")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p = sub.add_parser("predict", help="energies, forces and sigmas of a data set from saved fits")
    p.add_argument("fits", help="directory of saved fits")
    p.add_argument("data", help="HDF5 data set")
    p.add_argument("-o", "--output", required=True, help=".npz with index, energy, forces (flat), sigma")
    p.add_argument("--no-forces", action="store_true")


def run(args) -> int:
    from .augment import AugmentConfig

    from ..utils.io import check_writable

    # every output proven writable before the (long) fits or predictions
    if args.gpr_command == "fit":
        check_writable(args.out, "fit folder")
    elif args.gpr_command == "test":
        if args.save:
            check_writable(args.save, "fit folder")
        if args.json:
            check_writable(Path(args.json).parent)
    else:
        check_writable(Path(args.output).parent)
    if args.gpr_command in ("fit", "test"):
        overrides = dict(parse_override(s) for s in args.set)
        if args.gpr_command == "fit":
            overrides.setdefault("output", "-")
        else:
            overrides.setdefault("output", "-")
        cfg = load_config(args.config, AugmentConfig, overrides)
        if args.gpr_command == "fit":
            fit_all(cfg, save=args.out)
            print(f"gpr fit: fits in {args.out}")
            return 0
        fits = fit_all(cfg, save=args.save, load=args.load)
        res = test_table(fits, args.test)
        print(format_test(res))
        if args.json:
            with atomic_path(args.json) as tmp:
                Path(tmp).write_text(json.dumps(res, indent=1))
        return 0
    from ..data.h5store import H5Dataset
    from .store import fit_path, load_fit

    ds = H5Dataset(args.data)
    n = ds.n_structures
    E = np.full(n, np.nan)
    S = np.full(n, np.nan)
    F = np.full(int(ds.natoms.sum()) * 3, np.nan)
    off = np.concatenate([[0], np.cumsum(ds.natoms * 3)])
    # the directory's fits, matched by what they take (names differ between files)
    saved = {path.name: (path, load_fit(path)) for path in sorted(Path(args.fits).glob("*.gpr.pt"))}
    for sid, sub in enumerate(ds.subsets):
        idx = np.flatnonzero(ds.subset_ids == sid)
        if len(idx) == 0:
            continue
        structs = ds.read(idx)
        key = _fit_for({k: f for k, (_, f) in saved.items()}, fit_path(args.fits, sub["name"]).name,
                       structs[0].numbers)
        if key is None:
            print(f"subset {sub['name']}: no saved fit in {args.fits} takes its atoms, left NaN")
            continue
        path, fit = saved[key]
        e, f, sg = predict_structures(fit, structs, forces=not args.no_forces)
        E[idx], S[idx] = e, sg
        if f is not None:
            for k, i in enumerate(idx):
                F[off[i]:off[i + 1]] = f[k].ravel()
        print(f"subset {sub['name']}: {len(idx)} structures predicted (fit {path.name})")
    if n and not np.isfinite(E).any():
        # as gpr test does: a file of NaN only is no prediction (sweep 8: written, exit 0)
        from ..errors import InputError
        raise InputError(f"{args.data}: none of its subsets has a saved fit of its atom sequence in {args.fits} "
                         f"(fits: {', '.join(sorted(p.name for p in Path(args.fits).glob('*.gpr.pt'))[:8]) or 'none'}); "
                         f"nothing written")
    with atomic_path(args.output, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, index=np.arange(n), energy=E, sigma=S, forces=F, forces_offset=off)
    print(f"gpr predict: wrote {args.output}")
    return 0
