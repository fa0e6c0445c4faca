"""Per-atom Chebyshev descriptors of one structure and their position Jacobian through the
compiled descriptor operators (``torch.ops.distmlip.chebyshev_forward`` and the Jacobian-vector
product of ``chebyshev_double_backward``), for the GPR's local-environment fingerprint."""
from __future__ import annotations

import numpy as np
import torch


def _have_ops() -> bool:
    from ..descriptors import fused  # noqa: F401  (loads the extension where it exists)

    ops = getattr(torch.ops, "distmlip", None)
    try:
        return ops is not None and hasattr(ops, "chebyshev_forward") and hasattr(ops, "chebyshev_double_backward")
    except RuntimeError:
        return False


def descriptor_and_jacobian(desc, species, cutoff, numbers, positions, cell, pbc, with_jacobian=True):
    """(x [n D], J [n D, 3n] or None) with x = G.reshape(-1); None when the compiled operators
    are missing (the caller falls back to autograd on the reference descriptor)."""
    if not _have_ops():
        return None
    from ..descriptors import fused
    from ..descriptors.batch import collate
    from .fingerprints import _Tmpl

    b = collate([_Tmpl(np.asarray(numbers), np.asarray(positions, dtype=np.float64),
                       np.asarray(cell, dtype=np.float64), np.asarray(pbc, dtype=bool))],
                list(species), float(cutoff), dtype=torch.float64)
    n = b.positions.shape[0]
    pos, *tens = fused.prepare_arguments(b.positions.detach(), b.species, b.pair_i, b.pair_j, b.pair_shift,
                                         typespin=desc.typespin, pair_ptr=b.pair_ptr)
    prm = (float(desc.rc_radial), int(desc.n_radial), float(desc.rc_angular), int(desc.n_angular))
    ops = torch.ops.distmlip
    with torch.no_grad():
        G = ops.chebyshev_forward(pos, *tens, *prm)
        if not with_jacobian:
            return G.reshape(-1), None
        zero = torch.zeros_like(G)
        J = torch.empty(G.numel(), 3 * n, dtype=torch.float64)
        v = torch.zeros(n, 3, dtype=torch.float64)
        for k in range(3 * n):
            v.view(-1)[k] = 1.0
            jv, _ = ops.chebyshev_double_backward(zero, v, pos, *tens, *prm, True, False, None)
            J[:, k] = jv.reshape(-1)
            v.view(-1)[k] = 0.0
    return G.reshape(-1), J
