"""Fused C++/CUDA kernels of the aenet Chebyshev descriptor, with autograd to second order.

``chebyshev(positions, species_idx, pair_i, pair_j, pair_shift, *, typespin, rc_radial, n_radial,
rc_angular, n_angular, pair_ptr=None) -> G [N, dim]`` computes the same function as
:func:`distmlip.descriptors.chebyshev.chebyshev_reference` (see that module for the definition)
with the operators ``torch.ops.distmlip.chebyshev_{forward,backward,double_backward}`` of the
compiled extension (csrc/chebyshev*.{h,cpp,cu}).

Autograd
  * backward (VJP): dE/dG -> dE/dR by the ``chebyshev_backward`` kernel, which recomputes every
    pair and triplet term; dG/dR is never stored.  The forward saves references to its inputs
    and, on the CPU, the per-atom angular moments of its centres (a few dozen doubles per atom,
    independent of the number of neighbours), which the VJP and JVP kernels would otherwise
    rebuild with one more pass over each centre's neighbours.
  * double backward: the VJP is itself a differentiable function (``_ChebyshevVJP``) of dE/dG
    and of the positions.  Its derivative with respect to dE/dG is the Jacobian-vector product
    J v (``need_jvp``); its derivative with respect to the positions is the Hessian-vector
    product of g.G (``need_hvp``).  So ``F = -autograd.grad(E, R, create_graph=True)`` followed
    by ``loss(F).backward()`` gives exact weight gradients for a force loss, and also the exact
    ``positions.grad`` (both second-derivative terms: the R-R Hessian term is implemented).
  * The Hessian term costs about as much as the JVP.  It is computed only when the backward pass
    will actually deliver a gradient to the positions: ``loss.backward(inputs=params)`` or
    ``torch.autograd.grad(loss, params)`` skip it automatically (and also skip the first-order
    descriptor backward towards the positions), which is what a force-training step should use.
  * Third derivatives are not supported: differentiating the double backward raises a clear
    RuntimeError.
  * Gradients with respect to ``pair_shift`` (cell, strain, stress): when ``pair_shift``
    requires grad, every periodic image that some pair reaches (a distinct (j, shift) with a
    non-zero shift) becomes an image atom at ``R[j] + shift`` appended to the positions, the pairs
    point at their image atoms with a zero shift, and the kernels run on the augmented atoms
    (image atoms are neighbours only: no pairs of their own, their descriptor rows are dropped).
    The kernels' VJP then gives dE/dX of every image atom, i.e. the per-pair gradients summed over
    the pairs of each image, and autograd carries them to ``positions`` and ``pair_shift``;
    J and H products work as for positions (force training with a stress loss).  The image
    position reads the shift of one pair of the image (the first): the gradient of the pairs of an
    image is delivered to that pair's row of ``pair_shift``.  That is the exact derivative of any
    ``pair_shift`` whose rows of one image are equal functions and whose zero rows stay zero (the
    strained shifts S (1 + eps) of :func:`distmlip.descriptors.batch.strained`, which is what the
    stress uses); no per-pair Jacobian is formed.

Precision: float32 and float64 inputs; every sum and derivative is accumulated in float64
inside the kernels and rounded once to the input dtype.

The pair list must hold both directions of every pair within max(rc_radial, rc_angular), as
``collate`` builds it.  It is used in CSR form (sorted by centre ``pair_i``); when ``pair_ptr``
is not given it is computed here (and the pairs stably sorted by centre if they are not).

Whether the operators exist for a device is the plan's question
(:func:`distmlip._ext.has_kernel`, :mod:`distmlip.models.backend`); this module only calls them.
"""
from __future__ import annotations


import torch

from .._ext import load_extension
from ..utils.autograd import will_reach

load_extension(warn_if_missing=False)     # registers torch.ops.distmlip where the build has it
_ops = torch.ops.distmlip

__all__ = ["chebyshev", "pair_pointers", "prepare_arguments", "MAX_ORDER"]

MAX_ORDER = 32  # csrc/chebyshev.h kMaxOrder


def pair_pointers(pair_i: torch.Tensor, n_atoms: int) -> torch.Tensor:
    """CSR offsets [n_atoms + 1] of a pair list sorted by centre (no host synchronisation)."""
    return torch.searchsorted(pair_i.contiguous(),
                              torch.arange(n_atoms + 1, device=pair_i.device, dtype=pair_i.dtype))


