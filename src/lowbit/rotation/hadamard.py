"""Hadamard matrices of any order ``2^k * m`` where ``m`` is 1 or ``q + 1`` for a prime ``q = 3 (mod 4)``.

Sylvester doubling gives the powers of two; Paley's first construction gives order ``q + 1``;
their Kronecker product gives the rest (e.g. 576 = 72 x 8 with q = 71, 1536 = 12 x 128 with
q = 11).  ``random_hadamard(n, seed)`` is ``H diag(+-1) / sqrt(n)``: orthogonal, and it spreads
any one large coordinate evenly over all of them, which is what removes activation outliers.
"""

from __future__ import annotations

import math

import torch

from lowbit.errors import LowbitError


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(math.isqrt(q)) + 1))


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _paley1(q: int) -> torch.Tensor:
    """Order ``q + 1`` from the quadratic residues mod a prime ``q = 3 (mod 4)``."""
    residues = {(i * i) % q for i in range(1, q)}
    idx = torch.arange(q)
    diff = (idx.view(1, -1) - idx.view(-1, 1)) % q
    chi = torch.zeros(q, q, dtype=torch.float64)
    for r in range(1, q):
        chi[diff == r] = 1.0 if r in residues else -1.0
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = chi
    return s + torch.eye(q + 1, dtype=torch.float64)


def _odd_factor(n: int) -> tuple[int, int] | None:
    """``(m, 2^k)`` with ``n = m * 2^k`` and a known order-``m`` construction, smallest ``m`` first."""
    p = 1
    candidates = []
    while n % p == 0:
        m = n // p
        if m == 1 or (m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3):
            candidates.append((m, p))
        p *= 2
    return min(candidates) if candidates else None


def hadamard(n: int) -> torch.Tensor:
    """An ``n x n`` matrix of +-1 with ``H H^T = n I`` (float64), or a LowbitError for an order not covered."""
    f = _odd_factor(n)
    if f is None:
        raise LowbitError(f"no Hadamard matrix of order {n} is built in (orders 2^k * (q + 1), q a prime = 3 mod 4); "
                          "use random orthogonal rotations for this width")
    m, p = f
    h = _sylvester(p)
    return h if m == 1 else torch.kron(_paley1(m - 1), h)


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """Orthogonal ``H diag(s) / sqrt(n)`` with random signs ``s`` (float64); a random orthogonal matrix
    (QR of a Gaussian) where no Hadamard matrix of order ``n`` is built in."""
    g = torch.Generator().manual_seed(seed)
    try:
        h = hadamard(n)
    except LowbitError:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r)).view(1, -1)
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return h * signs.view(1, -1) / math.sqrt(n)
