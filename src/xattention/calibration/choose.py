"""Choosing per-head thresholds from :func:`~xattention.calibration.head_statistics` tables: the least density that keeps
a mass per head (separable), or the most mass under a mean-density budget (a multiple-choice knapsack, solved on each
head's upper concave hull; the algorithm and why it is right are in ``docs/calibration.md``)."""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from .statistics import MASS_TOL, check_candidates

__all__ = ["choose_indices", "choose_thresholds"]

logger = logging.getLogger(__name__)


def _check_tables(density: Tensor, mass: Tensor, candidates: Sequence[float]) -> list[float]:
    cands = check_candidates(candidates)
    if density.ndim != 3 or density.shape != mass.shape:
        raise ValueError(f"density and mass must both be [L, Hq, C], got {tuple(density.shape)} and {tuple(mass.shape)}")
    if density.shape[-1] != len(cands):
        raise ValueError(f"tables have {density.shape[-1]} candidates but {len(cands)} thresholds were given")
    if density.numel() == 0:
        raise ValueError(f"tables are empty: shape {tuple(density.shape)}")
    if density.is_meta or mass.is_meta:
        raise ValueError("density and mass are on the meta device; choosing thresholds needs their values")
    if bool(density.isnan().any() | mass.isnan().any()):
        raise ValueError("density and mass must not hold NaN")
    return cands


def _upper_hull(density: list[float], mass: list[float], candidates: list[float]) -> list[int]:
    """Candidate indices on one head's upper concave hull of (density, mass), by increasing density.

    First the Pareto front: sorted by (density, -mass, tau), a point stays only if its mass beats every point of lower
    or equal density (so ties go to the smallest tau). Then Andrew's monotone chain drops points strictly below the
    chord of their neighbours; collinear points stay (they are finer steps of the same slope).
    """
    order = sorted(range(len(candidates)), key=lambda c: (density[c], -mass[c], candidates[c]))
    front: list[int] = []
    for c in order:
        if not front or mass[c] > mass[front[-1]]:
            front.append(c)
    hull: list[int] = []
    for c in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies strictly below the chord a -> c: slope(a, b) < slope(a, c)
            if (mass[b] - mass[a]) * (density[c] - density[a]) < (mass[c] - mass[a]) * (density[b] - density[a]):
                hull.pop()
            else:
                break
        hull.append(c)
    return hull


def _indices_min_mass(density: Tensor, mass: Tensor, cands: list[float], min_mass: float) -> Tensor:
    d, m = density.tolist(), mass.tolist()
    best = []
    for h in range(len(d)):
        ok = [c for c in range(len(cands)) if m[h][c] >= min_mass - MASS_TOL]
        # least density; ties: more mass, then smaller tau
        best.append(min(ok, key=lambda c, h=h: (d[h][c], -m[h][c], cands[c])) if ok else -1)
    idx = torch.tensor(best, dtype=torch.long)
    missing = idx < 0
    if bool(missing.any()):
        largest = max(range(len(cands)), key=lambda c: cands[c])
        logger.warning(
            "%d of %d heads keep less than %.4f of the attention mass at every candidate; they get the largest "
            "candidate tau=%g",
            int(missing.sum()), len(d), min_mass, cands[largest],
        )  # fmt: skip
        idx[missing] = largest
    return idx


