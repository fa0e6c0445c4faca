"""Energies and forces of the network term as ONE autograd node: fused descriptor kernels plus
compiled networks, the ``one-node`` forces of the CPU plan (:mod:`.backend`).

The general path (:meth:`AtomicNetworks._energy_and_forces_closed_form`) builds the forces with a dozen
autograd nodes (descriptor, normalisation, networks, scaling, the descriptor VJP) and runs the
autograd engine twice per step (``autograd.grad(..., create_graph=True)`` for the forces, then
``loss.backward()``).  For the few hundred atoms of a training batch of small molecules the
kernels themselves take well under half of such a step; the rest is Python and autograd
bookkeeping.  :class:`BPNNEnergyForces` does the same arithmetic with the same kernels, called
from two compiled operators (csrc/bpnn_forces_cpu.cpp), one for the forward and one for the
backward:

forward (positions R, per-element weights w)
    G, moments = chebyshev_forward_moments(R)            per-atom descriptors, angular moments
    x = (G - mean[t]) / std[t]                           normalised descriptors
    y, dy/dx = bpnn_nets_forward(x)                      network outputs and input gradients
    e = e_ref[t] + shift[t] + scale * y;  E = sum of e per structure
    g = dE/dG = scale * dy/dx / std[t]
    F = -J^T g = -chebyshev_backward(g)                  J = dG/dR, never stored

backward (cotangents Ebar [B], Fbar [N, 3])
    ybar = scale * Ebar[structure of each atom]
    gbar = J (-Fbar) = chebyshev_double_backward(g, -Fbar)   (the JVP)
    ubar = scale * gbar / std[t]                         cotangent of dy/dx
    weight gradients (and xbar) = bpnn_nets_backward(x, ybar, ubar)
    positions, only when the backward will deliver a gradient to them: J^T (xbar / std[t]) plus
    the Hessian term of the descriptor (chebyshev_double_backward's HVP with g and -Fbar).

Same values and gradients as the general path (tested to 1e-12 in float64).  The backward is
not differentiable (third derivatives of the descriptor, and second derivatives of the compiled
networks, are not provided): differentiating it raises.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._ext import has_kernel
from ..descriptors import fused
from ..utils.autograd import will_reach
from . import activations as act_table
from .networks import net_parameters

# the attribute under which the trainer's flat parameters (distmlip.training.flat) hang on the
# network term: the operator then takes the flat tensor as its input (one gradient accumulation)
FLAT_PARAMETERS_ATTR = "_distmlip_flat_parameters"


class BPNNEnergyForces(torch.autograd.Function):
    """(positions, batch, constants, flat_for, *inputs) -> (E [B] float64, F [N, 3] in the
    positions' dtype); the operators ``torch.ops.distmlip.bpnn_energy_forces{,_backward}``
    (csrc/bpnn_forces_cpu.cpp).

    ``batch``: the tuple (species, pair_ptr, pair_j, pair_shift, typespin, structure,
    n_structures); ``constants``: (descriptor parameters, activation codes, feature mean,
    1 / feature std, per-species base energies, energy scale) (:func:`_model_constants`); neither
    is differentiated (tuples: autograd does not look into them, which keeps ``apply`` cheap).
    ``flat_for`` None: ``inputs`` are the network parameters, each gets its gradient.
    ``flat_for`` the tuple of network parameters: ``inputs`` is the one flat tensor whose views
    they are (:class:`distmlip.training.flat.FlatParameters`), which gets one flat gradient."""

    @staticmethod
    def forward(ctx, positions, batch, constants, flat_for, *inputs):
        species, ptr, pj, shift, ts, structure, n_structures = batch
        dparams, codes, mean, inv_std, base, scale = constants
        params = list(inputs) if flat_for is None else list(flat_for)
        E, F, x, g, moments, nets_saved = torch.ops.distmlip.bpnn_energy_forces(
            positions, species, ptr, pj, shift, ts, *dparams, mean, inv_std, base, scale, structure,
            n_structures, params, list(codes))
        # saved (checked for in-place changes before the backward): positions, the weights (or the
        # flat tensor whose views they are) and the forward's outputs; the batch's index tensors
        # and the normalisation are kept as they are (unpacking saved tensors costs about a
        # microsecond each)
        ctx.save_for_backward(positions, x, g, moments, nets_saved, *inputs)
        ctx.rest = (species, ptr, pj, shift, ts, inv_std, scale, structure)
        ctx.params = None if flat_for is None else params
        ctx.dparams = dparams
        ctx.codes = codes
        return E, F

    @staticmethod
    @once_differentiable
    def backward(ctx, Ebar, Fbar):
        positions, x, g, moments, nets_saved, *inputs = ctx.saved_tensors
        species, ptr, pj, shift, ts, inv_std, scale, structure = ctx.rest
        flat = ctx.params is not None
        params = ctx.params if flat else inputs
        need = ctx.needs_input_grad
        need_pos = bool(need[0]) and will_reach(positions)
        need_w = any(need[_N_ARGS:])
        if not (need_pos or need_w):
            return (None,) * len(need)
        out = torch.ops.distmlip.bpnn_energy_forces_backward(
            Ebar, Fbar, positions, species, ptr, pj, shift, ts, *ctx.dparams, x, g, moments, nets_saved,
            inv_std, scale, structure, params, list(ctx.codes), need_w, need_pos, flat)
        grads = tuple(gr if nd else None for gr, nd in zip(out[:-1], need[_N_ARGS:]))
        return ((out[-1] if need_pos else None),) + (None,) * (_N_ARGS - 1) + grads


_N_ARGS = 4         # BPNNEnergyForces.forward's arguments before the parameters (or flat tensor)


def model_constants(model, params):
    """(descriptor parameters, activation codes, feature mean, 1 / feature std, reference +
    shift energies, energy scale, parameter tuple) of the network term ``model``, cached on it
    and rebuilt
    when a normalisation buffer changed (in place: its version counter; or replaced) or the
    parameter list did."""
    bufs = model._buffers
    mean, std, ref, shift, scale = (bufs["feature_mean"], bufs["feature_std"], bufs["reference_energy"],
                                    bufs["energy_shift"], bufs["energy_scale"])
    key = (id(params), mean, mean._version, std, std._version, ref, ref._version, shift, shift._version,
           scale, scale._version)
    cache = model.__dict__.get("_distmlip_one_node_constants")
    if cache is not None and _same(cache[0], key):
        return cache[1]
    spec = model.spec
    with torch.no_grad():
        consts = ((spec.rc_radial, spec.n_radial, spec.rc_angular, spec.n_angular),
                  act_table.kernel_codes(model.activations),
                  mean, std.reciprocal(), ref + shift, scale, tuple(params))
    model.__dict__["_distmlip_one_node_constants"] = (key, consts)
    return consts


def _same(a, b) -> bool:
    """Entry-wise identity of the tensors and equality of the integers of two cache keys."""
    return all((x is y) if isinstance(x, torch.Tensor) else (x == y) for x, y in zip(a, b))


def operator_inputs(model, batch, positions):
    """(parameters, constants, (positions, species, pair_ptr, pair_j, pair_shift, typespin)) of
    the network term ``model`` for the operators."""
    params = net_parameters(model.nets)
    consts = model_constants(model, params)
    args = fused.prepare_arguments(positions, batch.species, batch.pair_i, batch.pair_j, batch.pair_shift,
                                   typespin=model.descriptor.typespin, pair_ptr=getattr(batch, "pair_ptr", None))
    return params, consts, args


def energy_and_forces(model, batch):
    """(E [B], F [N, 3]) of the network term ``model`` as one autograd node, differentiable once
    (weights, and positions).  When the term's parameters are flattened (the trainer's flat
    parameters, within their routing context), the node takes the flat tensor as its input: one
    gradient accumulation instead of one per parameter."""
    params, (dparams, codes, mean, inv_std, base, scale, ptuple), args = operator_inputs(model, batch, batch.positions)
    fp = model.__dict__.get(FLAT_PARAMETERS_ATTR)
    flat = fp.flat_for(params) if fp is not None else None
    inputs = (None, *params) if flat is None else (ptuple, flat)
    pos, species, ptr, pj, shift, ts = args
    return BPNNEnergyForces.apply(pos, (species, ptr, pj, shift, ts, batch.structure, int(batch.n_structures)),
                                  (dparams, codes, mean, inv_std, base, scale), *inputs)


def virial_supported(model, batch) -> bool:
    """Whether :func:`energy_forces_virial` serves the network term ``model`` on ``batch``: the
    compiled operator exists and positions and networks are float64 (its pipelined path)."""
    pos = batch.positions
    return (pos is not None and pos.dtype == torch.float64 and pos.device.type == "cpu"
            and model.net_dtype == torch.float64 and has_kernel("bpnn_energy_forces_virial", "cpu"))


def one_node_forward(model, batch, virial: bool = False):
    """The forward operator on a batch, no gradient: ((E [B], F [N, 3], W [B, 3, 3] or None, x, g,
    moments, nets_saved), (parameters, constants, arguments)) (:func:`operator_inputs`).
    ``virial``: ``bpnn_energy_forces_virial``, whose W = dE/d(strain) = sum_p r_p (x) dE/dr_p
    (float64 only, :func:`virial_supported`), else ``bpnn_energy_forces``.  The last four
    outputs feed ``bpnn_energy_forces_backward``."""
    params, consts, args = operator_inputs(model, batch, batch.positions.detach())
    dparams, codes, mean, inv_std, base, scale, _ = consts
    ops = torch.ops.distmlip
    with torch.no_grad():
        op = ops.bpnn_energy_forces_virial if virial else ops.bpnn_energy_forces
        out = op(*args, *dparams, mean, inv_std, base, scale, batch.structure, int(batch.n_structures),
                 list(params), list(codes))
    if not virial:
        out = (*out[:2], None, *out[2:])
    return out, (params, consts, args)


def energy_forces_virial(model, batch):
    """(E [B], F [N, 3], W [B, 3, 3]) of the network term, detached (prediction: the calculator,
    evaluation, validation)."""
    (E, F, W, *_), _ = one_node_forward(model, batch, virial=True)
    return E, F, W
