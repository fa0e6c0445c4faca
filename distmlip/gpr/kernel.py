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
import time

import numpy as np
import torch

__all__ = ["cov_block", "assemble", "cartesian_grad_traces", "n_obs", "LocalKernel"]


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


def _place(out, blk, rs, re_, cs, ce, A, B, Pa, Pb, skip_rows=0):
    """Write the block between structures rs:re_ (rows) and cs:ce (columns), laid out as
    [values; derivatives] x [values, derivatives], at its place in ``out``; with ``skip_rows``
    the first structures of the row set are left out (the mirrored copy of a diagonal block)."""
    m, k = re_ - rs, ce - cs
    r0 = rs + skip_rows
    vr = slice(skip_rows, m)
    out[r0:re_, cs:ce] = blk[vr, :k]
    if Pb:
        out[r0:re_, B + cs * Pb:B + ce * Pb] = blk[vr, k:]
    if Pa:
        dr = slice(m + skip_rows * Pa, m + m * Pa)
        out[A + r0 * Pa:A + re_ * Pa, cs:ce] = blk[dr, :k]
        if Pb:
            out[A + r0 * Pa:A + re_ * Pa, B + cs * Pb:B + ce * Pb] = blk[dr, k:]


def _mirror(out, s, e, A, P):
    """K symmetric: copy the rows of structures s:e, columns of structures e:A, onto the
    transposed place (strided copies inside ``out``)."""
    rows = [(s, e)] + ([(A + s * P, A + e * P)] if P else [])
    cols = [(e, A)] + ([(A + e * P, A + A * P)] if P else [])
    for r0, r1 in rows:
        for c0, c1 in cols:
            out[c0:c1, r0:r1].copy_(out[r0:r1, c0:c1].T)


def _cartesian_into(out, XA, XB, w, l, rows_grad, cols_grad, deriv, s, t0, A, B):
    """The Cartesian squared-exponential block of rows s:s+m and columns t0:B, written in place."""
    m, Bc, P = XA.shape[0], XB.shape[0], XA.shape[1]
    e = s + m
    diff = XA[:, None, :] - XB[None, :, :]                  # [m, Bc, P]
    d2 = (diff * diff).sum(-1)
    il2 = 1.0 / (l * l)
    k0 = (w * w) * torch.exp(-0.5 * d2 * il2)
    if deriv is None:
        k, kl2, kl4 = k0, k0 * il2, k0 * il2 * il2
    else:
        u = d2 * il2
        k, kl2, kl4 = k0 * u, k0 * il2 * (u - 2.0), k0 * il2 * il2 * (u - 4.0)
    out[s:e, t0:B] = k
    if cols_grad:
        torch.mul(kl2[:, :, None], diff, out=out[s:e, B + t0 * P:B + B * P].view(m, Bc, P))
    if not rows_grad:
        return
    ge = out[A + s * P:A + e * P, t0:B].view(m, P, Bc)
    torch.mul(diff.permute(0, 2, 1), kl2[:, None, :], out=ge)
    ge.neg_()
    if not cols_grad:
        return
    gg = out[A + s * P:A + e * P, B + t0 * P:B + B * P].view(m, P, Bc, P)
    # (k / l^2) delta_pq - (k / l^4) r_p r_q
    torch.mul(diff.permute(0, 2, 1)[:, :, :, None], diff[:, None, :, :], out=gg)
    gg.mul_(kl4.neg()[:, None, :, None])
    gg.diagonal(dim1=1, dim2=3).add_(kl2[:, :, None])


