"""Per-species networks with their input gradient in closed form, for direct force training.

Force training needs, for every atom, the network output y(x) and its gradient dy/dx with
respect to the (normalised) descriptor x, and then the weight gradients of a loss on both.
Letting autograd build dy/dx (``autograd.grad(..., create_graph=True)``) records the backward of
every layer as a graph and differentiates that graph once more: for the small networks of a
Behler-Parrinello potential this is hundreds of tiny operations per step, and it dominated the
force-training step of small molecules.  :class:`NetsWithGradient` computes y and dy/dx in one
forward and, in one backward, the weight (and input) gradients of any loss on (y, dy/dx), from
the analytic first and second derivatives of the activations.

Networks: ``Linear -> act -> ... -> Linear(., 1)`` with the activations of
``distmlip.models.bpnn.ACTIVATIONS``, the same architecture for every species, evaluated for all
species at once on the padded per-species layout of :func:`distmlip.models.bpnn.species_layout`.

Notation, per atom (row vectors): h_0 = x, a_k = h_{k-1} W_k^T + b_k, h_k = s_k(a_k) for the
hidden layers k = 1..L-1, y = h_{L-1} W_L^T + b_L.  Gradient: g_{L-1} = W_L,
d_k = g_k * s_k'(a_k), g_{k-1} = d_k W_k, dy/dx = g_0.  The backward with cotangents (ybar, ubar
on g_0) runs the g-chain upwards (W_k gets d_k^T ubar_{k-1}; ubar_k = (ubar_{k-1} W_k^T) * s_k';
a_k gets (ubar_{k-1} W_k^T) * g_k * s_k''), then the usual backward of y downwards, adding the
a_k terms.  Padding rows have zero cotangents, so they add nothing.
"""
from __future__ import annotations

import contextlib
import operator
import threading

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.autograd import will_reach


def _act_derivatives(kind: str, a: torch.Tensor):
    """(s(a), s'(a), s''(a)) of the activation ``kind`` (matching torch's modules, including
    nn.Softplus' linear branch above its threshold of 20)."""
    if kind == "tanh":
        h = torch.tanh(a)
        d1 = 1.0 - h * h
        return h, d1, -2.0 * h * d1
    if kind == "sigmoid":
        h = torch.sigmoid(a)
        d1 = h * (1.0 - h)
        return h, d1, d1 * (1.0 - 2.0 * h)
    if kind == "linear":
        return a, torch.ones_like(a), torch.zeros_like(a)
    if kind == "softplus":
        s = torch.sigmoid(a)
        lin = a > 20.0
        h = F.softplus(a)
        d1 = torch.where(lin, torch.ones_like(a), s)
        d2 = torch.where(lin, torch.zeros_like(a), s * (1.0 - s))
        return h, d1, d2
    if kind == "silu":
        s = torch.sigmoid(a)
        h = a * s
        d1 = s * (1.0 + a * (1.0 - s))
        d2 = s * (1.0 - s) * (2.0 + a * (1.0 - 2.0 * s))
        return h, d1, d2
    raise ValueError(f"no closed-form derivatives for activation {kind!r}")


SUPPORTED = ("tanh", "sigmoid", "linear", "softplus", "silu")


def supported(nets, activations) -> bool:
    """Whether :class:`NetsWithGradient` handles these networks (else use autograd)."""
    if not all(a in SUPPORTED for a in activations):
        return False
    layers = list(nets[0])
    lin = [m for m in layers if isinstance(m, nn.Linear)]
    return (len(lin) == len(activations) + 1 and all(m.bias is not None for m in lin)
            and lin[-1].out_features == 1
            and all(isinstance(m, (nn.Linear, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Softplus, nn.SiLU))
                    for m in layers)
            and all(getattr(m, "beta", 1.0) == 1.0 and getattr(m, "threshold", 20.0) == 20.0
                    for m in layers if isinstance(m, nn.Softplus)))


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
            h, d1, d2 = _act_derivatives(activations[k], a)
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
        n = slot.shape[0]
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

ACTIVATION_CODES = {"tanh": 0, "sigmoid": 1, "linear": 2, "softplus": 3, "silu": 4}

_STATE = threading.local()
_OPS: dict = {}


