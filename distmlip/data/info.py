"""``distmlip info DATA.h5``: summary of a data set (sizes, subsets, species, energies, forces,
stresses)."""
from __future__ import annotations

import json

import numpy as np

from .h5store import H5Dataset

EV_A3_GPA = 160.21766208     # 1 eV/Angstrom^3 in GPa


def add_arguments(p) -> None:
    p.add_argument("data", nargs="+", help="data set file(s); several files are read as shards of one set")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--max-subsets", type=int, default=50, help="rows of the subset table to print (default 50)")
    p.add_argument("--label-check", type=int, default=10000, metavar="N",
                   help="check the energies against the forces on up to N reference structures (a random "
                        "sample of each subset beyond that, at most 4000 per subset; 0: off; default 10000)")


def summarize(ds: H5Dataset) -> dict:
    S = ds.n_structures
    energy = np.asarray(ds.column("energy"), dtype=np.float64)
    natoms = ds.natoms.astype(np.float64)
    epa = energy / np.maximum(natoms, 1)
    has_f = np.asarray(ds.column("has_forces"), dtype=bool)
    synth = np.asarray(ds.column("synthetic"), dtype=bool)
    # force statistics over atoms of structures with forces (streamed in blocks)
    atom_has_f = np.repeat(has_f, ds.natoms)
    atom_struct = np.repeat(np.arange(S), ds.natoms)
    fsum = 0.0
    fmax = 0.0
    nf = 0
    # non-finite entries per field: (count, first structure index)
    bad: dict[str, list] = {}

    def note(name, ok, struct_of):
        if not ok.all():
            idx = np.flatnonzero(~ok)
            first = int(struct_of[idx[0]])
            c = bad.setdefault(name, [0, first])
            c[0] += int(len(idx))

    for name in ("energy", "cell", "weight"):
        v = np.asarray(ds.column(name), dtype=np.float64).reshape(S, -1)
        note(name, np.isfinite(v).all(1), np.arange(S))
    for k, a, blk in ds.iter_atom_blocks("forces"):
        base = int(sum(sh.n_atoms for sh in ds._shards[:k]))
        mask = atom_has_f[base + a: base + a + len(blk)]
        fin = np.isfinite(blk).all(1)
        note("forces", fin | ~mask, atom_struct[base + a: base + a + len(blk)])
        mask = mask & fin
        if mask.any():
            mag = np.linalg.norm(blk[mask], axis=1)
            fsum += float(mag.sum())
            fmax = max(fmax, float(mag.max()))
            nf += int(mask.sum())
    has_s = np.asarray(ds.column("has_stress"), dtype=bool)
    stress = np.asarray(ds.column("stress"), dtype=np.float64).reshape(S, 9)
    note("stress", np.isfinite(stress).all(1) | ~has_s, np.arange(S))
    stress_stats = None
    use = has_s & np.isfinite(stress).all(1)
    if use.any():
        st = stress[use]
        p = -(st[:, 0] + st[:, 4] + st[:, 8]) / 3.0            # pressure, eV/A^3
        stress_stats = {"structures_with_stress": int(use.sum()),
                        "mean_abs_component_GPa": float(np.abs(st).mean() * EV_A3_GPA),
                        "max_abs_component_GPa": float(np.abs(st).max() * EV_A3_GPA),
                        "pressure_GPa": {"min": float(p.min() * EV_A3_GPA), "max": float(p.max() * EV_A3_GPA),
                                         "mean": float(p.mean() * EV_A3_GPA)}}
    for k, a, blk in ds.iter_atom_blocks("positions"):
        base = int(sum(sh.n_atoms for sh in ds._shards[:k]))
        note("positions", np.isfinite(blk).all(1), atom_struct[base + a: base + a + len(blk)])
    finite_e = np.isfinite(epa)
    epa = epa[finite_e] if finite_e.any() else epa
    counts = np.bincount(ds.subset_ids, minlength=len(ds.subsets)) if S else np.zeros(len(ds.subsets), int)
    out = {
        "files": ds.paths, "structures": S, "atoms": ds.n_atoms, "species": ds.species,
        "subsets": [{"name": t["name"], "composition": t["composition"], "natoms": t["natoms"],
                     "count": int(counts[k])} for k, t in enumerate(ds.subsets)],
        "natoms_range": [int(ds.natoms.min()), int(ds.natoms.max())] if S else [0, 0],
        "energy_per_atom_eV": {"min": float(epa.min()), "max": float(epa.max()), "mean": float(epa.mean())}
        if S else None,
        "forces": {"atoms_with_forces": nf, "mean_abs_eV_per_A": fsum / nf if nf else None,
                   "max_abs_eV_per_A": fmax if nf else None},
        "has_forces_fraction": float(has_f.mean()) if S else 0.0,
        "stress": stress_stats,
        "has_stress_fraction": float(has_s.mean()) if S else 0.0,
        "synthetic_fraction": float(synth.mean()) if S else 0.0,
        "reference_energies": ds.reference_energies,
        "stored_split": None,
        "provenance": ds.provenance,
        "non_finite": {k: {"entries": v[0], "first_structure": v[1]} for k, v in bad.items()},
    }
    if ds.has_stored_split and S:
        sp = np.asarray(ds.column("split"))
        out["stored_split"] = {"train": int((sp == 0).sum()), "val": int((sp == 1).sum()), "test": int((sp == 2).sum())}
    return out