def _typespin_tensor(typespin, device) -> torch.Tensor:
    if isinstance(typespin, torch.Tensor):
        return typespin.detach().to(device=device, dtype=torch.float64).contiguous()
    return torch.tensor([float(s) for s in typespin], dtype=torch.float64, device=device)


class _ChebyshevVJP(torch.autograd.Function):
    """(dE/dG, R) -> dE/dR; differentiable once more (JVP in dE/dG, HVP in R).

    ``moments`` (optional, not differentiated): the per-atom angular moments of the forward at the
    same positions (``chebyshev_forward_moments``); the VJP and JVP kernels then skip rebuilding
    them."""

    @staticmethod
    def forward(ctx, grad_G, positions, species, ptr, pj, shift, ts, rc_r, n_r, rc_a, n_a,
                moments=None):
        ctx.save_for_backward(grad_G, positions, species, ptr, pj, shift, ts)
        ctx.params = (rc_r, n_r, rc_a, n_a)
        ctx.moments = moments
        return _ops.chebyshev_backward(grad_G, positions, species, ptr, pj, shift, ts,
                                       rc_r, n_r, rc_a, n_a, moments)

    @staticmethod
    def backward(ctx, v):
        grad_G, positions, species, ptr, pj, shift, ts = ctx.saved_tensors
        need_jvp = bool(ctx.needs_input_grad[0])
        need_hvp = bool(ctx.needs_input_grad[1]) and will_reach(positions)
        jv = hv = None
        if need_jvp or need_hvp:
            jv, hv = _ChebyshevSecond.apply(grad_G, v.contiguous(), positions, species, ptr, pj, shift,
                                            ts, *ctx.params, need_jvp, need_hvp, ctx.moments)
        return ((jv if need_jvp else None), (hv if need_hvp else None),
                None, None, None, None, None, None, None, None, None, None)


class _ChebyshevSecond(torch.autograd.Function):
    """Double-backward products (J v, H v).  Not differentiable: its backward raises, so that a
    third derivative fails loudly instead of silently missing terms."""

    @staticmethod
    def forward(ctx, grad_G, v, positions, species, ptr, pj, shift, ts, rc_r, n_r, rc_a, n_a,
                need_jvp, need_hvp, moments=None):
        return _ops.chebyshev_double_backward(grad_G, v, positions, species, ptr, pj, shift, ts,
                                              rc_r, n_r, rc_a, n_a, need_jvp, need_hvp, moments)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("fused Chebyshev descriptor: third derivatives are not supported (the "
                           "double-backward kernels are not differentiable); use "
                           "ChebyshevDescriptor(backend='reference') for higher orders")


class _ChebyshevG(torch.autograd.Function):
    """R -> G; backward through :class:`_ChebyshevVJP` so that it is differentiable.

    On the CPU the forward also keeps the per-atom angular moments (``chebyshev_forward_moments``:
    per-atom rows, 73 doubles for n_angular = 4, nothing per pair or triplet) for the VJP and the
    JVP of a force-training step."""

    @staticmethod
    def forward(ctx, positions, species, ptr, pj, shift, ts, rc_r, n_r, rc_a, n_a):
        ctx.save_for_backward(positions, species, ptr, pj, shift, ts)
        ctx.params = (rc_r, n_r, rc_a, n_a)
        ctx.moments = None
        if positions.device.type == "cpu" and hasattr(_ops, "chebyshev_forward_moments"):
            G, moments = _ops.chebyshev_forward_moments(positions, species, ptr, pj, shift, ts,
                                                        rc_r, n_r, rc_a, n_a)
            if moments.shape[1] > 0:
                ctx.moments = moments
            return G
        return _ops.chebyshev_forward(positions, species, ptr, pj, shift, ts, rc_r, n_r, rc_a, n_a)

    @staticmethod
    def backward(ctx, grad_G):
        positions, species, ptr, pj, shift, ts = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 10
        gR = _ChebyshevVJP.apply(grad_G.contiguous(), positions, species, ptr, pj, shift, ts,
                                 *ctx.params, ctx.moments)
        return (gR,) + (None,) * 9


