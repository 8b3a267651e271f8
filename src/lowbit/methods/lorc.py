"""LoRC (low-rank compensation, ZeroQuant-V2): after a step rounds a layer, add the best rank-r approximation
of its rounding error ``W - Q(W)`` as two fp16 factors, so the layer computes ``Q(W) + A B``.

Any rounding step takes it as the option ``lorc_rank`` (0: off)::

    methods:
      - {method: gptq, spec: W3_G64, options: {lorc_rank: 32}}

Where the step collected the layer's input Gram matrix (GPTQ and the other Hessian-based steps), the error is
factorized in the whitened space (SVD-LLM's whitening: the correction minimises the layer's output error);
otherwise plain SVD, as in the paper.  The factors add ``16 r (in + out)`` bits to the layer's count.  The
layer's weight is then no longer a grid's: it saves as fake-quant (dense weights any transformers loads).
"""

from __future__ import annotations

import torch

from lowbit.core.lowrank import lorc_correction
from lowbit.methods.base import LayerResult

REFUSAL = "LoRC added a full-precision low-rank correction to the codes"


def lorc_factors(w: torch.Tensor, wq: torch.Tensor, rank: int,
                 gram: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 factors ``(A, B)`` (out x r, r x in) of the rank-``rank`` correction of ``w - wq``."""
    f = lorc_correction(w.float(), wq.float(), rank, gram)
    return f.a.to(torch.float16), f.b.to(torch.float16)


def with_lorc(res: LayerResult, w: torch.Tensor, rank: int, gram: torch.Tensor | None) -> LayerResult:
    """``res`` (a rounding of ``w``) with its rank-``rank`` LoRC correction added to the weight and the count."""
    a, b = lorc_factors(w, res.weight, rank, gram)
    rows, cols = w.shape
    res.weight = (res.weight.float() + a.float() @ b.float()).to(w.dtype)
    res.bits_per_weight += 16 * rank * (rows + cols) / (rows * cols)
    res.extra_params += rank * (rows + cols)
    res.artifacts["lorc"] = (a, b)
    res.form, res.int_refusal = None, REFUSAL
    return res
