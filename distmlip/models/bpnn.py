"""Behler-Parrinello potential: a sum of energy terms.

    E = E_ANN + E_ZBL        (E_ZBL only with ``zbl``)

``ann`` (:class:`~distmlip.models.ann.AtomicNetworks`) holds the descriptor, the per-element
networks and their normalisation; ``zbl`` (:class:`~distmlip.models.zbl.ZBL`, optional) the
short-range repulsion.  Each term gives its per-atom energies and its energies and forces for a
batch; the model sums them, chooses which code runs per device (:mod:`.backend`) and saves and
loads itself.  The network term is fitted to the residual of the other terms.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from ..descriptors.spec import DescriptorSpec
from ..errors import ConfigError, DataFormatError
from ..utils.io import load_torch_file
from . import backend as backend_mod
from .ann import AtomicNetworks

FORMAT = "distmlip-bpnn"
# 2: the network term's state under "ann." (version 1 had it at the top level)
VERSION = 2
_READABLE_VERSIONS = (1, 2)


class BPNN(nn.Module):
    """Per-element atomic neural networks on a descriptor, plus optional ZBL repulsion.

    ``descriptor``: a DescriptorSpec or its mapping; ``backend``: the descriptor kernels
    requested ('auto', 'fused', 'reference'; see :func:`distmlip.models.backend.choose`; default:
    the mapping's ``backend`` entry, else 'auto')."""

    def __init__(self, species: Sequence[str], descriptor, hidden: Sequence[int] = (10, 10),
                 activation="tanh", dtype: str = "float64",
                 reference_energies: dict | None = None, zbl: dict | None = None, backend: str | None = None):
        super().__init__()
        if not species:
            raise ConfigError("model: the species list is empty")
        if backend is None:   # a descriptor mapping may carry the request, as the config section does
            backend = descriptor.get("backend", "auto") if isinstance(descriptor, dict) else "auto"
        self.species = list(species)
        spec = descriptor if isinstance(descriptor, DescriptorSpec) else DescriptorSpec.from_dict(descriptor)
        self.ann = AtomicNetworks(self.species, spec, hidden, activation, dtype, reference_energies)
        # optional ZBL short-range repulsion (``zbl``: {"radii": {"A-B": [in, out]}} or {} for the
        # covalent-radius defaults; None: no ZBL)
        self.zbl = None
        if zbl is not None:
            from .zbl import ZBL

            try:
                self.zbl = ZBL(self.species, (zbl or {}).get("radii"))
            except (ValueError, KeyError) as exc:
                raise ConfigError(f"zbl: {exc}") from None
        if backend not in backend_mod.DESCRIPTOR_CHOICES:
            raise ConfigError(f"descriptor.backend: {backend!r} is not one of {', '.join(backend_mod.DESCRIPTOR_CHOICES)}")
        self.backend = backend
        self._pinned: dict = {}
        self._plans: dict = {}
        # what the training data covered (models/data_record.py); written into the metadata on save
        self.training_record: dict | None = None

    # ------------------------------------------------------------------ structure
    @property
    def terms(self) -> list:
        """The energy terms, summed: the networks first, then ZBL if present."""
        return [self.ann] if self.zbl is None else [self.ann, self.zbl]

    @property
    def spec(self) -> DescriptorSpec:
        return self.ann.spec

    @property
    def descriptor(self):
        return self.ann.descriptor

    @property
    def dim(self) -> int:
        return self.ann.dim

    @property
    def cutoff(self) -> float:
        """Neighbour-list radius: the largest any term needs."""
        return max(t.cutoff for t in self.terms)

    @property
    def activations(self) -> list:
        return self.ann.activations

    # ------------------------------------------------------------------ backend
    def plan(self, device=None) -> backend_mod.Plan:
        """Which code runs on ``device`` (default: where the model is), chosen once per device."""
        dev = (device if device is not None else self.ann.energy_scale.device)
        dev = getattr(dev, "type", None) or str(dev).split(":")[0]
        p = self._plans.get(dev)
        if p is None:
            p = self._plans[dev] = backend_mod.choose(dev, self.ann.activations, self.backend, **self._pinned)
        return p

    def set_plan(self, backend: str | None = None, **pinned) -> backend_mod.Plan:
        """Request other descriptor kernels (``backend``) or pin single paths (``networks='torch'``,
        ``forces='autograd'``, ...; None unpins); returns the plan for the model's device."""
        if backend is not None:
            if backend not in backend_mod.DESCRIPTOR_CHOICES:
                raise ConfigError(f"descriptor.backend: {backend!r} is not one of "
                                  f"{', '.join(backend_mod.DESCRIPTOR_CHOICES)}")
            self.backend = backend
        self._pinned.update(pinned)
        self._pinned = {k: v for k, v in self._pinned.items() if v is not None}
        self._plans = {}
        return self.plan()

    # ------------------------------------------------------------------ configuration / io
    def config(self) -> dict:
        a = self.ann
        return {"species": list(self.species), "descriptor": a.spec.to_dict(),
                "hidden": list(a.hidden), "activation": list(a.activations),
                "dtype": a.dtype_name, "reference_energies": a.reference_energies(),
                "zbl": ({"radii": {k: list(v) for k, v in self.zbl.to_dict()["radii"].items()}}
                        if self.zbl is not None else None)}

    @classmethod
    def from_config(cls, cfg: dict, backend: str | None = None) -> "BPNN":
        return cls(cfg["species"], DescriptorSpec.from_dict(cfg["descriptor"]), cfg["hidden"], cfg["activation"],
                   cfg["dtype"], cfg.get("reference_energies") or None, zbl=cfg.get("zbl"),
                   backend=backend or "auto")

    def payload(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "config": self.config(),
                "state_dict": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}}

    def save(self, path, metadata: dict | None = None) -> None:
        """Write the model (config + weights + normalisation) atomically to ``path``."""
        from ..utils.io import atomic_torch_save
        from .data_record import RECORD_KEY

        meta = dict(metadata or {})
        if self.training_record and RECORD_KEY not in meta:
            meta[RECORD_KEY] = self.training_record
        atomic_torch_save({**self.payload(), "metadata": meta}, path)

    @classmethod
    def from_payload(cls, obj, source: str = "<memory>", backend: str | None = None,
                     device="cpu") -> "BPNN":
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            fmt = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
            raise DataFormatError(f"{source}: not a distmlip model file (format {fmt!r}, expected {FORMAT!r})")
        version = obj.get("version")
        if version not in _READABLE_VERSIONS:
            raise DataFormatError(f"{source}: model format version {version!r} is not supported "
                                  f"(this distmlip reads versions {', '.join(map(str, _READABLE_VERSIONS))})")
        try:
            model = cls.from_config(obj["config"], backend=backend)
            state = obj["state_dict"]
            if version == 1:
                state = {(k if k.startswith("zbl.") else "ann." + k): v for k, v in state.items()}
            model.load_state_dict(state)
        except (KeyError, RuntimeError, TypeError) as exc:
            raise DataFormatError(f"{source}: model file is inconsistent: {exc}") from None
        model.metadata = dict(obj.get("metadata") or {})
        from .data_record import RECORD_KEY

        model.training_record = model.metadata.get(RECORD_KEY) or None
        return model.to(device)

    @classmethod
    def load(cls, path, device="cpu", backend: str | None = None) -> "BPNN":
        """Load a model written by :meth:`save`; ``backend`` requests descriptor kernels."""
        path = Path(path)
        obj = load_torch_file(path, "model file")
        return cls.from_payload(obj, source=str(path), backend=backend, device=device)

    # ------------------------------------------------------------------ evaluation
    def atomic_energies(self, batch) -> torch.Tensor:
        """Per-atom energies [N] float64, all terms."""
        plan = self.plan()
        e = self.ann.atomic_energies(batch, plan)
        for term in self.terms[1:]:
            e = e + term.atomic_energies(batch, plan)
        return e

    def forward(self, batch) -> torch.Tensor:
        """Total energies [B] float64."""
        e = self.atomic_energies(batch)
        E = torch.zeros(batch.n_structures, dtype=torch.float64, device=e.device)
        return E.index_add(0, batch.structure, e)

    def energy_and_forces(self, batch, create_graph: bool = False):
        """(E [B] float64, F [N, 3] = -dE/dR), the sums over the terms.  Sets ``requires_grad``
        on batch.positions if needed.  With ``create_graph`` (force training) E and F are
        differentiable in the weights."""
        pos = batch.positions
        if getattr(batch, "features", None) is not None or pos is None:
            raise ConfigError("forces need positions: a batch of cached descriptors supports energies only")
        if not pos.requires_grad:
            pos.requires_grad_(True)
        plan = self.plan()
        if pos.shape[0] == 0:
            E = torch.zeros(batch.n_structures, dtype=torch.float64, device=pos.device)
            return E, torch.zeros_like(pos)
        E, F = self.ann.energy_and_forces(batch, plan, create_graph)
        for term in self.terms[1:]:
            Et, Ft = term.energy_and_forces(batch, plan, create_graph)
            E, F = E + Et, F + Ft
        return E, F

    def energy_forces_stress(self, batch, create_graph: bool = False):
        """(E [B], F [N, 3], stress [B, 3, 3]): energies, forces and the stress of every structure,
        stress = (1/V) dE/d(eps) = (1/V) sum_pairs r_ij (x) dE/dr_ij (eV/A^3, ASE's sign: negative
        under compression), the derivative with respect to a homogeneous strain eps of each
        structure's cell and atoms (:func:`~distmlip.descriptors.batch.strained`), symmetrised;
        zeros for structures without a periodic direction.  Exact in both descriptor backends:
        the reference differentiates through the pair shifts, the fused kernels through image
        atoms (:mod:`distmlip.descriptors.fused`), no per-pair Jacobian; on the CPU's one-node
        plan (float64) the force operator sums r_p (x) dE/dr_p per centre from the pair gradients
        it forms anyway (:func:`~distmlip.models.forces_op.energy_forces_virial`).  With
        ``create_graph`` all three are differentiable in the weights (the trainer's stress step
        takes the operator's backward instead: ``training.force_step``)."""
        from ..descriptors.batch import strained, stress_from_virial
        from . import forces_op

        pos = batch.positions
        if getattr(batch, "features", None) is not None or pos is None:
            raise ConfigError("stress needs positions: a batch of cached descriptors supports energies only")
        B = batch.n_structures
        plan = self.plan()
        if pos.shape[0] == 0:
            z = torch.zeros(B, dtype=torch.float64, device=pos.device)
            return z, torch.zeros_like(pos), torch.zeros(B, 3, 3, dtype=torch.float64, device=pos.device)
        if not create_graph and plan.forces == "one-node" and forces_op.virial_supported(self.ann, batch):
            # the virial from the force operator's own pair gradients (no autograd, no strained copy)
            E, F, W = forces_op.energy_forces_virial(self.ann, batch)
            for term in self.terms[1:]:
                Et, Ft, Wt = term.energy_forces_virial(batch)
                E, F, W = E + Et, F + Ft.to(F.dtype), W + Wt
            return E, F, stress_from_virial(W, batch)
        if not pos.requires_grad:
            pos.requires_grad_(True)
        eps = torch.zeros(B, 3, 3, dtype=pos.dtype, device=pos.device, requires_grad=True)
        with torch.enable_grad():
            sb = strained(batch, eps)
            # differentiated twice for training: the compiled networks' backward is not, so the
            # torch networks run then
            e = self.ann.atomic_energies(sb, plan, compiled=False if create_graph else None)
            for term in self.terms[1:]:
                e = e + term.atomic_energies(sb, plan)
            E = torch.zeros(B, dtype=torch.float64, device=pos.device).index_add(0, batch.structure, e)
            gR, gE = torch.autograd.grad(E.sum(), (pos, eps), create_graph=create_graph)
        stress = stress_from_virial(gE, batch)
        if not create_graph:
            E, gR, stress = E.detach(), gR.detach(), stress.detach()
        return E, -gR, stress

    def other_terms_energy(self, batch) -> torch.Tensor:
        """Energies [B] of the terms other than the networks (what the networks are fitted to
        the residual of)."""
        E = torch.zeros(batch.n_structures, dtype=torch.float64, device=batch.species.device)
        for term in self.terms[1:]:
            E = E.index_add(0, batch.structure, term.atomic_energies(batch, self.plan()).to(torch.float64))
        return E

    @torch.no_grad()
    def fit_normalization(self, batches: Iterable, ctx=None, descriptor: bool = True,
                          energy: str = "lstsq", scale: bool = True, min_scale: float | None = None) -> dict:
        """Fit the network term's normalisation on the training batches (see
        :meth:`AtomicNetworks.fit_normalization`), to the residual of the other terms."""
        return self.ann.fit_normalization(batches, self.plan(), ctx, descriptor, energy, scale,
                                          fixed_energy=self.other_terms_energy if self.zbl is not None else None,
                                          min_scale=min_scale)

    @torch.no_grad()
    def refit_normalization_keeping_function(self, batches: Iterable, ctx=None, descriptor: bool = True,
                                             energy: str = "lstsq", scale: bool = True,
                                             min_scale: float | None = None) -> dict:
        """:meth:`fit_normalization` on new data with the networks changed so that the model's
        energies stay the same (a warm start whose data outgrew the old normalisation; see
        :meth:`AtomicNetworks.refit_normalization_keeping_function`)."""
        return self.ann.refit_normalization_keeping_function(
            batches, self.plan(), ctx, descriptor, energy, scale,
            fixed_energy=self.other_terms_energy if self.zbl is not None else None, min_scale=min_scale)

    def extra_repr(self) -> str:
        return f"zbl={self.zbl is not None}, backend={self.backend}"

    def describe(self) -> str:
        """One line: what the model is."""
        a = self.ann
        return (f"species={self.species}, dim={a.dim}, hidden={a.hidden}, activation={a.activations}, "
                f"dtype={a.dtype_name}, zbl={self.zbl is not None}")


