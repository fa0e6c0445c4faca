"""``distmlip export --format aenet|torchscript MODEL -o OUT``.

aenet: one ``<El>.<arch>.nn`` ASCII file per element in folder OUT (distmlip/evaluation/export_aenet.py
describes the layout and the mapping of the normalisations).  Committees are refused (aenet
cannot hold them); a ZBL term is left out with a warning (aenet has no pair potential).  Convert to aenet's binary form with ``nnASCII2bin.x``.

torchscript: one self-contained TorchScript file OUT (positions [N,3], numbers [N], cell [3,3],
pbc [3] -> energy, forces), runnable with torch alone in Python or C++; includes ZBL.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..utils.log import log


def add_arguments(p) -> None:
    p.add_argument("model", nargs="+", help="model file (several files or a committee file are refused "
                   "by the aenet format; torchscript exports a single model)")
    p.add_argument("--format", "-f", required=True, choices=["aenet", "torchscript"], help="export format")
    p.add_argument("--output", "-o", required=True,
                   help="aenet: output folder for the .nn files; torchscript: output file (e.g. model.pt)")
    p.add_argument("--prefix", help="aenet: middle part of the file names <El>.<prefix>.nn "
                   "(default: the architecture, e.g. 16t-16t)")


def _load_single(paths, fmt):
    from ..models import bpnn

    models = []
    loader = getattr(bpnn, "load_models", None)
    for p in paths:
        models.extend(loader(p) if loader is not None else [bpnn.BPNN.load(p)])
    if len(models) != 1:
        raise InputError(f"export --format {fmt}: {', '.join(map(str, paths))} hold a committee of "
                         f"{len(models)} models; {'aenet .nn files hold one network per element' if fmt == 'aenet' else 'the TorchScript export holds one model'}"
                         f" - export the members one by one")
    return models[0]


def run(args) -> int:
    model = _load_single(args.model, args.format)
    if args.format == "aenet":
        from .export_aenet import write_aenet

        out = Path(args.output)
        if out.exists() and not out.is_dir():
            raise InputError(f"export --format aenet: output {out} exists and is not a folder")
        paths = write_aenet(model, out, prefix=args.prefix, description="distmlip-export-" + Path(args.model[0]).stem)
        for p in paths:
            log(f"wrote {p}")
        log("aenet: list these files under NETWORKS in predict.in (or pair_coeff of LAMMPS pair aenet); "
            "nnASCII2bin.x converts them to aenet's binary format")
    else:
        from .export_torchscript import write_torchscript

        write_torchscript(model, args.output)
        log(f"wrote {args.output} (TorchScript: energy, forces = module(positions, numbers, cell, pbc))")
    return 0
