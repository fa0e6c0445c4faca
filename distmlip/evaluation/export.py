"""``distmlip export --format aenet|exported-program|torchscript MODEL -o OUT``.

aenet: one ``<El>.<arch>.nn`` file per element in folder OUT, in aenet's binary layout (what
predict.x, train.x restarts and the aenet LAMMPS interfaces read), or with ``--ascii`` in aenet's
ASCII layout.  distmlip/evaluation/export_aenet.py describes the mapping; ``--data`` fills the
headers' training-set record from a data set instead of the model file's.  Committees are
refused (aenet cannot hold them); a ZBL term is left out with a warning (aenet has no pair
potential).

exported-program: a ``torch.export`` program (``.pt2``; ``--aoti`` packages it with
AOTInductor) computing energy and forces from positions, species, cell and a neighbour list,
loadable with torch alone (distmlip/evaluation/export_program.py).

metatomic: one metatomic model file OUT (LAMMPS pair_style metatomic, i-PI, ASE through
metatomic-ase); needs the optional package metatomic-torch (distmlip/evaluation/export_metatomic.py).

torchscript: one self-contained TorchScript file OUT (positions [N,3], numbers [N], cell [3,3],
pbc [3] -> energy, forces), runnable with torch alone in Python or C++; includes ZBL.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..utils.log import log, warn

FORMATS = ["aenet", "exported-program", "metatomic", "torchscript"]


def add_arguments(p) -> None:
    p.add_argument("model", nargs="+", help="model file (several files or a committee file are refused: "
                   "each format holds a single model)")
    p.add_argument("--format", "-f", required=True, choices=FORMATS, help="export format")
    p.add_argument("--output", "-o", required=True,
                   help="aenet: output folder for the .nn files; other formats: output file "
                   "(model.pt2 for exported-program, model.pt for metatomic and torchscript)")
    p.add_argument("--prefix", help="aenet: middle part of the file names <El>.<prefix>.nn "
                   "(default: the architecture, e.g. 10t-10t)")
    p.add_argument("--ascii", action="store_true", help="aenet: write aenet's ASCII layout instead of the "
                   "binary one (aenet 2.0.4 programs read only the binary files)")
    p.add_argument("--data", nargs="+", help="aenet: data set file(s) whose structure/atom counts and energy "
                   "range fill the .nn headers (default: the training-set record in the model file)")
    p.add_argument("--aoti", action="store_true", help="exported-program: also compile the program with "
                   "AOTInductor into OUT with suffix .aoti.pt2 (needs a C++ compiler)")


def _load_single(paths, fmt):
    from ..models import bpnn

    models = []
    for p in paths:
        models.extend(bpnn.load_models(p))
    if len(models) != 1:
        raise InputError(f"export --format {fmt}: {', '.join(map(str, paths))} hold a committee of "
                         f"{len(models)} models; {'aenet .nn files hold one network per element' if fmt == 'aenet' else 'an export holds one model'}"
                         f" - export the members one by one")
    return models[0]


def aenet_usage(paths, species, binary: bool = True) -> str:
    """How to use exported .nn files with predict.x and the two aenet LAMMPS interfaces."""
    names = {p.name.split(".")[0]: p.name for p in map(Path, paths)}
    files = [names[s] for s in species]
    mask = files[0].split(".", 1)[1]
    L = []
    if not binary:
        L.append("ASCII layout: aenet 2.0.4's programs read only the binary files; export without --ascii "
                 "(or convert each file with aenet-PyTorch's nnASCII2bin.x) before using them there.")
    L.append("predict.x: copy the .nn files next to predict.in (predict.x cuts NETWORKS paths at '/') and list them:")
    L.append("    TYPES\n    " + str(len(species)) + "\n" + "\n".join(f"    {s}" for s in species))
    L.append("    NETWORKS\n" + "\n".join(f"    {s}  {f}" for s, f in zip(species, files)))
    L.append("LAMMPS with atomisticnet/aenet-lammps (USER-AENET): one file per LAMMPS atom type, in type order:")
    L.append(f"    pair_style aenet {' '.join(files)}\n    pair_coeff * *")
    L.append("LAMMPS with HidekiMori-CIT/aenet-lammps (v00 = files of original aenet 2.0.4; the last list gives "
             "the element of each atom type):")
    L.append(f"    pair_style aenet\n    pair_coeff * * v00 {' '.join(species)} {mask} {' '.join(species)}")
    return "\n".join(L)


def run(args) -> int:
    model = _load_single(args.model, args.format)
    if args.format != "aenet" and (args.ascii or args.data or args.prefix):
        raise InputError("export: --ascii, --data and --prefix apply to --format aenet only")
    if args.format != "exported-program" and args.aoti:
        raise InputError("export: --aoti applies to --format exported-program only")
    if args.format == "aenet":
        from .export_aenet import training_statistics, write_aenet

        out = Path(args.output)
        if out.exists() and not out.is_dir():
            raise InputError(f"export --format aenet: output {out} exists and is not a folder")
        stats = training_statistics(model, args.data)
        if not stats:
            warn("export --format aenet: the model file has no training-set record (models written before "
                 "this version, or not by `distmlip train`): the .nn headers get no structure counts and "
                 "energy range, and a train.x restart from them would rescale the networks; pass --data "
                 "TRAINING.h5 to fill them")
        paths = write_aenet(model, out, prefix=args.prefix, description="distmlip-export-" + Path(args.model[0]).stem,
                            ascii=args.ascii, stats=stats)
        for p in paths:
            log(f"wrote {p}")
        log(aenet_usage(paths, model.species, binary=not args.ascii))
    elif args.format == "exported-program":
        from .export_program import write_exported_program

        paths = write_exported_program(model, args.output, aoti=args.aoti)
        for p in paths:
            log(f"wrote {p}")
        log("exported program: torch.export.load(path).module()(positions, numbers, cell, pair_i, pair_j, "
            "cell_shifts) -> (energy, forces), numbers: atomic numbers; see docs/aenet.md (Deployment)")
    elif args.format == "metatomic":
        from .export_metatomic import write_metatomic

        write_metatomic(model, args.output)
        log(f"wrote {args.output} (metatomic model: ASE metatomic_ase.MetatomicCalculator({args.output!r}), "
            f"LAMMPS pair_style metatomic {args.output}, i-PI)")
    else:
        from .export_torchscript import write_torchscript

        write_torchscript(model, args.output)
        log(f"wrote {args.output} (TorchScript: energy, forces = module(positions, numbers, cell, pbc))")
    return 0