def label_check(ds: H5Dataset, budget: int = 10000, seed: int = 0, per_subset: int = 4000) -> dict | None:
    """Energy-force consistency of the reference structures (``validate.energy_force_outliers``,
    subset by subset; at most ``budget`` structures, each subset sampled in proportion): labels
    that contradict their own forces and their neighbours' energies are listed by structure."""
    from .validate import energy_force_check, force_outliers, unit_slope

    if budget <= 0 or ds.n_structures == 0:
        return None
    ref = ~np.asarray(ds.column("synthetic"), dtype=bool) & np.asarray(ds.column("has_forces"), dtype=bool)
    eligible = np.flatnonzero(ref)
    if len(eligible) == 0:
        return None
    share = min(1.0, budget / len(eligible))
    rng = np.random.default_rng(seed)
    checked, scored, suspects, typical, any_sampled = 0, 0, [], [], False
    pdE, pwork, pij, units = [], [], [], []
    read, read_idx = [], []            # every structure read, for the per-atom force check
    src, sidx = ds.column("source"), ds.column("source_index")
    for sid in np.unique(ds.subset_ids[eligible]):
        idx = eligible[ds.subset_ids[eligible] == sid]
        want = min(per_subset, max(5, int(round(share * len(idx)))))
        sampled = want < len(idx)
        if sampled:
            idx = np.sort(rng.choice(idx, size=want, replace=False))
        any_sampled |= sampled
        structs = ds.read(idx)
        read.extend(structs)
        read_idx.append(idx)
        if len(idx) < 5:
            continue
        c = energy_force_check(structs)
        bad, med = c.bad, c.typical
        pdE.append(c.dE)
        pwork.append(c.work)
        pij.append(idx[c.pairs])
        u = unit_slope(c.dE, c.work, idx[c.pairs])
        if u is not None and u.suspect:
            nat = int(ds.natoms[idx[0]]) if (ds.natoms[idx] == ds.natoms[idx[0]]).all() else None
            units.append({"subset": ds.subsets[int(sid)]["name"], "natoms": nat, "slope": u})
        checked += len(idx)
        if np.isfinite(med):
            scored += len(idx)
            typical.append(med)
        for i, r in bad:
            g = int(idx[i])
            suspects.append({"structure": g, "subset": ds.subsets[int(sid)]["name"], "source": str(src[g]),
                             "source_index": int(sidx[g]), "residual_eV": r, "typical_eV": med})
    # units: one slope over every subset's pairs, and the subsets that disagree on their own
    # (two sources in different units); a subset is named only when the pooled slope passes
    u = unit_slope(np.concatenate(pdE), np.concatenate(pwork), np.concatenate(pij)) if pdE else None
    unit = None
    if u is not None:
        nat = ds.natoms[eligible]
        unit = {"slope": u.slope, "range": [u.low, u.high], "pairs": u.pairs, "suspect": u.suspect,
                "likely": u.likely(int(nat[0]) if (nat == nat[0]).all() else None), "example": list(u.example),
                "_u": u, "_natoms": int(nat[0]) if (nat == nat[0]).all() else None}
        if not u.suspect:
            unit["subsets"] = [{"subset": x["subset"], "slope": x["slope"].slope,
                                "range": [x["slope"].low, x["slope"].high], "pairs": x["slope"].pairs,
                                "likely": x["slope"].likely(x["natoms"]), "example": list(x["slope"].example),
                                "_u": x["slope"], "_natoms": x["natoms"]} for x in units]
    from ase.data import chemical_symbols

    fo, _ = force_outliers(read)
    gidx = np.concatenate(read_idx) if read_idx else np.zeros(0, np.int64)
    forces = [{"structure": int(gidx[o["position"]]), "source": str(src[gidx[o["position"]]]),
               "source_index": int(sidx[gidx[o["position"]]]), "atom": o["atom"], "element": chemical_symbols[o["Z"]],
               "force_eVA": o["force"], "typical_eVA": o["scale"], "net_force_eVA": o["net"]} for o in fo]
    return {"checked": checked, "scored": scored, "sampled": any_sampled, "suspects": suspects,
            "typical_eV": float(np.median(typical)) if typical else None, "units": unit,
            "force_outliers": forces, "force_checked": len(read)}