def assemble(XA, JA, XB, JB, w, l, rows_grad=True, cols_grad=True, out=None,
             max_block_bytes: int = 256 * 2 ** 20, deriv=None, kernel=None, progress=None):
    """Fill the full covariance matrix between sets A and B chunk by chunk (no autograd);
    ``progress(done, total, elapsed_s)`` after each chunk of row structures.

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
    block = cov_block
    if kernel is not None:
        per_row = kernel.bytes_per_row(B, Pa, Pb)
        block = kernel.cov_block
    c = _chunk_rows(A, per_row, max_block_bytes)
    w = float(w)
    l = float(l)
    # K(X, X): only the blocks on and above the diagonal are computed, the rest mirrored
    sym = XA is XB and JA is JB and rows_grad == cols_grad
    # the Cartesian squared-exponential blocks are written straight into ``out`` (no temporaries
    # of the block's size: those were mapped and faulted in afresh for every chunk)
    direct = kernel is None and JA is None and JB is None and deriv in (None, "log_length")
    if direct:
        c = _chunk_rows(A, 8 * 4 * B * XA.shape[1] + 8 * 8 * B, max_block_bytes)
    t_start = time.perf_counter()
    with torch.no_grad():
        for s in range(0, A, c):
            e = min(A, s + c)
            t0 = s if sym else 0
            if direct:
                _cartesian_into(out, XA[s:e], XB[t0:], w, l, rows_grad, cols_grad, deriv, s, t0, A, B)
            else:
                blk = block(XA[s:e], None if JA is None else JA[s:e], XB[t0:],
                            None if JB is None else JB[t0:], w, l, rows_grad, cols_grad, deriv=deriv)
                _place(out, blk, s, e, t0, B, A, B, Pa, Pb)
                del blk
            if sym and e < B:
                _mirror(out, s, e, A, Pa)
            if progress is not None:
                progress(e, A, time.perf_counter() - t_start)
    return out


def cartesian_grad_traces(W, X, w, l, with_grad=True, masks=None):
    """``tr(W dK/dlog l)`` and, per row of ``masks`` ([G, D] 0/1), ``tr(W dK/dlog s_g)`` (the
    coordinate-scale derivatives of :func:`cov_block`) for the Cartesian squared-exponential
    K(X, X), from one pass over the symmetric W without forming any dK.

    Why: the LML gradient needs these traces for every length-scale parameter; building each dK
    as an n x n matrix (and its [A, P, B, P] temporaries) cost more than the Cholesky factor and
    the inverse together.  Per structure pair (a, b), with r = x_a - x_b, the blocks of dK are
    scalar functions of (a, b) times 1, r_q, delta_pq or r_p r_q, so the traces reduce to the
    pair sums of W_ee, W_eg . r, tr W_gg and r^T W_gg r (the value-derivative and derivative-value
    blocks give equal sums by the symmetry of W and the antisymmetry of r).  Returns
    (float, [G floats])."""
    N, D = X.shape
    diff = X[:, None, :] - X[None, :, :]                    # [N, N, D]
    r2 = diff * diff
    d2 = r2.sum(-1)
    il2 = 1.0 / (l * l)
    k = (w * w) * torch.exp(-0.5 * d2 * il2)
    u = d2 * il2
    kl2, kl4 = k * il2, k * il2 * il2
    Wee = W[:N, :N]
    if masks is not None:
        M = masks.to(X.dtype).T                             # [D, G]
        q = (r2.reshape(N * N, D) @ M).reshape(N, N, -1) * il2   # [N, N, G]
        kq = k[:, :, None] * q
        tr_g = (Wee[:, :, None] * kq).sum((0, 1))
    tr_l = float((Wee * k * u).sum())
    if with_grad:
        Weg = W[:N, N:].reshape(N, N, D)                    # W[E_a, g_b q]
        wr = Weg * diff
        A1 = wr.sum(-1)                                     # sum_q W_eg[a, b, q] r_q
        Wgg = W[N:, N:].view(N, D, N, D)
        T = Wgg.diagonal(dim1=1, dim2=3).sum(-1)            # [N, N]: tr of each D x D block
        v = torch.empty_like(diff)                          # v[a, b] = W_gg[a, :, b, :] r_ab
        for a in range(N):
            torch.bmm(Wgg[a].permute(1, 0, 2), diff[a][:, :, None], out=v[a][:, :, None])
        rv = diff * v
        Q = rv.sum(-1)                                      # r^T W_gg r
        kl2p, kl4p = kl2 * (u - 2.0), kl4 * (u - 4.0)
        tr_l += float((2.0 * kl2p * A1 + kl2p * T - kl4p * Q).sum())
        if masks is not None:
            A1g = (wr.reshape(N * N, D) @ M).reshape(N, N, -1)
            Qg = (rv.reshape(N * N, D) @ M).reshape(N, N, -1)
            tr_g = tr_g + (2.0 * kl2[:, :, None] * (q * A1[:, :, None] - A1g)
                           - (kl4 * Q)[:, :, None] * q + 2.0 * kl4[:, :, None] * Qg
                           + (kl2 * T)[:, :, None] * q).sum((0, 1))
    return tr_l, ([] if masks is None else [float(t) for t in tr_g])


LOG2PI = math.log(2.0 * math.pi)


# ------------------------------------------------------------------------------------------
# local-environment kernel (a sum of per-atom kernels, as in SOAP-GPR and GAP)
# ------------------------------------------------------------------------------------------

class LocalKernel:
    """Covariance of total energies modelled as sums of atomic energies, ``E = sum_i e(G_i)``,
    with a squared-exponential prior on ``e`` between atoms of the same element:

        cov(E_a, E_b) = sum_{i in a} sum_{j in b} [Z_i = Z_j] w^2 exp(-|G_ai - G_bj|^2 / 2 l^2)

    ``G_ai`` [D] is the descriptor of atom i of structure a (a local environment, here aenet's
    Chebyshev descriptor), ``J_ai = dG_ai / dR_a`` [D, P] its Jacobian.  Every block of the
    global kernel (module docstring) holds per atom pair, with r = G_ai - G_bj, and is summed
    over the pairs:

        cov(E_a, g_b) = sum_ij (k_ij / l^2) J_bj^T r_ij
        cov(g_a, E_b) = -sum_ij (k_ij / l^2) J_ai^T r_ij
        cov(g_a, g_b) = sum_ij (k_ij / l^2) J_ai^T J_bj - (k_ij / l^4) (J_ai^T r_ij)(J_bj^T r_ij)^T

    so the hyperparameter derivatives are those of the global kernel pair by pair
    (``deriv="log_length"``).  A structure's fingerprint is its atoms' descriptors concatenated
    (``X`` [n D], ``J`` [n D, P], the layout of the chebyshev fingerprint); ``species`` [n] gives
    the element of each atom (one atom order per subset).

    ``mixed``: the structures of one fit differ in composition or atom order (random alloys,
    where every structure has its own composition).  Each structure then carries its atoms'
    element codes in n extra columns at the end of its fingerprint (X [n D + n], J [n D + n, P],
    the extra Jacobian rows zero; fingerprints.LocalFingerprint with ``mixed``), so that the
    element of every atom travels with the structure through every subset of rows the GPR takes
    (sub-samples, clusters, chunks), and an atom pair counts when the two codes agree.  Structures
    of fewer atoms than ``n`` are padded: code -1, zero descriptor and Jacobian, so that their
    padded atoms pair with nothing and the derivative rows of their coordinates are zero
    (:meth:`padded`; model.GPR keeps those rows out of the likelihood).

    Why: a global kernel (Cartesian, inverse distances, concatenated descriptors) compares whole
    structures, so it learns the energy surface only along the few directions in which its
    N training structures differ; a random displacement of all 3n coordinates mostly moves along
    directions it never saw, where its posterior reverts to the prior and misses the curvature
    (the energy rise ``0.5 d^T H d`` of a displacement).  The local kernel learns one atomic
    energy function from N n environments, which covers those directions."""

    def __init__(self, species, dim: int, mixed: bool = False):
        self.species = torch.as_tensor(np.asarray(species, dtype=np.int64).reshape(-1))
        self.n = int(self.species.numel())
        self.dim = int(dim)
        self.mixed = bool(mixed)

    def state(self) -> dict:
        return {"kind": "local", "species": self.species.tolist(), "dim": self.dim, "mixed": self.is_mixed}

    @property
    def is_mixed(self) -> bool:
        return bool(getattr(self, "mixed", False))      # fits saved before mixed groups lack it

    def codes(self, X) -> torch.Tensor:
        """[A, n] element code of every atom of each structure (mixed), or the one sequence [n]."""
        if not self.is_mixed:
            return self.species.to(X.device)
        return X[:, self.n * self.dim:].round().long()

    def composition(self, X) -> torch.Tensor:
        """[A, K] float64 atom count of each element code per structure (K: codes present)."""
        c = self.codes(X)
        if c.dim() == 1:
            c = c[None].expand(X.shape[0], -1)
        K = int(c.max()) + 1 if c.numel() else 1
        real = (c >= 0)[..., None].to(torch.float64)
        return (torch.nn.functional.one_hot(c.clamp_min(0), K) * real).sum(1)

    def padded(self, X):
        """[A, 3 n] bool: the coordinates of padded atoms (code -1), or None (no padding)."""
        if not self.is_mixed:
            return None
        return (self.codes(X) < 0).repeat_interleave(3, dim=1)

    def _strip(self, X, J, keep: bool = False):
        """(descriptors [A, n D], Jacobian [A, n D, P] or None, codes [A, n] or None): a mixed
        fit's fingerprints without their code columns (contiguous: the products below read them
        as [A, n, D] blocks); others as they are.  ``keep``: the stripped descriptors kept for
        the last X (the rows of a prediction, the same training set in every call, so that what
        :meth:`_one_sided` derives from them is kept too)."""
        if not self.is_mixed:
            return X, J, None
        nD = self.n * self.dim
        Xs = (self._kept_for("_xstrip", X, lambda: X[:, :nD].contiguous()) if keep
              else X[:, :nD].contiguous())
        return Xs, (None if J is None else self._stripped(J, nD)), self.codes(X)

    def _stripped(self, J, nD):
        """J without its code rows (kept for the last J: see :meth:`_kept_for`)."""
        return self._kept_for("_jstrip", J, lambda: J[:, :nD].contiguous())

    def _kept_for(self, attr, J, make):
        """``make()``, kept in ``attr`` for the last tensor ``J`` (or tuple of tensors) it was
        made from: a fitted model predicts against the same training Jacobian in every call, and
        what is derived from it costs a pass over the whole array.  Reused only for the same
        tensor objects, unchanged (a freed tensor's memory may hold a new one)."""
        import weakref

        keys = J if isinstance(J, tuple) else (J,)
        kept = getattr(self, attr, None)
        if kept is not None and len(kept[0]) == len(keys) and all(
                r() is t and v == t._version for r, v, t in zip(kept[0], kept[1], keys)):
            return kept[2]
        out = make()
        setattr(self, attr, (tuple(weakref.ref(t) for t in keys), tuple(t._version for t in keys), out))
        return out

    def _same(self, sA, sB, like):
        """Mask of the atom pairs of one element, broadcastable to [A, n, B, m]."""
        if sA is None:
            same = (self.species[:, None] == self.species[None, :]).to(like.dtype).to(like.device)
            return same[None, :, None, :]
        return ((sA[:, :, None, None] == sB[None, None]) & (sA >= 0)[:, :, None, None]).to(like.dtype)

    def pair_factors(self, GA, GB, w, l, deriv, sA=None, sB=None):
        """k, k / l^2, k / l^4 (or their log-l derivatives) per atom pair [A, n, B, m]; ``sA``,
        ``sB``: the element codes of a mixed fit's structures [A, n], [B, m]."""
        a2 = (GA * GA).sum(-1)
        b2 = (GB * GB).sum(-1)
        d2 = (a2[:, :, None, None] + b2[None, None] - 2.0 * torch.einsum("aid,bjd->aibj", GA, GB)).clamp_min_(0.0)
        il2 = 1.0 / (l * l)
        k0 = (w * w) * torch.exp(-0.5 * il2 * d2) * self._same(sA, sB, GA)
        if deriv is None:
            return k0, k0 * il2, k0 * (il2 * il2)
        u = d2 * il2
        return k0 * u, k0 * il2 * (u - 2.0), k0 * (il2 * il2) * (u - 4.0)

    def cov_block(self, XA, JA, XB, JB, w, l, rows_grad=True, cols_grad=True, deriv=None):
        """The block between structure sets A and B in the layout of :func:`cov_block`.  One
        row structure at a time, every contraction one batched matrix product over the column
        structures, with the pair arrays built in the order the products read them (the
        reordering copies of a straight einsum cost more than the products)."""
        if deriv not in (None, "log_length"):
            raise ValueError("LocalKernel: only deriv='log_length' is supported")
        XA, JA, sA = self._strip(XA, JA, keep=True)
        XB, JB, sB = self._strip(XB, JB)
        return self._cov(XA, JA, XB, JB, sA, sB, w, l, rows_grad, cols_grad, deriv)

    def _cov(self, XA, JA, XB, JB, sA, sB, w, l, rows_grad, cols_grad, deriv):
        A, B, n, D = XA.shape[0], XB.shape[0], self.n, self.dim
        if deriv is None and rows_grad != cols_grad:
            return self._one_sided(XA, JA, XB, JB, w, l, rows_grad, sA, sB)
        Pa = JA.shape[-1] if rows_grad else 0
        Pb = JB.shape[-1] if cols_grad else 0
        Bc = self.column_chunk(B, Pa, Pb) if (rows_grad and cols_grad) else B
        if Bc < B:
            # the per-row scratch (JBr: B n^2 P) grows with the column structures and
            # is kept between calls: 30 structures of 192 atoms needed 5 GB each and a fit's RSS
            # passed 13 GB.  Column chunks bound it; each column's block is independent of the
            # others, so the result is the same
            out = torch.empty(A * (1 + Pa), B * (1 + Pb), dtype=XA.dtype, device=XA.device)
            for b0 in range(0, B, Bc):
                b1 = min(B, b0 + Bc)
                sub = self._cov(XA, JA, XB[b0:b1], None if JB is None else JB[b0:b1], sA,
                                None if sB is None else sB[b0:b1], w, l, rows_grad, cols_grad, deriv)
                out[:, b0:b1] = sub[:, :b1 - b0]
                if cols_grad:
                    out[:, B + b0 * Pb:B + b1 * Pb] = sub[:, b1 - b0:]
            return out
        GA, GB = XA.reshape(A, n, D), XB.reshape(B, n, D)
        k, c2, c4 = self.pair_factors(GA, GB, w, l, deriv, sA, sB)          # [A, n, B, n]
        out = torch.empty(A * (1 + Pa), B * (1 + Pb), dtype=XA.dtype, device=XA.device)
        out[:A, :B] = k.sum((1, 3))
        # The gradient blocks with r_ij = G_ai - G_bj.  Written out per atom pair they form
        # J^T r_ij for every pair, n^2 P D products per structure pair, and the force-force term
        # sum_ij c4_ij (J_ai^T r_ij)(J_bj^T r_ij)^T n^2 P^2 (P = 3n): 29 GFLOP per pair of
        # 200-atom cells, 8 s per likelihood evaluation of two such structures.  Summing the pair
        # weights into descriptor-sized vectors first leaves n^2 D per pair and n D P per atom:
        #   energy-force  sum_ij c2_ij J_bj^T r_ij = sum_j J_bj^T V_bj,  V_bj = sum_i c2_ij r_ij
        #   force-energy  sum_ij c2_ij J_ai^T r_ij = sum_i J_ai^T U_ai,  U_ai = sum_j c2_ij r_ij
        #   force-force   sum_i J_ai^T [sum_j c2_ij J_bj - sum_j c4_ij r_ij (J_bj^T r_ij)^T]
        # (the bracket is D x P per atom i: n^2 D P to form, n D P^2 to contract with J_ai).
        if cols_grad:
            V = torch.einsum("aibj,aid->abjd", c2, GA)
            V -= c2.sum(1)[..., None] * GB[None]
            grad = torch.einsum("abk,bkq->abq", V.reshape(A, B, n * D), JB.reshape(B, n * D, Pb))
            out[:A, B:] = grad.reshape(A, B * Pb)
        if rows_grad:
            U = c2.sum(3)[..., None] * GA[:, :, None, :]                   # [a, i, b, d]
            U -= torch.einsum("aibj,bjd->aibd", c2, GB)
            grad = torch.einsum("aidp,aibd->apb", JA.reshape(A, n, D, Pa), U)
            out[A:, :B] = -grad.reshape(A * Pa, B)
        if not (rows_grad and cols_grad):
            return out
        JBd = JB.reshape(B, n, D, Pb).permute(0, 2, 1, 3).reshape(B, D, n * Pb)     # [b, d, (j q)]
        hB = torch.einsum("bjdq,bjd->bjq", JB.reshape(B, n, D, Pb), GB)           # J_bj^T G_bj
        JB3 = JB.reshape(B, n, D * Pb)
        for a in range(A):
            # JBr[b, i, j, q] = (J_bj^T r_ij)_q  (into a reused buffer: a fresh one per row
            # structure was faulted in page by page, as system time)
            JBr = torch.matmul(GA[a], JBd, out=self._buf("JBr", (B, n, n * Pb), XA)).view(B, n, n, Pb)
            JBr -= hB[:, None]
            # c4_ij r_ij as [b, i, d, j] (the layout the product reads)
            rw = torch.sub(GA[a][None, :, :, None], GB.transpose(1, 2)[:, None, :, :],
                           out=self._buf("rw", (B, n, D, n), XA))
            rw *= c4[a].transpose(0, 1)[:, :, None, :]
            # bracket [b, i, d, q]: sum_j c2_ij J_bj - sum_j c4_ij r_ij (J_bj^T r_ij)^T
            Tb = torch.bmm(c2[a].transpose(0, 1), JB3).view(B * n, D, Pb)
            Tb -= torch.bmm(rw.view(B * n, D, n), JBr.view(B * n, n, Pb))
            gg = torch.matmul(JA[a].T, Tb.view(B, n * D, Pb))                        # [b, p, q]
            del Tb
            out[A + a * Pa:A + (a + 1) * Pa, B:].view(Pa, B, Pb).copy_(gg.transpose(0, 1))
            del gg
        return out

    def _one_sided(self, XA, JA, XB, JB, w, l, rows_grad, sA=None, sB=None):
        """:meth:`cov_block` with gradients on one side only and no length derivative: the
        energy predictions of a fitted GPR (training rows with gradients, test columns values;
        labelling the copies of a pool spent most of its time here).  Element by element: only
        same-element pairs contribute, so each element's pair arrays hold its share of the pairs
        (EC dimers: 136 of 400) and the products skip the zeros the general path multiplies;
        the second-derivative factor is not formed.  The gradient rows
        -sum_ij c2_ij J_ai^T r_ij split into sum_i (J_ai^T G_ai) s_ib - sum_i J_ai^T W_aib with
        s_ib = sum_j c2_ij and W_aib = sum_j c2_ij G_bj: two batched matrix products.  A mixed
        fit has no common element layout: one part of all atoms, with the pairs' element mask."""
        if not rows_grad:        # values rows, gradient columns: the transpose of the other case
            t = self._one_sided(XB, JB, XA, None, w, l, True, sB, sA)
            return t.T.contiguous()
        A, B, n, D = XA.shape[0], XB.shape[0], self.n, self.dim
        P = JA.shape[-1]
        GA, GB = XA.reshape(A, n, D), XB.reshape(B, n, D)
        il2 = 1.0 / (l * l)
        out = torch.zeros(A * (1 + P), B, dtype=XA.dtype, device=XA.device)
        ee, grad = out[:A], out[A:].view(A, P, B)
        parts = self._element_rows(JA, A, P) if sA is None else [(None, JA.reshape(A, n, D, P))]
        # J_ai^T G_ai [A, P, na] per part: the rows' alone, the same in every call of a
        # prediction (it cost 0.4x the column-dependent products at the 17-45 copies per call of
        # a pool's labelling)
        hs = self._kept_for("_hrows", (XA, JA), lambda: [
            torch.einsum("aidp,aid->api", JS, GA if S is None else GA[:, S]) for S, JS in parts])
        for (S, JS), h in zip(parts, hs):
            Ga, Gb = (GA, GB) if S is None else (GA[:, S], GB[:, S])     # [A, na, D], [B, nb, D]
            d2 = torch.einsum("aid,bjd->aibj", Ga, Gb).mul_(-2.0)
            d2 += (Ga * Ga).sum(-1)[:, :, None, None]
            d2 += (Gb * Gb).sum(-1)[None, None]
            k = d2.clamp_min_(0.0).mul_(-0.5 * il2).exp_().mul_(w * w)   # [A, na, B, nb], in place
            if S is None:
                k *= self._same(sA, sB, k)
            ee += k.sum((1, 3))
            s = k.sum(3)                                                  # [A, na, B]
            grad -= torch.bmm(h, s)
            W = torch.einsum("aibj,bjd->aidb", k, Gb)                     # [A, na, D, B]
            grad += torch.bmm(JS.reshape(A, -1, P).transpose(1, 2), W.reshape(A, -1, B))
        grad.mul_(il2)                     # c2 = k / l^2, once for every element's sum
        return out

    def _element_rows(self, JA, A, P):
        """(atom indices of one element, JA's rows of those atoms [A, na, D, P]) per element,
        kept for the last JA seen (:meth:`_kept_for`: gathering it costs a copy of the whole array)."""
        def make():
            J4 = JA.reshape(A, self.n, self.dim, P)
            parts = []
            for z in torch.unique(self.species).tolist():
                S = torch.nonzero(self.species == z).flatten().to(JA.device)
                parts.append((S, J4[:, S].contiguous()))
            return parts
        return self._kept_for("_elements", JA, make)

    def _buf(self, name, shape, like):
        """A scratch tensor of ``shape`` kept between calls (grown, never shrunk)."""
        if not hasattr(self, "_scratch"):
            self._scratch = {}
        n = int(np.prod(shape))
        b = self._scratch.get(name)
        if b is None or b.numel() < n or b.device != like.device or b.dtype != like.dtype:
            b = torch.empty(n, dtype=like.dtype, device=like.device)
            self._scratch[name] = b
        return b[:n].view(shape)

    def __getstate__(self):          # scratch buffers are not part of a saved fit
        d = dict(self.__dict__)
        d.pop("_scratch", None)
        for k in ("_elements", "_jstrip", "_xstrip", "_hrows"):
            d.pop(k, None)
        return d

    def prior_variance(self, X, w, l):
        """Prior variance of each structure's energy, sum_ij k(G_i, G_j) over its own atoms [M]."""
        X, _, s = self._strip(X, None)
        G = X.reshape(X.shape[0], self.n, self.dim)
        d2 = torch.cdist(G, G).pow_(2)
        if s is None:
            same = (self.species[:, None] == self.species[None, :]).to(G.dtype).to(G.device)
        else:
            same = ((s[:, :, None] == s[:, None, :]) & (s >= 0)[:, :, None]).to(G.dtype)
        return ((w * w) * torch.exp(-0.5 * d2 / (l * l)) * same).sum((1, 2))

    SCRATCH_BYTES = 256 * 2 ** 20    # per scratch buffer of cov_block (column chunks above it)

    def column_chunk(self, B, Pa, Pb) -> int:
        """Column structures per pass of :meth:`cov_block`: the scratch buffer JBr (Bc n^2 P
        values) within SCRATCH_BYTES."""
        per = 8 * self.n * self.n * max(Pa, Pb, 1)
        return max(1, min(B, int(self.SCRATCH_BYTES // per)))

    def max_columns(self, A: int, max_bytes: int) -> int:
        """Column structures per :meth:`cov_block` call against A row structures with the pair
        arrays (k, c2, c4: [A, n, B, n] each) within ``max_bytes``."""
        return max(1, int(max_bytes // (8 * 3 * A * self.n * self.n)))

    def bytes_per_row(self, B, Pa, Pb):
        """Bytes per structure of the row set: its output rows and the pair factors (the
        per-structure temporaries, the scratch JBr [B, n, n, P] and the bracket [B, n, D, P], are
        reused or freed after each)."""
        return 8 * ((1 + Pa) * B * (1 + Pb) + 4 * self.n * B * self.n)

    def nn_distance(self, X, max_envs: int = 4000, seed: int = 0):
        """Median distance from each atomic environment to its nearest environment of the same
        element in another structure (the data's spacing in descriptor space)."""
        N = X.shape[0]
        X, _, s = self._strip(X, None)
        G = X.reshape(N, self.n, self.dim)
        codes = (self.species.to(X.device)[None].expand(N, -1) if s is None else s).reshape(-1)
        Gall = G.reshape(-1, self.dim)
        owners = torch.arange(N, device=X.device).repeat_interleave(self.n)
        out = []
        for z in torch.unique(codes[codes >= 0]):
            Gz, owner = Gall[codes == z], owners[codes == z]
            if Gz.shape[0] > max_envs:
                g = torch.Generator().manual_seed(seed)
                pick = torch.randperm(Gz.shape[0], generator=g)[:max_envs].to(X.device)
            else:
                pick = torch.arange(Gz.shape[0], device=X.device)
            d = torch.cdist(Gz[pick], Gz)
            d[owner[pick][:, None] == owner[None, :]] = float("inf")
            m = d.min(1).values
            out.append(m[torch.isfinite(m)])
        v = torch.cat(out) if out else torch.zeros(0)
        v = v[v > 0]
        return float(v.median()) if v.numel() else 1.0
