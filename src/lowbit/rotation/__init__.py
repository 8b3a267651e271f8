"""Orthogonal channel maps for outlier-free quantization: Hadamard matrices, the online rotations of
layer inputs, and channel permutations (RPTQ's reorder).  The steps that use them (QuaRot, RPTQ)
are in ``lowbit.transforms``."""
