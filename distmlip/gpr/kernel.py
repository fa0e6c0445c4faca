"""Squared-exponential covariance between energies and their position derivatives.

Every structure ``a`` has a fingerprint ``x_a`` (length D) and the Jacobian ``J_a = dx_a/dR_a``
([D, P], P = 3 natoms).  With ``r = x_a - x_b`` and ``k = w^2 exp(-|r|^2 / (2 l^2))``:

* value-value          cov(E_a, E_b)             = k
* value-derivative     cov(E_a, dE_b/dR_b)       = (k / l^2) J_b^T r
* derivative-value     cov(dE_a/dR_a, E_b)       = -(k / l^2) J_a^T r
* derivative-derivative cov(dE_a/dR_a, dE_b/dR_b) = (k / l^2) J_a^T J_b - (k / l^4) (J_a^T r)(J_b^T r)^T

For the Cartesian fingerprint (x = R flattened) ``J`` is the identity; it is never built: the
``J_a^T J_b`` term becomes a Kronecker delta over components and ``J^T r = r``.

The observation vector of a set of structures is laid out as
``[E_0 .. E_{B-1}, g_0 (P values), g_1, ...]`` with ``g = dE/dR``: all values first, then the
derivatives structure by structure.  :func:`cov_block` returns the covariance between the
observations of two structure sets (optionally without the derivative rows or columns), and
:func:`assemble` fills a large matrix in row chunks so that no intermediate exceeds a memory cap
(no [B, B, P, P]-sized temporaries beyond the chunk being written).

Hyperparameter derivatives in closed form (used by the analytic LML gradient): every block is
w^2 times a function of l, so ``dK/dlog w = 2 K``; with ``u = |r|^2 / l^2``,
``d/dlog l`` multiplies the ``k`` terms by ``u``, the ``k / l^2`` terms by ``(u - 2)`` and the
``k / l^4`` term by ``(u - 4)`` (``deriv="log_length"`` in :func:`cov_block` / :func:`assemble`).
The functions are also differentiable by torch autograd and run on any torch device; float64 is
expected.
"""
from __future__ import annotations

import math

import torch

__all__ = ["cov_block", "assemble", "n_obs"]


def n_obs(n_structures: int, n_deriv: int, with_grad: bool = True) -> int:
    return n_structures * (1 + (n_deriv if with_grad else 0))


def _geometry(XA, JA, XB, JB, rows_grad, cols_grad):
    """Pairwise pieces that do not depend on the hyperparameters."""
    diff = XA[:, None, :] - XB[None, :, :]             # exact differences (no |a|^2+|b|^2-2ab round-off)
    d2 = (diff * diff).sum(-1)
    JBr = JAr = None
    if cols_grad:
        if JB is None:                          # Cartesian: J_b^T r = x_a - x_b
            JBr = diff
        else:                                   # [A, B, Pb]
            JBr = torch.einsum("bdp,ad->abp", JB, XA) - torch.einsum("bdp,bd->bp", JB, XB)[None]
    if rows_grad:
        if JA is None:
            JAr = diff
        else:                                   # [A, B, Pa]
            JAr = torch.einsum("adp,ad->ap", JA, XA)[:, None, :] - torch.einsum("adp,bd->abp", JA, XB)
    return d2, JAr, JBr


def cov_block(XA, JA, XB, JB, w, l, rows_grad=True, cols_grad=True, deriv=None):
    """Covariance between the observations of structure sets A (rows) and B (columns).

    XA [A, D], JA [A, D, Pa] or None (Cartesian: identity, then Pa = D), same for B.
    ``w``, ``l``: python floats or 0-d tensors (autograd flows through them).
    ``deriv="log_length"`` returns the derivative of the block with respect to log l instead;
    ``deriv=mask`` (bool tensor [D], Cartesian fingerprints only) the derivative with respect
    to log s of a common scale s of the coordinates selected by mask, x_m -> x_m / s (used for
    per-group length scales: with q = |r_mask|^2 / l^2, the k terms are multiplied by q, the
    value-derivative terms by q - mask_j, the derivative-derivative terms by q, plus
    (k / l^4) r_i r_j (mask_i + mask_j)).
    Returns a tensor [A (1 + Pa if rows_grad), B (1 + Pb if cols_grad)] in the layout above."""
    if isinstance(deriv, torch.Tensor):
        if JA is not None or JB is not None or rows_grad != cols_grad:
            raise ValueError("cov_block: the coordinate-scale derivative needs the Cartesian "
                             "fingerprint, with both or neither of derivative rows and columns")
        return _cov_block_dscale(XA, XB, w, l, deriv, rows_grad)
    if deriv not in (None, "log_length"):
        raise ValueError(f"cov_block: unknown deriv {deriv!r}")
    A, B = XA.shape[0], XB.shape[0]
    Pa = (XA.shape[1] if JA is None else JA.shape[2]) if rows_grad else 0
    Pb = (XB.shape[1] if JB is None else JB.shape[2]) if cols_grad else 0
    d2, JAr, JBr = _geometry(XA, JA, XB, JB, rows_grad, cols_grad)
    il2 = 1.0 / (l * l)
    k0 = (w * w) * torch.exp(-0.5 * d2 * il2)               # [A, B]
    if deriv is None:
        k, kl2, kl4 = k0, k0 * il2, k0 * il2 * il2
    else:                                                  # d/dlog l of k, k/l^2, k/l^4
        u = d2 * il2
        k, kl2, kl4 = k0 * u, k0 * il2 * (u - 2.0), k0 * il2 * il2 * (u - 4.0)
    parts_top = [k]
    if cols_grad:
        eg = kl2[:, :, None] * JBr                         # [A, B, Pb]
        parts_top.append(eg.reshape(A, B * Pb))
    top = torch.cat(parts_top, dim=1) if len(parts_top) > 1 else k
    if not rows_grad:
        return top
    ge = -kl2[:, :, None] * JAr                            # [A, B, Pa]
    ge = ge.permute(0, 2, 1).reshape(A * Pa, B)
    if not cols_grad:
        return torch.cat([top, ge], dim=0)
    # - (k / l^4) (J_a^T r)(J_b^T r)^T  -> [A, Pa, B, Pb]
    gg = -(kl4[:, None, :, None] * JAr.permute(0, 2, 1)[:, :, :, None] * JBr[:, None, :, :])
    if JA is None and JB is None:
        eye = torch.eye(Pa, dtype=XA.dtype, device=XA.device)
        gg = gg + kl2[:, None, :, None] * eye[None, :, None, :]
    else:
        JA_ = JA if JA is not None else None
        JB_ = JB if JB is not None else None
        if JA_ is None:     # identity on the A side: J_a^T J_b = J_b
            jj = JB_.unsqueeze(0).expand(A, -1, -1, -1).permute(0, 2, 1, 3)   # [A, D=Pa, B, Pb]
        elif JB_ is None:
            jj = JA_.permute(0, 2, 1)[:, :, None, :].expand(-1, -1, B, -1)    # [A, Pa, B, D=Pb]
        else:
            jj = torch.einsum("adp,bdq->apbq", JA_, JB_)
        gg = gg + kl2[:, None, :, None] * jj
    gg = gg.reshape(A * Pa, B * Pb)
    bottom = torch.cat([ge, gg], dim=1)
    return torch.cat([top, bottom], dim=0)


