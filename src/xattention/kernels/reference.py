"""Plain-PyTorch references: the semantics every Triton kernel must reproduce.

Each function here has a Triton twin with the same signature (``antidiagonal.py``, ``select.py``,
``block_sparse_attention.py``). They run on any device, compute statistics in float32 (selection cumsums in float64),
and bound memory by processing query rows in chunks, so they also serve as the CPU backend.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ..block_mask import forced_blocks, visible_blocks
from . import softmax_scale

__all__ = [
    "ACCELERATOR_CHUNK_ELEMENTS",
    "DEFAULT_CHUNK_ELEMENTS",
    "antidiagonal_block_scores",
    "antidiagonal_partial_scores",
    "block_rows_geometry",
    "block_sparse_attention",
    "cumulative_select",
    "forced_blocks",
    "merge_partial_row_stats",
    "partial_block_scores",
    "rows_per_chunk",
    "select_blocks",
    "select_blocks_masked",
    "shard_lengths",
    "token_visibility",
    "true_block_scores",
]

# Float32 elements of one chunk's score matrix on the CPU (16 MiB; one block row at least): bounds memory at any length,
# and is small enough that the CPU allocator reuses its buffers instead of faulting in fresh pages for every chunk
# (measured 2.2x faster than 1 GiB chunks for true_block_scores at 3.5K tokens on a 2-core CPU). On accelerators one
# chunk is a handful of kernel launches and launch overhead dominates: 16x larger there (benchmarks/NOTES.md).
DEFAULT_CHUNK_ELEMENTS = 1 << 22
ACCELERATOR_CHUNK_ELEMENTS = 1 << 26


def _pad_len(x: Tensor, length: int) -> Tensor:
    """Zero-pad ``x`` ``[..., L, D]`` along L to ``length``."""
    return F.pad(x, (0, 0, 0, length - x.shape[-2])) if x.shape[-2] < length else x


def rows_per_chunk(num_rows: int, cost_per_row: int, chunk_elements: int | None, device: torch.device) -> int:
    """How many of ``num_rows`` rows of ``cost_per_row`` scores one chunk holds (at least one): at most
    ``chunk_elements`` scores, or with ``None`` :data:`DEFAULT_CHUNK_ELEMENTS` on the CPU and
    :data:`ACCELERATOR_CHUNK_ELEMENTS` on any other device."""
    if chunk_elements is None:
        chunk_elements = DEFAULT_CHUNK_ELEMENTS if device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    return max(1, min(num_rows, chunk_elements // max(1, cost_per_row)))


def antidiagonal_block_scores(
    q: Tensor,
    k: Tensor,
    *,
    stride: int,
    block_size: int,
    causal: bool = True,
    scale: float | None = None,
    chunk_elements: int | None = None,
    lengths: Tensor | None = None,
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
        lengths: int ``[B]`` or ``None``: a right-padded batch (``Lq == Lk``), element ``b``'s tokens being positions
            ``0 … lengths[b]-1``; later rows and keys are padding, as if that element had been scored alone. Its q and
            k must hold zeros past the length (as the padding of a lone element does).
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
    # reshape, not view: merging (S, D) needs a copy when k is a transposed [B, L, H, D] tensor (as HF passes it)
    kt = _pad_len(k.float(), kb * b).reshape(bsz, hkv, kb * r, s * d)
    factor = softmax_scale(scale, d) / s

    u = torch.arange(kb * r, device=q.device)
    # per batch element (one row unless lengths): the tokens of queries and of keys
    q_lens = torch.full((1,), lq, device=q.device) if lengths is None else lengths.to(q.device)
    k_lens = torch.full((1,), lk, device=q.device) if lengths is None else q_lens
    key_ok = u[None, :] * s < k_lens[:, None]  # [B or 1, U]
    out = torch.empty(bsz, hkv, g, qb, kb, dtype=torch.float32, device=q.device)
    step = rows_per_chunk(qb, bsz * hq * r * kb * r, chunk_elements, q.device)
    for r0 in range(0, qb, step):
        r1 = min(qb, r0 + step)
        t = torch.arange(r0 * r, r1 * r, device=q.device)
        scores = torch.einsum("bhgtx,bhux->bhgtu", qt[:, :, :, r0 * r : r1 * r], kt) * factor
        allowed = key_ok[:, None, :].expand(-1, t.numel(), -1)  # [B or 1, T, U]
        if causal:
            allowed = allowed & (u[None, :] * s <= (lk - lq) + t[:, None] * s + s - 1)
        probs = torch.softmax(scores.masked_fill(~allowed[:, None, None], float("-inf")), dim=-1)
        row_ok = t[None, :] * s < q_lens[:, None]  # padding rows carry no mass
        probs = torch.where(row_ok[:, None, None, :, None], probs, 0.0)  # also the NaN of a row that sees no key
        out[:, :, :, r0:r1] = probs.view(bsz, hkv, g, r1 - r0, r, kb, r).sum(dim=(4, 6))
    return out.view(bsz, hq, qb, kb)


def select_blocks(
    scores: Tensor, threshold: float | Tensor, *, q_len: int, k_len: int, block_size: int, causal: bool = True
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
    forced, visible = block_rows_geometry(q_len, k_len, block_size, causal=causal, device=scores.device)
    return select_blocks_masked(scores, threshold, forced=forced, visible=visible)


def true_block_scores(
    q: Tensor,
    k: Tensor,
    *,
    block_size: int,
    causal: bool = True,
    scale: float | None = None,
    chunk_elements: int | None = None,
) -> Tensor:
    """Exact attention probability mass per block, float32 ``[B, Hq, Qb, Kb]`` (each real query row sums to 1).

    The oracle's scores and the ground truth for "attention mass kept": ``(true_block_scores * mask).sum() / Lq``.
    """
    bsz, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g, b = hq // hkv, block_size
    qb, kb = -(-lq // b), -(-lk // b)
    factor = softmax_scale(scale, d)
    qf = _pad_len(q.float(), qb * b).view(bsz, hkv, g, qb * b, d)
    kf = k.float()
    k_pos = torch.arange(lk, device=q.device)
    out = torch.empty(bsz, hkv, g, qb, kb, dtype=torch.float32, device=q.device)
    step = rows_per_chunk(qb, bsz * hq * b * lk, chunk_elements, q.device)
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


def token_visibility(mask_rows: Tensor, q0: int, q1: int, *, q_len: int, k_len: int, block_size: int, causal: bool) -> Tensor:
    """bool ``[..., q1 - q0, Lk]``: which keys queries ``q0 … q1-1`` see, from their block rows ``mask_rows``
    ``[..., R, Kb]`` (the rows holding those queries, starting at row ``q0 // block_size``)."""
    b = block_size
    first = q0 - (q0 // b) * b
    visible = mask_rows.repeat_interleave(b, dim=-2)[..., first : first + q1 - q0, :]
    visible = visible.repeat_interleave(b, dim=-1)[..., :k_len]
    if causal:
        rows = torch.arange(q0, q1, device=mask_rows.device)
        visible = visible & (torch.arange(k_len, device=mask_rows.device)[None, :] <= (k_len - q_len) + rows[:, None])
    return visible


def _query_chunks(
    mask: Tensor, q_len: int, k_len: int, *, block_size: int, causal: bool, chunk_elements: int | None
) -> Iterator[tuple[int, int, Tensor]]:
    """``(q0, q1, visible)`` for the attention references' chunks of whole block rows of ``mask`` ``[..., Qb, Kb]``:
    queries ``q0 … q1-1`` and the bool ``[..., q1 - q0, Lk]`` keys they see, at most ``chunk_elements`` of them."""
    b, qb = block_size, mask.shape[-2]
    step = rows_per_chunk(qb, math.prod(mask.shape[:-2]) * b * k_len, chunk_elements, mask.device)
    for r0 in range(0, qb, step):
        q0, q1 = r0 * b, min(q_len, (r0 + step) * b)
        visible = token_visibility(mask[..., r0 : r0 + step, :], q0, q1, q_len=q_len, k_len=k_len, block_size=b, causal=causal)
        yield q0, q1, visible


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor,
    *,
    block_size: int,
    causal: bool = True,
    scale: float | None = None,
    return_lse: bool = False,
    chunk_elements: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact softmax attention restricted to the kept blocks of ``mask``; the contract of every backend's kernel.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``; mask: bool ``[B, Hq, Qb, Kb]`` (see :class:`BlockMask`).
        return_lse: also return each query's log-sum-exp, for merging partial results.
    Returns:
        ``[B, Hq, Lq, D]`` in q's dtype, computed in float32; a query that sees no key gets zeros. With ``return_lse``,
        ``(out, lse)``, lse float32 ``[B, Hq, Lq]`` = ``log sum_j exp(scale q.k_j)`` over the visible kept keys
        (natural log; ``-inf`` for a query that sees no key). Without it, PyTorch's fused SDPA runs on the expanded
        token mask chunk by chunk (several times faster on CPU than materialising the probabilities).
    """
    if return_lse:
        return _attention_with_lse(q, k, v, mask, block_size=block_size, causal=causal, scale=scale,
                                   chunk_elements=chunk_elements)  # fmt: skip
    hq, lq, d = q.shape[1:]
    hkv, lk = k.shape[1], k.shape[2]
    factor = softmax_scale(scale, d)
    kf, vf = k.float(), v.float()
    out = torch.empty_like(q)
    for q0, q1, visible in _query_chunks(mask, lq, lk, block_size=block_size, causal=causal, chunk_elements=chunk_elements):
        part = F.scaled_dot_product_attention(
            q[:, :, q0:q1].float(), kf, vf, attn_mask=visible, scale=factor, enable_gqa=hq != hkv
        )
        # SDPA leaves NaN where a query sees no key; our contract is zeros there
        out[:, :, q0:q1] = part.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0).to(q.dtype)
    return out


def _check_shard(name: str, start: int, length: int, total: int, block_size: int) -> None:
    if start < 0 or start % block_size != 0:
        raise ValueError(f"{name}_start must be a non-negative multiple of block_size ({block_size}), got {start}")
    if start + length > total:
        raise ValueError(f"{name} shard [{start}, {start + length}) runs past {name}_len={total}")
    if length % block_size != 0 and start + length != total:
        raise ValueError(
            f"{name} shard [{start}, {start + length}) ends inside a block: only the shard at the end may be partial"
        )


def shard_lengths(q_shard: tuple[int, int, int | None], k_shard: tuple[int, int, int | None], block_size: int) -> tuple[int, int]:
    """Full ``(q_len, k_len)`` of a (start, shard length, full length or ``None``) pair of shards, checked.

    ``None`` means the shard ends its sequence. Shards must start on block boundaries and only one that ends its
    sequence may end inside a block (the contract of :func:`antidiagonal_partial_scores`).
    """
    totals = []
    for name, (start, length, total) in (("q", q_shard), ("k", k_shard)):
        total = start + length if total is None else total
        _check_shard(name, start, length, total, block_size)
        totals.append(total)
    return totals[0], totals[1]


def antidiagonal_partial_scores(
    q: Tensor,
    k: Tensor,
    *,
    stride: int,
    block_size: int,
    q_start: int = 0,
    k_start: int = 0,
    q_len: int | None = None,
    k_len: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    row_max: Tensor | None = None,
    chunk_elements: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Online-softmax statistics of XAttention's reshaped rows against one shard of the keys.

    ``q`` holds queries ``q_start … q_start+Lq_s-1`` of a problem with ``q_len`` queries and ``k`` keys
    ``k_start … k_start+Lk_s-1`` of ``k_len`` keys (queries aligned to the end of the keys, as everywhere). Shards start
    on block boundaries; only a shard that ends the sequence may end inside a block. With reshaped scores
    ``x[t, u] = q~[t] . k~[u] * scale / S`` masked exactly as in :func:`antidiagonal_block_scores` (causal at the reshaped
    resolution, padding keys and padding query rows excluded), returns

    * ``row_max`` float32 ``[B, Hq, Tq]`` (``Tq = ceil(Lq_s / b) * b / S``): ``max_u x[t, u]`` over this shard's visible
      reshaped keys, ``-inf`` where none is visible; or the ``row_max`` passed in (a global max, second pass);
    * ``sums`` float32 ``[B, Hq, Tq, Kb_s]`` (``Kb_s = ceil(Lk_s / b)``): ``sum_{u in key block c} exp(x[t, u] - row_max[t])``.

    ``sum(sums, -1)`` is the shard's partial softmax denominator. Merge shards with :func:`merge_partial_row_stats`
    and turn each shard's sums into block scores with :func:`partial_block_scores`; one shard holding every key gives
    exactly :func:`antidiagonal_block_scores`. Memory: ``sums`` is ``b / S`` times smaller than the reshaped score
    matrix; at most ``chunk_elements`` scores exist at once.
    """
    bsz, hq, lq_s, d = q.shape
    hkv, lk_s = k.shape[1], k.shape[2]
    g, s, b = hq // hkv, stride, block_size
    if b % s != 0:
        raise ValueError(f"block_size ({b}) must be a multiple of stride ({s})")
    r = b // s
    q_len, k_len = shard_lengths((q_start, lq_s, q_len), (k_start, lk_s, k_len), b)
    qb, kb = -(-lq_s // b), -(-lk_s // b)
    qt = _pad_len(q.float(), qb * b).reshape(bsz, hkv, g, qb * r, s, d).flip(-2).reshape(bsz, hkv, g, qb * r, s * d)
    kt = _pad_len(k.float(), kb * b).reshape(bsz, hkv, kb * r, s * d)
    factor = softmax_scale(scale, d) / s

    u = k_start // s + torch.arange(kb * r, device=q.device)
    key_ok = u * s < k_len
    given = None if row_max is None else row_max.float().reshape(bsz, hkv, g, qb * r)
    maxes = torch.empty(bsz, hkv, g, qb * r, dtype=torch.float32, device=q.device)
    sums = torch.empty(bsz, hkv, g, qb * r, kb, dtype=torch.float32, device=q.device)
    step = rows_per_chunk(qb, bsz * hq * r * kb * r, chunk_elements, q.device)
    for r0 in range(0, qb, step):
        r1 = min(qb, r0 + step)
        t = q_start // s + torch.arange(r0 * r, r1 * r, device=q.device)
        scores = torch.einsum("bhgtx,bhux->bhgtu", qt[:, :, :, r0 * r : r1 * r], kt) * factor
        allowed = key_ok[None, :] & (t * s < q_len)[:, None]  # padding query rows carry no mass
        if causal:
            allowed = allowed & (u[None, :] * s <= (k_len - q_len) + t[:, None] * s + s - 1)
        scores = scores.masked_fill(~allowed, float("-inf"))
        m = scores.amax(dim=-1) if given is None else given[:, :, :, r0 * r : r1 * r]
        shift = torch.where(torch.isfinite(m), m, 0.0)  # a row with no visible key: exp(-inf - 0) = 0, not NaN
        e = torch.exp(scores - shift[..., None])
        sums[:, :, :, r0 * r : r1 * r] = e.view(bsz, hkv, g, (r1 - r0) * r, kb, r).sum(dim=-1)
        maxes[:, :, :, r0 * r : r1 * r] = m
    return maxes.view(bsz, hq, qb * r), sums.view(bsz, hq, qb * r, kb)


def merge_partial_row_stats(row_maxes: list[Tensor], row_sums: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Merge per-shard softmax statistics (Milakov & Gimelshein, 2018, "Online normalizer calculation for softmax").

    Args:
        row_maxes, row_sums: per shard, float32 ``[..., T]`` maxima (``-inf`` for none) and sums of ``exp(x - max)``.
    Returns:
        ``(M, Z)``: the global max ``M = max_j m_j`` and denominator ``Z = sum_j s_j exp(m_j - M)``, float32 ``[..., T]``.
    """
    if not row_maxes or len(row_maxes) != len(row_sums):
        raise ValueError(f"need one row_sums per row_maxes, got {len(row_maxes)} and {len(row_sums)}")
    total_max = torch.stack(list(row_maxes)).amax(dim=0)
    shift = torch.where(torch.isfinite(total_max), total_max, 0.0)
    total_sum = torch.zeros_like(total_max)
    for m, s in zip(row_maxes, row_sums, strict=True):
        total_sum = total_sum + s * torch.exp(m - shift)
    return total_max, total_sum


def partial_block_scores(sums: Tensor, row_max: Tensor, total_max: Tensor, total_sum: Tensor, *, rows_per_block: int) -> Tensor:
    """One shard's columns of the XAttention block scores from its :func:`antidiagonal_partial_scores` output.

    Args:
        sums: float32 ``[B, Hq, Tq, Kb_s]``, relative to ``row_max`` ``[B, Hq, Tq]``.
        total_max, total_sum: the merged statistics ``[B, Hq, Tq]`` of :func:`merge_partial_row_stats`.
        rows_per_block: ``b / S`` reshaped rows per query block.
    Returns:
        float32 ``[B, Hq, Tq / (b/S), Kb_s]``: each block's softmax mass, summed over its reshaped rows.
    """
    shift = torch.where(torch.isfinite(total_max), total_max, 0.0)
    weight = torch.exp(row_max - shift) / torch.where(total_sum > 0, total_sum, 1.0)
    weight = torch.where(total_sum > 0, weight, 0.0)
    bsz, hq, tq, kb = sums.shape
    return (sums * weight[..., None]).view(bsz, hq, tq // rows_per_block, rows_per_block, kb).sum(dim=3)


def block_rows_geometry(
    q_len: int,
    k_len: int,
    block_size: int,
    rows: Tensor | None = None,
    *,
    causal: bool = True,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """``(forced, visible)``, bool ``[R, Kb]``, for query-block rows ``rows`` (default: all ``Qb``) of a problem.

    ``forced`` is :func:`~xattention.block_mask.forced_blocks` (sink and diagonal blocks), ``visible``
    :func:`~xattention.block_mask.visible_blocks` (the blocks a row may keep).
    """
    forced = forced_blocks(q_len, k_len, block_size, device, rows=rows)
    return forced, visible_blocks(q_len, k_len, block_size, device, rows=rows, causal=causal)


def select_blocks_masked(scores: Tensor, threshold: float | Tensor, *, forced: Tensor, visible: Tensor) -> Tensor:
    """:func:`select_blocks` with the row geometry given: ``forced`` / ``visible`` bool, broadcastable to ``scores``.

    Lets a caller select any subset of rows (a rank's query blocks) with :func:`block_rows_geometry`.
    """
    return cumulative_select(scores, threshold, forced=forced, visible=visible)


def cumulative_select(
    scores: Tensor,
    threshold: float | Tensor | None = None,
    *,
    count: int | Tensor | None = None,
    forced: Tensor | None = None,
    visible: Tensor | None = None,
) -> Tensor:
    """The one selection rule of every method: per row of ``scores`` (its last dim), the ``forced`` entries first, then
    the other ``visible`` ones in descending score (ties: lower index), either the first ``count`` or while the kept
    score (forced ones included) is below ``threshold x`` the row's visible total. Zero-score entries are never added
    (they add no mass); ``threshold >= 1`` keeps every entry with a non-zero score.

    Sums run in float64, so a threshold compares exactly as given (a float32 0.9 would move the cut-off).

    Args:
        scores: non-negative ``[..., N]`` (block scores per row ``[B, H, Qb, Kb]``, line scores ``[B, H, L]``, or a
            head's flattened block matrix ``[B, H, Qb*Kb]``).
        threshold: float, or per-head tensor ``[H]`` for 4-D ``scores``; exactly one of ``threshold`` and ``count``.
        count: entries to keep per row (an int, or a tensor broadcastable to ``scores[..., :1]``).
        forced, visible: bool, broadcastable to ``scores`` (default: nothing forced, everything visible).
    Returns:
        bool, ``scores``' shape: ``(kept | forced) & visible``.
    """
    if (threshold is None) == (count is None):
        raise ValueError("give exactly one of threshold and count")
    s = (scores if visible is None else torch.where(visible, scores, torch.zeros_like(scores))).to(torch.float64)
    key = s if forced is None else torch.where(forced, float("inf"), s)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    sorted_s = torch.gather(s, -1, order)
    if count is not None:
        keep_sorted = torch.arange(s.shape[-1], device=s.device) < count
    else:
        thr = torch.as_tensor(threshold, dtype=torch.float64, device=scores.device)
        thr = thr.view(1, -1, 1, 1) if thr.ndim == 1 else thr
        before = torch.cumsum(sorted_s, dim=-1) - sorted_s  # mass kept before adding this entry
        keep_sorted = (before < thr * s.sum(dim=-1, keepdim=True)) | (thr >= 1.0)
    keep_sorted = keep_sorted & (sorted_s > 0)
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    if forced is not None:
        keep = keep | forced
    return keep if visible is None else keep & visible


def _attention_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor,
    *,
    block_size: int,
    causal: bool,
    scale: float | None,
    chunk_elements: int | None,
) -> tuple[Tensor, Tensor]:
    """:func:`block_sparse_attention` with ``return_lse=True``, computed explicitly (SDPA does not return the LSE)."""
    bsz, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    factor = softmax_scale(scale, d)
    qf = q.float().reshape(bsz, hkv, g, lq, d)
    kf, vf = k.float(), v.float()
    mask = mask.reshape(bsz, hkv, g, *mask.shape[2:])
    out = torch.empty(bsz, hkv, g, lq, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(bsz, hkv, g, lq, dtype=torch.float32, device=q.device)
    for q0, q1, visible in _query_chunks(mask, lq, lk, block_size=block_size, causal=causal, chunk_elements=chunk_elements):
        scores = torch.einsum("bhgtd,bhud->bhgtu", qf[:, :, :, q0:q1], kf) * factor
        scores = scores.masked_fill(~visible, float("-inf"))
        row_max = scores.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
        probs = torch.exp(scores - row_max)
        denom = probs.sum(dim=-1, keepdim=True)
        out[:, :, :, q0:q1] = torch.einsum("bhgtu,bhud->bhgtd", probs, vf) / torch.where(denom > 0, denom, 1.0)
        lse[:, :, :, q0:q1] = torch.where(denom > 0, row_max + torch.log(denom), float("-inf")).squeeze(-1)
    return out.view(bsz, hq, lq, d).to(q.dtype), lse.view(bsz, hq, lq)
