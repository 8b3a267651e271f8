"""Low-rank factorization of a weight ``W`` (out, in) into ``A`` (out, r) @ ``B`` (r, in), pure tensor math.

* plain truncated SVD: the best rank-r approximation of ``W`` itself (Eckart-Young);
* ASVD (Yuan et al., 2023): SVD of ``W S`` with ``S = diag(mean|x_j|)^alpha`` (input channels by activation
  magnitude), ``B`` scaled back by ``S^-1``: loud input channels are kept more faithfully;
* SVD-LLM (Wang et al., 2024): whitening by the Cholesky factor ``L`` of the calibration Gram matrix
  ``X^T X = L L^T``; truncating the SVD of ``W L`` then minimises the output error ``||X (W - A B)^T||_F``
  exactly, each dropped singular value being exactly the output error it adds;
* LoRC (Yao et al., 2023): a low-rank correction ``A B`` of a quantization error ``W - Q``.

Ranks come from a parameter budget (``A`` and ``B`` together hold at most ``fraction`` of ``W``'s parameters)
or from the retained share of the squared singular values.  The factors split the singular values evenly
(``A = U sqrt(S)``, ``B = sqrt(S) V^T``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Factors:
    """``A @ B`` approximates the weight; ``singular`` are the (whitened) singular values, all of them."""

    a: torch.Tensor  # (out, r)
    b: torch.Tensor  # (r, in)
    singular: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    def product(self) -> torch.Tensor:
        return self.a @ self.b


def rank_for_budget(out_features: int, in_features: int, fraction: float) -> int:
    """The largest rank whose two factors hold at most ``fraction`` of the ``out x in`` parameters (at least 1)."""
    return max(1, int(fraction * out_features * in_features // (out_features + in_features)))


def rank_for_energy(singular: torch.Tensor, energy: float) -> int:
    """The smallest rank keeping ``energy`` of the sum of squared singular values."""
    sq = singular.double().square()
    kept = torch.cumsum(sq, 0) / sq.sum().clamp_min(1e-300)
    return int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12).item()) + 1


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root.unsqueeze(1) * vh[:rank]


def _rank(s: torch.Tensor, shape: torch.Size, rank: int | None, fraction: float | None, energy: float | None) -> int:
    if rank is None:
        rank = rank_for_energy(s, energy) if energy is not None else rank_for_budget(shape[0], shape[1], fraction or 0.5)
    return max(1, min(rank, s.numel()))


def svd_factors(w: torch.Tensor, rank: int | None = None, fraction: float | None = None,
                energy: float | None = None) -> Factors:
    """Plain truncated SVD of ``w`` at ``rank`` (or the rank of ``fraction`` / ``energy``)."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    a, b = _split(u, s, vh, _rank(s, w.shape, rank, fraction, energy))
    return Factors(a.to(w.dtype), b.to(w.dtype), s)


def asvd_factors(w: torch.Tensor, act_absmean: torch.Tensor, alpha: float = 0.5, rank: int | None = None,
                 fraction: float | None = None, energy: float | None = None) -> Factors:
    """ASVD: SVD of ``w diag(s)`` with ``s = act_absmean^alpha``, then ``B diag(s)^-1``."""
    scale = act_absmean.double().clamp_min(1e-6).pow(alpha).to(w.device)
    u, s, vh = torch.linalg.svd(w.double() * scale, full_matrices=False)
    a, b = _split(u, s, vh, _rank(s, w.shape, rank, fraction, energy))
    return Factors(a.to(w.dtype), (b / scale).to(w.dtype), s)


def whitening(gram: torch.Tensor, damp: float = 1e-6) -> torch.Tensor:
    """Lower Cholesky factor ``L`` of ``X^T X`` (a relative ``damp`` on the diagonal, raised x10 until it factors)."""
    g = gram.double()
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    mean = g.diagonal().mean().clamp_min(1e-300)
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(g + damp * mean * eye)
        if int(info) == 0:
            return chol
        damp *= 10
    raise ValueError("the calibration Gram matrix did not factor even with dampening; use more calibration tokens")


def svd_llm_factors(w: torch.Tensor, gram: torch.Tensor, rank: int | None = None, fraction: float | None = None,
                    energy: float | None = None) -> Factors:
    """SVD-LLM: SVD of ``W L`` (``L L^T = X^T X``), ``B = V_r^T L^-1``; minimises ``||X (W - A B)^T||``."""
    chol = whitening(gram.to(w.device))
    u, s, vh = torch.linalg.svd(w.double() @ chol, full_matrices=False)
    a, b = _split(u, s, vh, _rank(s, w.shape, rank, fraction, energy))
    b = torch.linalg.solve_triangular(chol, b, upper=False, left=False)  # b L^-1
    return Factors(a.to(w.dtype), b.to(w.dtype), s)


def lorc_correction(w: torch.Tensor, wq: torch.Tensor, rank: int, gram: torch.Tensor | None = None) -> Factors:
    """LoRC: rank-``rank`` factors of the quantization error ``w - wq`` (whitened by ``gram`` when given, so
    the correction minimises the output error)."""
    err = w.double() - wq.double()
    f = svd_llm_factors(err, gram, rank) if gram is not None else svd_factors(err, rank)
    return Factors(f.a.to(w.dtype), f.b.to(w.dtype), f.singular)
