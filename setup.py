"""Build script for distmlip.

The compiled extension ``distmlip._C`` holds the fused descriptor kernels (csrc/).  CUDA sources
are compiled only when the installed torch was built with CUDA and a CUDA toolkit is found;
the CPU torch wheel used on CI has no CUDA headers, so there the extension is C++ only.
Install with ``pip install --no-build-isolation -e .`` so the extension is built against the
torch that is already installed.
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
    # -Wno-psabi: the CPU kernels use 4-double vector types in always-inlined helpers; gcc's note
    # that passing them by value would change the ABI without AVX does not apply
    extra = {"cxx": ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-Wno-psabi"]}
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
    install_requires=["numpy", "h5py", "ase", "pyyaml", "scipy"],
    # `distmlip export --format metatomic` (optional; measured to install with torch 2.13)
    extras_require={"metatomic": ["metatomic-torch>=0.1.19", "metatomic-ase>=0.1.4"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["distmlip=distmlip.cli:main"]},
)
