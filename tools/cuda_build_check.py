"""Check a CUDA build of distmlip._C without a GPU: it loads, and every operator with a CPU kernel
also has a CUDA kernel, unless distmlip/_ext.py CPU_ONLY_OPS declares it CPU-only.

usage: python tools/cuda_build_check.py BUILD_LIB      (the folder holding distmlip/_C*.so)

Run with the (CUDA) torch the extension was built against; `make cuda-build-check` builds it with
tools/build_cuda_ext.sh and runs this.  No GPU is needed: loading the library registers its
kernels with torch's dispatcher, which is what is asked.  Prints one line per operator; exits 1
when the library does not load, was built without CUDA, an operator lacks a CUDA kernel without
being declared CPU-only, or a declared CPU-only operator has a CUDA kernel or no longer exists.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_built_extension(build_lib: Path):
    """Import the built ``distmlip/_C*.so`` of ``build_lib`` as ``distmlip._C`` (the source tree's
    distmlip package, pure Python, supplies _ext; its own _C*.so, the CPU build, is not loaded)."""
    sos = sorted((build_lib / "distmlip").glob("_C*.so"))
    if len(sos) != 1:
        raise SystemExit(f"cuda_build_check: expected one distmlip/_C*.so under {build_lib}, found {sos}")
    sys.path.insert(0, str(REPO))
    import distmlip  # noqa: F401  (the package __init__ imports nothing)

    loader = importlib.machinery.ExtensionFileLoader("distmlip._C", str(sos[0]))
    spec = importlib.util.spec_from_file_location("distmlip._C", sos[0], loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    sys.modules["distmlip._C"] = mod    # _ext.load_extension() finds this one
    return sos[0], mod


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    import torch

    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), torch.cuda.is_available() = "
          f"{torch.cuda.is_available()}")
    if torch.version.cuda is None:
        print("FAIL: this torch has no CUDA; run with the torch the CUDA extension was built against")
        return 1
    try:
        so, mod = load_built_extension(Path(argv[0]).resolve())
    except Exception as exc:  # ImportError, OSError: undefined symbol, missing library
        print(f"FAIL: the CUDA build of distmlip._C does not load: {type(exc).__name__}: {exc}")
        return 1
    print(f"loaded {so} (with_cuda() = {mod.with_cuda()})")
    if not mod.with_cuda():
        print("FAIL: the extension was built without its CUDA kernels (DISTMLIP_WITH_CUDA unset)")
        return 1

    from distmlip import _ext

    ops = _ext.registered_ops("CPU")
    if not ops:
        print("FAIL: the extension registers no operator with a CPU kernel")
        return 1
    declared = _ext.CPU_ONLY_OPS
    problems = []
    width = max(len(op) for op in ops + list(declared))
    print(f"\n{'operator':<{width}}  CPU  CUDA  status")
    for op in ops:
        cuda = torch._C._dispatch_has_kernel_for_dispatch_key(f"distmlip::{op}", "CUDA")
        if cuda and op in declared:
            status = "FAIL: has a CUDA kernel but is declared CPU-only (remove it from _ext.CPU_ONLY_OPS)"
            problems.append(op)
        elif cuda:
            status = "ok: CUDA kernel"
        elif op in declared:
            status = f"ok: CPU-only (declared: {declared[op]})"
        else:
            status = ("FAIL: no CUDA kernel (add one in csrc/*cuda*, or declare the operator in "
                      "distmlip/_ext.py CPU_ONLY_OPS with what runs on a GPU instead)")
            problems.append(op)
        print(f"{op:<{width}}  yes  {'yes' if cuda else 'no ':<4}  {status}")
    for op in sorted(set(declared) - set(ops)):
        print(f"{op:<{width}}  no   -     FAIL: declared CPU-only but the extension has no such operator "
              "(remove it from _ext.CPU_ONLY_OPS)")
        problems.append(op)
    n_cuda = sum(torch._C._dispatch_has_kernel_for_dispatch_key(f"distmlip::{op}", "CUDA") for op in ops)
    print(f"\n{len(ops)} operators with a CPU kernel: {n_cuda} with a CUDA kernel, "
          f"{len(ops) - n_cuda} CPU-only ({len(declared)} declared)")
    if problems:
        print(f"FAIL: {len(problems)} operator(s): {', '.join(problems)}")
        return 1
    print("OK: the CUDA build loads and covers every operator not declared CPU-only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
