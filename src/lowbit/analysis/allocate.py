"""Mixed-precision allocation as a multiple-choice knapsack (pure math, no model).

Layer ``i`` takes exactly one option ``k`` with an exact storage cost ``costs[i][k]`` (integer
bits: codes + scales + zero points) and a predicted loss ``losses[i][k]`` (its measured
sensitivity, e.g. the KL when only that layer is quantized that way).  Losses are assumed
additive across layers (the first-order assumption of HAWQ-V2/V3's ILP and of other
mixed-precision allocators: interactions between layers are ignored).  We minimise
``sum_i losses[i][k_i]`` subject to ``sum_i costs[i][k_i] <= budget``.

Solvers:

* ``dp``: dynamic programming over the budget in units of the greatest common divisor of the
  cost differences; exact whenever that grid has at most ``max_cells`` cells (smollm2-135m with
  g64 formats: about 3e4 cells).  Beyond that the costs are rounded *up* to a coarser grid: still
  feasible, no longer guaranteed optimal.
* ``greedy``: the Lagrangian relaxation solved exactly through each layer's lower convex hull
  (upgrades applied in order of loss saved per bit, i.e. sweeping the multiplier), then a greedy
  upgrade pass over every option with the bits left.  Its loss is at most the LP lower bound plus
  the largest single hull step of any layer.
* ``auto``: ``dp`` when exact, otherwise both, keeping the better.

Budgets below the all-cheapest cost raise a LowbitError naming the minimum; budgets above the
all-most-expensive cost raise one naming the maximum (nothing can spend them, and a target no
allocation reaches is most likely a mistake).  Between the cost of "every layer at its lowest-loss
option" and that maximum, that allocation is returned (``saturated``).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np

from lowbit.errors import LowbitError

MAX_CELLS = 1 << 18  # DP grid cells; the choice table is layers x cells bytes


@dataclass
class Allocation:
    """The chosen option index per layer, its total cost and loss, and how it was found."""

    choice: list[int]
    cost: int
    loss: float
    lower_bound: float  # the LP (Lagrangian) relaxation's optimum: no allocation within budget does better
    method: str
    exact: bool  # provably optimal for the additive model
    saturated: bool = False  # the budget covers every layer's lowest-loss option


def _check(costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]]) -> None:
    if not costs or len(costs) != len(losses):
        raise LowbitError(f"allocation needs one cost and loss list per layer, got {len(costs)} and {len(losses)}")
    for i, (c, l) in enumerate(zip(costs, losses)):
        if not c or len(c) != len(l) or len(c) > 255:
            raise LowbitError(f"layer {i}: {len(c)} costs and {len(l)} losses; give 1 to 255 options, as many of each")
        if any(int(x) != x or x < 0 for x in c):
            raise LowbitError(f"layer {i}: costs must be non-negative integers (bits), got {list(c)}")
        if any(not math.isfinite(x) for x in l):
            raise LowbitError(f"layer {i}: losses must be finite, got {list(l)}")


def _total(costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]], choice: Sequence[int]) -> tuple[int, float]:
    return (sum(int(c[k]) for c, k in zip(costs, choice)), math.fsum(l[k] for l, k in zip(losses, choice)))


def _hull(cost: Sequence[int], loss: Sequence[float]) -> list[int]:
    """Indices of the lower convex hull of (cost, loss), from the cheapest option to the lowest loss
    (dominated and non-convex options removed; ties go to the cheaper option)."""
    order = sorted(range(len(cost)), key=lambda k: (cost[k], loss[k]))
    frontier: list[int] = []
    for k in order:  # Pareto frontier: strictly lower loss as the cost rises
        if not frontier or loss[k] < loss[frontier[-1]]:
            if frontier and cost[k] == cost[frontier[-1]]:
                frontier.pop()
            frontier.append(k)
    hull: list[int] = []
    for k in frontier:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when it lies on or above the segment a -> k
            if (loss[b] - loss[a]) * (cost[k] - cost[a]) >= (loss[k] - loss[a]) * (cost[b] - cost[a]):
                hull.pop()
            else:
                break
        hull.append(k)
    return hull


def lagrangian_greedy(costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]], budget: int
                      ) -> tuple[list[int], float]:
    """(choice, LP lower bound): hull upgrades by decreasing loss saved per bit while they fit, then a
    greedy pass over all options with what is left."""
    hulls = [_hull(c, l) for c, l in zip(costs, losses)]
    choice = [h[0] for h in hulls]
    pos = [0] * len(hulls)
    spent = sum(int(c[k]) for c, k in zip(costs, choice))
    lp = math.fsum(l[k] for l, k in zip(losses, choice))
    lp_done = False

    def step(i: int) -> tuple[float, int, int] | None:
        if pos[i] + 1 >= len(hulls[i]):
            return None
        a, b = hulls[i][pos[i]], hulls[i][pos[i] + 1]
        dc, dl = int(costs[i][b]) - int(costs[i][a]), losses[i][a] - losses[i][b]
        return (-dl / dc, i, dc)

    heap = [s for s in (step(i) for i in range(len(hulls))) if s is not None]
    heapq.heapify(heap)
    while heap:  # hull steps of one layer have decreasing efficiency, so popping in order is the LP sweep
        neg_eff, i, dc = heapq.heappop(heap)
        if spent + dc <= budget:
            spent += dc
            if not lp_done:
                lp += neg_eff * dc  # neg_eff = -(loss saved per bit)
            pos[i] += 1
            choice[i] = hulls[i][pos[i]]
            nxt = step(i)
            if nxt is not None:
                heapq.heappush(heap, nxt)
        elif not lp_done:  # the one fractional item of the LP relaxation
            lp += neg_eff * (budget - spent)
            lp_done = True
    choice = _greedy_fill(costs, losses, budget, choice)
    return choice, lp


def _greedy_fill(costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]], budget: int,
                 choice: list[int]) -> list[int]:
    """Repeatedly take the single-layer change (any option) with the largest loss saved per extra bit
    that still fits, until none lowers the loss."""
    choice = list(choice)
    spent = sum(int(c[k]) for c, k in zip(costs, choice))
    while True:
        best: tuple[float, int, int] | None = None
        for i, (c, l) in enumerate(zip(costs, losses)):
            k0 = choice[i]
            for k in range(len(c)):
                dl, dc = l[k0] - l[k], int(c[k]) - int(c[k0])
                if dl <= 0 or spent + dc > budget:
                    continue
                eff = math.inf if dc <= 0 else dl / dc
                if best is None or eff > best[0]:
                    best = (eff, i, k)
        if best is None:
            return choice
        _, i, k = best
        spent += int(costs[i][k]) - int(costs[i][choice[i]])
        choice[i] = k


def dp_allocate(costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]], budget: int,
                max_cells: int = MAX_CELLS) -> tuple[list[int], bool]:
    """(choice, exact): DP over the spare budget above the all-cheapest cost, on a grid of the gcd of
    the extra costs (exact) or, when that needs more than ``max_cells`` cells, a coarser grid with
    costs rounded up (feasible, not guaranteed optimal)."""
    base = [min(int(x) for x in c) for c in costs]
    extra = [[int(x) - b for x in c] for c, b in zip(costs, base)]
    spare = budget - sum(base)
    unit = reduce(math.gcd, (x for e in extra for x in e if x), 0) or 1
    exact = spare // unit <= max_cells
    if not exact:
        unit = -(-spare // max_cells)
    cells = spare // unit
    best = np.zeros(cells + 1)  # min loss of the layers so far using at most c units
    picks = np.zeros((len(costs), cells + 1), dtype=np.uint8)
    for i, (e, l) in enumerate(zip(extra, losses)):
        new = np.full(cells + 1, np.inf)
        for k, (x, lk) in enumerate(zip(e, l)):
            w = -(-x // unit)  # rounded up: never over budget
            if w > cells:
                continue
            cand = np.full(cells + 1, np.inf)
            cand[w:] = best[: cells + 1 - w] + lk
            better = cand < new
            new[better] = cand[better]
            picks[i, better] = k
        best = new
    choice = [0] * len(costs)
    c = cells
    for i in range(len(costs) - 1, -1, -1):
        k = int(picks[i, c])
        choice[i] = k
        c -= -(-extra[i][k] // unit)
    return choice, exact


def cost_range(costs: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(smallest, largest) total bits of any allocation: every layer at its cheapest / dearest option."""
    return sum(min(int(x) for x in c) for c in costs), sum(max(int(x) for x in c) for c in costs)