def periodic_images(pair_j, pair_shift):
    """(image_pair [K], pair_image [P]) of a pair list: ``pair_image[p]`` is the image atom of
    pair p (-1 for a zero shift) numbered 0..K-1 over the distinct (j, shift) with a non-zero
    shift, ``image_pair[k]`` the first pair of image k.  The shifts of one image are the same
    numbers (``collate`` computes n @ cell) and shifts of different images of an atom differ by a
    lattice vector, so rounded to 1e-5 A they are told apart exactly.  The keys are packed into
    int64 and made unique in 1-D (``torch.unique(dim=0)`` compares rows one at a time: 30 ms for
    20k pairs, ten times the descriptor)."""
    shift = pair_shift.detach()
    P = shift.shape[0]
    sel = torch.nonzero((shift != 0).any(1), as_tuple=False).reshape(-1)
    pair_image = torch.full((P,), -1, dtype=torch.long, device=shift.device)
    if sel.numel() == 0:
        return sel, pair_image
    q = torch.round(shift[sel].to(torch.float64) * 1e5).to(torch.long) + (1 << 31)   # [M, 3] in [0, 2^32)
    j = pair_j[sel].to(torch.long)
    _, a = torch.unique(j * (1 << 32) + q[:, 0], return_inverse=True)
    _, b = torch.unique(q[:, 1] * (1 << 32) + q[:, 2], return_inverse=True)
    _, inv = torch.unique(a * sel.numel() + b, return_inverse=True)
    K = int(inv.max()) + 1
    first = torch.full((K,), P, dtype=torch.long, device=shift.device).scatter_reduce(0, inv, sel, "amin")
    pair_image[sel] = inv
    return first, pair_image


def _with_images(positions, species_idx, pair_i, pair_j, pair_shift, pair_ptr):
    """The augmented problem of a differentiable ``pair_shift`` (module docstring): (positions
    [N + K, 3], species [N + K], pair_j, zero shifts, pair_ptr [N + K + 1])."""
    device = positions.device
    N = positions.shape[0]
    pair_j = pair_j.to(device=device, dtype=torch.long)
    if pair_ptr is None:
        pair_i = pair_i.to(device=device, dtype=torch.long)
        if pair_i.numel() > 1 and bool((pair_i[1:] < pair_i[:-1]).any()):
            order = torch.sort(pair_i, stable=True).indices
            pair_i, pair_j, pair_shift = pair_i[order], pair_j[order], pair_shift[order]
        pair_ptr = pair_pointers(pair_i, N)
    pair_ptr = pair_ptr.to(device=device, dtype=torch.long)
    pair_shift = pair_shift.to(device=device, dtype=positions.dtype)
    first, pair_image = periodic_images(pair_j, pair_shift)
    K = first.numel()
    src = pair_j[first]
    X = torch.cat([positions, positions[src] + pair_shift[first]], 0)
    species_idx = species_idx.to(device=device, dtype=torch.long)
    sp = torch.cat([species_idx, species_idx[src]])
    pj = torch.where(pair_image >= 0, pair_image + N, pair_j)
    ptr = torch.cat([pair_ptr, pair_ptr[-1:].expand(K)])
    return X, sp, pj, torch.zeros_like(pair_shift.detach()), ptr


def prepare_arguments(positions, species_idx, pair_i, pair_j, pair_shift, *, typespin, pair_ptr=None):
    """The operators' tensor arguments (positions, species, pair_ptr, pair_j, pair_shift,
    typespin) from a batch's tensors: contiguous, on the positions' device, pairs sorted by centre
    (stably, only if they are not) with their CSR offsets.  Positions keep their autograd
    history."""
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.shape[1] != 3:
        raise ValueError("fused.chebyshev: positions must be a [N, 3] tensor")
    if positions.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"fused.chebyshev: positions must be float32 or float64, got {positions.dtype}")
    if isinstance(pair_shift, torch.Tensor) and pair_shift.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("fused.chebyshev: gradients with respect to pair_shift (cell, stress) "
                                  "are not supported; detach pair_shift or use backend='reference'")
    device = positions.device
    N = positions.shape[0]
    species_idx = species_idx.to(device=device, dtype=torch.long).contiguous()
    pair_j = pair_j.to(device=device, dtype=torch.long)
    pair_shift = pair_shift.detach().to(device=device, dtype=positions.dtype)
    ts = _typespin_tensor(typespin, device)
    if pair_ptr is None:
        pair_i = pair_i.to(device=device, dtype=torch.long)
        if pair_i.numel() > 1:
            if device.type == "cpu":
                unsorted = bool((pair_i[1:] < pair_i[:-1]).any())
            else:
                unsorted = True  # sorting on the GPU is cheaper than a host synchronisation
            if unsorted:
                order = torch.sort(pair_i, stable=True).indices
                pair_i, pair_j, pair_shift = pair_i[order], pair_j[order], pair_shift[order]
        pair_ptr = pair_pointers(pair_i, N)
    else:
        pair_ptr = pair_ptr.to(device=device, dtype=torch.long)
    return (positions.contiguous(), species_idx, pair_ptr.contiguous(), pair_j.contiguous(),
            pair_shift.contiguous(), ts)