# ---------------------------------------------------------------------------------- committees
COMMITTEE_FORMAT = "distmlip-committee"
COMMITTEE_VERSION = 1


def save_committee(path, payloads: Sequence[dict], metadata: dict | None = None) -> None:
    """Write K model payloads (``BPNN.payload()`` or the dicts of saved model files) as ONE
    committee file, atomically: ``{format: distmlip-committee, version, members: [...], metadata}``."""
    from ..utils.io import atomic_torch_save

    members = []
    for k, p in enumerate(payloads):
        if not isinstance(p, dict) or p.get("format") != FORMAT:
            raise DataFormatError(f"committee member {k}: not a distmlip model payload")
        members.append({key: p[key] for key in ("format", "version", "config", "state_dict", "metadata") if key in p})
    atomic_torch_save({"format": COMMITTEE_FORMAT, "version": COMMITTEE_VERSION, "K": len(members),
                       "members": members, "metadata": dict(metadata or {})}, path)


def load_models(path, device="cpu", backend: str | None = None) -> list:
    """``list[BPNN]`` from a single model file (one member) or a committee file (K members)."""
    path = Path(path)
    obj = load_torch_file(path, "model file")
    if isinstance(obj, dict) and obj.get("format") == COMMITTEE_FORMAT:
        if obj.get("version") != COMMITTEE_VERSION:
            raise DataFormatError(f"{path}: committee format version {obj.get('version')!r} is not supported "
                                  f"(this distmlip reads version {COMMITTEE_VERSION})")
        members = obj.get("members") or []
        if not members:
            raise DataFormatError(f"{path}: committee file has no members")
        return [BPNN.from_payload(m, source=f"{path} (member {k})", backend=backend, device=device)
                for k, m in enumerate(members)]
    return [BPNN.from_payload(obj, source=str(path), backend=backend, device=device)]