def _ops_available() -> bool:
    ok = _OPS.get("available")
    if ok is None:
        try:
            from .._ext import load_extension

            ok = bool(load_extension(warn_if_missing=False)) and hasattr(torch.ops.distmlip, "bpnn_nets_forward")
        except Exception:  # noqa: BLE001  (any failure: use the torch-operator path)
            ok = False
        _OPS["available"] = ok
    return ok


def compiled_enabled() -> bool:
    return getattr(_STATE, "compiled", True)


@contextlib.contextmanager
def compiled_networks(enabled: bool):
    """Use (True, default) or not (False) the compiled CPU network operators in this thread.
    Their backward is not differentiable again, so code that differentiates the networks twice
    through autograd (the autograd reference of force training) switches them off."""
    old = compiled_enabled()
    _STATE.compiled = bool(enabled)
    try:
        yield
    finally:
        _STATE.compiled = old


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


def supported_cached(nets, activations) -> bool:
    key = tuple(activations)
    if not isinstance(nets, nn.Module):      # a plain list: nothing to cache on
        return supported(nets, activations)
    cache = nets.__dict__.setdefault("_distmlip_supported", {})
    ok = cache.get(key)
    if ok is None:
        ok = cache[key] = supported(nets, activations)
    return ok


def use_compiled(x: torch.Tensor, nets, activations) -> bool:
    """Whether the compiled operators evaluate these networks on x (CPU tensors, supported
    networks, extension present, not switched off)."""
    return (x.device.type == "cpu" and compiled_enabled() and _ops_available()
            and supported_cached(nets, activations) and nets[0][0].weight.device.type == "cpu")


_ACT_FUNCTIONS = {0: torch.tanh, 1: torch.sigmoid, 2: (lambda a: a), 3: F.softplus, 4: F.silu}


def _torch_network_energies(x, species, codes, params):
    """y [N] of the networks with torch operators (differentiable to any order), for
    :class:`CompiledNets`' backward under ``create_graph``."""
    from .bpnn import species_layout, stacked_forward

    L = len(codes) + 1
    T = len(params) // (2 * L)
    weights = [([params[t * 2 * L + 2 * k] for t in range(T)], [params[t * 2 * L + 2 * k + 1] for t in range(T)])
               for k in range(L)]
    return stacked_forward(x, species_layout(species, T), weights, [_ACT_FUNCTIONS[c] for c in codes])


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
                                   "(no derivatives of dy/dx beyond the first); switch the compiled "
                                   "operators off with forcenet.compiled_networks(False)")
            with torch.enable_grad():
                y = _torch_network_energies(x, species, ctx.codes, params)
                need = [x] + list(params)
                grads = torch.autograd.grad(y, need, ybar, create_graph=True, allow_unused=True)
            return (grads[0], None, None, None, *grads[1:])
        need_x = bool(ctx.needs_input_grad[0]) and (x.grad_fn is None or will_reach(x))
        out = torch.ops.distmlip.bpnn_nets_backward(x, species, params, list(ctx.codes), ybar, ubar, need_x)
        return (out[-1] if need_x else None, None, None, None, *out[:-1])


def network_energies(x, species, nets, activations):
    """Outputs y [N] of the per-species networks with the compiled operator (see
    :func:`use_compiled`)."""
    codes = tuple(ACTIVATION_CODES[a] for a in activations)
    return CompiledNets.apply(x, species, codes, False, *net_parameters(nets))


def nets_with_gradient(x, layout, nets, activations, species=None):
    """y [N] and dy/dx [N, D] of the per-species ``nets``: the compiled CPU operators when
    ``species`` is given and :func:`use_compiled` allows, else :class:`NetsWithGradient`.
    ``layout``: :func:`distmlip.models.bpnn.species_layout` of the atoms, or a function returning
    it (called only when the torch-operator path needs it)."""
    params = net_parameters(nets)
    if species is not None and use_compiled(x, nets, activations):
        codes = tuple(ACTIVATION_CODES[a] for a in activations)
        return CompiledNets.apply(x, species, codes, True, *params)
    slot, src, rows = layout() if callable(layout) else layout
    return NetsWithGradient.apply(x, slot, src, rows, tuple(activations), *params)