def _indices_budget(density: Tensor, mass: Tensor, cands: list[float], budget: float) -> Tensor:
    n = density.shape[0]
    d, m = density.tolist(), mass.tolist()
    hulls = [_upper_hull(d[h], m[h], cands) for h in range(n)]
    choice = [hull[0] for hull in hulls]  # each head's least-density point (with the most mass among ties)
    capacity = budget * n
    used = sum(d[h][choice[h]] for h in range(n))
    tol = 1e-9 * max(1.0, capacity)
    if used > capacity + tol:
        raise ValueError(
            f"density budget {budget:.4f} is below the least mean density the candidates allow ({used / n:.4f}); "
            f"add smaller candidate thresholds or raise the budget"
        )

    # Hull segments in one global order of decreasing slope: a heap holding each head's next segment (within a head
    # slopes do not increase along the hull, so this is the global order, and a head's segments come in hull order).
    def segment(h: int, step: int) -> tuple[float, int, int]:
        a, b = hulls[h][step - 1], hulls[h][step]
        return (-(m[h][b] - m[h][a]) / (d[h][b] - d[h][a]), h, step)

    heap = [segment(h, 1) for h in range(n) if len(hulls[h]) > 1]
    heapq.heapify(heap)
    while heap:
        _, h, step = heapq.heappop(heap)
        b = hulls[h][step]
        dd = d[h][b] - d[h][choice[h]]
        if used + dd <= capacity + tol:
            used += dd
            choice[h] = b
            if step + 1 < len(hulls[h]):
                heapq.heappush(heap, segment(h, step + 1))
        # else: the head stays where it is (its later segments need this one first); the other heads go on
    # Spend what is left on the single best upgrade (any candidate, hull or not) until none fits: never loses mass.
    dt, mt = torch.tensor(d, dtype=torch.float64), torch.tensor(m, dtype=torch.float64)
    idx = torch.tensor(choice, dtype=torch.long)
    for _ in range(n * len(cands)):
        cur_d = dt.gather(1, idx[:, None])
        cur_m = mt.gather(1, idx[:, None])
        gain = torch.where(dt - cur_d <= capacity + tol - used, mt - cur_m, torch.zeros_like(mt))
        best = int(torch.argmax(gain))
        h, c = divmod(best, len(cands))
        if float(gain[h, c]) <= 0:
            break
        used += float(dt[h, c] - cur_d[h, 0])
        idx[h] = c
    return idx


def choose_indices(density: Tensor, mass: Tensor, candidates: Sequence[float], kind: str, value: float) -> Tensor:
    """:func:`choose_thresholds` as candidate indices, long ``[L, Hq]``, for the target ``kind`` ``"mass"``
    (``min_mass=value``) or ``"density"`` (``density_budget=value``)."""
    cands = _check_tables(density, mass, candidates)
    shape = density.shape[:2]
    d = density.detach().to("cpu", torch.float64).reshape(-1, len(cands))
    m = mass.detach().to("cpu", torch.float64).reshape(-1, len(cands))
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{'min_mass' if kind == 'mass' else 'density_budget'} must lie in (0, 1], got {value}")
    pick = _indices_min_mass if kind == "mass" else _indices_budget
    return pick(d, m, cands, float(value)).view(shape)


def choose_thresholds(
    density: Tensor,
    mass: Tensor,
    candidates: Sequence[float],
    *,
    min_mass: float | None = None,
    density_budget: float | None = None,
) -> Tensor:
    """Per-(layer, head) thresholds from :func:`head_statistics` tables; give exactly one of the two targets.

    **min_mass** (minimise total density s.t. every head keeps at least ``min_mass`` of its attention): the problem is
    separable, so per head the answer is the candidate of least density whose mass reaches ``min_mass`` (ties: more
    mass, then smaller ``tau``); heads that no candidate serves get the largest candidate (1.0 if in the grid) and a
    logged warning. ``O(N C)`` for ``N = L x Hq`` heads and ``C`` candidates.

    **density_budget** (maximise the total mass, i.e. the mean mass, s.t. the mean density is ``<= density_budget``): a
    multiple-choice knapsack, solved on each head's upper concave hull of ``(density, mass)``: hull segments are taken
    whole in one global order of decreasing slope while they fit, then the leftover budget buys the best single
    upgrades. The result is exactly optimal when the budget falls on hull vertices and otherwise short of the optimum by
    less than one hull step of one head; the mean density never exceeds the budget (up to ``1e-9`` relative rounding).
    ``docs/calibration.md`` gives the steps, the proof and the cost (``O(N C log N)``).

    Args:
        density, mass: ``[L, Hq, C]`` tables (any float dtype; :func:`head_statistics` gives float64).
        candidates: the ``C`` thresholds the tables were computed for.
        min_mass: target mass per head in ``(0, 1]``; density_budget: mean density budget in ``(0, 1]``.
    Returns:
        float64 ``[L, Hq]`` thresholds, each exactly one of ``candidates`` (float64 because selection compares
        float64 running sums with ``tau x total``: a float32 ``0.9`` would move the cut-off).
    """
    _check_tables(density, mass, candidates)
    if (min_mass is None) == (density_budget is None):
        raise ValueError("give exactly one of min_mass and density_budget")
    kind, value = ("mass", min_mass) if min_mass is not None else ("density", density_budget)
    idx = choose_indices(density, mass, candidates, kind, float(value))  # type: ignore[arg-type]
    cands = torch.tensor([float(c) for c in candidates], dtype=torch.float64)
    return cands[idx]
