"""Build script for distmlip.

The compiled extension ``distmlip._C`` holds the fused descriptor kernels (csrc/).  CUDA sources
are compiled only when the installed torch was built with CUDA and a CUDA toolkit is found;
the CPU torch wheel used on CI has no CUDA headers, so there the extension is C++ only.
Install with ``pip install --no-build-isolation -e .`` so the extension is built against the
torch that is already installed.

Environment: ``CUDA_HOME`` (the CUDA toolkit; checked to hold the CUDA headers),
``TORCH_CUDA_ARCH_LIST`` (GPU architectures to compile for, e.g. ``9.0``; needed where no GPU is
visible), ``DISTMLIP_NO_CUDA=1`` (C++ only), ``DISTMLIP_REQUIRE_CUDA=1`` (fail instead of building
C++ only; ``make cuda-build-check`` and ``tools/build_cuda_ext.sh`` set it).
"""
import glob
import os

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}
try:
    import torch
    from torch.utils import cpp_extension

    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cu_sources = sorted(glob.glob("csrc/*.cu"))
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("DISTMLIP_NO_CUDA", "0") != "1"
    )
    if with_cuda and not os.path.isfile(os.path.join(cpp_extension.CUDA_HOME, "include", "cuda_runtime_api.h")):
        # torch guesses CUDA_HOME from where nvcc is found (/usr/local for a wrapper in
        # /usr/local/bin): the build would then stop at the first CUDA header, far from the cause
        raise SystemExit(
            f"setup.py: CUDA_HOME={cpp_extension.CUDA_HOME} has no include/cuda_runtime_api.h; set "
            "CUDA_HOME to the CUDA toolkit (e.g. CUDA_HOME=/usr/local/cuda), or DISTMLIP_NO_CUDA=1 "
            "for a CPU-only build")
    if os.environ.get("DISTMLIP_REQUIRE_CUDA", "0") == "1" and not with_cuda:
        # the CUDA build check (make cuda-build-check): a CPU-only build is an error, with the reason
        why = ("torch has no CUDA (torch.version.cuda is None: install a CUDA build of torch)"
               if torch.version.cuda is None else
               "no CUDA toolkit found (set CUDA_HOME, e.g. CUDA_HOME=/usr/local/cuda)"
               if cpp_extension.CUDA_HOME is None else "DISTMLIP_NO_CUDA=1 is set")
        raise SystemExit(f"setup.py: DISTMLIP_REQUIRE_CUDA=1 but the CUDA kernels would not be built: {why}")
    # -Wno-psabi: the CPU kernels use 4-double vector types in always-inlined helpers; gcc's note
    # that passing them by value would change the ABI without AVX does not apply
    # DISTMLIP_CXX_OPT: the C++ files' optimisation level.  -O0 compiles the CPU kernels in a
    # sixth of the time: for a quick GPU correctness run (gpu_check.sh --quick), where the CPU
    # kernels are only the reference, never for timing
    opt = os.environ.get("DISTMLIP_CXX_OPT", "-O3")
    if opt not in ("-O0", "-O1", "-O2", "-O3"):
        raise SystemExit(f"setup.py: DISTMLIP_CXX_OPT={opt!r}: expected -O0, -O1, -O2 or -O3")
    extra = {"cxx": [opt, "-std=c++17", "-fopenmp", "-fno-math-errno", "-Wno-psabi"]}
    define_macros = []
    if with_cuda:
        extra["nvcc"] = ["-O3", "--use_fast_math", "-std=c++17"]
        define_macros.append(("DISTMLIP_WITH_CUDA", "1"))
        ext = cpp_extension.CUDAExtension(
            "distmlip._C",
            cpp_sources + cu_sources,
            extra_compile_args=extra,
            define_macros=define_macros,
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "distmlip._C",
            cpp_sources,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    ext_modules = [ext]
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}
except ImportError:  # torch missing: pure-Python install, the package warns at import
    pass

setup(
    name="distmlip",
    version="0.1.0",
    description="Distributed training of Behler-Parrinello (aenet Chebyshev) interatomic potentials "
    "with GPR data augmentation",
    packages=find_packages(include=["distmlip", "distmlip.*"]),
    python_requires=">=3.10",
    install_requires=["numpy", "h5py", "ase", "pyyaml", "scipy", "threadpoolctl"],
    # `distmlip export --format metatomic` (optional; measured to install with torch 2.13)
    extras_require={"metatomic": ["metatomic-torch>=0.1.19", "metatomic-ase>=0.1.4"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["distmlip=distmlip.cli:main"]},
)
