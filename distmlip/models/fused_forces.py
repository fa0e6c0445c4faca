"""Energies and forces of a BPNN as ONE autograd node: fused descriptor kernels plus compiled
networks, for the CPU force-training step.

The general path (:meth:`BPNN._energy_and_forces_closed_form`) builds the forces with a dozen
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

from ..utils.autograd import will_reach


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


def usable(model, batch, params=None) -> bool:
    """Whether :func:`energy_and_forces` applies: CPU tensors, the fused descriptor backend with
    its operators, compiled networks for this architecture (the per-model part of the answer is
    cached on the model, keyed by the device of its weights)."""
    from .forcenet import compiled_enabled, net_parameters

    pos = batch.positions
    if (pos.device.type != "cpu" or pos.dtype not in (torch.float32, torch.float64)
            or getattr(batch, "pair_i", None) is None or not compiled_enabled()):
        return False
    if params is None:
        params = net_parameters(model.nets)
    key = (params[0].device.type, len(params), tuple(model.activations))
    cache = model.__dict__.get("_distmlip_one_node")
    if cache is None or cache[0] != key:
        from .forcenet import use_compiled

        desc = model.descriptor
        ok = (key[0] == "cpu" and getattr(desc, "backend", None) == "fused"
              and desc._fused_module() is not None
              and hasattr(torch.ops.distmlip, "bpnn_energy_forces")
              and use_compiled(pos, model.nets, model.activations))
        cache = model.__dict__["_distmlip_one_node"] = (key, ok)
    return cache[1]


def _model_constants(model, params):
    """(descriptor parameters, activation codes, feature mean, 1 / feature std, reference +
    shift energies, energy scale, parameter tuple) of ``model``, cached on the model and rebuilt
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
    from .forcenet import ACTIVATION_CODES

    desc = model.descriptor
    with torch.no_grad():
        consts = ((desc.rc_radial, desc.n_radial, desc.rc_angular, desc.n_angular),
                  tuple(ACTIVATION_CODES[a] for a in model.activations),
                  mean, std.reciprocal(), ref + shift, scale, tuple(params))
    model.__dict__["_distmlip_one_node_constants"] = (key, consts)
    return consts


def _same(a, b) -> bool:
    """Entry-wise identity of the tensors and equality of the integers of two cache keys."""
    return all((x is y) if isinstance(x, torch.Tensor) else (x == y) for x, y in zip(a, b))


def _operator_inputs(model, batch, positions):
    """(parameters, constants, (positions, species, pair_ptr, pair_j, pair_shift, typespin)) for
    the operators, or None when the one-node path does not apply (:func:`usable`)."""
    from ..descriptors import fused
    from .forcenet import net_parameters

    params = net_parameters(model.nets)
    if not usable(model, batch, params):
        return None
    consts = _model_constants(model, params)
    args = fused.prepare_arguments(positions, batch.species, batch.pair_i, batch.pair_j, batch.pair_shift,
                                   typespin=model.descriptor.typespin, pair_ptr=getattr(batch, "pair_ptr", None))
    return params, consts, args


def energy_and_forces(model, batch):
    """(E [B], F [N, 3]) of the networks of ``model`` (a BPNN; its ZBL term is not included, see
    :meth:`BPNN.energy_and_forces`) as one autograd node, differentiable once (weights, and
    positions), or None when the one-node path does not apply (:func:`usable`).  When the model's
    parameters are flattened (FlatParameters, within its routing context), the node takes the
    flat tensor as its input: one gradient accumulation instead of one per parameter."""
    from ..training.flat import FlatParameters

    prepared = _operator_inputs(model, batch, batch.positions)
    if prepared is None:
        return None
    params, (dparams, codes, mean, inv_std, base, scale, ptuple), args = prepared
    fp = model.__dict__.get(FlatParameters.ATTR)
    flat = fp.flat_for(params) if fp is not None else None
    inputs = (None, *params) if flat is None else (ptuple, flat)
    pos, species, ptr, pj, shift, ts = args
    return BPNNEnergyForces.apply(pos, (species, ptr, pj, shift, ts, batch.structure, int(batch.n_structures)),
                                  (dparams, codes, mean, inv_std, base, scale), *inputs)


def loss_and_flat_gradient(model, batch, counts, *, per_atom: bool, alpha: float, mask, grad_out):
    """One force-training batch without the autograd engine: the operators for E and F, the
    loss operator (value and gradients in E and F, ``distmlip.training.losses``) and the
    backward operator, whose flat parameter gradient is added to ``grad_out`` (the flat gradient
    of :class:`~distmlip.training.flat.FlatParameters`, parameters in ``net_parameters`` order).
    Returns (loss, E, F) detached, or None when the one-node path does not apply (the caller
    then goes through autograd).  Same numbers as ``energy_and_forces`` + ``energy_force_loss``
    + ``backward`` (tested); no position gradient."""
    if model.zbl is not None:
        return None
    prepared = _operator_inputs(model, batch, batch.positions.detach())
    if prepared is None:
        return None
    params, (dparams, codes, mean, inv_std, base, scale, _), (pos, species, ptr, pj, shift, ts) = prepared
    ops = torch.ops.distmlip
    codes = list(codes)
    with torch.no_grad():
        E, F, x, g, moments, nets_saved = ops.bpnn_energy_forces(
            pos, species, ptr, pj, shift, ts, *dparams, mean, inv_std, base, scale, batch.structure,
            int(batch.n_structures), params, codes)
        loss, gE, gF = ops.energy_force_loss(E, batch.energy, batch.weight, batch.natoms, bool(per_atom), F,
                                             batch.forces, batch.structure, mask, counts, float(alpha))
        out = ops.bpnn_energy_forces_backward(gE, gF, pos, species, ptr, pj, shift, ts, *dparams, x, g, moments,
                                              nets_saved, inv_std, scale, batch.structure, params, codes,
                                              True, False, True)
        grad_out.add_(out[0])
    return loss, E, F
