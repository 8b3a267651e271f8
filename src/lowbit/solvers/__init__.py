"""Solvers shared by several methods: the Hessian column sweep, its int column format, storage accounting.

Pure tensor math below ``lowbit.methods``; nothing here imports methods or the pipeline.
"""

from lowbit.solvers.affine import AffineCodes, AffineColumns, Segment, check_int_spec, group_qparams, group_width
from lowbit.solvers.hessian import ColumnFormat, Solution, act_order, inverse_cholesky, prepare, solve, sweep
from lowbit.solvers.storage import CodeBlock, bits_per_weight

__all__ = [
    "AffineCodes", "AffineColumns", "Segment", "check_int_spec", "group_qparams", "group_width",
    "ColumnFormat", "Solution", "act_order", "inverse_cholesky", "prepare", "solve", "sweep",
    "CodeBlock", "bits_per_weight",
]
