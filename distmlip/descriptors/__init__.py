"""distmlip.descriptors: the descriptor spec and registry (``spec``), neighbour lists, batch
collation, the aenet Chebyshev descriptor (pure-PyTorch reference and fused kernels) and the
descriptor cache.  Nothing is imported here, so that importing one module does not load the others."""
