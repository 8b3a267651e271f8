"""Orthogonal rotations for outlier-free quantization (QuaRot): Hadamard matrices and their folding."""
