"""MInference's vertical-slash pattern as a block-sparse method (Jiang et al., 2024, "MInference 1.0: Accelerating
Pre-filling for Long-Context LLMs via Dynamic Sparse Attention", arXiv:2407.02490, Sec. 3: the vertical-slash head).

The helpers here (last-query statistics, line selection, block cover) are shared with :mod:`.flexprefill`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..block_mask import BlockMask
from ..kernels import softmax_scale
from ..kernels.reference import cumulative_select, rows_per_chunk
from .base import Geometry, Method, check_fraction

__all__ = [
    "VerticalSlash",
    "keep_top_lines",
    "last_queries_line_sums",
    "line_block_sums",
]


def _diagonal_sums(x: Tensor) -> Tensor:
    """Sums of ``x`` ``[..., n, m]`` along its anti-diagonals: ``out[..., s] = sum_{a + c = s} x[..., a, c]``,
    ``[..., n + m - 1]``. Skew trick: pad every row by ``n`` zeros, then re-read the buffer with rows one element
    shorter, which shifts row ``a`` right by ``a``; the wrap-around only ever reads padding."""
    n, m = x.shape[-2:]
    lead = x.shape[:-2]
    padded = torch.nn.functional.pad(x, (0, n)).reshape(*lead, n * (m + n))
    return padded[..., : n * (m + n - 1)].reshape(*lead, n, m + n - 1).sum(dim=-2)


def last_queries_line_sums(
    q: Tensor,
    k: Tensor,
    *,
    last_q: int,
    causal: bool = True,
    scale: float | None = None,
    chunk_elements: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact softmax attention of the last ``t = min(last_q, Lq)`` queries, summed per key column and per diagonal.

    The probabilities are computed in float32 over all keys (bottom-right causal when ``causal``), in chunks of queries
    so at most ``chunk_elements`` scores exist at once; nothing of size ``Lq x Lk`` is ever built.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]`` (GQA without repeating k).
    Returns:
        ``(vertical, slash)``: float32 ``[B, Hq, Lk]`` with ``vertical[..., j]`` the summed probability of key ``j``, and
        float32 ``[B, Hq, 2 Lk - 1]`` with ``slash[..., o + Lk - 1]`` the summed probability on the line of offset
        ``o = (query position) - (key position)``, ``o`` in ``[-(Lk-1), Lk-1]`` (negative offsets only carry mass when
        not causal). Each sums to ``t``.
    """
    bsz, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    t = min(last_q, lq)
    factor = softmax_scale(scale, d)
    qf = q[:, :, lq - t :].float().view(bsz, hkv, g, t, d)
    kf = k.float()
    k_pos = torch.arange(lk, device=q.device)
    vertical = torch.zeros(bsz, hkv, g, lk, dtype=torch.float32, device=q.device)
    slash = torch.zeros(bsz, hkv, g, 2 * lk - 1, dtype=torch.float32, device=q.device)
    step = rows_per_chunk(t, 2 * bsz * hq * lk, chunk_elements, q.device)
    for a0 in range(0, t, step):
        a1 = min(t, a0 + step)
        n = a1 - a0
        scores = torch.einsum("bhgtd,bhud->bhgtu", qf[:, :, :, a0:a1], kf) * factor
        if causal:
            pos = torch.arange(lk - t + a0, lk - t + a1, device=q.device)  # key positions of these queries
            scores = scores.masked_fill(k_pos[None, :] > pos[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        vertical += probs.sum(dim=-2)
        # Query a0 + a (position lk - t + a0 + a) and key j = lk - 1 - j' lie on offset o = a + j' + a0 - t + 1: the
        # anti-diagonals of the key-flipped matrix are the offsets, starting at o = a0 - t + 1.
        start = a0 - t + 1 + lk - 1
        slash[..., start : start + n + lk - 1] += _diagonal_sums(probs.flip(-1))
    return vertical.view(bsz, hq, lk), slash.view(bsz, hq, 2 * lk - 1)


def keep_top_lines(scores: Tensor, *, count: int | None = None, threshold: float | None = None) -> Tensor:
    """bool mask of the lines (last dim) to keep: the ``count`` highest, or the fewest whose sum reaches
    ``threshold x`` the total (exactly one of the two). Descending score, ties to the lower index; lines with zero
    score are never kept (they carry no mass); ``threshold >= 1`` keeps every line with non-zero score
    (:func:`~xattention.kernels.reference.cumulative_select` without forced lines)."""
    if (count is None) == (threshold is None):
        raise ValueError("give exactly one of count and threshold")
    return cumulative_select(scores, threshold, count=count)


def line_block_sums(
    vertical: Tensor,
    slash: Tensor,
    *,
    q_len: int,
    k_len: int,
    block_size: int,
    chunk_elements: int | None = None,
) -> Tensor:
    """Per block, the total weight of the vertical columns it contains plus the slash lines that pass through it.

    A column ``j`` lies in block column ``j // b``. A slash of offset ``o`` passes through block ``(r, c)`` when some
    query ``i`` of row ``r`` and key ``j`` of column ``c`` have ``pos(i) - j = o`` (``pos(i) = Lk - Lq + i``); since
    both ranges are contiguous, the offsets through ``(r, c)`` are exactly the interval
    ``[pos(first query of r) - last key of c, pos(last query of r) - first key of c]``, summed with one prefix sum.

    Args:
        vertical: ``[B, H, Lk]`` column weights; slash: ``[B, H, 2 Lk - 1]`` offset weights (index ``o + Lk - 1``).
            Bool inputs count kept lines, so ``> 0`` gives the block cover.
    Returns:
        float64 ``[B, H, Qb, Kb]`` (no causal masking applied).
    """
    b = block_size
    bsz, h, lk = vertical.shape
    device = vertical.device
    qb, kb = -(-q_len // b), -(-k_len // b)
    pad = kb * b - lk
    col = torch.nn.functional.pad(vertical.to(torch.float64), (0, pad)).view(bsz, h, kb, b).sum(dim=-1)
    prefix = torch.nn.functional.pad(torch.cumsum(slash.to(torch.float64), dim=-1), (1, 0))  # prefix[x] = sum of [0, x)

    first_q = torch.arange(qb, device=device) * b
    last_q = torch.clamp(first_q + b - 1, max=q_len - 1)
    p0, p1 = first_q + (k_len - q_len), last_q + (k_len - q_len)
    j0 = torch.arange(kb, device=device) * b
    j1 = torch.clamp(j0 + b - 1, max=k_len - 1)
    out = torch.empty(bsz, h, qb, kb, dtype=torch.float64, device=device)
    step = rows_per_chunk(qb, 2 * bsz * h * kb, chunk_elements, device)
    for r0 in range(0, qb, step):
        r1 = min(qb, r0 + step)
        lo_idx = p0[r0:r1, None] - j1[None, :] + (lk - 1)  # offsets of the interval, as slash indices
        hi_idx = p1[r0:r1, None] - j0[None, :] + (lk - 1)
        through = prefix[..., hi_idx + 1] - prefix[..., lo_idx]
        out[:, :, r0:r1] = through + col[:, :, None, :]
    return out


def line_count(size: int | float, length: int) -> int:
    """A budget given as a count (int) or as a fraction of ``length`` (float) -> a count in ``[0, length]``."""
    if isinstance(size, float):
        return min(length, math.ceil(size * length))
    return min(length, size)


def _check_size(name: str, size: object) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise ValueError(f"{name} must be an int count or a float fraction in (0, 1], got {size!r}")
    if isinstance(size, int) and size < 0:
        raise ValueError(f"{name} must be a non-negative count, got {size}")
    if isinstance(size, float) and not 0.0 < size <= 1.0:
        raise ValueError(f"{name} as a fraction of Lk must lie in (0, 1], got {size}")


@dataclass(kw_only=True, eq=False)
class VerticalSlash(Method):
    """MInference's vertical-slash pattern (arXiv:2407.02490, Sec. 3, vertical-slash head), as a block-granular cover.

    The exact attention of the last ``last_q`` queries, summed per key column (vertical) and per diagonal offset
    (slash), picks lines: the ``vertical_size`` / ``slash_size`` highest (budget mode, ``threshold=None``; a size is an
    int count or a float fraction of ``Lk``, ``0`` disables that part) or the fewest holding ``threshold`` of each mass
    (mass mode). A block is kept when it contains a kept column or a kept slash passes through it, plus the sink and
    diagonal blocks; lines with zero mass never count. ``docs/methods.md`` explains the cover, its cost against
    MInference's token-level kernel, and the differences from MInference.

    Attributes:
        last_q: queries used for the estimate (default 64, as MInference).
        vertical_size: columns kept in budget mode, int count or float fraction of ``Lk`` (default 1000).
        slash_size: slash lines kept in budget mode, int count or float fraction of ``Lk`` (default 6096).
        threshold: ``None`` for budget mode, or the mass fraction ``τ`` in ``(0, 1]`` for mass mode.
    """

    name: ClassVar[str] = "vertical_slash"

    last_q: int = 64
    vertical_size: int | float = 1000
    slash_size: int | float = 6096
    threshold: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.last_q, bool) or not isinstance(self.last_q, int) or self.last_q < 1:
            raise ValueError(f"last_q must be a positive int, got {self.last_q!r}")
        _check_size("vertical_size", self.vertical_size)
        _check_size("slash_size", self.slash_size)
        if self.threshold is not None:
            check_fraction("threshold", self.threshold)

    def choose_blocks(self, q: Tensor, k: Tensor, geo: Geometry, *, scale: float | None) -> BlockMask:
        """Block cover of the vertical-slash lines, computed in PyTorch on the inputs' device (the scoring backend is not
        used)."""
        lq, lk, b = geo.q_len, geo.k_len, self.block_size
        vertical, slash = last_queries_line_sums(q, k, last_q=self.last_q, causal=geo.causal, scale=scale)
        if self.threshold is not None:
            v_keep = keep_top_lines(vertical, threshold=float(self.threshold))
            s_keep = keep_top_lines(slash, threshold=float(self.threshold))
        else:
            v_keep = keep_top_lines(vertical, count=line_count(self.vertical_size, lk))
            s_keep = keep_top_lines(slash, count=line_count(self.slash_size, lk))
        return geo.block_mask(line_block_sums(v_keep, s_keep, q_len=lq, k_len=lk, block_size=b) > 0)
