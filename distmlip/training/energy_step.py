"""One energy-training batch of cached descriptors: the loss and its parameter gradient, added
to the flat gradient, without the autograd engine.

An energy step on cached descriptors is small: on 1,000 atoms the compiled networks take about
0.7 ms forward and backward, and the autograd engine around them (the normalisation, the
per-structure sum, the loss, the copy-difference term and their backward nodes) took twice as
long again (docs/results.md, "Engine-free energy step").  Here the same loss is written out with
its gradient in closed form:

    E_s = sum_{a in s} [base_{t(a)} + scale * y_a] + E_s^frozen,   y = nets(x),
    x_a = (G_a - mean_{t(a)}) / std_{t(a)}
    dL/dy_a = scale * dL/dE_{s(a)}

dL/dE of the energy term comes from the compiled loss operator (``energy_force_loss``), that of
the copy-difference term (losses module docstring) from its residuals: for a pair (copy c,
parent p, displacement dx) with residual r and weight w, d(gamma S_D / C_D)/dE_c = 2 gamma w r /
(C_D dx) and the same with the opposite sign for E_p.  One call of ``bpnn_nets_backward`` turns
dL/dy into the weight gradients.  Terms without parameters (ZBL) only add their energies.

The path is taken when it applies (:func:`applies`): cached descriptors, the compiled networks
and loss of the plan, and trainable parameters that are exactly the networks' (the flat
gradient covers them in order); otherwise the trainer uses autograd, with the same numbers
(tested against each other).
"""
from __future__ import annotations

import torch

from ..models.networks import act_table, net_parameters
from .losses import difference_residuals


def forward_applies(model, batch) -> bool:
    """Whether :func:`energies` can run this batch: cached descriptors on the CPU and the
    compiled networks of the plan."""
    if getattr(batch, "features", None) is None or batch.features.device.type != "cpu":
        return False
    return model.plan().networks == "compiled"


def applies(model, flat, batch) -> bool:
    """Whether :func:`energy_loss_and_gradients` can run this batch: :func:`forward_applies`,
    the compiled loss, and a flat gradient that covers exactly the networks' parameters."""
    if not forward_applies(model, batch) or model.plan().loss != "compiled":
        return False
    return flat.flat_grad_for(net_parameters(model.ann.nets)) is not None


def energy_loss_and_gradients(model, flat, batch, counts: torch.Tensor, *, per_atom: bool, pairs=None,
                              c_d: float = 0.0, gamma: float = 0.0):
    """(loss, E, r), detached, with the parameter gradient of the batch's loss
    added to the flat gradient.  ``counts``: the GLOBAL (C_E, ...) of the step's energy term
    (already divided by 1 - gamma when the difference term is on, as the trainer's
    ``batch_loss``); ``pairs``, ``c_d``, ``gamma``: the copy-difference term
    (losses.difference_term); ``r``: the pairs' residuals (losses.difference_residuals; None
    without pairs), which the trainer's error sums take even when gamma is 0."""
    ann = model.ann
    params = net_parameters(ann.nets)
    codes = list(act_table.kernel_codes(ann.activations))
    grad = flat.flat_grad_for(params)
    with torch.no_grad():
        if batch.species.numel() == 0:
            return torch.zeros((), dtype=torch.float64), torch.zeros(batch.n_structures, dtype=torch.float64), None
        x, y, E = _forward(model, batch, params, codes)
        loss, gE, _ = torch.ops.distmlip.energy_force_loss(E, batch.energy, batch.weight, batch.natoms,
                                                           bool(per_atom), None, None, None, None, counts[:2], 0.0)
        rw = difference_residuals(E, batch, pairs)
        r = None
        if rw is not None:
            r, w = rw
            if gamma > 0 and c_d > 0:
                c, p, dx = pairs
                loss = loss + (w * r * r).sum() * (gamma / c_d)
                g = (2.0 * gamma / c_d) * w * r / dx
                gE = gE.index_add(0, c, g).index_add_(0, p, -g)
        ybar = (ann.energy_scale * gE).index_select(0, batch.structure).to(y.dtype)
        out = torch.ops.distmlip.bpnn_nets_backward(x, batch.species, params, codes, ybar, None, False)
        grad.add_(torch.cat([t.reshape(-1) for t in out[:len(params)]]).to(grad.dtype))
    return loss, E, r


def _forward(model, batch, params, codes):
    """(x, y, E): the networks' inputs, their outputs and the total energies [B] (all terms) of a
    batch of cached descriptors.  x is computed every step, not kept on the loader's kept
    batches: it would double their memory outside the budget that bounds them
    (data.neighbor_cache_mb), for a small part of a step."""
    ann = model.ann
    sp = batch.species
    x = ann.normalised(batch.features, sp).to(ann.net_dtype)
    y, _ = torch.ops.distmlip.bpnn_nets_forward(x, sp, params, codes, False)
    e = ann.scaled_outputs(y, sp)
    plan = model.plan()
    for term in model.terms[1:]:
        e = e + term.atomic_energies(batch, plan)
    E = torch.zeros(batch.n_structures, dtype=torch.float64).index_add_(0, batch.structure, e)
    return x, y, E


def energies(model, batch) -> torch.Tensor:
    """Total energies [B] float64 of a batch of cached descriptors (:func:`forward_applies`),
    without autograd: what ``model(batch)`` gives under ``no_grad``, for validation."""
    with torch.no_grad():
        if batch.species.numel() == 0:
            return torch.zeros(batch.n_structures, dtype=torch.float64)
        return _forward(model, batch, net_parameters(model.ann.nets),
                        list(act_table.kernel_codes(model.ann.activations)))[2]
