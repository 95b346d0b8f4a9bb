"""Triton antidiagonal scoring: twins of :func:`.reference.antidiagonal_block_scores` and
:func:`.reference.antidiagonal_partial_scores`.

One program per (batch x query head, tile of ``BLOCK_T`` reshaped query rows). It forms ``q~ k~^T`` tile by tile as
``S`` strided ``D``-deep products (``q~[t] . k~[u] = sum_i q[tS+i] . k[uS+S-1-i]``, the antidiagonal of each S x S tile),
keeps an online softmax (running max and sum per row), and writes per key block the row's partial exp-sums with the max
they were taken against. A second loop in the same program rescales those partials by the final max and sum and adds up
the ``b/S`` rows of each query block. The ``(L/S)^2`` score matrix never reaches memory; the ``(L/S) x (L/b)`` partials
(a ``b``-fold reduction of it) do, once each way.

The same kernel scores one shard of the keys for context parallelism (``PARTIAL``): queries and keys are then pieces of
a longer sequence, related by one causal offset, and the second loop rescales the partials to the row's max (its own,
or a global one passed in) in place, without dividing by the sum or adding rows up, and writes that max.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import tma_usable
from .reference import shard_lengths

__all__ = ["antidiagonal_block_scores", "antidiagonal_partial_scores", "unsupported_geometry"]

LOG2E = 1.4426950408889634
# Float32 partials held at once across a launch (1 GiB); more heads are processed in successive launches.
PARTIAL_BUDGET_BYTES = 1 << 30


def _set_tma_blocks(nargs: dict) -> None:
    """Autotune pre-hook: the bulk-copy descriptors' tile shapes follow the config's tile sizes."""
    if nargs.get("QDesc") is not None:
        block_k = nargs["BLOCK_D"] // nargs.get("SPLIT_D", 1)
        nargs["QDesc"].block_shape = [1, 1, nargs["BLOCK_T"], 1, block_k]
        nargs["KDesc"].block_shape = [1, 1, nargs["BLOCK_U"], 1, block_k]


def _configs() -> list[triton.Config]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_T": 64, "BLOCK_U": 64}, num_warps=4, num_stages=1)]
    # 128 x 256 tiles over a flattened (column tile, slot) loop, D in two chunks: the fastest correct variants at the
    # shape of record (benchmarks/NOTES.md, "Scoring GEMM"); the smaller tiles serve short inputs and head dim 256.
    wide = [
        triton.Config({"BLOCK_T": 128, "BLOCK_U": 256, "FLAT": True, "SPLIT_D": sp}, num_warps=8, num_stages=st,
                      pre_hook=_set_tma_blocks)
        for sp, st in ((2, 4), (2, 3), (1, 2))
    ]  # fmt: skip
    return wide + [
        triton.Config({"BLOCK_T": bt, "BLOCK_U": bu}, num_warps=w, num_stages=s, pre_hook=_set_tma_blocks)
        for bt, bu in ((128, 128), (128, 64), (64, 128))
        for w in (4, 8)
        for s in (2, 3)
    ]


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop configs whose D chunks would be narrower than a 16-deep ``tl.dot`` (small head dims)."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 16))
    return [c for c in configs if block_d // c.kwargs.get("SPLIT_D", 1) >= 16]


@triton.jit
def _tile_products(
    QDesc, KDesc, q_base, k_base, sql, skl, batch, head, kv_head, tile, jt, offs_t, offs_u, q_len, k_len,
    S: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_U: tl.constexpr,
    USE_TMA: tl.constexpr, SPLIT_D: tl.constexpr,
):  # fmt: skip
    # q~ k~^T for one (row tile, column tile): S products of depth D (one per antidiagonal slot), each in SPLIT_D
    # chunks for a deeper load pipeline
    BLOCK_K: tl.constexpr = BLOCK_D // SPLIT_D
    acc = tl.zeros([BLOCK_T, BLOCK_U], dtype=tl.float32)
    for i in tl.range(S * SPLIT_D):
        slot = i // SPLIT_D
        offs_k = (i % SPLIT_D) * BLOCK_K + tl.arange(0, BLOCK_K)
        if USE_TMA:  # views [B, H, L/S, S, D]: row t, slot i is token t*S + i; out-of-range rows read as zeros
            qi = QDesc.load([batch, head, tile * BLOCK_T, slot, (i % SPLIT_D) * BLOCK_K]).reshape(BLOCK_T, BLOCK_K)
            ki = KDesc.load([batch, kv_head, jt * BLOCK_U, S - 1 - slot, (i % SPLIT_D) * BLOCK_K])
            ki = ki.reshape(BLOCK_U, BLOCK_K)
        else:
            q_rows = offs_t * S + slot
            k_rows = offs_u * S + (S - 1 - slot)
            k_ok = offs_k < D
            q_ptrs = q_base + q_rows[:, None] * sql + offs_k[None, :]
            k_ptrs = k_base + k_rows[:, None] * skl + offs_k[None, :]
            qi = tl.load(q_ptrs, mask=(q_rows < q_len)[:, None] & k_ok[None, :], other=0.0)
            ki = tl.load(k_ptrs, mask=(k_rows < k_len)[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(qi, tl.trans(ki), acc)
    return acc


@triton.jit
def _rescale_partials(
    part_base, tmax_base, out_base, m_i, l_i, row_ok, offs_t, tile, n_tiles, num_rows, num_k_blocks, num_tiles,
    R: tl.constexpr, BLOCK_T: tl.constexpr, NB: tl.constexpr, PARTIAL: tl.constexpr,
):  # fmt: skip
    # Rescale every partial to the row's final max: block scores divide by the sum and add up the R rows of each query
    # block; partial scores stay per row, in place.
    if not PARTIAL:
        inv_l = 1.0 / tl.where(row_ok, l_i, 1.0)  # padding rows: partials of 0 and a sum of 0
    m_ref = tl.where(m_i == float("-inf"), 0.0, m_i)
    offs_r = tile * (BLOCK_T // R) + tl.arange(0, BLOCK_T // R)
    for jt in range(0, n_tiles):
        offs_c = jt * NB + tl.arange(0, NB)
        c_ok = offs_c < num_k_blocks
        part_ptrs = part_base + offs_t[:, None] * num_k_blocks + offs_c[None, :]
        part_ok = (offs_t < num_rows)[:, None] & c_ok[None, :]
        partial = tl.load(part_ptrs, mask=part_ok, other=0.0)
        tmax = tl.load(tmax_base + offs_t * num_tiles + jt, mask=offs_t < num_rows, other=0.0)
        weight = tl.math.exp2(tmax - m_ref)
        if PARTIAL:
            tl.store(part_ptrs, partial * weight[:, None], mask=part_ok)
        else:
            probs = partial * (weight * inv_l)[:, None]
            blocks = tl.sum(tl.reshape(probs, (BLOCK_T // R, R, NB)), 1)
            out_ptrs = out_base + offs_r[:, None] * num_k_blocks + offs_c[None, :]
            tl.store(out_ptrs, blocks, mask=(offs_r < num_rows // R)[:, None] & c_ok[None, :])


@triton.autotune(
    configs=_configs(),
    key=["S", "D", "R", "CAUSAL", "G", "PARTIAL", "USE_TMA", "VARLEN"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _antidiagonal_scores_fwd(
    Q, K, QDesc, KDesc, Partial, TileMax, Out, RowMax, Lengths,
    sqb, sqh, sql, skb, skh, skl, smb, smh,
    scale_log2, q_len, k_len, causal_offset, num_heads, head_offset, num_rows, num_k_blocks, num_tiles,
    G: tl.constexpr, S: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, R: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_U: tl.constexpr, CAUSAL: tl.constexpr, PARTIAL: tl.constexpr, GIVEN_MAX: tl.constexpr,
    USE_TMA: tl.constexpr, VARLEN: tl.constexpr, FLAT: tl.constexpr = False, SPLIT_D: tl.constexpr = 1,
):  # fmt: skip
    # q_len, k_len: tokens in Q and K (VARLEN: each batch element's own, from Lengths, as both); reshaped key u is
    # causally visible to reshaped query t when u*S <= causal_offset + t*S + S - 1. PARTIAL: leave in Partial the sums
    # relative to the row max (log2 units) that RowMax receives (or holds, GIVEN_MAX); otherwise write block scores.
    pid_bh = tl.program_id(0)  # index within this launch's heads
    tile = tl.cdiv(num_rows, BLOCK_T) - 1 - tl.program_id(1)  # long causal rows first
    batch = pid_bh // num_heads
    head = head_offset + pid_bh % num_heads
    if VARLEN:
        q_len = tl.load(Lengths + batch).to(tl.int32)
        k_len = q_len
    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    q_base = Q + batch * sqb + head * sqh
    k_base = K + batch * skb + (head // G) * skh
    row_ok = (offs_t * S < q_len) & (offs_t < num_rows)  # padding query rows see no key

    n_cols = tl.cdiv(k_len, S)
    if CAUSAL:
        last_t = tl.minimum(tile * BLOCK_T + BLOCK_T, tl.cdiv(q_len, S)) - 1
        n_cols = tl.minimum(n_cols, tl.maximum((causal_offset + last_t * S + S - 1) // S + 1, 0))
    n_tiles = tl.cdiv(n_cols, BLOCK_U)

    NB: tl.constexpr = BLOCK_U // R  # key blocks per column tile
    part_base = Partial + pid_bh.to(tl.int64) * num_rows * num_k_blocks
    tmax_base = TileMax + pid_bh.to(tl.int64) * num_rows * num_tiles
    m_i = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_T], dtype=tl.float32)
    for jt in tl.range(0, n_tiles, flatten=FLAT):
        offs_u = jt * BLOCK_U + tl.arange(0, BLOCK_U)
        acc = _tile_products(QDesc, KDesc, q_base, k_base, sql, skl, batch, head, head // G, tile, jt, offs_t, offs_u,
                             q_len, k_len, S, D, BLOCK_D, BLOCK_T, BLOCK_U, USE_TMA, SPLIT_D)  # fmt: skip
        s = acc * scale_log2
        ok = row_ok[:, None] & (offs_u * S < k_len)[None, :]
        if CAUSAL:
            ok = ok & (offs_u[None, :] * S <= causal_offset + offs_t[:, None] * S + S - 1)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row may see no key of a tile (or of a whole key shard): exponents against 0 then give 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        e = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(e, 1)
        m_i = m_new
        offs_c = jt * NB + tl.arange(0, NB)
        part_ok = (offs_t < num_rows)[:, None] & (offs_c < num_k_blocks)[None, :]
        tl.store(part_base + offs_t[:, None] * num_k_blocks + offs_c[None, :], tl.sum(tl.reshape(e, (BLOCK_T, NB, R)), 2),
                 mask=part_ok)  # fmt: skip
        tl.store(tmax_base + offs_t * num_tiles + jt, m_new, mask=offs_t < num_rows)
    # The loop below reads back partials that other threads of this program stored: make those stores visible first.
    tl.debug_barrier()
    if PARTIAL:
        rmax_ptrs = RowMax + batch * smb + head * smh + offs_t
        if GIVEN_MAX:
            m_i = tl.load(rmax_ptrs, mask=offs_t < num_rows, other=float("-inf"))
        else:
            tl.store(rmax_ptrs, m_i, mask=offs_t < num_rows)
    out_base = Out + pid_bh.to(tl.int64) * (num_rows // R) * num_k_blocks
    _rescale_partials(part_base, tmax_base, out_base, m_i, l_i, row_ok, offs_t, tile, n_tiles, num_rows, num_k_blocks,
                      num_tiles, R, BLOCK_T, NB, PARTIAL)  # fmt: skip


def unsupported_geometry(block_size: int, stride: int) -> str | None:
    """Why the Triton scorers cannot take ``block_size`` and ``stride``, or ``None`` when they can.

    They need a power-of-two ``block_size >= 16`` that ``stride`` divides into a power of two ``block_size / stride``
    of at most 64.
    """
    if stride <= 0 or block_size % stride != 0:
        return f"block_size ({block_size}) must be a multiple of stride ({stride})"
    r = block_size // stride
    if block_size & (block_size - 1) or r & (r - 1) or block_size < 16:
        return f"the Triton scorer needs power-of-two block_size >= 16 and block_size/stride; got {block_size}/{stride}"
    if r > 64:
        return f"the Triton scorer needs block_size/stride <= 64, got {r}"
    return None


def _score(
    q: Tensor,
    k: Tensor,
    out: Tensor,
    row_max: Tensor | None,
    *,
    stride: int,
    block_size: int,
    causal: bool,
    causal_offset: int,
    scale: float | None,
    given_max: bool = False,
    use_tma: bool | None = None,
    lengths: Tensor | None = None,
) -> None:
    """Run the scorer over every head, as many heads per launch as :data:`PARTIAL_BUDGET_BYTES` allows.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``, both with unit stride along D; geometry already checked.
        out: zero-initialised float32, written: block scores ``[B, Hq, Qb, Kb]`` when ``row_max`` is ``None``, else
            partial sums ``[B, Hq, Tq, Kb]`` relative to ``row_max``.
        row_max: float32 ``[B, Hq, Tq]`` in log2 units: the kernel writes each row's max there, or reads it when
            ``given_max``.
        causal_offset: reshaped key ``u`` is visible to reshaped query ``t`` when ``uS <= causal_offset + tS + S - 1``.
        lengths: int ``[B]`` on q's device, or ``None``: each batch element's own token count, for queries and keys
            alike (``Lq == Lk``, ``causal_offset == 0``); rows and keys past it are padding.
    """
    bsz, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    r = block_size // stride
    partial_mode = row_max is not None
    qb, kb = -(-lq // block_size), -(-lk // block_size)
    num_rows = qb * r  # reshaped query rows, padded to whole query blocks
    num_tiles = triton.cdiv(kb * r, 64)  # room for the narrowest column tile any config uses
    factor = (scale if scale is not None else 1.0 / math.sqrt(d)) / stride * LOG2E

    q_desc = k_desc = None
    if use_tma is None:
        use_tma = tma_usable(q, k)
    if use_tma:
        q_desc, k_desc = (_strided_rows_descriptor(t, stride) for t in (q, k))
    per_head = num_rows * (kb + num_tiles) * 4
    heads_per_launch = max(1, min(hq, PARTIAL_BUDGET_BYTES // max(1, bsz * per_head)))
    for h0 in range(0, hq, heads_per_launch):
        nh = min(heads_per_launch, hq - h0)
        whole = nh == hq
        tile_max = torch.empty(bsz * nh, num_rows, num_tiles, dtype=torch.float32, device=q.device)
        if partial_mode:  # the kernel rescales the partials in place: they are the output
            partial = out if whole else torch.zeros(bsz, nh, num_rows, kb, dtype=torch.float32, device=q.device)
            scores = partial
        else:
            partial = torch.empty(bsz * nh, num_rows, kb, dtype=torch.float32, device=q.device)
            scores = out if whole else torch.zeros(bsz, nh, qb, kb, dtype=torch.float32, device=q.device)
        rmax = row_max if row_max is not None else tile_max  # RowMax is only touched in partial mode
        grid = lambda meta, n=bsz * nh: (n, triton.cdiv(num_rows, meta["BLOCK_T"]))
        _antidiagonal_scores_fwd[grid](
            q, k, q_desc, k_desc, partial, tile_max, scores, rmax, lengths,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), rmax.stride(0), rmax.stride(1),
            factor, lq, lk, causal_offset, nh, h0, num_rows, kb, num_tiles,
            G=hq // hkv, S=stride, D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), R=r, CAUSAL=causal,
            PARTIAL=partial_mode, GIVEN_MAX=given_max, USE_TMA=use_tma, VARLEN=lengths is not None,
        )  # fmt: skip
        if not whole:
            out[:, h0 : h0 + nh].copy_(scores)


def _strided_rows_descriptor(t: Tensor, stride: int):
    """A bulk-copy descriptor over ``t`` ``[B, H, L, D]`` seen as ``[B, H, ceil(L/S), S, D]`` (tile shape set per config).

    The view needs ``L`` to be a multiple of ``S``; otherwise ``t`` is zero-padded (a copy), which the kernel's masks
    treat as the padding it is.
    """
    from triton.tools.tensor_descriptor import TensorDescriptor

    bsz, heads, length, d = t.shape
    pad = -length % stride
    if pad:
        t = torch.nn.functional.pad(t, (0, 0, 0, pad))
    sb, sh, sl, _ = t.stride()
    shape = [bsz, heads, (length + pad) // stride, stride, d]
    return TensorDescriptor(t, shape, [sb, sh, stride * sl, sl, 1], [1, 1, 16, 1, d])


def _unit_stride(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """q and k with unit stride along D (the kernel's loads assume it); a copy only where needed."""
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    return q, k


def antidiagonal_block_scores(
    q: Tensor,
    k: Tensor,
    *,
    stride: int,
    block_size: int,
    causal: bool = True,
    scale: float | None = None,
    use_tma: bool | None = None,
    lengths: Tensor | None = None,
) -> Tensor:
    """XAttention block scores ``[B, Hq, Qb, Kb]`` (float32); same contract as the reference.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; ``block_size % stride == 0``, ``block_size / stride`` a power of
            two, ``block_size`` a power of two (see :func:`unsupported_geometry`).
        use_tma: load the strided rows with bulk tensor copies; default: where :func:`~xattention.kernels.tma_usable`.
        lengths: int ``[B]`` on q's device for a right-padded batch (``Lq == Lk``): see the reference. q and k must
            hold zeros past each length (the bulk copies read them).
    """
    error = unsupported_geometry(block_size, stride)
    if error is not None:
        raise ValueError(error)
    q, k = _unit_stride(q, k)
    bsz, hq, lq, _ = q.shape
    lk = k.shape[2]
    out = torch.zeros(bsz, hq, -(-lq // block_size), -(-lk // block_size), dtype=torch.float32, device=q.device)
    _score(q, k, out, None, stride=stride, block_size=block_size, causal=causal, causal_offset=lk - lq, scale=scale,
           use_tma=use_tma, lengths=lengths)  # fmt: skip
    return out


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
) -> tuple[Tensor, Tensor]:
    """Online-softmax statistics of XAttention's reshaped rows against one key shard; same contract as the reference.

    ``q`` holds queries ``q_start …`` of ``q_len``, ``k`` keys ``k_start …`` of ``k_len`` (shards start on block
    boundaries; only the one ending the sequence may end inside a block). Returns ``(row_max, sums)``: float32
    ``[B, Hq, Tq]`` (``-inf`` where no key of the shard is visible; or the ``row_max`` passed in, for a second pass
    against a global max) and float32 ``[B, Hq, Tq, Kb_s]``, per key block the sum of ``exp(x - row_max)``.

    Args:
        q: ``[B, Hq, Lq_s, D]``; k: ``[B, Hkv, Lk_s, D]``; block size and stride as for
            :func:`antidiagonal_block_scores`.
    """
    error = unsupported_geometry(block_size, stride)
    if error is not None:
        raise ValueError(error)
    bsz, hq, lq_s, _ = q.shape
    lk_s = k.shape[2]
    q_len, k_len = shard_lengths((q_start, lq_s, q_len), (k_start, lk_s, k_len), block_size)
    q, k = _unit_stride(q, k)
    num_rows = -(-lq_s // block_size) * (block_size // stride)
    sums = torch.zeros(bsz, hq, num_rows, -(-lk_s // block_size), dtype=torch.float32, device=q.device)
    # the kernel's row maxima are in log2 units (x * log2(e))
    if row_max is None:
        log2_max = torch.empty(bsz, hq, num_rows, dtype=torch.float32, device=q.device)
    else:
        row_max = row_max.to(torch.float32, copy=True).reshape(bsz, hq, num_rows)
        log2_max = (row_max * LOG2E).contiguous()
    _score(
        q, k, sums, log2_max, stride=stride, block_size=block_size, causal=causal,
        causal_offset=(k_len - q_len) + q_start - k_start, scale=scale, given_max=row_max is not None,
    )  # fmt: skip
    return (log2_max / LOG2E if row_max is None else row_max), sums
