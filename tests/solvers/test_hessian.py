"""The Hessian solver against the textbook column-by-column update, its mask hook, and dampening retry.

The reference (``textbook``) quantizes column ``j``, spreads ``(w_j - q_j) / [H^-1]_jj`` over the later
columns with row ``j`` of the *current* inverse Hessian, then eliminates ``j`` from ``H^-1`` (rank-one
downdate): no Cholesky factor, no lazy blocks.  Both run in float64, so they agree to rounding.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from lowbit.core.affine import spec_qparams
from lowbit.errors import LowbitError
from lowbit.solvers.affine import AffineColumns, Segment, group_qparams
from lowbit.solvers.hessian import act_order, inverse_cholesky, prepare, solve
from lowbit.spec import QuantSpec

Quant = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]  # (sweep column, x, current W) -> new x
ASYM3 = QuantSpec(type="int", bits=3, granularity="group", group_size=8, symmetric=False, signed=False)
SYM4 = QuantSpec(type="int", bits=4, granularity="group", group_size=8)
INT8_ROW = QuantSpec(type="int", bits=8, granularity="channel")


def _problem(rows: int = 12, cols: int = 40, n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 weight and ``H = 2/n X^T X`` of correlated inputs, one dead input (column 5)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g, dtype=torch.float64)
    x = x @ (torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols**0.5 + torch.eye(cols))
    x[:, 5] = 0
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return w, 2.0 / n * x.T @ x


def _prepared(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``prepare`` (dead column handling) kept in float64 for the comparisons."""
    wp, hp = prepare(w, h)
    dead = torch.diag(h) == 0
    h = h.clone()
    h[dead, dead] = 1
    w = w.clone()
    w[:, dead] = 0
    assert torch.equal(wp, w.float()) and torch.equal(hp, h.float())
    return w, h


def textbook(w: torch.Tensor, h: torch.Tensor, perm: torch.Tensor, quant: Quant, damp: float = 0.01,
             stop: int | None = None, prune: Callable | None = None, block: int = 0) -> torch.Tensor:
    """OBQ column by column on the explicit inverse Hessian; ``prune(W_block, diag(d_block))`` at each block start."""
    w, h = w[:, perm].clone(), h[perm][:, perm]
    cols = w.shape[1]
    stop = cols if stop is None else stop
    hinv = torch.linalg.inv(h + damp * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype))
    d = _pivots(hinv)
    mask = None
    for j in range(stop):
        if prune is not None and j % block == 0:
            end = min(j + block, stop)
            mask = prune(w[:, j:end].clone(), torch.diag(d[j:end]))
        x = w[:, j].clone()
        m = None if mask is None else mask[:, j % block]
        q = quant(j, x if m is None else x.masked_fill(m, 0), w)
        q = q if m is None else q.masked_fill(m, 0)
        e = (x - q) / hinv[j, j]
        w[:, j:] -= e[:, None] * hinv[j, j:][None, :]
        w[:, j] = q
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return w[:, torch.argsort(perm)]


def _pivots(hinv: torch.Tensor) -> torch.Tensor:
    """``sqrt`` of each column's ``[H^-1]_jj`` once the earlier columns are eliminated (= the Cholesky ``U_jj``)."""
    d = []
    for j in range(hinv.shape[0]):
        d.append(hinv[j, j].sqrt())
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return torch.stack(d)


