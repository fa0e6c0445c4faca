"""Export a BPNN (with its ZBL term, if any) as a metatomic model: one file that LAMMPS
(pair_style metatomic), i-PI, ASE (metatomic-ase's MetatomicCalculator) and the other engines
of the metatomic standard load.

Needs the optional packages metatomic-torch (and metatomic-ase to use it from ASE):
``pip install metatomic-torch metatomic-ase`` (measured: metatomic-torch 0.1.19 installs
with torch 2.13 and ships libraries for it).  The model's energy output (eV, per system or per
atom) is computed by the TorchScript core of :mod:`.export_torchscript` from the neighbour list
the engine provides (full list, the model's cutoff); forces and stress are the engine's autograd
derivatives.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from ..errors import InputError

INSTALL_HINT = "pip install metatomic-torch metatomic-ase (with the torch already installed)"


def available() -> bool:
    try:
        import metatomic.torch  # noqa: F401
    except Exception:
        return False
    return True


def _quiet():
    """metatomic scripts the module with torch.jit.script, which torch 2.x marks deprecated: not
    the user's concern."""
    w = warnings.catch_warnings()
    w.__enter__()
    warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
    return w


def build_model(model):
    """The ``metatomic.torch.AtomisticModel`` of ``model``."""
    w = _quiet()
    try:
        return _build(model)
    finally:
        w.__exit__(None, None, None)


def _build(model):
    try:
        from metatomic.torch import AtomisticModel, ModelCapabilities, ModelMetadata, ModelOutput
    except Exception as exc:
        raise InputError(f"export --format metatomic needs metatomic-torch ({type(exc).__name__}: {exc}); "
                         f"{INSTALL_HINT}") from None
    from ase.data import atomic_numbers

    from .export_torchscript import build_module
    from .metatomic_module import MetatomicPotential

    core = build_module(model).eval()
    module = MetatomicPotential(core).eval()
    caps = ModelCapabilities(
        outputs={"energy": ModelOutput(unit="eV", sample_kind="system", explicit_gradients=[])},
        atomic_types=[atomic_numbers[s] for s in model.species],
        interaction_range=float(core.cutoff), length_unit="angstrom", supported_devices=["cpu"], dtype="float64")
    meta = ModelMetadata(name="distmlip-bpnn", description=f"distmlip Behler-Parrinello potential: {model.describe()}")
    return AtomisticModel(module, meta, caps)


def write_metatomic(model, path) -> Path:
    from ..utils.io import atomic_path

    path = Path(path)
    am = build_model(model)
    w = _quiet()
    try:
        with atomic_path(path, suffix=".pt") as tmp:
            am.save(str(tmp))
    finally:
        w.__exit__(None, None, None)
    return path
