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
