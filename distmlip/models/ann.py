"""The network energy term of a Behler-Parrinello potential: one network per element on the
normalised descriptor.

    e_i = e_ref[t_i] + shift[t_i] + scale * net_{t_i}( (G_i - mean[t_i]) / std[t_i] )

The descriptor, its per-species normalisation, the energy shift/scale and the reference atomic
energies are modules and buffers of the term, so a saved model predicts from raw positions
alone.  Descriptors, atomic-energy scaling and all sums are float64; the networks may run in
float32 (``dtype="float32"``): their outputs are numbers of order 1, cast to float64 before
scaling and summation, so total energies of 1e4 eV keep meV resolution.

Forces come from one of three implementations of the same arithmetic, by the model's plan
(:mod:`.backend`): ``one-node`` (:mod:`.forces_op`), ``closed-form`` (networks' input gradient
in closed form, :mod:`.networks`; the descriptor VJP through autograd) and ``autograd``.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..descriptors.spec import DescriptorSpec
from ..errors import ConfigError
from . import activations as act_table
from . import forces_op
from .networks import batch_layout, make_mlp, network_energies, nets_with_gradient

DTYPES = {"float64": torch.float64, "float32": torch.float32}
# the smallest feature scale, as a share of the feature's RMS over the training atoms (fit_normalization)
FEATURE_STD_FLOOR = 1e-2


class AtomicNetworks(nn.Module):
    """Energy term: per-element networks on the descriptor of ``spec``."""

    def __init__(self, species: Sequence[str], spec: DescriptorSpec, hidden: Sequence[int] = (10, 10),
                 activation="tanh", dtype: str = "float64", reference_energies: dict | None = None):
        super().__init__()
        if dtype not in DTYPES:
            raise ConfigError(f"model.dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
        self.species = list(species)
        self.spec = spec
        self.hidden = [int(h) for h in hidden]
        acts = [activation] * len(self.hidden) if isinstance(activation, str) else list(activation)
        if len(acts) != len(self.hidden):
            raise ConfigError(f"model.activation: {len(acts)} activations given for {len(self.hidden)} hidden layers")
        for a in acts:
            act_table.get(a)
        self.activations = acts
        self.dtype_name = dtype
        self.descriptor = spec.build(self.species)
        T, D = len(self.species), int(self.descriptor.dim)
        self.dim = D
        self.nets = nn.ModuleList([make_mlp(D, self.hidden, self.activations, DTYPES[dtype]) for _ in range(T)])
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

    @property
    def cutoff(self) -> float:
        return self.spec.cutoff

    @property
    def net_dtype(self):
        return DTYPES[self.dtype_name]

    def reference_energies(self) -> dict:
        return {s: float(e) for s, e in zip(self.species, self.reference_energy.tolist()) if e != 0.0}

    # ------------------------------------------------------------------ energies
    def descriptors(self, batch, plan) -> torch.Tensor:
        """Raw descriptors [N, D] of the batch; a batch carrying precomputed ``features`` (the
        descriptor cache of energy-mode training, ``distmlip.descriptors.featurize``) uses them."""
        G = getattr(batch, "features", None)
        if G is not None:
            return G
        return self.descriptor(batch.positions, batch.species, batch.pair_i, batch.pair_j, batch.pair_shift,
                               pair_ptr=getattr(batch, "pair_ptr", None), kernels=plan.descriptor)

    def atomic_energies_from_features(self, G: torch.Tensor, species: torch.Tensor, plan,
                                      layout=None, compiled: bool | None = None) -> torch.Tensor:
        """Per-atom energies [N] float64 from raw descriptors G [N, D].  ``layout``: the batch's
        species layout, or a function returning it (only the torch networks need it);
        ``compiled`` overrides the plan's networks (False where autograd differentiates twice)."""
        G = G.to(torch.float64)
        if G.shape[0] == 0:
            return G.new_zeros(0)
        x = self.normalised(G, species)
        if compiled is None:
            compiled = plan.networks == "compiled"
        y = network_energies(x.to(self.net_dtype), species, self.nets, self.activations, compiled, layout)
        return self.scaled_outputs(y, species)

    def normalised(self, G: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """The networks' inputs x = (G - mean_t) / std_t [N, D] float64 of raw descriptors G."""
        G = G.to(torch.float64)
        return (G - self.feature_mean.index_select(0, species)) / self.feature_std.index_select(0, species)

    def scaled_outputs(self, y: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """Per-atom energies [N] float64 from the networks' outputs y: base_t + scale y."""
        base = (self.reference_energy + self.energy_shift).index_select(0, species)
        return base + self.energy_scale * y.to(torch.float64)

    def atomic_energies(self, batch, plan, compiled: bool | None = None) -> torch.Tensor:
        return self.atomic_energies_from_features(self.descriptors(batch, plan), batch.species, plan,
                                                  lambda: batch_layout(batch, len(self.species)), compiled)

    def energy_and_forces(self, batch, plan, create_graph: bool = False):
        """(E [B], F [N, 3]) of this term; ``batch.positions`` must require grad."""
        pos = batch.positions
        if plan.forces == "one-node":
            if create_graph:
                return forces_op.energy_and_forces(self, batch)
            with torch.no_grad():
                return forces_op.energy_and_forces(self, batch)
        if create_graph and plan.forces == "closed-form":
            return self._energy_and_forces_closed_form(batch, plan)
        # autograd through everything; differentiated twice for force training, which the
        # compiled networks' backward does not support: the torch networks run then
        e = self.atomic_energies(batch, plan, compiled=False if create_graph else None)
        E = torch.zeros(batch.n_structures, dtype=torch.float64, device=e.device).index_add(0, batch.structure, e)
        (g,) = torch.autograd.grad(E.sum(), pos, create_graph=create_graph)
        return (E if create_graph else E.detach()), -g

    def _energy_and_forces_closed_form(self, batch, plan):
        sp = batch.species
        G = self.descriptors(batch, plan).to(torch.float64)
        std = self.feature_std.index_select(0, sp)
        x = self.normalised(G, sp)
        y, dydx = nets_with_gradient(x.to(self.net_dtype), sp, lambda: batch_layout(batch, len(self.species)),
                                     self.nets, self.activations, plan.networks == "compiled")
        e = self.scaled_outputs(y, sp)
        E = torch.zeros(batch.n_structures, dtype=torch.float64, device=e.device).index_add(0, batch.structure, e)
        dEdG = self.energy_scale * dydx.to(torch.float64) / std
        (g,) = torch.autograd.grad(G, batch.positions, dEdG, create_graph=True)
        return E, -g

    # ------------------------------------------------------------------ normalisation
    @torch.no_grad()
    def fit_normalization(self, batches: Iterable, plan, ctx=None, descriptor: bool = True,
                          energy: str = "lstsq", scale: bool = True,
                          fixed_energy: Callable | None = None, min_scale: float | None = None,
                          keep_absent: bool = False) -> dict:
        """Fit descriptor mean/std per species and feature, and the per-atom energy shift/scale.

        ``batches`` yields collated batches of the training set (a rank's share under MPI: the
        sums are all-reduced over ``ctx`` so every rank gets identical buffers).  ``energy``:
        'lstsq' (least-squares per-species shift), 'mean' (mean energy per atom, the same for all
        species) or 'none'.  ``fixed_energy(batch) -> [B]``: the energy of the model's other
        terms, which this term is fitted to the residual of.  ``min_scale``: a lower bound of the
        output scale (force training: the scale the forces imply).  ``keep_absent``: a species
        without atoms in ``batches`` keeps its feature statistics and energy shift (a refit of a
        trained model on data without that element must not erase what the model knows of it;
        a new model's absent species get mean 0, std 1 and the mean energy per atom).  Returns a
        summary dict."""
        old = (self.feature_mean.clone(), self.feature_std.clone(), self.energy_shift.clone())
        T, D = len(self.species), self.dim
        dev = self.feature_mean.device
        f64 = torch.float64
        cnt = torch.zeros(T, dtype=f64, device=dev)
        s1 = torch.zeros(T, D, dtype=f64, device=dev)
        s2 = torch.zeros(T, D, dtype=f64, device=dev)
        AtA = torch.zeros(T, T, dtype=f64, device=dev)
        AtE = torch.zeros(T, dtype=f64, device=dev)
        stats = torch.zeros(4, dtype=f64, device=dev)  # n_struct, n_atoms, sum E, (unused)
        comps, energies = [], []
        for batch in batches:
            if batch is None or batch.n_structures == 0:
                continue
            batch = batch.to(dev)
            spec = batch.species
            if descriptor:
                G = self.descriptors(batch, plan).to(f64)
                cnt += torch.bincount(spec, minlength=T).to(f64)
                s1.index_add_(0, spec, G)
                s2.index_add_(0, spec, G * G)
            comp = torch.zeros(batch.n_structures, T, dtype=f64, device=dev)
            comp.index_put_((batch.structure, spec), torch.ones_like(spec, dtype=f64), accumulate=True)
            E = batch.energy.to(f64) - comp @ self.reference_energy
            if fixed_energy is not None:
                E = E - fixed_energy(batch).to(f64)
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
            # A feature that barely varies in the training data (a bulk cell at one lattice
            # constant: std 1e-4 of its size) would be scaled up ~1e4x, so that a 1 % strain puts
            # the network's input hundreds of standard deviations out and the predicted energy
            # surface (and stress) is rough there.  Floor the scale at FEATURE_STD_FLOOR of the
            # feature's RMS (energy and force errors unchanged where it engages: docs/results.md).
            floor = FEATURE_STD_FLOOR * (mean * mean + var).sqrt()
            live = std > 1e-8 * (1.0 + mean.abs())
            floored = live & (std < floor)
            # guard constant features (zero std) and species absent from the training set
            std = torch.where(live, torch.maximum(std, floor), torch.ones_like(std))
            if keep_absent:
                gone = (cnt == 0)[:, None]
                mean = torch.where(gone, old[0], mean)
                std = torch.where(gone, old[1], std)
            summary["floored_features"] = {s: int(c) for s, c in zip(self.species, floored.sum(1).tolist()) if c}
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
        absent = [s for s, c in zip(self.species, torch.diagonal(AtA).tolist()) if c == 0]
        summary["absent_species"] = absent
        if keep_absent and absent and energy in ("lstsq", "mean"):
            gone = torch.diagonal(AtA) == 0
            self.energy_shift.copy_(torch.where(gone, old[2], self.energy_shift))
        if scale:
            # RMS per-atom residual energy after the shift, over all structures (global)
            ss = torch.zeros(2, dtype=f64, device=dev)
            for comp, E in zip(comps, energies):
                r = (E - comp @ self.energy_shift) / comp.sum(1)
                ss += torch.stack([(r * r).sum(), torch.tensor(float(len(r)), dtype=f64, device=dev)])
            if ctx is not None:
                ctx.all_reduce_sum(ss)
            rms = math.sqrt(float(ss[0] / ss[1])) if ss[1] > 0 else 1.0
            summary["energy_residual_rms"] = rms
            scale_value = rms if rms > 1e-6 else 1.0
            if min_scale is not None and min_scale > scale_value:
                scale_value = float(min_scale)
            self.energy_scale.fill_(scale_value)
        summary["energy_shift"] = {s: float(v) for s, v in zip(self.species, self.energy_shift.tolist())}
        summary["energy_scale"] = float(self.energy_scale)
        return summary

    @torch.no_grad()
    def refit_normalization_keeping_function(self, batches: Iterable, plan, ctx=None, descriptor: bool = True,
                                             energy: str = "lstsq", scale: bool = True,
                                             fixed_energy: Callable | None = None,
                                             min_scale: float | None = None) -> dict:
        """Refit the normalisation on new data and change the first and last layer of every
        network so that the term computes the same energies as before (to round-off).

        Why: a warm start keeps the normalisation of the old data, and an energy scale fitted on
        narrow data (300 K snapshots: a few meV/atom) caps the energies the networks can reach, so
        new structures far above it (what active learning adds) cannot be fitted without wrecking
        the rest.  With x = (G - m) / s and E_i = base + scale y: the first layer becomes
        W' = W diag(s'/s), b' = b + W (m' - m) / s, the last w' = w scale/scale',
        b' = b scale/scale' + (base - base') / scale'."""
        f64 = torch.float64
        old_mean, old_std = self.feature_mean.clone(), self.feature_std.clone()
        old_base = (self.reference_energy + self.energy_shift).clone()
        old_scale = float(self.energy_scale)
        summary = self.fit_normalization(batches, plan, ctx, descriptor, energy, scale, fixed_energy,
                                         min_scale=min_scale, keep_absent=True)
        new_base = self.reference_energy + self.energy_shift
        k = old_scale / float(self.energy_scale)
        for t, net in enumerate(self.nets):
            lin = [m for m in net if isinstance(m, nn.Linear)]
            first, last = lin[0], lin[-1]
            W = first.weight.to(f64)
            r = self.feature_std[t] / old_std[t]
            d = (self.feature_mean[t] - old_mean[t]) / old_std[t]
            first.bias.copy_((first.bias.to(f64) + W @ d).to(first.bias.dtype))
            first.weight.copy_((W * r[None, :]).to(first.weight.dtype))
            last.weight.copy_((last.weight.to(f64) * k).to(last.weight.dtype))
            last.bias.copy_((last.bias.to(f64) * k + (old_base[t] - new_base[t]) / float(self.energy_scale))
                            .to(last.bias.dtype))
        summary["kept_function"] = True
        return summary

    def extra_repr(self) -> str:
        return (f"species={self.species}, dim={self.dim}, hidden={self.hidden}, "
                f"activation={self.activations}, dtype={self.dtype_name}")
