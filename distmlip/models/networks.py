"""The per-element networks: construction, evaluation for all species at once, and the input
gradient in closed form for direct force training.

Networks: ``Linear -> act -> ... -> Linear(., 1)`` with the activations of
:mod:`distmlip.models.activations`, the same architecture for every species.  Two
implementations of the same arithmetic, chosen by the model's plan (:mod:`.backend`):

* torch operators on a padded per-species table (:func:`species_layout`,
  :func:`stacked_forward`): each layer is one batched product with the stacked weights of all
  species, a few autograd nodes per layer instead of a few per layer and species;
* the compiled CPU operators ``torch.ops.distmlip.bpnn_nets_{forward,backward}``
  (csrc/nets_cpu.cpp, :class:`CompiledNets`): y and dy/dx in one call, and the weight (and
  input) gradients of any loss on both in one call; their per-operation overhead is what
  dominated the small batches of molecules.

Force training needs, for every atom, the network output y(x) and its gradient dy/dx with
respect to the (normalised) descriptor x, and then the weight gradients of a loss on both.
Letting autograd build dy/dx (``autograd.grad(..., create_graph=True)``) records the backward of
every layer as a graph and differentiates that graph once more: hundreds of tiny operations per
step for the small networks of a Behler-Parrinello potential.  :class:`NetsWithGradient` (torch
operators) and :class:`CompiledNets` compute y and dy/dx in one forward and, in one backward,
the weight gradients of a loss on both, from the activations' analytic first and second
derivatives.

Notation, per atom (row vectors): h_0 = x, a_k = h_{k-1} W_k^T + b_k, h_k = s_k(a_k) for the
hidden layers k = 1..L-1, y = h_{L-1} W_L^T + b_L.  Gradient: g_{L-1} = W_L,
d_k = g_k * s_k'(a_k), g_{k-1} = d_k W_k, dy/dx = g_0.  The backward with cotangents (ybar, ubar
on g_0) runs the g-chain upwards (W_k gets d_k^T ubar_{k-1}; ubar_k = (ubar_{k-1} W_k^T) * s_k';
a_k gets (ubar_{k-1} W_k^T) * g_k * s_k''), then the usual backward of y downwards, adding the
a_k terms.  Padding rows have zero cotangents, so they add nothing.
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch
from torch import nn

from ..utils.autograd import will_reach
from . import activations as act_table


def make_mlp(n_in: int, hidden: Sequence[int], activations: Sequence[str], dtype) -> nn.Sequential:
    layers: list[nn.Module] = []
    prev = n_in
    for width, act in zip(hidden, activations):
        layers.append(nn.Linear(prev, int(width), dtype=dtype))
        layers.append(act_table.get(act).module())
        prev = int(width)
    layers.append(nn.Linear(prev, 1, dtype=dtype))
    return nn.Sequential(*layers)


def species_layout(species: torch.Tensor, n_species: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Padded per-species layout of a batch's atoms: (slot [N], src [n_species * rows], rows).
    Atom a goes to row ``slot[a]`` of a [n_species * rows] table in which the atoms of species t
    fill rows t * rows ... t * rows + count_t - 1 (rows = the largest count); ``src`` is the
    inverse map (the atom of each row, N for padding rows).  One host synchronisation (the
    largest count): cache the result per batch (:func:`batch_layout`)."""
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


def stacked_forward(x: torch.Tensor, layout: tuple[torch.Tensor, torch.Tensor, int], weights,
                    activations) -> torch.Tensor:
    """Outputs [N] of T per-species networks of one architecture for the rows of x [N, D], atom a
    evaluated by the network of its species.  ``weights``: per Linear layer k, the pair
    (``[W_k of species 0..T-1]``, ``[b_k of species 0..T-1]``); ``activations``: one callable
    per hidden layer.  The atoms are gathered into a padded [T, rows, D] table (``layout`` from
    :func:`species_layout`; padding rows are zero) and each layer is one batched matrix product
    with the stacked weights of the T networks."""
    slot, src, rows = layout
    T = len(weights[0][0])
    D = x.shape[1]
    h = torch.cat([x, x.new_zeros(1, D)]).index_select(0, src).view(T, rows, D)
    for k, (Ws, bs) in enumerate(weights):
        h = torch.baddbmm(torch.stack(bs).unsqueeze(1), h, torch.stack(Ws).transpose(1, 2))
        if k < len(activations):
            h = activations[k](h)
    return h.reshape(T * rows, -1)[:, 0].index_select(0, slot)


def _layer_weights(params, L: int):
    """Per Linear layer k, ([W_k of every species], [b_k of every species]) from the flat
    parameter list of :func:`net_parameters`."""
    T = len(params) // (2 * L)
    return [([params[t * 2 * L + 2 * k] for t in range(T)], [params[t * 2 * L + 2 * k + 1] for t in range(T)])
            for k in range(L)]