def _cov_block_dscale(XA, XB, w, l, mask, with_grad=True):
    """d cov_block / d log s for x_m -> x_m / s on the components in mask (Cartesian)."""
    A, B, P = XA.shape[0], XB.shape[0], XA.shape[1]
    diff = XA[:, None, :] - XB[None, :, :]
    d2 = (diff * diff).sum(-1)
    il2 = 1.0 / (l * l)
    mk = mask.to(XA.dtype)
    k = (w * w) * torch.exp(-0.5 * d2 * il2)
    q = ((diff * diff) * mk).sum(-1) * il2                       # [A, B]
    if not with_grad:
        return k * q
    kl2, kl4 = k * il2, k * il2 * il2
    top = torch.cat([k * q, (kl2[:, :, None] * diff * (q[:, :, None] - mk)).reshape(A, B * P)], 1)
    ge = (-kl2[:, :, None] * diff * (q[:, :, None] - mk)).permute(0, 2, 1).reshape(A * P, B)
    rr = diff.permute(0, 2, 1)[:, :, :, None] * diff[:, None, :, :]        # [A, P, B, P]
    gg = -(kl4 * q)[:, None, :, None] * rr \
        + kl4[:, None, :, None] * rr * (mk[None, :, None, None] + mk[None, None, None, :])
    eye = torch.eye(P, dtype=XA.dtype, device=XA.device)
    gg = gg + (kl2 * q)[:, None, :, None] * eye[None, :, None, :]
    return torch.cat([top, torch.cat([ge, gg.reshape(A * P, B * P)], 1)], 0)


def _chunk_rows(A, bytes_per_row, max_bytes):
    return max(1, min(A, int(max_bytes // max(1, bytes_per_row))))


def assemble(XA, JA, XB, JB, w, l, rows_grad=True, cols_grad=True, out=None,
             max_block_bytes: int = 256 * 2 ** 20, deriv=None):
    """Fill the full covariance matrix between sets A and B chunk by chunk (no autograd).

    Rows of A are processed in chunks whose largest temporary ([c, Pa, B, Pb] doubles, a few of
    them) stays under ``max_block_bytes``; each chunk is scattered into ``out`` (allocated when
    None) at its place in the [values; derivatives] layout."""
    A, B = XA.shape[0], XB.shape[0]
    Pa = (XA.shape[1] if JA is None else JA.shape[2]) if rows_grad else 0
    Pb = (XB.shape[1] if JB is None else JB.shape[2]) if cols_grad else 0
    nA, nB = A * (1 + Pa), B * (1 + Pb)
    if out is None:
        out = torch.empty(nA, nB, dtype=XA.dtype, device=XA.device)
    per_row = 8 * 4 * B * (1 + Pb) * (1 + Pa) + 8 * B * XA.shape[1] * 2
    c = _chunk_rows(A, per_row, max_block_bytes)
    w = float(w)
    l = float(l)
    with torch.no_grad():
        for s in range(0, A, c):
            e = min(A, s + c)
            blk = cov_block(XA[s:e], None if JA is None else JA[s:e], XB, JB, w, l, rows_grad,
                            cols_grad, deriv=deriv)
            m = e - s
            out[s:e] = blk[:m]
            if rows_grad:
                out[A + s * Pa:A + e * Pa] = blk[m:]
            del blk
    return out


LOG2PI = math.log(2.0 * math.pi)
