"""ASE calculators by name: the labeller of ``distmlip explore --label-with`` and the reference
potential of ``distmlip md-check ase:EMT start.xyz``.

Names:

* ``ase:NAME`` - a calculator ASE knows by name (``ase.calculators.calculator.get_calculator_class``:
  ``ase:EMT``, ``ase:LJ``, ``ase:morse``, ``ase:vasp``, ...);
* ``package.module:Class`` - any importable class with ASE's calculator interface
  (``mypkg.calc:MyDFT``);

with keyword arguments given as a JSON object (``--label-kwargs '{"xc": "PBE"}'``).
"""
from __future__ import annotations

import importlib
import json

import numpy as np

from ..errors import ConfigError


def is_calculator_name(spec: str) -> bool:
    """True for 'ase:NAME' and 'module.path:Class' (a model file path has no colon before its
    last path separator and does not start with 'ase:')."""
    s = str(spec)
    if s.startswith("ase:"):
        return True
    if ":" not in s or "/" in s.split(":", 1)[0] or s.endswith((".pt", ".pth")):
        return False
    mod, cls = s.rsplit(":", 1)
    return bool(mod) and bool(cls) and cls.isidentifier() and all(p.isidentifier() for p in mod.split("."))


def calculator_class(spec: str):
    s = str(spec)
    if s.startswith("ase:"):
        from ase.calculators.calculator import get_calculator_class

        name = s[4:]
        try:
            return get_calculator_class(name.lower())
        except Exception:
            pass
        try:
            return get_calculator_class(name)
        except Exception as exc:
            raise ConfigError(f"calculator {spec!r}: ASE has no calculator named {name!r} ({exc})") from None
    if ":" not in s:
        raise ConfigError(f"calculator {spec!r}: expected 'ase:NAME' or 'package.module:Class'")
    mod, cls = s.rsplit(":", 1)
    try:
        m = importlib.import_module(mod)
    except ImportError as exc:
        raise ConfigError(f"calculator {spec!r}: cannot import {mod!r}: {exc}") from None
    c = getattr(m, cls, None)
    if c is None:
        raise ConfigError(f"calculator {spec!r}: module {mod!r} has no {cls!r}")
    return c


def parse_kwargs(kwargs) -> dict:
    if kwargs is None or kwargs == "":
        return {}
    if isinstance(kwargs, dict):
        return dict(kwargs)
    try:
        out = json.loads(kwargs)
    except ValueError as exc:
        raise ConfigError(f"calculator keyword arguments {kwargs!r} are not a JSON object: {exc}") from None
    if not isinstance(out, dict):
        raise ConfigError(f"calculator keyword arguments {kwargs!r} are not a JSON object")
    return out


def make_calculator(spec: str, kwargs=None):
    """A fresh calculator instance for ``spec``."""
    cls = calculator_class(spec)
    try:
        return cls(**parse_kwargs(kwargs))
    except TypeError as exc:
        raise ConfigError(f"calculator {spec!r}: {exc}") from None


def stress_if_computed(atoms):
    """The stress (eV/A^3, 3x3) the calculator already computed with the energy and forces of a
    fully periodic frame, else None (asking for it could start another, costly calculation)."""
    if not bool(np.all(atoms.pbc)) or atoms.calc is None:
        return None
    st = getattr(atoms.calc, "results", {}).get("stress")
    if st is None:
        return None
    st = np.asarray(st, dtype=np.float64)
    if st.shape == (6,):
        from ase.stress import voigt_6_to_full_3x3_stress
        st = voigt_6_to_full_3x3_stress(st)
    return st if st.shape == (3, 3) and np.isfinite(st).all() else None


def label(frames, spec: str, kwargs=None) -> list:
    """Energies, forces (and the stress of periodic frames, when the calculator computed one) of
    ``frames`` (ASE Atoms) from the calculator ``spec``; returns copies
    carrying a SinglePointCalculator with the results (what extxyz writes as labels).  The
    calculator's errors propagate: callers that label many expensive frames label them one at a
    time and keep each result (explore's ``labels_partial/``)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    calc = make_calculator(spec, kwargs)
    out = []
    for a in frames:
        b = a.copy()
        b.calc = calc
        e = float(b.get_potential_energy())
        f = np.array(b.get_forces(), dtype=np.float64)
        c = a.copy()
        st = stress_if_computed(b)       # kept for a stress term (sweep 8: dropped)
        c.calc = SinglePointCalculator(c, energy=e, forces=f, **({} if st is None else {"stress": st}))
        c.info.update(a.info)
        c.info["labelled_with"] = str(spec)
        out.append(c)
    return out