def force_outlier_text(o: dict) -> str:
    """One atom of ``label_check``'s force outliers, named."""
    return (f"structure {o['structure']} ({o['source']}#{o['source_index']}), atom {o['atom']} ({o['element']}): "
            f"|F| {o['force_eVA']:.4g} eV/A, {o['force_eVA'] / o['typical_eVA']:.0f} x the median {o['element']} force "
            f"{o['typical_eVA']:.3g} eV/A" + (f"; the structure's forces sum to {o['net_force_eVA']:.3g} "
                                             f"eV/A (about 0 for forces of one calculation)"
                                             if o["net_force_eVA"] >= 0.5 * o["force_eVA"] else ""))


FORCE_OUTLIER_ADVICE = ("check the field 'forces' of these atoms (a parsing or unit slip, a broken calculation); "
                        "a few such atoms set the force RMS that scales the loss and the energy-scale floor "
                        "of force training: fix or drop the structures (convert --skip-invalid does not catch "
                        "them)")


def unit_warnings(ds: H5Dataset, lc: dict | None) -> list[str]:
    """The unit warnings of a ``label_check`` result (the data set as a whole, else the subsets
    whose own slope is off), structures named by index and source."""
    from .validate import unit_slope_warning

    unit = (lc or {}).get("units")
    if not unit:
        return []
    src, sidx = ds.column("source"), ds.column("source_index")
    files = ", ".join(ds.paths)

    def name(g):
        return f"structure {g} ({src[g]}#{int(sidx[g])})" if g >= 0 else "a structure"

    if unit["suspect"]:
        return [unit_slope_warning(unit["_u"], files, name, unit["_natoms"])]
    return [unit_slope_warning(x["_u"], f"{files}: subset {x['subset']}", name, x["_natoms"])
            for x in unit.get("subsets", [])]