def _affine_ref(w0: torch.Tensor, perm: torch.Tensor, segments: list[tuple[QuantSpec, int, int]],
                static: bool) -> Quant:
    """Naive grid per sweep column: dynamic groups fitted on the current W at their first column, or static
    groups of original columns fitted on ``w0``."""
    spans = []  # (start, end, spec, group)
    start = 0
    for spec, width, group in segments:
        spans.append((start, start + width, spec, group))
        start += width
    params: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def fit(block: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        return spec_qparams(block.amin(1), block.amax(1), spec)

    def quant(j: int, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        lo, hi, spec, group = next(s for s in spans if s[0] <= j < s[1])
        if static:
            g = int(perm[j]) // group
            s, z = fit(w0[:, g * group : (g + 1) * group], spec)
        else:
            if (j - lo) % group == 0:
                params["cur"] = fit(w[:, j : min(j + group, hi)], spec)
            s, z = params["cur"]
        s, z = s.double(), z.double()
        return s * (torch.clamp(torch.round(x / s) + z, spec.qmin, spec.qmax) - z)

    return quant


CASES = {  # segments (spec, width, group), act-order, static groups, keep_last, block size
    "gptq": ([(ASYM3, 40, 8)], False, False, 0, 16),
    "gptq-act-order": ([(SYM4, 40, 8)], True, False, 0, 7),
    "gptq-act-order-static": ([(ASYM3, 40, 8)], True, True, 0, 7),
    "owq-keep-last": ([(ASYM3, 37, 8)], True, False, 3, 16),  # a partial last group, 3 compensated columns
    "atom-two-segments": ([(ASYM3, 34, 8), (INT8_ROW, 6, 6)], False, False, 0, 16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_solve_matches_textbook_reference(case):
    segments, use_act_order, static, keep, block = CASES[case]
    w, h = _prepared(*_problem())
    perm = act_order(h) if use_act_order else torch.arange(40)
    fmt = AffineColumns(perm, [Segment(*s) for s in segments], static_groups=static)
    sol = solve(w, h, fmt, perm, damp=0.01, block_size=block, keep_last=keep)
    ref = textbook(w, h, perm, _affine_ref(w, perm, segments, static), stop=40 - keep)
    # measured max |difference| 1.3e-15 (owq-keep-last: its fp columns), 0 in the other four cases (same codes)
    assert (sol.weight - ref).abs().max().item() < 1e-10
    # the stored parts rebuild the quantized columns; kept columns have no group
    parts = fmt.result()
    q = parts.g_idx >= 0
    assert int(q.sum()) == 40 - keep
    gi = parts.g_idx[q].long().expand(12, -1)
    deq = parts.scale.gather(1, gi) * (parts.codes[:, q].double() - parts.zero.gather(1, gi))
    assert torch.equal(deq, sol.weight[:, q])


def test_static_groups_follow_original_columns_under_act_order():
    w, h = _prepared(*_problem(seed=1))
    perm = act_order(h)
    fmt = AffineColumns(perm, [Segment(ASYM3, 40, 8)], static_groups=True)
    solve(w, h, fmt, perm)
    parts = fmt.result()
    assert torch.equal(parts.g_idx, torch.arange(40, dtype=torch.int32) // 8)
    for g in range(5):  # fitted on the un-updated weights of original columns 8g .. 8g+7
        s, z = group_qparams(w[:, 8 * g : 8 * g + 8], ASYM3)
        assert torch.equal(parts.scale[:, g], s.double()) and torch.equal(parts.zero[:, g], z.double())


def test_block_size_does_not_change_the_result():
    w, h = _prepared(*_problem(seed=2))
    perm = act_order(h)
    runs = [solve(w, h, AffineColumns(perm, [Segment(SYM4, 40, 8)]), perm, block_size=b).weight for b in (1, 5, 8, 64)]
    for r in runs[1:]:
        assert (r - runs[0]).abs().max().item() < 1e-12  # measured max difference 0 (same codes, same scales)


class _FullPrecision:
    """A column format that keeps every value (only the mask hook changes anything)."""

    def begin(self, w: torch.Tensor, hinv: torch.Tensor) -> None:
        pass

    def group_start(self, col: int) -> int:
        return 0

    def fit_group(self, col: int, block: torch.Tensor) -> None:
        raise AssertionError("no groups")

    def quantize(self, col: int, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def _prune_half(w_block: torch.Tensor, hinv_block: torch.Tensor) -> torch.Tensor:
    """SparseGPT's rule: per row, the half of the block with the smallest ``(w / U_jj)^2``."""
    score = (w_block / torch.diagonal(hinv_block)).square()
    idx = score.topk(w_block.shape[1] // 2, dim=1, largest=False).indices
    return torch.zeros_like(w_block, dtype=torch.bool).scatter_(1, idx, True)


def test_mask_hook_matches_naive_pruning():
    w, h = _prepared(*_problem(seed=3))
    perm = torch.arange(40)
    masks: list[torch.Tensor] = []

    def hook(w_block: torch.Tensor, hinv_block: torch.Tensor) -> torch.Tensor:
        masks.append(_prune_half(w_block, hinv_block))
        return masks[-1]

    sol = solve(w, h, _FullPrecision(), perm, block_size=16, on_block_start=hook)
    ref = textbook(w, h, perm, lambda j, x, w_: x, prune=_prune_half, block=16)
    mask = torch.cat(masks, dim=1)
    assert mask.shape == (12, 40) and int(mask.sum()) == 12 * (8 + 8 + 4)
    assert torch.equal(sol.weight == 0, mask | (w == 0))  # pruned weights stay exactly 0 (column 5 was dead)
    assert torch.equal(ref == 0, sol.weight == 0)  # the same weights were pruned
    # measured max |difference| 2.9e-15: the kept weights received the pruned ones' error feedback
    assert (sol.weight - ref).abs().max().item() < 1e-10
    moved = (sol.weight - w)[~mask].abs().max().item()
    assert moved > 0.1  # measured 1.32: the feedback is not a no-op


def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse():
    _, h = _prepared(*_problem(seed=4))
    u, damp = inverse_cholesky(h, 0.01)
    target = torch.linalg.inv(h + 0.01 * torch.diag(h).mean() * torch.eye(40, dtype=h.dtype))
    assert damp == 0.01 and torch.equal(u, u.triu())
    assert (u.T @ u - target).abs().max().item() < 1e-10  # measured 4.1e-14 (float64)


def test_damping_is_raised_until_the_factorisation_succeeds():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 64, generator=g)
    h = x.T @ x  # rank 8 of 64
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(h + 1e-9 * torch.diag(h).mean() * torch.eye(64))
    u, damp = inverse_cholesky(h, 1e-9)
    assert 1e-9 < damp <= 1e-4  # float32: 1e-9 .. 1e-7 fail, 1e-6 succeeds (measured)
    u2, damp2 = inverse_cholesky(h, damp)
    assert damp2 == damp and torch.equal(u, u2)  # the retry is the plain factorisation at the raised dampening
    w = torch.randn(16, 64, generator=g)
    sol = solve(w, h, AffineColumns(torch.arange(64), [Segment(SYM4, 64, 8)]), damp=1e-9)
    assert sol.damp == damp and bool(torch.isfinite(sol.weight).all())


def test_a_hessian_that_never_factorises_is_a_clear_error():
    with pytest.raises(LowbitError, match="stayed singular"):
        inverse_cholesky(-torch.eye(8), 0.01)  # negative definite: no dampening helps


def test_prepare_handles_dead_inputs_and_leaves_inputs_alone():
    w, h = _problem(rows=4, cols=10, n=32)
    w0, h0 = w.clone(), h.clone()
    wp, hp = prepare(w, h)
    assert wp.dtype == hp.dtype == torch.float32
    assert (wp[:, 5] == 0).all() and hp[5, 5] == 1 and (hp[5, :5] == 0).all()
    assert torch.equal(w, w0) and torch.equal(h, h0)
