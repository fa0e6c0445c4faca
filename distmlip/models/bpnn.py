"""Behler-Parrinello potential: one MLP per element on aenet Chebyshev descriptors.

    E_struct = sum_i  e_ref[t_i] + shift[t_i] + scale * net_{t_i}( (G_i - mean[t_i]) / std[t_i] )

The descriptor, its per-species normalisation, the energy shift/scale and the reference atomic
energies are buffers of the module and are saved with it, so a saved model predicts from raw
positions alone.  Descriptors, atomic-energy scaling and all sums are float64; the networks may run
in float32 (``dtype="float32"``): their per-atom outputs are small numbers (order 1) and are cast
to float64 before scaling and summation, so total energies of 1e4 eV keep meV resolution.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, DataFormatError
from ..utils.io import load_torch_file

FORMAT = "distmlip-bpnn"
VERSION = 1

ACTIVATIONS = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "linear": nn.Identity,
    "softplus": nn.Softplus,
    "silu": nn.SiLU,
}

DTYPES = {"float64": torch.float64, "float32": torch.float32}

DESCRIPTOR_KEYS = ("rc_radial", "n_radial", "rc_angular", "n_angular", "backend")


def resolve_backend(backend: str) -> str:
    """'auto' -> 'fused' when the compiled kernels are usable, else 'reference'."""
    if backend in ("reference", "fused"):
        return backend
    if backend != "auto":
        raise ConfigError(f"descriptor.backend: {backend!r} is not one of 'auto', 'reference', 'fused'")
    try:
        from .._ext import load_extension

        if load_extension(warn_if_missing=False):
            import importlib

            importlib.import_module("distmlip.descriptors.fused")
            return "fused"
    except Exception:  # fused wrapper not available in this build
        pass
    return "reference"


def make_descriptor(species, params: dict):
    from ..descriptors.chebyshev import ChebyshevDescriptor

    p = dict(params)
    p["backend"] = resolve_backend(p.get("backend", "auto"))
    try:
        return ChebyshevDescriptor(list(species), float(p["rc_radial"]), int(p["n_radial"]),
                                   float(p["rc_angular"]), int(p["n_angular"]), backend=p["backend"])
    except ValueError as exc:
        raise ConfigError(f"descriptor: {exc}") from None


def _activation_list(activation, n_hidden: int) -> list[str]:
    acts = [activation] * n_hidden if isinstance(activation, str) else list(activation)
    if len(acts) != n_hidden:
        raise ConfigError(f"model.activation: {len(acts)} activations given for {n_hidden} hidden layers")
    for a in acts:
        if a not in ACTIVATIONS:
            raise ConfigError(f"model.activation: {a!r} is not one of {', '.join(ACTIVATIONS)}")
    return acts


def make_mlp(n_in: int, hidden: Sequence[int], activations: Sequence[str], dtype) -> nn.Sequential:
    layers: list[nn.Module] = []
    prev = n_in
    for width, act in zip(hidden, activations):
        layers.append(nn.Linear(prev, int(width), dtype=dtype))
        layers.append(ACTIVATIONS[act]())
        prev = int(width)
    layers.append(nn.Linear(prev, 1, dtype=dtype))
    return nn.Sequential(*layers)


def species_layout(species: torch.Tensor, n_species: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Padded per-species layout of a batch's atoms: (slot [N], src [n_species * rows], rows).
    Atom a goes to row ``slot[a]`` of a [n_species * rows] table in which the atoms of species t
    fill rows t * rows ... t * rows + count_t - 1 (rows = the largest count); ``src`` is the
    inverse map (the atom of each row, N for padding rows).  One host synchronisation (the
    largest count): cache the result per batch (:meth:`BPNN.batch_layout`)."""
    n = species.shape[0]
    counts = torch.bincount(species, minlength=n_species)
    rows = max(int(counts.max()), 1) if n else 1
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(species, stable=True)
    sp = species[order]
    slot = torch.empty_like(species)
    slot[order] = sp * rows + torch.arange(n, device=species.device) - start[sp]
    src = torch.full((n_species * rows,), n, dtype=species.dtype, device=species.device)
    src[slot] = torch.arange(n, dtype=species.dtype, device=species.device)
    return slot, src, rows