def energy_statistics(ds: H5Dataset, indices=None, reference_energies: dict | None = None) -> dict:
    """What aenet keeps about a training set, for the structures ``indices`` (default: all):
    counts of structures, atoms and atoms per species, and the minimum, maximum and mean over
    structures of the energy per atom after subtracting ``reference_energies`` (per element,
    eV; missing elements count 0), i.e. aenet's cohesive energies per atom.  Reads the energy
    column and the atomic numbers in blocks."""
    from ase.data import atomic_numbers, chemical_symbols

    S = ds.n_structures
    sel = np.zeros(S, dtype=bool)
    if indices is None:
        sel[:] = True
    else:
        sel[np.asarray(indices, dtype=np.int64)] = True
    ref_z = np.zeros(256, dtype=np.float64)
    for sym, e in (reference_energies or {}).items():
        ref_z[atomic_numbers[sym]] = float(e)
    starts = np.concatenate([[0], np.cumsum(ds.natoms)]).astype(np.int64)
    shard_atoms = np.concatenate([[0], np.cumsum([sh.n_atoms for sh in ds._shards])]).astype(np.int64)
    eref = np.zeros(S, dtype=np.float64)
    counts = np.zeros(256, dtype=np.int64)
    for k, a, blk in ds.iter_atom_blocks("numbers"):
        z = np.asarray(blk, dtype=np.int64)
        g = shard_atoms[k] + a + np.arange(len(z))
        sid = np.searchsorted(starts, g, side="right") - 1
        eref += np.bincount(sid, weights=ref_z[z], minlength=S)[:S]
        counts += np.bincount(z[sel[sid]], minlength=256)[:256]
    energy = np.asarray(ds.column("energy"), dtype=np.float64)
    n = ds.natoms.astype(np.float64)
    epa = ((energy - eref) / np.maximum(n, 1))[sel]
    return {"n_structures": int(sel.sum()), "n_atoms": int(ds.natoms[sel].sum()),
            "species_atoms": {chemical_symbols[z]: int(c) for z, c in enumerate(counts) if c},
            "e_min": float(epa.min()) if epa.size else 0.0, "e_max": float(epa.max()) if epa.size else 0.0,
            "e_avg": float(epa.mean()) if epa.size else 0.0,
            "reference_energies": {k: float(v) for k, v in (reference_energies or {}).items()}}


