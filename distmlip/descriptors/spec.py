"""The descriptor settings as one value, and the registry of descriptor types.

A :class:`DescriptorSpec` says WHAT a descriptor computes (its type and parameters).  It is
validated once, when it is made, frozen and hashable, and every stage takes it whole: the model
builds its descriptor from it and stores it, the descriptor caches and GPR fingerprints are keyed
on it, committees share it.  HOW the values are computed (which kernels, whether a cache is used)
is not part of it: two runs with equal specs produce the same descriptors whatever their kernels.

Adding a descriptor type: a module in this folder with a ``torch.nn.Module`` class that has
``from_spec(spec, species)``, ``dimension(spec, n_species)`` (static), ``cutoff`` and
``forward(positions, species, pair_i, pair_j, pair_shift, pair_ptr=None, kernels=...)``, its
parameters as fields below (with defaults), and one line in ``DESCRIPTOR_TYPES``.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from .._ext import has_kernel
from ..config import paths
from ..errors import ConfigError

# type name -> "module:class" of its implementation (imported on first use)
DESCRIPTOR_TYPES = {
    "chebyshev": "distmlip.descriptors.chebyshev:ChebyshevDescriptor",
}


def descriptor_class(type_name: str):
    try:
        modname, clsname = DESCRIPTOR_TYPES[type_name].split(":")
    except KeyError:
        raise ConfigError(f"descriptor.type: {type_name!r} is not one of {', '.join(DESCRIPTOR_TYPES)}") from None
    return getattr(importlib.import_module(modname), clsname)


# the largest cutoff accepted (Angstrom): Behler-Parrinello descriptors are local (4-10 A);
# beyond this the neighbour lists outgrow memory long before a model could use them
RC_MAX = 20.0


@dataclass(frozen=True)
class DescriptorSpec:
    """The descriptor's identity.  Chebyshev (aenet's AUC descriptor): radial and angular
    expansions to orders ``n_radial`` and ``n_angular`` within cutoffs ``rc_radial`` and
    ``rc_angular`` (Angstrom)."""
    type: str = "chebyshev"
    rc_radial: float = 6.5
    n_radial: int = 12
    rc_angular: float = 4.0
    n_angular: int = 4

    def __post_init__(self):
        if self.type not in DESCRIPTOR_TYPES:
            raise ConfigError(f"descriptor.type: {self.type!r} is not one of {', '.join(DESCRIPTOR_TYPES)}")
        for name in ("rc_radial", "rc_angular"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"descriptor.{name}: expected a positive cutoff in Angstrom, got {v!r}")
            if v > RC_MAX:
                raise ConfigError(f"descriptor.{name}: {v} A is beyond {RC_MAX:g} A (typical cutoffs are 4-10 A; the "
                                  f"neighbour lists of larger ones outgrow memory); a unit mistake (bohr, nm)?")
            object.__setattr__(self, name, float(v))
        for name, low in (("n_radial", 1), ("n_angular", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"descriptor.{name}: expected an order >= {low}, got {v!r}")
        if self.rc_angular > self.rc_radial:
            raise ConfigError(f"descriptor.rc_angular: {self.rc_angular} A is beyond rc_radial {self.rc_radial} A "
                              "(the angular terms describe the inner shell; swap the two values?)")

    @property
    def cutoff(self) -> float:
        """The neighbour-list radius this descriptor needs."""
        return max(self.rc_radial, self.rc_angular)

    def dim(self, n_species: int) -> int:
        return int(descriptor_class(self.type).dimension(self, int(n_species)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d) -> "DescriptorSpec":
        """From a stored or configured mapping.  A ``backend`` entry (model files written before
        the spec existed kept it there) is ignored: kernels are chosen where the model runs."""
        if isinstance(d, cls):
            return d
        d = {k: v for k, v in dict(d).items() if k != "backend"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"descriptor: unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(sorted(names))}")
        return cls(**d)

    def key(self, species) -> dict:
        """JSON-able identity of the descriptor values of a data set with this species list (the
        key of descriptor caches)."""
        species = [str(s) for s in species]
        return {**self.to_dict(), "species": species, "dim": self.dim(len(species))}

    def build(self, species):
        """The descriptor module of this spec for ``species``."""
        return descriptor_class(self.type).from_spec(self, list(species))


BACKENDS = ("auto", "fused", "reference")


def choose_kernels(device, backend: str = "auto") -> str:
    """The descriptor kernels for a device type: 'fused' where the compiled extension has them
    for the device ('auto'; required by 'fused'), else 'reference'.  The one place this is decided;
    the model's plan (distmlip.models.backend) takes it from here."""
    device = getattr(device, "type", None) or str(device).split(":")[0]
    if backend not in BACKENDS:
        raise ConfigError(f"descriptor.backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    fused = has_kernel("chebyshev_forward", device)
    if backend == "fused" and not fused:
        raise ConfigError(f"descriptor.backend: fused, but the compiled extension has no {device} kernels "
                          "for the descriptor (build it with `pip install --no-build-isolation -e .`"
                          + (" against a CUDA torch" if device == "cuda" else "") + ") or use auto")
    return "fused" if fused and backend != "reference" else "reference"


def _default_spec() -> DescriptorSpec:
    return DescriptorSpec()


@dataclass
class DescriptorConfig:
    """The ``descriptor:`` section of a training configuration: the spec's keys (inline: ``type``,
    ``rc_radial``, ...) and how training computes them.

    ``backend``: auto (the fastest kernels this device has), fused (the compiled kernels, an
    error where they are missing) or reference (pure PyTorch).  ``cache``: descriptor cache of
    energy-mode training (``distmlip featurize``, docs/training.md); auto uses DATA.h5.desc.h5
    when it matches and builds it at start-up when its folder is writable; on: build/refresh it
    if needed (an error if impossible); off: never (YAML reads bare on/off as booleans: true/false
    are accepted for on/off)."""
    spec: DescriptorSpec = field(default_factory=_default_spec, metadata={"inline": True})
    backend: Literal["auto", "reference", "fused"] = "auto"
    cache: Union[Literal["auto", "on", "off"], bool] = "auto"
    cache_file: Optional[str] = field(default=None, metadata=paths("out"))   # default: featurize.default_cache_path; validation data: CACHE_FILE.val.h5

    def validate(self):
        if isinstance(self.cache, bool):
            self.cache = "on" if self.cache else "off"