def stacked_forward(x: torch.Tensor, layout: tuple[torch.Tensor, torch.Tensor, int], weights,
                    activations) -> torch.Tensor:
    """Outputs [N] of T per-species networks of one architecture for the rows of x [N, D], atom a
    evaluated by the network of its species.  ``weights``: per Linear layer k, the pair
    (``[W_k of species 0..T-1]``, ``[b_k of species 0..T-1]``); ``activations``: one callable
    per hidden layer.

    All species at once: the atoms are gathered into a padded [T, rows, D] table (``layout``
    from :func:`species_layout`; padding rows are zero) and each layer is one batched matrix
    product with the stacked weights of the T networks.  Same values as a loop over species,
    with a few autograd nodes per layer instead of a few per layer and species: the training
    step of small networks is dominated by per-operation overhead, above all in the double
    backward of force training."""
    slot, src, rows = layout
    T = len(weights[0][0])
    D = x.shape[1]
    h = torch.cat([x, x.new_zeros(1, D)]).index_select(0, src).view(T, rows, D)
    for k, (Ws, bs) in enumerate(weights):
        h = torch.baddbmm(torch.stack(bs).unsqueeze(1), h, torch.stack(Ws).transpose(1, 2))
        if k < len(activations):
            h = activations[k](h)
    return h.reshape(T * rows, -1)[:, 0].index_select(0, slot)


def stacked_mlp(x: torch.Tensor, layout: tuple[torch.Tensor, torch.Tensor, int],
                nets: Sequence[nn.Sequential]) -> torch.Tensor:
    """Outputs [N] of the per-species networks ``nets`` (same architecture: Linear and activation
    layers) for the rows of x [N, D] (:func:`stacked_forward` with the modules' weights and
    activation layers)."""
    layers = list(nets[0])
    lin = [k for k, m in enumerate(layers) if isinstance(m, nn.Linear)]
    weights = [([net[k].weight for net in nets], [net[k].bias for net in nets]) for k in lin]
    acts = [nn.Sequential(*layers[k + 1:k2]) for k, k2 in zip(lin, lin[1:])]
    return stacked_forward(x, layout, weights, acts)