def format_summary(d: dict, max_subsets: int = 50) -> str:
    L = []
    L.append(f"data set      : {', '.join(d['files'])}")
    L.append(f"structures    : {d['structures']}")
    L.append(f"atoms         : {d['atoms']}  (per structure {d['natoms_range'][0]}..{d['natoms_range'][1]})")
    L.append(f"species       : {' '.join(d['species'])}")
    e = d["energy_per_atom_eV"]
    if e:
        L.append(f"energy / atom : {e['min']:.6f} .. {e['max']:.6f} eV (mean {e['mean']:.6f})")
    f = d["forces"]
    if f["atoms_with_forces"]:
        L.append(f"forces        : mean |F| {f['mean_abs_eV_per_A']:.4f} eV/A, max |F| {f['max_abs_eV_per_A']:.4f} eV/A "
                 f"({f['atoms_with_forces']} atoms)")
    else:
        L.append("forces        : none")
    L.append(f"with forces   : {100 * d['has_forces_fraction']:.1f} % of structures")
    st = d.get("stress")
    if st:
        p = st["pressure_GPa"]
        L.append(f"stress        : mean |s_ij| {st['mean_abs_component_GPa']:.4f} GPa, max |s_ij| "
                 f"{st['max_abs_component_GPa']:.4f} GPa, pressure {p['min']:.4f} .. {p['max']:.4f} GPa "
                 f"(mean {p['mean']:.4f}; {st['structures_with_stress']} structures, "
                 f"{100 * d['has_stress_fraction']:.1f} %)")
    else:
        L.append("stress        : none")
    L.append(f"synthetic     : {100 * d['synthetic_fraction']:.1f} % of structures")
    if d["reference_energies"]:
        L.append("ref. energies : " + ", ".join(f"{k}={v}" for k, v in d["reference_energies"].items()))
    if d["stored_split"]:
        s = d["stored_split"]
        L.append(f"stored split  : train {s['train']}, val {s['val']}, test {s['test']}")
    subs = d["subsets"]
    L.append(f"subsets       : {len(subs)}")
    w = max([len("name")] + [len(t["name"]) for t in subs[:max_subsets]])
    wc = max([len("composition")] + [len(t["composition"]) for t in subs[:max_subsets]])
    L.append(f"  {'name':<{w}}  {'composition':<{wc}}  {'natoms':>6}  {'count':>8}")
    for t in subs[:max_subsets]:
        nat = str(t["natoms"]) if t["natoms"] >= 0 else "mixed"
        L.append(f"  {t['name']:<{w}}  {t['composition']:<{wc}}  {nat:>6}  {t['count']:>8}")
    if len(subs) > max_subsets:
        L.append(f"  ... {len(subs) - max_subsets} more (use --max-subsets)")
    lc = d.get("labels")
    if lc:
        L.append(f"label check   : {lc['checked']} reference structures{' (sampled)' if lc['sampled'] else ''}, "
                 f"{lc['scored']} with a partner in their cell to compare; energy-force residual typically "
                 + (f"{lc['typical_eV']:.3g} eV" if lc["typical_eV"] is not None else "-")
                 + (" (subsets of fewer than 5 reference structures with forces are not checked)"
                    if lc["checked"] == 0 else ""))
        for o in lc["suspects"][:10]:
            L.append(f"SUSPECT LABEL : structure {o['structure']} ({o['source']}#{o['source_index']}, subset "
                     f"{o['subset']}): its energy contradicts its forces and its neighbours' energies by "
                     f"{o['residual_eV']:.3g} eV (typical {o['typical_eV']:.3g} eV)")
        if len(lc["suspects"]) > 10:
            L.append(f"SUSPECT LABEL : ... {len(lc['suspects']) - 10} more (--json lists them)")
        for o in lc.get("force_outliers", [])[:10]:
            L.append(f"SUSPECT FORCE : {force_outlier_text(o)}")
        if len(lc.get("force_outliers", [])) > 10:
            L.append(f"SUSPECT FORCE : ... {len(lc['force_outliers']) - 10} more (--json lists them)")
        if lc.get("force_outliers"):
            L.append(f"SUSPECT FORCE : {FORCE_OUTLIER_ADVICE}")
        un = lc.get("units")
        if un:
            lo, hi = un["range"]
            L.append(f"label units   : energy differences / forces' work = {un['slope']:.3g} (95 % range "
                     f"{lo:.3g}..{hi:.3g}, {un['pairs']} pairs; 1 for eV with eV/A"
                     + ("; not determined: the pairs' work barely predicts their energy differences (cells that "
                        "differ, or structures too far apart for the trapezoid rule, e.g. liquid snapshots)"
                        if lo < 0 < hi else "") + ")")
        elif lc["scored"]:
            from .validate import UNIT_PAIR_MAX_STEP

            L.append(f"label units   : not checked: no two structures of one cell lie within {UNIT_PAIR_MAX_STEP:g} A "
                     f"(RMS per atom) of each other, too far apart for their forces' work to predict their energy "
                     f"difference (e.g. independent liquid snapshots)")
        for w in d.get("unit_warnings") or []:
            L.append(f"LABEL UNITS?  : {w}")
    if d["non_finite"]:
        L.append("NON-FINITE    : " + "; ".join(f"{k}: {v['entries']} entr{'y' if v['entries'] == 1 else 'ies'} "
                                                  f"(first in structure {v['first_structure']})"
                                                  for k, v in d["non_finite"].items())
                 + " -- training and augment refuse this data set")
    prov = d["provenance"][0] if d["provenance"] else {}
    if prov:
        L.append(f"provenance    : {prov.get('command', '?')} ({prov.get('time', '?')}, "
                 f"distmlip {prov.get('distmlip_version', '?')})")
    return "\n".join(L)


def _public(x):
    """``x`` without the private entries (keys starting with '_': objects kept for the messages)."""
    if isinstance(x, dict):
        return {k: _public(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, list):
        return [_public(v) for v in x]
    return x


def run(args) -> int:
    ds = H5Dataset(args.data)
    d = summarize(ds)
    if not d["non_finite"]:
        d["labels"] = label_check(ds, args.label_check)
        d["unit_warnings"] = unit_warnings(ds, d["labels"])
    if args.json:
        print(json.dumps(_public(d), indent=1, default=str))
    else:
        print(format_summary(d, args.max_subsets))
    return 1 if d["non_finite"] else 0