def torch_network_energies(x, layout, params, activations) -> torch.Tensor:
    """y [N] of the networks with torch operators (differentiable to any order)."""
    fns = [act_table.get(a).function for a in activations]
    return stacked_forward(x, layout, _layer_weights(params, len(activations) + 1), fns)


class NetsWithGradient(torch.autograd.Function):
    """(x [N, D], layout, activations, *params) -> (y [N], dy/dx [N, D]).

    ``params``: W_1^t, b_1^t, ..., W_L^t, b_L^t of species t = 0..T-1, in the order
    ``[p for net in nets for p in net.parameters()]``."""

    @staticmethod
    def forward(ctx, x, slot, src, rows, activations, *params):
        T = len(params) // (2 * (len(activations) + 1))
        L = len(activations) + 1
        D = x.shape[1]
        W = [torch.stack([params[t * 2 * L + 2 * k] for t in range(T)]) for k in range(L)]
        b = [torch.stack([params[t * 2 * L + 2 * k + 1] for t in range(T)]).unsqueeze(1) for k in range(L)]
        h = torch.cat([x, x.new_zeros(1, D)]).index_select(0, src).view(T, rows, D)
        hs, d1s, d2s = [h], [], []
        for k in range(L - 1):
            a = torch.baddbmm(b[k], h, W[k].transpose(1, 2))
            h, d1, d2 = act_table.get(activations[k]).derivatives(a)
            hs.append(h)
            d1s.append(d1)
            d2s.append(d2)
        y = torch.baddbmm(b[L - 1], h, W[L - 1].transpose(1, 2))      # [T, R, 1]
        g = W[L - 1].expand(T, rows, W[L - 1].shape[2])                # g_{L-1}: [T, R, H]
        gs = [None] * L
        gs[L - 1] = g
        for k in range(L - 2, -1, -1):
            d = g * d1s[k]
            g = torch.bmm(d, W[k])                                     # g_k of layer k (0-based)
            gs[k] = g
        ctx.save_for_backward(slot, *W, *hs, *d1s, *d2s, *gs[1:])
        ctx.meta = (T, L, rows, D)
        y = y.reshape(T * rows).index_select(0, slot)
        dydx = g.reshape(T * rows, D).index_select(0, slot)
        return y, dydx

    @staticmethod
    def backward(ctx, ybar, ubar):
        T, L, rows, D = ctx.meta
        saved = ctx.saved_tensors
        slot = saved[0]
        W = list(saved[1:1 + L])
        hs = list(saved[1 + L:1 + 2 * L])                   # h_0 .. h_{L-1}: L tensors
        o = 1 + L + L
        d1s = list(saved[o:o + L - 1])
        d2s = list(saved[o + L - 1:o + 2 * (L - 1)])
        gs = list(saved[o + 2 * (L - 1):])                  # g_1 .. g_{L-1} (g_0 is dy/dx)
        dev, dt = hs[0].device, hs[0].dtype
        Wbar = [torch.zeros_like(w) for w in W]
        bbar = [torch.zeros(T, w.shape[1], dtype=dt, device=dev) for w in W]
        abar_g = [None] * (L - 1)
        if ubar is not None:
            u = hs[0].new_zeros(T * rows, D).index_copy(0, slot, ubar.to(dt)).view(T, rows, D)
            for k in range(L - 1):                          # up the g-chain: g_k = d_{k+1} W_{k+1}
                gk1 = gs[k]                                  # g_{k+1} in 1-based terms
                d = gk1 * d1s[k]
                Wbar[k] += torch.bmm(d.transpose(1, 2), u)
                dbar = torch.bmm(u, W[k].transpose(1, 2))
                abar_g[k] = dbar * gk1 * d2s[k]
                u = dbar * d1s[k]
            Wbar[L - 1] += u.sum(1, keepdim=True)           # g_{L-1} = W_L for every row
        if ybar is not None:
            yb = hs[0].new_zeros(T * rows).index_copy(0, slot, ybar.to(dt)).view(T, rows, 1)
            Wbar[L - 1] += torch.bmm(yb.transpose(1, 2), hs[L - 1])
            bbar[L - 1] += yb.sum(1)
            hbar = torch.bmm(yb, W[L - 1])
        else:
            hbar = None
        for k in range(L - 2, -1, -1):
            abar = hbar * d1s[k] if hbar is not None else None
            if abar_g[k] is not None:
                abar = abar_g[k] if abar is None else abar + abar_g[k]
            if abar is None:
                hbar = None
                continue
            Wbar[k] += torch.bmm(abar.transpose(1, 2), hs[k])
            bbar[k] += abar.sum(1)
            hbar = torch.bmm(abar, W[k])
        xbar = None
        if ctx.needs_input_grad[0] and hbar is not None:
            xbar = hbar.reshape(T * rows, D).index_select(0, slot)
        grads = []
        for t in range(T):
            for k in range(L):
                grads += [Wbar[k][t], bbar[k][t]]
        return (xbar, None, None, None, None, *grads)


