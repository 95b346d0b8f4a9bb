"""Plain-PyTorch references: the semantics every Triton kernel must reproduce.

Each function here has a Triton twin with the same signature (``antidiagonal.py``, ``select.py``,
``block_sparse_attention.py``). They run on any device, compute statistics in float32 (selection cumsums in float64),
and bound memory by processing query rows in chunks, so they also serve as the CPU backend.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..block_mask import causal_block_bounds

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "antidiagonal_block_scores",
    "block_sparse_attention",
    "select_blocks",
    "true_block_scores",
]

# Float32 elements of one chunk's score matrix (1 GiB): bounds memory at any length.
DEFAULT_CHUNK_ELEMENTS = 1 << 28


def _pad_len(x: Tensor, length: int) -> Tensor:
    """Zero-pad ``x`` ``[..., L, D]`` along L to ``length``."""
    return F.pad(x, (0, 0, 0, length - x.shape[-2])) if x.shape[-2] < length else x


def _rows_per_chunk(num_block_rows: int, cost_per_block_row: int, budget: int) -> int:
    return max(1, min(num_block_rows, budget // max(1, cost_per_block_row)))


def antidiagonal_block_scores(
    q: Tensor,
    k: Tensor,
    *,
    stride: int,
    block_size: int,
    causal: bool = True,
    scale: float | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Tensor:
    """XAttention block scores (Xu et al., 2025, Sec. 2.1: antidiagonal scoring).

    For every ``S x S`` tile the antidiagonal sum of ``q . k`` is one entry of ``q~ k~^T`` with
    ``q~[t] = concat(q[tS+S-1], ..., q[tS])`` and ``k~[u] = concat(k[uS], ..., k[uS+S-1])``. The reshaped scores are
    scaled by ``scale / S`` (``scale`` defaults to ``1/sqrt(D)``), masked causally at the reshaped resolution (reshaped
    key ``u`` is visible to reshaped query ``t`` when ``uS <= Lk - Lq + tS + S - 1``, i.e. when any of its pairs is),
    padding excluded, soft-maxed per row, and summed inside each ``(b/S) x (b/S)`` tile.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]`` with ``Hq % Hkv == 0`` (GQA without repeating k).
        stride: ``S``; ``block_size % S == 0``.
    Returns:
        float32 ``[B, Hq, Qb, Kb]``: each valid reshaped row contributes probability 1, so a row's total is the number
        of reshaped query rows it holds that are not padding.
    """
    bsz, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g, s, b = hq // hkv, stride, block_size
    r = b // s
    qb, kb = -(-lq // b), -(-lk // b)
    qt = _pad_len(q.float(), qb * b).view(bsz, hkv, g, qb * r, s, d).flip(-2).reshape(bsz, hkv, g, qb * r, s * d)
    kt = _pad_len(k.float(), kb * b).view(bsz, hkv, kb * r, s * d)
    factor = (scale if scale is not None else 1.0 / math.sqrt(d)) / s

    u = torch.arange(kb * r, device=q.device)
    key_ok = u * s < lk
    out = torch.empty(bsz, hkv, g, qb, kb, dtype=torch.float32, device=q.device)
    step = _rows_per_chunk(qb, bsz * hq * r * kb * r, chunk_elements)
    for r0 in range(0, qb, step):
        r1 = min(qb, r0 + step)
        t = torch.arange(r0 * r, r1 * r, device=q.device)
        scores = torch.einsum("bhgtx,bhux->bhgtu", qt[:, :, :, r0 * r : r1 * r], kt) * factor
        allowed = key_ok[None, :].expand(t.numel(), -1)
        if causal:
            allowed = allowed & (u[None, :] * s <= (lk - lq) + t[:, None] * s + s - 1)
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        probs = probs * (t * s < lq)[:, None].to(probs.dtype)  # padding rows carry no mass
        out[:, :, :, r0:r1] = probs.view(bsz, hkv, g, r1 - r0, r, kb, r).sum(dim=(4, 6))
    return out.view(bsz, hq, qb, kb)


def forced_blocks(q_len: int, k_len: int, block_size: int, device: torch.device | str | None = None) -> Tensor:
    """bool ``[Qb, Kb]``: blocks every row keeps regardless of score — the sink (column 0) and the diagonal blocks
    (those holding the row's own query positions; two when ``k_len - q_len`` is not a multiple of ``block_size``)."""
    lo, hi = causal_block_bounds(q_len, k_len, block_size, device)
    cols = torch.arange(-(-k_len // block_size), device=device)[None, :]
    return (cols == 0) | ((cols >= lo[:, None]) & (cols <= hi[:, None]))


def select_blocks(
    scores: Tensor,
    threshold: float | Tensor,
    *,
    q_len: int,
    k_len: int,
    block_size: int,
    causal: bool = True,
) -> Tensor:
    """Cumulative-threshold block selection (XAttention Sec. 2.2).

    Per row: keep the sink and diagonal blocks, then add the remaining visible blocks in descending score (ties: lower
    column first) while the kept score is below ``threshold x row total``. Zero-score blocks are never added (they add no
    mass); ``threshold >= 1`` keeps every block with a non-zero score. Blocks above the causal diagonal are never kept.

    Args:
        scores: non-negative ``[B, Hq, Qb, Kb]``.
        threshold: float, or per-head tensor ``[Hq]``, in ``(0, 1]``.
    Returns:
        bool ``[B, Hq, Qb, Kb]``.
    """
    device = scores.device
    forced = forced_blocks(q_len, k_len, block_size, device)
    _, hi = causal_block_bounds(q_len, k_len, block_size, device)
    cols = torch.arange(scores.shape[-1], device=device)
    visible = cols[None, :] <= hi[:, None] if causal else torch.ones_like(forced)
    s = torch.where(visible, scores, torch.zeros_like(scores)).to(torch.float64)
    thr = torch.as_tensor(threshold, dtype=torch.float64, device=device)
    thr = thr.view(1, -1, 1, 1) if thr.ndim == 1 else thr

    order = torch.sort(torch.where(forced, float("inf"), s), dim=-1, descending=True, stable=True).indices
    sorted_s = torch.gather(s, -1, order)
    before = torch.cumsum(sorted_s, dim=-1) - sorted_s  # mass kept before adding this block
    total = s.sum(dim=-1, keepdim=True)
    keep_sorted = ((before < thr * total) | (thr >= 1.0)) & (sorted_s > 0)
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return (keep | forced) & visible


def true_block_scores(
    q: Tensor,
    k: Tensor,
    *,
    block_size: int,
    causal: bool = True,
    scale: float | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Tensor:
    """Exact attention probability mass per block, float32 ``[B, Hq, Qb, Kb]`` (each real query row sums to 1).

    The oracle's scores and the ground truth for "attention mass kept": ``(true_block_scores * mask).sum() / Lq``.
    """
    bsz, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g, b = hq // hkv, block_size
    qb, kb = -(-lq // b), -(-lk // b)
    factor = scale if scale is not None else 1.0 / math.sqrt(d)
    qf = _pad_len(q.float(), qb * b).view(bsz, hkv, g, qb * b, d)
    kf = k.float()
    k_pos = torch.arange(lk, device=q.device)
    out = torch.empty(bsz, hkv, g, qb, kb, dtype=torch.float32, device=q.device)
    step = _rows_per_chunk(qb, bsz * hq * b * lk, chunk_elements)
    for r0 in range(0, qb, step):
        r1 = min(qb, r0 + step)
        rows = torch.arange(r0 * b, r1 * b, device=q.device)
        scores = torch.einsum("bhgtd,bhud->bhgtu", qf[:, :, :, r0 * b : r1 * b], kf) * factor
        if causal:
            scores = scores.masked_fill(k_pos[None, :] > (lk - lq) + rows[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1) * (rows < lq)[:, None].to(torch.float32)
        probs = F.pad(probs, (0, kb * b - lk))
        out[:, :, :, r0:r1] = probs.view(bsz, hkv, g, r1 - r0, b, kb, b).sum(dim=(4, 6))
    return out.view(bsz, hq, qb, kb)


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor,
    *,
    block_size: int,
    causal: bool = True,
    scale: float | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Tensor:
    """Exact softmax attention restricted to the kept blocks of ``mask``.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``; mask: bool ``[B, Hq, Qb, Kb]`` (see :class:`BlockMask`).
    Returns:
        ``[B, Hq, Lq, D]`` in q's dtype, computed in float32. A query that sees no key gets zeros.
    """
    bsz, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g, b = hq // hkv, block_size
    qb = mask.shape[2]
    factor = scale if scale is not None else 1.0 / math.sqrt(d)
    qf = q.float().view(bsz, hkv, g, lq, d)
    kf, vf = k.float(), v.float()
    mask = mask.view(bsz, hkv, g, qb, mask.shape[3])
    k_pos = torch.arange(lk, device=q.device)
    out = torch.empty(bsz, hkv, g, lq, d, dtype=torch.float32, device=q.device)
    step = _rows_per_chunk(qb, bsz * hq * b * lk, chunk_elements)
    for r0 in range(0, qb, step):
        r1 = min(qb, r0 + step)
        q0, q1 = r0 * b, min(lq, r1 * b)
        scores = torch.einsum("bhgtd,bhud->bhgtu", qf[:, :, :, q0:q1], kf) * factor
        visible = mask[:, :, :, r0:r1].repeat_interleave(b, dim=3)[:, :, :, : q1 - q0]
        visible = visible.repeat_interleave(b, dim=4)[..., :lk]
        if causal:
            rows = torch.arange(q0, q1, device=q.device)
            visible = visible & (k_pos[None, :] <= (lk - lq) + rows[:, None])
        scores = scores.masked_fill(~visible, float("-inf"))
        row_max = scores.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
        probs = torch.exp(scores - row_max)
        denom = probs.sum(dim=-1, keepdim=True)
        out[:, :, :, q0:q1] = torch.einsum("bhgtu,bhud->bhgtd", probs, vf) / torch.where(denom > 0, denom, 1.0)
    return out.view(bsz, hq, lq, d).to(q.dtype)
