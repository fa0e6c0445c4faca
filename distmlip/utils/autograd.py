"""Small helpers around torch.autograd shared by the custom autograd functions."""
from __future__ import annotations

import torch


def will_reach(t: torch.Tensor) -> bool:
    """Whether the running backward pass will use a gradient for ``t`` (False e.g. under
    ``loss.backward(inputs=params)`` or ``autograd.grad(loss, params)`` for a tensor that only
    leads to the positions).  Uses the engine query behind
    ``torch.autograd.graph.register_multi_grad_hook``; if that is unavailable, True."""
    try:
        edge = torch.autograd.graph.get_gradient_edge(t)
        return bool(torch._C._will_engine_execute_node(edge.node))
    except Exception:  # noqa: BLE001  (leaf tensors, older torch: assume it is needed)
        return True