# ------------------------------------------------------------------------------------------
# compiled CPU operators (csrc/nets_cpu.cpp)
# ------------------------------------------------------------------------------------------

def net_parameters(nets) -> list:
    """W_1, b_1, ..., W_L, b_L of every network in ``nets``, in ``net.parameters()`` order, read
    straight off the Linear layers (``Module.parameters()`` walks the module tree, which cost
    more per training step than the networks' arithmetic on small batches).  The list is cached
    on ``nets`` and checked on every call against the current networks, layers and parameters
    (identity of each entry of their dictionaries: a few microseconds), so that replacing,
    adding or removing a layer or a parameter is seen."""
    cache = nets.__dict__.get("_distmlip_params") if isinstance(nets, nn.Module) else None
    if cache is not None:
        checks, params = cache
        if all(len(d) == len(vals) and all(map(operator.is_, d.values(), vals)) for d, vals in checks):
            return params
    params = [t for net in nets for m in net if isinstance(m, nn.Linear) for t in (m.weight, m.bias)]
    if isinstance(nets, nn.Module) and all(isinstance(net, nn.Module) for net in nets):
        checks = [(nets._modules, tuple(nets._modules.values()))]
        for net in nets:
            checks.append((net._modules, tuple(net._modules.values())))
            for m in net:
                if isinstance(m, nn.Linear):
                    checks.append((m._parameters, tuple(m._parameters.values())))
        nets.__dict__["_distmlip_params"] = (checks, params)
    return params


class CompiledNets(torch.autograd.Function):
    """(x [N, D], species [N], codes, with_grad, *params) -> y [N], or (y, dy/dx [N, D]) with
    ``with_grad``: the networks of ``species[a]`` for every atom, forward and backward in one
    compiled operator each (``torch.ops.distmlip.bpnn_nets_{forward,backward}``, CPU).  Same
    values and gradients as :class:`NetsWithGradient` and the autograd path (tested).  A backward
    under ``create_graph`` (a second derivative through autograd) recomputes y with torch
    operators and differentiates that, for y; for (y, dy/dx) it raises."""

    @staticmethod
    def forward(ctx, x, species, codes, with_grad, *params):
        y, dydx = torch.ops.distmlip.bpnn_nets_forward(x, species, list(params), list(codes), with_grad)
        ctx.save_for_backward(x, species, *params)
        ctx.codes = codes
        ctx.with_grad = with_grad
        return (y, dydx) if with_grad else y

    @staticmethod
    def backward(ctx, ybar, ubar=None):
        x, species, *params = ctx.saved_tensors
        if torch.is_grad_enabled():           # create_graph: a differentiable backward
            if ctx.with_grad:
                raise RuntimeError("compiled networks: the backward of (y, dy/dx) is not differentiable "
                                   "(no derivatives of dy/dx beyond the first); pin the torch networks "
                                   "with model.set_plan(networks='torch')")
            with torch.enable_grad():
                acts = [act_table.by_kernel_code(c).name for c in ctx.codes]
                y = torch_network_energies(x, species_layout(species, len(params) // (2 * len(acts) + 2)),
                                           params, acts)
                need = [x] + list(params)
                grads = torch.autograd.grad(y, need, ybar, create_graph=True, allow_unused=True)
            return (grads[0], None, None, None, *grads[1:])
        need_x = bool(ctx.needs_input_grad[0]) and (x.grad_fn is None or will_reach(x))
        out = torch.ops.distmlip.bpnn_nets_backward(x, species, params, list(ctx.codes), ybar, ubar, need_x)
        return (out[-1] if need_x else None, None, None, None, *out[:-1])


def network_energies(x, species, nets, activations, compiled: bool, layout=None):
    """Outputs y [N] of the per-species networks: the compiled operator when ``compiled`` (the
    plan's choice), else torch operators on ``layout`` (:func:`species_layout` of ``species``,
    or a function returning it; made here when None)."""
    params = net_parameters(nets)
    if compiled:
        return CompiledNets.apply(x, species, act_table.kernel_codes(activations), False, *params)
    if layout is None:
        layout = species_layout(species, len(nets))
    elif callable(layout):
        layout = layout()
    return torch_network_energies(x, layout, params, activations)


def nets_with_gradient(x, species, layout, nets, activations, compiled: bool):
    """y [N] and dy/dx [N, D] of the per-species ``nets``: the compiled CPU operators when
    ``compiled``, else :class:`NetsWithGradient` on ``layout`` (:func:`species_layout` of the
    atoms, or a function returning it)."""
    params = net_parameters(nets)
    if compiled:
        return CompiledNets.apply(x, species, act_table.kernel_codes(activations), True, *params)
    slot, src, rows = layout() if callable(layout) else layout
    return NetsWithGradient.apply(x, slot, src, rows, tuple(activations), *params)
