"""Loader for the compiled extension ``distmlip._C``.

Importing it registers the ``torch.ops.distmlip`` operators.  When the extension is missing
(not built, or built against another torch) the package still works with the pure-PyTorch
reference code and a one-line warning is printed once.
"""
from __future__ import annotations

_STATE = {"loaded": None, "error": None}


def load_extension(warn_if_missing: bool = True) -> bool:
    if _STATE["loaded"] is None:
        try:
            import torch  # noqa: F401  (the extension links against libtorch)

            from . import _C  # noqa: F401

            _STATE["loaded"] = True
        except Exception as exc:  # ImportError, OSError (undefined symbol), ...
            _STATE["loaded"] = False
            _STATE["error"] = f"{type(exc).__name__}: {exc}"
            if warn_if_missing:
                from .utils.log import warn

                warn("compiled extension distmlip._C not available "
                     f"({_STATE['error'].splitlines()[0]}); using the pure-PyTorch reference")
    return bool(_STATE["loaded"])


def extension_error() -> str | None:
    return _STATE["error"]


# Operators of distmlip._C with a CPU kernel and, by design for now, no CUDA kernel, each with what
# the plan (models/backend.py) runs on a GPU instead.  The plan needs no list: it asks
# has_kernel(op, "cuda"), which is False for these.  The list is what `make cuda-build-check`
# (tools/cuda_build_check.py) holds a CUDA build to: every operator with a CPU kernel must have a
# CUDA kernel or be named here, and none named here may have one (so the list stays true).
CPU_ONLY_OPS = {
    "chebyshev_forward_moments": "CPU forward that also keeps the angular moments for the CPU VJP/JVP; "
                                 "on a GPU the descriptor runs chebyshev_forward",
    "bpnn_nets_forward": "compiled networks (csrc/nets_cpu.cpp); on a GPU: networks torch",
    "bpnn_nets_backward": "compiled networks (csrc/nets_cpu.cpp); on a GPU: networks torch",
    "bpnn_energy_forces": "one-node force operator (csrc/bpnn_forces_cpu.cpp); on a GPU: forces closed-form",
    "bpnn_energy_forces_virial": "one-node force operator with the virial (stress); on a GPU: stress by "
                                 "autograd through strained image shifts",
    "bpnn_energy_forces_backward": "one-node force operator (csrc/bpnn_forces_cpu.cpp); on a GPU: forces "
                                   "closed-form",
    "energy_force_loss": "compiled loss (csrc/bpnn_forces_cpu.cpp); on a GPU: loss torch (training/losses.py)",
    "neighbor_pairs": "neighbour pairs of one structure (csrc/neighbors_cpu.cpp) from numpy positions; "
                      "lists are built on the host for every device",
    "neighbor_type_minima": "per element-pair shortest distances of one structure (csrc/neighbors_cpu.cpp), "
                            "for the training-data record; computed on the host for every device",
}


def registered_ops(dispatch_key: str = "CPU") -> list[str]:
    """Names (without the ``distmlip::`` prefix) of the extension's operators that have a kernel
    for ``dispatch_key``, as the dispatcher lists them (empty when the extension is not loaded)."""
    if not load_extension(warn_if_missing=False):
        return []
    import torch

    prefix = "distmlip::"
    return sorted(name[len(prefix):] for name in torch._C._dispatch_get_registrations_for_dispatch_key(dispatch_key)
                  if name.startswith(prefix))


# (operator, device type) -> whether the extension registered a kernel for it.  The one piece of
# module state about the compiled code: what it provides does not change within a process.
_KERNELS: dict = {}
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def has_kernel(op: str, device: str = "cpu") -> bool:
    """Whether ``torch.ops.distmlip.<op>`` exists and has a kernel for ``device`` (a device
    type).  Asked of the dispatcher, so a CUDA torch running a CPU-only build of the extension
    gets False for 'cuda' instead of an error at the first call."""
    key = (op, device)
    ok = _KERNELS.get(key)
    if ok is None:
        ok = False
        if device in _DISPATCH_KEYS and load_extension(warn_if_missing=False):
            import torch

            try:
                ok = bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"distmlip::{op}",
                                                                          _DISPATCH_KEYS[device]))
            except RuntimeError:  # operator not defined in this build
                ok = False
            if ok and device == "cuda":
                ok = torch.cuda.is_available()
        _KERNELS[key] = ok
    return ok