class BPNN(nn.Module):
    """Per-element atomic neural networks on the Chebyshev descriptor."""

    def __init__(self, species: Sequence[str], descriptor: dict, hidden: Sequence[int] = (10, 10),
                 activation="tanh", dtype: str = "float64",
                 reference_energies: dict | None = None, zbl: dict | None = None):
        super().__init__()
        if not species:
            raise ConfigError("model: the species list is empty")
        if dtype not in DTYPES:
            raise ConfigError(f"model.dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
        missing = [k for k in DESCRIPTOR_KEYS[:4] if k not in descriptor]
        if missing:
            raise ConfigError(f"descriptor: missing {', '.join(missing)}")
        self.species = list(species)
        self.hidden = [int(h) for h in hidden]
        self.activations = _activation_list(activation, len(self.hidden))
        self.dtype_name = dtype
        self.descriptor = make_descriptor(self.species, descriptor)
        self.descriptor_params = {k: descriptor.get(k, "auto") for k in DESCRIPTOR_KEYS}
        self.descriptor_params["backend"] = self.descriptor.backend if hasattr(self.descriptor, "backend") \
            else resolve_backend(descriptor.get("backend", "auto"))
        self.cutoff = max(float(descriptor["rc_radial"]), float(descriptor["rc_angular"]))
        # optional ZBL short-range repulsion, E = E_ZBL + E_ANN (``zbl``: {"radii": {"A-B": [in, out]}}
        # or {} for the covalent-radius defaults; None: no ZBL).  The pair list must cover its
        # outer radius too.
        self.zbl = None
        if zbl is not None:
            from .zbl import ZBL

            try:
                self.zbl = ZBL(self.species, (zbl or {}).get("radii"))
            except (ValueError, KeyError) as exc:
                raise ConfigError(f"zbl: {exc}") from None
            self.cutoff = max(self.cutoff, self.zbl.cutoff)
        T, D = len(self.species), int(self.descriptor.dim)
        self.dim = D
        net_dtype = DTYPES[dtype]
        self.nets = nn.ModuleList([make_mlp(D, self.hidden, self.activations, net_dtype) for _ in range(T)])
        f64 = torch.float64
        self.register_buffer("feature_mean", torch.zeros(T, D, dtype=f64))
        self.register_buffer("feature_std", torch.ones(T, D, dtype=f64))
        self.register_buffer("energy_shift", torch.zeros(T, dtype=f64))
        self.register_buffer("energy_scale", torch.ones((), dtype=f64))
        ref = torch.zeros(T, dtype=f64)
        for sym, e in (reference_energies or {}).items():
            if sym not in self.species:
                raise ConfigError(f"model.reference_energies: {sym!r} is not one of the species {self.species}")
            ref[self.species.index(sym)] = float(e)
        self.register_buffer("reference_energy", ref)

    # ------------------------------------------------------------------ configuration / io
    def config(self) -> dict:
        ref = {s: float(e) for s, e in zip(self.species, self.reference_energy.tolist()) if e != 0.0}
        return {"species": list(self.species), "descriptor": dict(self.descriptor_params),
                "hidden": list(self.hidden), "activation": list(self.activations),
                "dtype": self.dtype_name, "reference_energies": ref,
                "zbl": ({"radii": {k: list(v) for k, v in self.zbl.to_dict()["radii"].items()}}
                        if self.zbl is not None else None)}

    @classmethod
    def from_config(cls, cfg: dict, backend: str | None = None) -> "BPNN":
        desc = dict(cfg["descriptor"])
        if backend is not None:
            desc["backend"] = backend
        return cls(cfg["species"], desc, cfg["hidden"], cfg["activation"], cfg["dtype"],
                   cfg.get("reference_energies") or None, zbl=cfg.get("zbl"))

    def save(self, path, metadata: dict | None = None) -> None:
        """Write the model (config + weights + normalisation) atomically to ``path``."""
        from ..utils.io import atomic_torch_save

        state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        atomic_torch_save({"format": FORMAT, "version": VERSION, "config": self.config(),
                           "state_dict": state, "metadata": dict(metadata or {})}, path)

    def payload(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "config": self.config(),
                "state_dict": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}}

    @classmethod
    def from_payload(cls, obj, source: str = "<memory>", backend: str | None = None,
                     device="cpu") -> "BPNN":
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            fmt = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
            raise DataFormatError(f"{source}: not a distmlip model file (format {fmt!r}, expected {FORMAT!r})")
        if obj.get("version") != VERSION:
            raise DataFormatError(f"{source}: model format version {obj.get('version')!r} is not supported "
                                  f"(this distmlip reads version {VERSION})")
        try:
            model = cls.from_config(obj["config"], backend=backend)
            model.load_state_dict(obj["state_dict"])
        except (KeyError, RuntimeError, TypeError) as exc:
            raise DataFormatError(f"{source}: model file is inconsistent: {exc}") from None
        model.metadata = dict(obj.get("metadata") or {})
        return model.to(device)

    @classmethod
    def load(cls, path, device="cpu", backend: str | None = None) -> "BPNN":
        """Load a model written by :meth:`save`; ``backend`` overrides the descriptor backend."""
        path = Path(path)
        obj = load_torch_file(path, "model file")
        return cls.from_payload(obj, source=str(path), backend=backend, device=device)

    # ------------------------------------------------------------------ evaluation
    @property
    def net_dtype(self):
        return DTYPES[self.dtype_name]

    def species_indices(self, batch_species: torch.Tensor) -> list[torch.Tensor]:
        return [torch.nonzero(batch_species == t, as_tuple=True)[0] for t in range(len(self.species))]

    def descriptors(self, batch) -> torch.Tensor:
        """Raw descriptors [N, D] of the batch; a batch carrying precomputed ``features`` (the
        descriptor cache of energy-mode training, ``distmlip.descriptors.featurize``) uses them."""
        G = getattr(batch, "features", None)
        if G is not None:
            return G
        return self.descriptor(batch.positions, batch.species, batch.pair_i, batch.pair_j, batch.pair_shift,
                               pair_ptr=getattr(batch, "pair_ptr", None))

    def atomic_energies_from_features(self, G: torch.Tensor, species: torch.Tensor,
                                      layout: tuple | None = None) -> torch.Tensor:
        """Per-atom energies [N] float64 from raw descriptors G [N, D] (float64).  ``layout``:
        :func:`species_layout` of ``species`` if already known, or a function returning it (the
        compiled CPU networks do not need it)."""
        G = G.to(torch.float64)
        if G.shape[0] == 0:
            return G.new_zeros(0)
        x = (G - self.feature_mean.index_select(0, species)) / self.feature_std.index_select(0, species)
        x = x.to(self.net_dtype)
        from .forcenet import network_energies, use_compiled

        if use_compiled(x, self.nets, self.activations):
            y = network_energies(x, species, self.nets, self.activations).to(torch.float64)
        else:
            if layout is None:
                layout = species_layout(species, len(self.species))
            elif callable(layout):
                layout = layout()
            y = stacked_mlp(x, layout, self.nets).to(torch.float64)
        base = (self.reference_energy + self.energy_shift).index_select(0, species)
        return base + self.energy_scale * y

    @staticmethod
    def batch_layout(batch, n_species: int) -> tuple:
        """:func:`species_layout` of ``batch.species``, cached on the batch object."""
        cached = getattr(batch, "_species_layout", None)
        if cached is not None and cached[0] is batch.species and cached[1] == n_species:
            return cached[2]
        layout = species_layout(batch.species, n_species)
        try:
            object.__setattr__(batch, "_species_layout", (batch.species, n_species, layout))
        except (AttributeError, TypeError):  # a batch type without instance attributes
            pass
        return layout

    def zbl_atomic_energies(self, batch) -> torch.Tensor | None:
        """Per-atom ZBL energies [N] float64 (half of every pair on each atom), None without ZBL."""
        if self.zbl is None:
            return None
        pre = getattr(batch, "zbl_atomic", None)   # precomputed by a descriptor cache, if any
        if pre is not None:
            return pre.to(torch.float64)
        if getattr(batch, "positions", None) is None or getattr(batch, "pair_i", None) is None:
            raise ConfigError("the model has a ZBL term, which needs positions and the pair list: this "
                              "batch holds cached descriptors only (set descriptor.cache: off with zbl)")
        return self.zbl.atomic_energies(batch.positions, batch.species, batch.pair_i, batch.pair_j,
                                        batch.pair_shift)

    def atomic_energies(self, batch) -> torch.Tensor:
        """Per-atom energies [N] float64: ANN (+ ZBL when the model has it)."""
        e = self.atomic_energies_from_features(self.descriptors(batch), batch.species,
                                               lambda: self.batch_layout(batch, len(self.species)))
        if self.zbl is not None:
            e = e + self.zbl_atomic_energies(batch)
        return e

    def forward(self, batch) -> torch.Tensor:
        """Total energies [B] float64."""
        e = self.atomic_energies(batch)
        E = torch.zeros(batch.n_structures, dtype=torch.float64, device=e.device)
        return E.index_add(0, batch.structure, e)

    # closed-form network gradient for force training (distmlip/models/forcenet.py); False:
    # autograd through the networks (the reference the tests compare against)
    closed_form_force_gradient = True
    # energies and forces as one autograd node on the CPU with the fused kernels and compiled
    # networks (distmlip/models/fused_forces.py); False: the general path
    one_node_forces = True

    def energy_and_forces(self, batch, create_graph: bool = False):
        """(E [B] float64, F [N, 3] = -dE/dR).  Sets ``requires_grad`` on batch.positions if needed.

        With ``create_graph`` (force training) the networks' gradient dy/dx comes in closed form
        from one custom autograd function (:mod:`distmlip.models.forcenet`) instead of an autograd
        graph of the networks' backward; F is the descriptor VJP of dE/dG, differentiable in the
        weights.  Same values and weight gradients (tested against the autograd path)."""
        pos = batch.positions
        if getattr(batch, "features", None) is not None or pos is None:
            raise ConfigError("forces need positions: a batch of cached descriptors supports energies only")
        if not pos.requires_grad:
            pos.requires_grad_(True)
        if pos.shape[0] > 0 and self.one_node_forces and self.closed_form_force_gradient:
            from . import fused_forces

            # CPU, fused kernels and compiled networks: one autograd node for E and F (None when
            # that path does not apply)
            if create_graph:
                EF = fused_forces.energy_and_forces(self, batch)
            else:
                with torch.no_grad():
                    EF = fused_forces.energy_and_forces(self, batch)
            if EF is not None:
                E, F = EF
                if self.zbl is not None:
                    ez = self.zbl_atomic_energies(batch)
                    (gz,) = torch.autograd.grad(ez.sum(), pos, create_graph=create_graph)
                    Ez = torch.zeros_like(E).index_add(0, batch.structure, ez)
                    E, F = E + (Ez if create_graph else Ez.detach()), F - gz
                return E, F
        if create_graph and self.closed_form_force_gradient and pos.shape[0] > 0:
            from .forcenet import supported_cached

            if supported_cached(self.nets, self.activations):
                return self._energy_and_forces_closed_form(batch)
        from .forcenet import compiled_networks

        # differentiated twice through autograd: the compiled networks' backward is not
        # differentiable, so the torch-operator networks run here
        with compiled_networks(not create_graph):
            E = self(batch)
        (g,) = torch.autograd.grad(E.sum(), pos, create_graph=create_graph)
        return (E if create_graph else E.detach()), -g

    def _energy_and_forces_closed_form(self, batch):
        from .forcenet import nets_with_gradient

        pos, sp = batch.positions, batch.species
        G = self.descriptors(batch).to(torch.float64)
        std = self.feature_std.index_select(0, sp)
        x = (G - self.feature_mean.index_select(0, sp)) / std
        y, dydx = nets_with_gradient(x.to(self.net_dtype), lambda: self.batch_layout(batch, len(self.species)),
                                     self.nets, self.activations, species=sp)
        e = (self.reference_energy + self.energy_shift).index_select(0, sp) + self.energy_scale * y.to(torch.float64)
        outputs = [G]
        grads = [self.energy_scale * dydx.to(torch.float64) / std]          # dE/dG
        if self.zbl is not None:
            ez = self.zbl_atomic_energies(batch)
            e = e + ez
            outputs.append(ez)
            grads.append(torch.ones_like(ez))
        E = torch.zeros(batch.n_structures, dtype=torch.float64, device=e.device).index_add(0, batch.structure, e)
        (g,) = torch.autograd.grad(outputs, pos, grads, create_graph=True)
        return E, -g

    # ------------------------------------------------------------------ normalisation
    @torch.no_grad()
    def fit_normalization(self, batches: Iterable, ctx=None, descriptor: bool = True,
                          energy: str = "lstsq", scale: bool = True) -> dict:
        """Fit descriptor mean/std per species and feature, and the per-atom energy shift/scale.

        ``batches`` yields collated batches of the training set (a rank's share under MPI:
        the sums are all-reduced over ``ctx`` so every rank gets identical buffers).
        ``energy``: 'lstsq' (least-squares per-species shift), 'mean' (mean energy per atom, the
        same for all species) or 'none'.  Returns a summary dict."""
        T, D = len(self.species), self.dim
        dev = self.feature_mean.device
        f64 = torch.float64
        cnt = torch.zeros(T, dtype=f64, device=dev)
        s1 = torch.zeros(T, D, dtype=f64, device=dev)
        s2 = torch.zeros(T, D, dtype=f64, device=dev)
        AtA = torch.zeros(T, T, dtype=f64, device=dev)
        AtE = torch.zeros(T, dtype=f64, device=dev)
        stats = torch.zeros(4, dtype=f64, device=dev)  # n_struct, n_atoms, sum E, sum (E/n)^2
        comps, energies, natoms = [], [], []
        for batch in batches:
            if batch is None or batch.n_structures == 0:
                continue
            batch = batch.to(dev)
            spec = batch.species
            if descriptor:
                G = self.descriptors(batch).to(f64)
                cnt += torch.bincount(spec, minlength=T).to(f64)
                s1.index_add_(0, spec, G)
                s2.index_add_(0, spec, G * G)
            comp = torch.zeros(batch.n_structures, T, dtype=f64, device=dev)
            comp.index_put_((batch.structure, spec), torch.ones_like(spec, dtype=f64), accumulate=True)
            E = batch.energy.to(f64) - comp @ self.reference_energy
            if self.zbl is not None:
                # the ANN is fitted to the residual E_ref - E_ZBL: shift/scale from the residual
                E = E - torch.zeros(batch.n_structures, dtype=f64, device=dev).index_add(
                    0, batch.structure, self.zbl_atomic_energies(batch).to(f64))
            AtA += comp.T @ comp
            AtE += comp.T @ E
            stats += torch.stack([torch.tensor(float(batch.n_structures), dtype=f64, device=dev),
                                  comp.sum(), E.sum(), torch.zeros((), dtype=f64, device=dev)])
            comps.append(comp)
            energies.append(E)
        if ctx is not None:
            for t in (cnt, s1, s2, AtA, AtE, stats):
                ctx.all_reduce_sum(t)
        summary = {"n_structures": int(stats[0].item()), "n_atoms": int(stats[1].item())}
        if stats[0].item() == 0:
            raise ConfigError("cannot fit the normalisation: the training set is empty")
        if descriptor:
            n = cnt.clamp(min=1.0)[:, None]
            mean = s1 / n
            var = (s2 / n - mean * mean).clamp(min=0.0)
            std = var.sqrt()
            # guard constant features (zero std) and species absent from the training set
            std = torch.where(std > 1e-8 * (1.0 + mean.abs()), std, torch.ones_like(std))
            self.feature_mean.copy_(mean)
            self.feature_std.copy_(std)
            summary["species_atoms"] = {s: int(c) for s, c in zip(self.species, cnt.tolist())}
        if energy == "lstsq":
            # shift = mu + delta: mu the mean energy per atom, delta the minimum-norm least-squares
            # correction (so species whose share cannot be resolved, e.g. a single composition,
            # all get the mean energy per atom)
            mu = float(stats[2] / stats[1])
            A, b = AtA.cpu().numpy(), (AtE - mu * AtA.sum(1)).cpu().numpy()
            delta = np.linalg.lstsq(A, b, rcond=None)[0]
            self.energy_shift.copy_(torch.from_numpy(mu + delta).to(dev, f64))
        elif energy == "mean":
            self.energy_shift.fill_(float(stats[2] / stats[1]))
        elif energy != "none":
            raise ConfigError(f"model.energy_shift: {energy!r} is not one of 'lstsq', 'mean', 'none'")
        if scale:
            # RMS per-atom residual energy after the shift, over all structures (global)
            ss = torch.zeros(2, dtype=f64, device=dev)
            for comp, E in zip(comps, energies):
                r = (E - comp @ self.energy_shift) / comp.sum(1)
                ss += torch.stack([(r * r).sum(), torch.tensor(float(len(r)), dtype=f64, device=dev)])
            if ctx is not None:
                ctx.all_reduce_sum(ss)
            rms = math.sqrt(float(ss[0] / ss[1])) if ss[1] > 0 else 1.0
            self.energy_scale.fill_(rms if rms > 1e-6 else 1.0)
        summary["energy_shift"] = {s: float(v) for s, v in zip(self.species, self.energy_shift.tolist())}
        summary["energy_scale"] = float(self.energy_scale)
        return summary

    def extra_repr(self) -> str:
        return (f"species={self.species}, dim={self.dim}, hidden={self.hidden}, "
                f"activation={self.activations}, dtype={self.dtype_name}, zbl={self.zbl is not None}")


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
