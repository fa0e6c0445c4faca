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
