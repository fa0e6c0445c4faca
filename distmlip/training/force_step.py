"""One force-training batch: the loss and its parameter gradient, added to the flat gradient.

With the ``one-node`` plan (CPU, fused descriptor, compiled networks) and the compiled loss, the
step runs three compiled operators and no autograd engine: the network term's energies and forces
(``bpnn_energy_forces``), the loss with its gradients in E and F (``energy_force_loss``) and the
backward (``bpnn_energy_forces_backward``), whose flat parameter gradient is added straight into
the optimiser's flat gradient.  Terms without parameters (ZBL) only add their energies and forces
before the loss.  Otherwise the forces are built with ``create_graph`` and ``loss.backward``
gives the weight gradients (same numbers, tested).

With a stress term (``beta`` > 0 and structures of the batch selected for it) the one-node
plan (float64) runs the same three steps with the virial: ``bpnn_energy_forces_virial`` also sums
W = sum_p r_p (x) dE/dr_p per structure from the pair gradients of its VJP, the loss's gradients
in E and F come from the compiled loss and those in W from the stress term in closed form
(``losses.stress_term_and_gradient``), and the backward's JVP adds the
strain direction r_p Wbar to every pair's tangent, which gives the stress term's exact weight
gradient without a per-pair Jacobian or a second pass.  Elsewhere the energies, forces and
stresses come from ``BPNN.energy_forces_stress(create_graph=True)`` (autograd through the
strained batch; with the fused kernels the double backward runs their JVP on image atoms), and
``loss.backward`` gives the same gradients.  A batch without selected stresses takes the
force path with the energy weight 1 - alpha - beta.
"""
from __future__ import annotations

import torch

from ..models import forces_op
from ..models.networks import net_parameters
from .losses import energy_force_loss, stress_term_and_gradient


def _engine_free(model, plan, batch, counts, *, per_atom, alpha, mask, grad_out, beta=0.0, smask=None):
    """(loss, E, F, stress or None) detached, with the parameter gradient added to ``grad_out``;
    ``smask`` given: with the stress term ``beta`` (module docstring)."""
    ops = torch.ops.distmlip
    stress = smask is not None
    (E, F, W, x, g, moments, nets_saved), (params, consts, args) = forces_op.one_node_forward(model.ann, batch,
                                                                                            virial=stress)
    dparams, codes, mean, inv_std, base, scale, _ = consts
    codes = list(codes)
    for term in model.terms[1:]:
        if stress:
            Et, Ft, Wt = term.energy_forces_virial(batch)
            E, F, W = E + Et, F + Ft, W + Wt
            continue
        positions = batch.positions
        if not positions.requires_grad:
            positions.requires_grad_(True)
        Et, Ft = term.energy_and_forces(batch, plan, create_graph=False)
        E, F = E + Et, F + Ft
    Wbar = S = None
    with torch.no_grad():
        # (1-a-b) S_E/C_E + a S_F/C_F = (1-a') S_E/C_E' + a' S_F/C_F' with a' = a/s, C' = C s,
        # s = 1 - b: the compiled energy+force loss, plus the stress term in closed form
        s = 1.0 - beta if stress else 1.0
        if s > 0:
            loss, gE, gF = ops.energy_force_loss(E, batch.energy, batch.weight, batch.natoms, bool(per_atom), F,
                                                 batch.forces, batch.structure, mask,
                                                 counts[:2] if s == 1.0 else counts[:2] / s, float(alpha / s))
        else:                      # beta = 1 (alpha = 0): the stress term alone
            loss, gE, gF = torch.zeros((), dtype=torch.float64), torch.zeros_like(E), torch.zeros_like(F)
        if stress:
            loss_s, Wbar, S = stress_term_and_gradient(W, batch, counts, per_atom=per_atom, beta=beta, smask=smask)
            loss = loss + loss_s
        out = ops.bpnn_energy_forces_backward(gE, gF, *args, *dparams, x, g, moments, nets_saved, inv_std, scale,
                                              batch.structure, params, codes, True, False, True, Wbar)
        grad_out.add_(out[0])
    return loss, E, F, S


def force_loss_and_gradients(model, flat, batch, counts, *, per_atom: bool, alpha: float, mask):
    """The loss of one force-training batch (given the GLOBAL counts) with its parameter
    gradient added to the flat gradient of ``flat`` (:class:`~distmlip.training.flat.FlatParameters`).
    Returns (loss, E, F), detached."""
    plan = model.plan()
    grad = flat.flat_grad_for(net_parameters(model.ann.nets))
    if grad is not None and plan.forces == "one-node" and plan.loss == "compiled":
        return _engine_free(model, plan, batch, counts, per_atom=per_atom, alpha=alpha, mask=mask,
                            grad_out=grad)[:3]
    with flat.routing():
        E, F = model.energy_and_forces(batch, create_graph=True)
        loss = energy_force_loss(E, batch, counts, per_atom=per_atom, alpha=alpha, F=F, mask=mask,
                                 compiled=plan.loss == "compiled")
        # inputs: only weight gradients are needed (the flat tensor, which the CPU force operator
        # takes, and the parameters, its views, which the module paths reach); this skips the
        # position-position second derivative of the descriptor and the backward pass towards
        # the positions
        loss.backward(inputs=flat.grad_inputs)
    return loss.detach(), E.detach(), F.detach()


def force_stress_loss_and_gradients(model, flat, batch, counts, *, per_atom: bool, alpha: float, mask,
                                    beta: float, smask):
    """:func:`force_loss_and_gradients` with the stress term ``beta`` L_S over the structures
    ``smask`` [B] (:func:`~distmlip.training.losses.stress_structure_mask`); ``counts``: the global
    (C_E, C_F, C_S).  Returns (loss, E, F, stress), detached (stress None when no structure of the
    batch is selected: then nothing but the energy weight differs from the force step)."""
    if beta <= 0 or smask is None or not bool(smask.any()):
        # (1-a-b) S_E/C_E + a S_F/C_F  ==  (1-a') S_E/C_E' + a' S_F/C_F'  with s = 1 - b
        s = 1.0 - beta
        if s <= 0:                 # beta = 1: L = L_S, which this batch has no part in
            E, F = model.energy_and_forces(batch)
            return torch.zeros((), dtype=torch.float64), E.detach(), F.detach(), None
        loss, E, F = force_loss_and_gradients(model, flat, batch, counts / s, per_atom=per_atom,
                                              alpha=alpha / s, mask=mask)
        return loss, E, F, None
    plan = model.plan()
    grad = flat.flat_grad_for(net_parameters(model.ann.nets))
    if (grad is not None and plan.forces == "one-node" and plan.loss == "compiled"
            and forces_op.virial_supported(model.ann, batch)):
        return _engine_free(model, plan, batch, counts, per_atom=per_atom, alpha=alpha, mask=mask, grad_out=grad,
                            beta=beta, smask=smask)
    with flat.routing():
        E, F, S = model.energy_forces_stress(batch, create_graph=True)
        loss = energy_force_loss(E, batch, counts, per_atom=per_atom, alpha=alpha, F=F, mask=mask,
                                 compiled=plan.loss == "compiled", beta=beta, S=S, smask=smask)
        loss.backward(inputs=flat.grad_inputs)
    return loss.detach(), E.detach(), F.detach(), S.detach()