def allocate(costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]], budget: float,
             method: str = "auto", max_cells: int = MAX_CELLS) -> Allocation:
    """Minimise the summed loss within ``budget`` bits (see the module docstring)."""
    if method not in ("auto", "dp", "greedy"):
        raise LowbitError(f"unknown allocation method {method!r}; use auto, dp or greedy")
    _check(costs, losses)
    budget_bits = math.floor(budget)
    low, high = cost_range(costs)
    if budget_bits < low:
        raise LowbitError(f"budget of {budget:,.0f} bits is below the smallest allocation ({low:,} bits, every layer "
                          "at its cheapest option); raise the target or add a cheaper candidate")
    if budget_bits > high:
        raise LowbitError(f"budget of {budget:,.0f} bits is above the largest allocation ({high:,} bits, every layer "
                          "at its most expensive option); lower the target or add a wider candidate")
    top = [min(range(len(l)), key=lambda k: (l[k], c[k])) for c, l in zip(costs, losses)]
    top_cost, top_loss = _total(costs, losses, top)
    if top_cost <= budget_bits:
        return Allocation(top, top_cost, top_loss, top_loss, "saturated", True, saturated=True)
    greedy, lower = lagrangian_greedy(costs, losses, budget_bits)
    found: list[tuple[float, int, list[int], str, bool]] = []
    if method in ("auto", "dp"):
        choice, exact = dp_allocate(costs, losses, budget_bits, max_cells)
        cost, loss = _total(costs, losses, choice)
        found.append((loss, cost, choice, "dp", exact))
    if method == "greedy" or (method == "auto" and not found[0][4]):
        cost, loss = _total(costs, losses, greedy)
        found.append((loss, cost, greedy, "greedy", False))
    loss, cost, choice, how, exact = min(found, key=lambda f: (f[0], f[1]))
    return Allocation(choice, cost, loss, min(lower, loss), how, exact)
