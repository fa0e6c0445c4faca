"""``distmlip evaluate MODEL DATA.h5 [...] [--split test|val|train|all] [-o DIR]``.

Energy MAE/RMSE (meV/atom and meV/structure), force component MAE/RMSE, force magnitude MAE and
mean force direction error (degrees), stress component MAE/RMSE (GPa; structures with a reference
stress), per subset and overall: a table on stdout, ``metrics.json``, a per-structure
``structures.csv`` and parity plots ``parity_energy.png`` / ``parity_forces.png`` /
``parity_stress.png``.
Several models (``--model`` repeated or comma-separated) are evaluated as a committee (mean)."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

SPLITS = {"train": 0, "val": 1, "validation": 1, "test": 2}


def add_arguments(p) -> None:
    p.add_argument("model", help="model file written by 'distmlip train' (model.pt) or a committee file "
                                 "(committee.pt); a comma-separated list is evaluated as one committee")
    p.add_argument("data", nargs="+", help="HDF5 data set(s) (shards are read as one data set)")
    p.add_argument("--split", default="all", choices=["all", "train", "val", "validation", "test"],
                   help="evaluate only this split, made by training's rule; its settings come from the run's "
                        "config.yaml beside the model when that run trained on these files (else --run-config, "
                        "else --split-seed/--fractions/--by-subset); default all")
    p.add_argument("--run-config", default=None, metavar="CONFIG",
                   help="the training configuration whose data split --split selects (default: config.yaml "
                        "beside the model, when its data.train are these files)")
    p.add_argument("--split-seed", type=int, default=None, help="hash split seed (default: training's, 0)")
    p.add_argument("--fractions", type=float, nargs=3, default=None, metavar=("TRAIN", "VAL", "TEST"),
                   help="hash split fractions (default: training's, 0.9 0.1 0)")
    p.add_argument("--by-subset", choices=["on", "off"], default=None,
                   help="split each subset apart (training's data.by_subset; default on)")
    p.add_argument("--synthetic", choices=["exclude", "include", "only"], default="exclude",
                   help="GPR-labelled copies of an augmented data set: left out (default: their labels are a "
                        "GPR's, not reference data), scored with the references, or scored alone")
    p.add_argument("-o", "--output", default=None,
                   help="output folder (default: eval_<model name>; for a run's model.pt, best_model.pt, "
                        "last_model.pt or committee.pt eval_<run folder>[_<name>])")
    p.add_argument("--batch-atoms", type=int, default=4096)
    p.add_argument("--no-forces", action="store_true", help="skip forces (energies only)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", choices=["auto", "reference", "fused"], default=None,
                   help="descriptor kernels (default auto: the fastest this device has)")


def model_paths(spec) -> list[str]:
    """The files of a MODEL argument: a comma-separated list of model and/or committee files, or
    one file whose name holds a comma (a run folder 'lr=1e-3,bs=64': it was split at the comma
    and reported missing, sweep 20)."""
    spec = str(spec)
    if "," in spec and Path(spec).is_file():
        return [spec]
    return [s for s in spec.split(",") if s]


# the file names every training run writes: a default output named after them alone was one
# folder for every run evaluated from one directory
_RUN_MODEL_NAMES = ("model", "best_model", "last_model", "committee")


def default_output(model, prefix: str = "eval") -> Path:
    """``<prefix>_<model name>``, or for a run's own file names (run_a/model.pt)
    ``<prefix>_<run folder>`` (``eval_run_a_best_model`` for best_model.pt): evaluate
    run_a/model.pt and run_b/model.pt from one directory without -o both wrote eval_model/, the
    second replacing the first's results without a word (sweep 20); md-check (prefix md_check)
    wrote every model's check into md_check/.  A calculator name (ase:EMT) gives
    ``<prefix>_EMT``."""
    if ":" in str(model) and not Path(model).exists():
        return Path(f"{prefix}_{str(model).split(':')[-1].split('.')[-1] or 'calculator'}")
    p = Path(model)
    if p.stem not in _RUN_MODEL_NAMES:
        return Path(f"{prefix}_{p.stem}")
    run = Path(os.path.abspath(p)).parent.name or "model"
    return Path(f"{prefix}_{run}" if p.stem == "model" else f"{prefix}_{run}_{p.stem}")


def load_models(spec, device="cpu", backend=None):
    """Models of a comma-separated list of model files and/or committee files (flattened)."""
    from ..models.bpnn import load_models as load_file

    return [m.eval() for p in model_paths(spec) for m in load_file(p, device=device, backend=backend)]


def select_indices(ds, split: str, seed: int = 0, fractions=(0.9, 0.1, 0.0), by_subset: bool = True,
                   use_stored: bool = True, patterns=None) -> np.ndarray:
    if split == "all":
        return np.arange(ds.n_structures, dtype=np.int64)
    from ..data.split import split_of

    sp = split_of(ds, seed, fractions, by_subset=by_subset, use_stored=use_stored, patterns=patterns)
    return np.nonzero(sp == SPLITS[split])[0].astype(np.int64)


def split_settings(args, ds=None, record=None) -> tuple[dict, str]:
    """The split rule of ``evaluate --split``: a training configuration's data settings (--run-config,
    or config.yaml beside the model when its data.train are the evaluated files), overridden by
    any of --split-seed / --fractions / --by-subset given; and a line saying where they came from.
    Without them a split trained with other settings would be scored as another set of
    structures (sweep 7: a 'validation' score that included training structures).

    The evaluated files are the run's when its data.train name them or, since those paths are
    relative to the training's working directory, when the evaluated data set ``ds`` has the
    content the model's training ``record`` names as its only data: evaluate run from another
    directory than training scored the split of evaluate's defaults instead (sweep 20)."""
    from ..errors import ConfigError
    from ..training.config import DataConfig

    dflt = DataConfig()          # training's defaults: the split a run without data settings made
    out = {"seed": dflt.split_seed, "fractions": tuple(dflt.fractions), "by_subset": dflt.by_subset,
           "use_stored": dflt.use_stored_split, "patterns": None}
    parts = []
    cfg_path = Path(args.run_config) if args.run_config else Path(model_paths(args.model)[0]).parent / "config.yaml"
    if args.split != "all" and cfg_path.is_file():
        import yaml

        try:
            cfg = yaml.safe_load(cfg_path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{cfg_path}: cannot read the run's configuration ({exc})") from None
        data = cfg.get("data") or {}
        trained_on = [str(Path(p).resolve()) for p in data.get("train") or []]
        given = [str(Path(p).resolve()) for p in args.data]
        same = bool(args.run_config) or trained_on == given
        label = str(cfg_path)
        if not same and ds is not None and (record or {}).get("data") and list(record["data"]) == [ds.content_id]:
            same = True
            label += (" (the model's training data, recognised by content: the data.train paths there are "
                      "relative to the training's working directory)")
        if same:
            if data.get("validation"):
                raise ConfigError(f"{cfg_path}: that run validated on {data['validation']}, not on a split of "
                                  f"{data.get('train')}: evaluate those files with --split all")
            out.update(seed=int(data.get("split_seed", out["seed"])), fractions=tuple(data.get("fractions", out["fractions"])),
                       by_subset=bool(data.get("by_subset", out["by_subset"])),
                       use_stored=bool(data.get("use_stored_split", out["use_stored"])),
                       patterns=data.get("split_patterns") or None)
            parts.append(label)
    if args.split_seed is not None:
        out["seed"] = args.split_seed
    if args.fractions is not None:
        out["fractions"] = tuple(args.fractions)
    if args.by_subset is not None:
        out["by_subset"] = args.by_subset == "on"
    if any(v is not None for v in (args.split_seed, args.fractions, args.by_subset)):
        parts.append("the command line")
    return out, " and ".join(parts) or "the defaults"


def format_table(results: dict) -> str:
    cols = [("n_structures", "N", "{:d}"), ("E_mae_meV_atom", "E MAE meV/at", "{:.3f}"),
            ("E_rmse_meV_atom", "E RMSE meV/at", "{:.3f}"), ("E_mae_meV_struct", "E MAE meV/str", "{:.2f}"),
            ("E_rmse_meV_struct", "E RMSE meV/str", "{:.2f}"), ("F_mae", "F MAE eV/A", "{:.4f}"),
            ("F_rmse", "F RMSE eV/A", "{:.4f}"), ("F_magnitude_mae", "|F| MAE eV/A", "{:.4f}"),
            ("F_direction_deg", "F angle deg", "{:.2f}"),
            ("S_mae_GPa", "S MAE GPa", "{:.4f}"), ("S_rmse_GPa", "S RMSE GPa", "{:.4f}"),
            # committee spread (K > 1): mean standard deviation over the test points
            ("E_msd_meV_atom", "E MSD meV/at", "{:.3f}"), ("E_msd_meV_struct", "E MSD meV/str", "{:.2f}"),
            ("F_magnitude_msd", "|F| MSD eV/A", "{:.4f}"), ("F_direction_msd_deg", "angle MSD deg", "{:.2f}")]
    cols = [c for c in cols if any(c[0] in r for r in results.values())]
    names = list(results)
    w0 = max(12, max(len(n) for n in names))
    head = f"{'subset':<{w0}}" + "".join(f"{c[1]:>16}" for c in cols)
    lines = [head, "-" * len(head)]
    for n in names:
        r = results[n]
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append(f"{(fmt.format(v) if v is not None and v == v else '-'):>16}")
        lines.append(f"{n:<{w0}}" + "".join(cells))
    return "\n".join(lines)


def write_structures_csv(path, pred, sources=None, subset_names=None) -> None:
    from ..utils.io import atomic_write_text

    buf = io.StringIO()
    wr = csv.writer(buf)
    hdr = ["index", "subset", "natoms", "E_ref_eV", "E_pred_eV", "E_err_meV_atom", "F_rmse_eV_A"]
    if pred.K > 1:
        hdr += ["E_std_meV_atom", "E_std_meV_struct"]
    if sources is not None:
        hdr.append("source")
    wr.writerow(hdr)
    Em = pred.energy
    for s in range(len(pred.natoms)):
        a, b = pred.atom_offset[s], pred.atom_offset[s + 1]
        frmse = ""
        if pred.forces is not None and pred.has_forces[s]:
            d = pred.force[a:b] - pred.forces_ref[a:b]
            frmse = f"{np.sqrt(np.mean(d * d)):.6f}"
        sub = pred.subset[s]
        row = [int(pred.index[s]), subset_names[sub] if subset_names and 0 <= sub < len(subset_names) else int(sub),
               int(pred.natoms[s]), f"{pred.energy_ref[s]:.10f}", f"{Em[s]:.10f}",
               f"{1e3 * (Em[s] - pred.energy_ref[s]) / pred.natoms[s]:.6f}", frmse]
        if pred.K > 1:
            sd = pred.energies[:, s].std(ddof=1)
            row += [f"{1e3 * sd / pred.natoms[s]:.6f}", f"{1e3 * sd:.6f}"]
        if sources is not None:
            row.append(sources[s])
        wr.writerow(row)
    atomic_write_text(path, buf.getvalue())


def evaluate(models, ds, indices=None, output=None, forces=True, plots=True, batch_atoms=4096,
             device="cpu", sources=None, label="") -> dict:
    """Evaluate; write metrics.json, structures.csv and PNGs into ``output`` (if given)."""
    from ..utils.io import atomic_write_text, json_text
    from .metrics import metrics_by_subset, predict

    pred = predict(models, ds, indices, batch_atoms=batch_atoms, forces=forces, device=device)
    _check_finite(pred, ds, indices)
    names = None
    if hasattr(ds, "subsets"):
        names = [t["name"] for t in ds.subsets]
    results = metrics_by_subset(pred, names)
    if output is not None:
        import shutil
        from ..errors import StorageError
        from ..utils.io import clean_stale_temps, storage_error, temp_path

        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        # every file is written into a staging folder first and moved in at the end: a full disk
        # half-way replaced metrics.json and structures.csv and left the old plots (a folder
        # mixing two runs); outputs of an earlier run this one does not write are removed
        # beside the real folder: an output folder linked to another file system (ln -s
        # $SCRATCH/eval eval) made the moves below fail across devices, EXDEV (sweep 20)
        real = Path(os.path.realpath(out))
        # named like every temporary file (host, pid): a killed evaluate's staging folder is
        # removed by the next run here; a random name was never recognised as a leftover (sweep 20)
        clean_stale_temps(real.parent)
        stage = temp_path(real)
        try:
            stage.mkdir()
        except OSError as exc:
            raise (storage_error(exc, out, "write the evaluation into") or exc) from None
        try:
            try:
                atomic_write_text(stage / "metrics.json", json_text({"label": label, "K": pred.K, "metrics": results},
                                                                   indent=2))
                write_structures_csv(stage / "structures.csv", pred, sources, names)
                if plots:
                    from .plots import parity_plot

                    ov = results["overall"]
                    parity_plot(pred.energy_ref / pred.natoms, pred.energy / pred.natoms, stage / "parity_energy.png",
                                "reference energy (eV/atom)", "predicted energy (eV/atom)", title=label,
                                text=f"MAE {ov['E_mae_meV_atom']:.2f} meV/atom\nRMSE {ov['E_rmse_meV_atom']:.2f} meV/atom",
                                groups=pred.subset if names and len(names) > 1 else None, group_names=names)
                    if pred.forces is not None and pred.has_forces.any():
                        am = pred.has_forces[pred.atom_structure()]
                        parity_plot(pred.forces_ref[am], pred.force[am], stage / "parity_forces.png",
                                    "reference force component (eV/A)", "predicted force component (eV/A)",
                                    title=label, text=f"MAE {ov['F_mae']:.3f} eV/A\nRMSE {ov['F_rmse']:.3f} eV/A")
                    if pred.stresses is not None and "S_mae_GPa" in ov:
                        from .metrics import EV_A3_GPA

                        sm = pred.has_stress
                        parity_plot(EV_A3_GPA * pred.stress_ref[sm].reshape(-1), EV_A3_GPA * pred.stress[sm].reshape(-1),
                                    stage / "parity_stress.png", "reference stress component (GPa)",
                                    "predicted stress component (GPa)", title=label,
                                    text=f"MAE {ov['S_mae_GPa']:.3f} GPa\nRMSE {ov['S_rmse_GPa']:.3f} GPa")
            except OSError as exc:
                raise (storage_error(exc, out, "write the evaluation into") or exc) from None
            except StorageError as exc:
                # named the staging folder's file (.OUT.RANDOM.tmp/parity_energy.png), which the
                # user never sees; the file it stands for is the one in the output folder (sweep 20)
                raise StorageError(str(exc).replace(str(stage), str(out))) from None
            for old in OUTPUT_FILES:
                if (out / old).exists() and not (stage / old).exists():
                    (out / old).unlink()
            for f in stage.iterdir():
                os.replace(f, out / f.name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return {"metrics": results, "predictions": pred}


# what evaluate writes into its folder
OUTPUT_FILES = ("metrics.json", "structures.csv", "parity_energy.png", "parity_forces.png", "parity_stress.png")


def _check_finite(pred, ds, indices) -> None:
    """A model that predicts NaN or inf (a corrupt or diverged model file) is an error, not a
    table of dashes, a CSV of nan and exit 0; nothing is written."""
    from ..errors import NonFiniteError

    bad = ~np.isfinite(pred.energies).all(0)
    if pred.forces is not None:
        fb = ~np.isfinite(pred.forces).all(axis=(0, 2))              # [N] atoms
        bad[np.repeat(np.arange(len(pred.natoms)), pred.natoms)[fb]] = True
    if bad.any():
        from ..models.data_record import COINCIDENT_A, structure_pair_minima

        idx = np.arange(len(bad)) if indices is None else np.asarray(indices)
        k = int(np.flatnonzero(bad)[0])
        # atoms on top of each other (convert --min-distance 0 lets them through) make the
        # descriptors NaN: name them rather than suspect the model (sweep 13)
        s = ds.read([int(idx[k])])[0]
        close = {p: d for p, d in structure_pair_minima(s.numbers, s.positions, s.cell, s.pbc, 0.5).items()
                 if d < COINCIDENT_A}
        why = (f"it has a {min(close, key=close.get)} pair at {min(close.values()):.3g} A (atoms on top of each "
               f"other: remove the structure, or convert without --min-distance 0)." if close
               else "a corrupt or diverged model file?")
        raise NonFiniteError(f"evaluate: the model predicts non-finite energies or forces for {int(bad.sum())} of "
                             f"{len(bad)} structures (first: structure {int(idx[k])} of {ds.paths[0]}); {why}  "
                             f"Nothing was written")


def _note_unseen_compositions(model, ds, idx) -> None:
    """Warn when evaluated structures have a composition the model's training data lacked (the
    errors then measure transfer in composition, not interpolation); needs the model file's
    training-data record."""
    from ..models.data_record import reduced_formula
    from ..utils.log import warn

    seen = (getattr(model, "training_record", None) or {}).get("energy_per_atom_min")
    if not seen:
        return
    from ase.data import chemical_symbols
    from ase.formula import Formula

    # elements with training atoms: those of the training compositions
    trained = {el for f in seen for el in Formula(f).count()}
    sids, first, counts = np.unique(np.asarray(ds.subset_ids)[idx], return_index=True, return_counts=True)
    unseen, untrained, n_untrained = {}, {}, 0
    for row, n in zip(first, counts):       # one structure per subset: a subset has one atom sequence
        z = ds.read(idx[row:row + 1])[0].numbers
        new = {chemical_symbols[int(a)] for a in z} - trained
        for el in new:
            untrained[el] = untrained.get(el, 0) + int(n)
        n_untrained += int(n) if new else 0
        f = reduced_formula(z)
        if f not in seen and not new:
            unseen[f] = unseen.get(f, 0) + int(n)
    if untrained:
        # an element without training atoms has an untrained network: its errors are no transfer
        warn(f"evaluate: {n_untrained} structure(s) contain elements with no atoms in the model's training "
             f"data: {', '.join(f'{el} (in {n} structure(s))' for el, n in sorted(untrained.items()))}; their "
             f"networks are untrained, so these structures' errors say nothing about the model: train on data "
             f"that contain {', '.join(sorted(untrained))}, or leave these structures out of the evaluation")
    if unseen:
        warn(f"evaluate: {sum(unseen.values())} structure(s) have compositions absent from the model's training "
             f"data ({', '.join(f'{k}: {v}' for k, v in sorted(unseen.items())[:8])}"
             f"{', ...' if len(unseen) > 8 else ''}): their errors measure transfer to new compositions")


def run(args) -> int:
    from ..data.h5store import H5Dataset
    from ..errors import InputError

    models = load_models(args.model, args.device, args.backend)
    ds = H5Dataset(args.data)
    how, where = split_settings(args, ds, models[0].training_record)
    idx = select_indices(ds, args.split, **how)
    if args.split != "all":
        print(f"split '{args.split}' by the settings of {where}: "
              + (f"patterns {how['patterns']}" if how["patterns"] else
                 f"seed {how['seed']}, fractions {list(how['fractions'])}, by_subset {how['by_subset']}"
                 + (" (a split stored in the data set comes first)" if how["use_stored"] and ds.has_stored_split
                    else "")))
    syn = np.asarray(ds.column("synthetic"), dtype=bool)[idx]
    n_syn = int(syn.sum())
    if args.synthetic != "include" and n_syn:
        idx = idx[syn] if args.synthetic == "only" else idx[~syn]
    if len(idx) == 0:
        raise InputError(f"{args.data}: split '{args.split}' is empty"
                         + (f" (--synthetic {args.synthetic}, {n_syn} synthetic)" if n_syn else ""))
    out = Path(args.output) if args.output else default_output(model_paths(args.model)[0])
    from ..utils.io import check_writable
    check_writable(out)             # before the predictions, not after them
    try:
        # file and frame: a multi-frame source (extxyz, OUTCAR) is otherwise one name for all rows
        src = [f"{f}#{int(k)}" for f, k in zip(ds.column("source")[idx], ds.column("source_index")[idx])]
    except Exception:
        src = None
    res = evaluate(models, ds, idx, output=out, forces=not args.no_forces, plots=not args.no_plots,
                   batch_atoms=args.batch_atoms, device=args.device, sources=src,
                   label=f"{Path(model_paths(args.model)[0]).name} on {args.split}"
                   + (f" (synthetic: {args.synthetic})" if n_syn else ""))
    what = {"exclude": f"; {n_syn} GPR-labelled copies left out (--synthetic include scores them)",
            "include": f", {n_syn} of them GPR-labelled copies", "only": ": GPR-labelled copies only"}
    print(f"model {args.model} ({len(models)} member(s)) on {', '.join(args.data)} (split {args.split}, "
          f"{len(idx)} structures{what[args.synthetic] if n_syn else ''})")
    print(format_table(res["metrics"]))
    _note_unseen_compositions(models[0], ds, idx)
    print(f"wrote {out / 'metrics.json'}, {out / 'structures.csv'}" + ("" if args.no_plots else ", parity plots"))
    return 0
