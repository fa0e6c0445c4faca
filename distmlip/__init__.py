"""distmlip: distributed training of Behler-Parrinello potentials on aenet Chebyshev
descriptors, with GPR-ANN data augmentation.

Pipeline folders: ``data`` (HDF5 store, convert, streaming), ``descriptors`` (Chebyshev
descriptor, neighbour lists, fused kernels), ``models`` (per-element networks, ZBL),
``training`` (trainer, losses, checkpoints), ``gpr`` (GPR-ANN augmentation),
``distributed`` (MPI / torch.distributed context), ``evaluation`` (metrics, calculator,
exports, MD checks).
"""
__version__ = "0.1.0"