def chebyshev(positions, species_idx, pair_i, pair_j, pair_shift, *, typespin, rc_radial,
              n_radial, rc_angular, n_angular, pair_ptr=None):
    """aenet Chebyshev descriptor G [N, dim] with the fused kernels (see module docstring).

    positions [N, 3] float32/float64; species_idx [N] long (index into ``typespin``);
    pair_i, pair_j [P] long; pair_shift [P, 3] Cartesian (r_ij = R[j] - R[i] + shift);
    typespin: sequence or tensor [T] (T = 1: no weighted copy); pair_ptr: optional CSR offsets
    [N + 1] of pairs sorted by centre (then pair_i is not read)."""
    n_radial, n_angular = int(n_radial), int(n_angular)
    rc_radial, rc_angular = float(rc_radial), float(rc_angular)
    if not (0 <= n_radial <= MAX_ORDER and 0 <= n_angular <= MAX_ORDER):
        raise ValueError(f"fused.chebyshev: orders must be in [0, {MAX_ORDER}], got {n_radial}, {n_angular}")
    N = positions.shape[0] if isinstance(positions, torch.Tensor) else 0
    if isinstance(pair_shift, torch.Tensor) and pair_shift.requires_grad and torch.is_grad_enabled():
        positions, species_idx, pair_j, pair_shift, pair_ptr = _with_images(
            positions, species_idx, pair_i, pair_j, pair_shift, pair_ptr)
    pos, *tensors = prepare_arguments(positions, species_idx, pair_i, pair_j, pair_shift,
                                      typespin=typespin, pair_ptr=pair_ptr)
    args = (*tensors, rc_radial, n_radial, rc_angular, n_angular)
    if torch.is_grad_enabled() and pos.requires_grad:
        G = _ChebyshevG.apply(pos, *args)
    else:
        G = _ops.chebyshev_forward(pos, *args)
    return G if G.shape[0] == N else G[:N]


def _register_fake():
    """Shape functions so that the operators trace under torch.compile / FakeTensor."""
    try:
        lib = torch.library
        if not hasattr(lib, "register_fake"):
            return

        def _dim(ts, n_r, n_a):
            return (n_r + n_a + 2) * (2 if ts.shape[0] > 1 else 1)

        @lib.register_fake("distmlip::chebyshev_forward")
        def _(positions, species, ptr, pj, shift, ts, rc_r, n_r, rc_a, n_a):
            return positions.new_empty((positions.shape[0], _dim(ts, n_r, n_a)))

        @lib.register_fake("distmlip::chebyshev_forward_moments")
        def _(positions, species, ptr, pj, shift, ts, rc_r, n_r, rc_a, n_a):
            k = 3 + (n_a + 1) * (n_a + 2) * (n_a + 3) // 3 if n_a <= 8 else 0
            return (positions.new_empty((positions.shape[0], _dim(ts, n_r, n_a))),
                    positions.new_empty((positions.shape[0], k), dtype=torch.float64))

        @lib.register_fake("distmlip::chebyshev_backward")
        def _(grad_G, positions, species, ptr, pj, shift, ts, rc_r, n_r, rc_a, n_a, moments=None):
            return positions.new_empty((positions.shape[0], 3))

        @lib.register_fake("distmlip::chebyshev_double_backward")
        def _(grad_G, v, positions, species, ptr, pj, shift, ts, rc_r, n_r, rc_a, n_a, need_jvp, need_hvp,
              moments=None):
            n = positions.shape[0]
            jv = positions.new_empty((n, _dim(ts, n_r, n_a)) if need_jvp else (0,))
            hv = positions.new_empty((n, 3) if need_hvp else (0,))
            return jv, hv
    except Exception:  # fake registration is optional (older torch, re-import)
        pass


_register_fake()
