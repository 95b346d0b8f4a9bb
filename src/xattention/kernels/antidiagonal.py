"""Triton antidiagonal block scoring (twin of :func:`.reference.antidiagonal_block_scores`).

One program per (batch x query head, tile of ``BLOCK_T`` reshaped query rows). It forms ``q~ k~^T`` tile by tile as
``S`` strided ``D``-deep products (``q~[t] . k~[u] = sum_i q[tS+i] . k[uS+S-1-i]``, the antidiagonal of each S x S tile),
keeps an online softmax (running max and sum per row), and writes per key block the row's partial exp-sums with the max
they were taken against. A second loop in the same program rescales those partials by the final max and sum and adds up
the ``b/S`` rows of each query block. The ``(L/S)^2`` score matrix never reaches memory; the ``(L/S) x (L/b)`` partials
(a ``b``-fold reduction of it) do, once each way.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["antidiagonal_block_scores"]

LOG2E = 1.4426950408889634
# Float32 partials held at once across a launch (1 GiB); more heads are processed in successive launches.
PARTIAL_BUDGET_BYTES = 1 << 30


def _configs() -> list[triton.Config]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_T": 64, "BLOCK_U": 64}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_T": bt, "BLOCK_U": bu}, num_warps=w, num_stages=s)
        for bt, bu in ((128, 128), (128, 64), (64, 128))
        for w in (4, 8)
        for s in (2, 3)
    ]


@triton.autotune(configs=_configs(), key=["S", "D", "R", "CAUSAL", "G"])
@triton.jit
def _antidiagonal_scores_fwd(
    Q, K, Partial, TileMax, Out,
    sqb, sqh, sql, skb, skh, skl,
    scale_log2, q_len, k_len, num_heads, head_offset, num_rows, num_cols, num_k_blocks, num_tiles,
    G: tl.constexpr, S: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, R: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_U: tl.constexpr, CAUSAL: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)  # index within this launch's heads
    n_row_tiles = tl.cdiv(num_rows, BLOCK_T)
    tile = n_row_tiles - 1 - tl.program_id(1)  # long causal rows first
    batch = pid_bh // num_heads
    head = head_offset + pid_bh % num_heads
    kv_head = head // G
    offset = k_len - q_len

    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_base = Q + batch * sqb + head * sqh
    k_base = K + batch * skb + kv_head * skh

    n_cols = tl.cdiv(k_len, S)
    if CAUSAL:
        last_t = tl.minimum(tile * BLOCK_T + BLOCK_T, tl.cdiv(q_len, S)) - 1
        n_cols = tl.minimum(n_cols, (offset + last_t * S + S - 1) // S + 1)
    n_tiles = tl.cdiv(n_cols, BLOCK_U)

    NB: tl.constexpr = BLOCK_U // R  # key blocks per column tile
    part_base = Partial + pid_bh.to(tl.int64) * num_rows * num_k_blocks
    tmax_base = TileMax + pid_bh.to(tl.int64) * num_rows * num_tiles
    m_i = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_T], dtype=tl.float32)
    for jt in range(0, n_tiles):
        offs_u = jt * BLOCK_U + tl.arange(0, BLOCK_U)
        acc = tl.zeros([BLOCK_T, BLOCK_U], dtype=tl.float32)
        for i in range(S):
            q_rows = offs_t * S + i
            k_rows = offs_u * S + (S - 1 - i)
            qi = tl.load(
                q_base + q_rows[:, None] * sql + offs_d[None, :],
                mask=(q_rows < q_len)[:, None] & d_ok[None, :],
                other=0.0,
            )
            ki = tl.load(
                k_base + k_rows[:, None] * skl + offs_d[None, :],
                mask=(k_rows < k_len)[:, None] & d_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(qi, tl.trans(ki), acc)
        s = acc * scale_log2
        ok = (offs_u * S < k_len)[None, :]
        if CAUSAL:
            ok = ok & (offs_u[None, :] * S <= offset + offs_t[:, None] * S + S - 1)
        s = tl.where(ok, s, float("-inf"))
        # Column 0 is visible to every row, so the running max is finite from the first tile on.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        e = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(e, 1)
        m_i = m_new
        partial = tl.sum(tl.reshape(e, (BLOCK_T, NB, R)), 2)
        offs_c = jt * NB + tl.arange(0, NB)
        tl.store(
            part_base + offs_t[:, None] * num_k_blocks + offs_c[None, :],
            partial,
            mask=(offs_t < num_rows)[:, None] & (offs_c < num_k_blocks)[None, :],
        )
        tl.store(tmax_base + offs_t * num_tiles + jt, m_new, mask=offs_t < num_rows)

    # Rescale every partial to the row's final softmax and sum the R rows of each query block.
    row_ok = (offs_t * S < q_len) & (offs_t < num_rows)
    inv_l = tl.where(row_ok, 1.0 / l_i, 0.0)
    offs_r = tile * (BLOCK_T // R) + tl.arange(0, BLOCK_T // R)
    out_base = Out + pid_bh.to(tl.int64) * (num_rows // R) * num_k_blocks
    for jt in range(0, n_tiles):
        offs_c = jt * NB + tl.arange(0, NB)
        c_ok = offs_c < num_k_blocks
        partial = tl.load(
            part_base + offs_t[:, None] * num_k_blocks + offs_c[None, :],
            mask=(offs_t < num_rows)[:, None] & c_ok[None, :],
            other=0.0,
        )
        tmax = tl.load(tmax_base + offs_t * num_tiles + jt, mask=offs_t < num_rows, other=0.0)
        probs = partial * (tl.math.exp2(tmax - m_i) * inv_l)[:, None]
        blocks = tl.sum(tl.reshape(probs, (BLOCK_T // R, R, NB)), 1)
        tl.store(
            out_base + offs_r[:, None] * num_k_blocks + offs_c[None, :],
            blocks,
            mask=(offs_r < num_rows // R)[:, None] & c_ok[None, :],
        )


def antidiagonal_block_scores(
    q: Tensor,
    k: Tensor,
    *,
    stride: int,
    block_size: int,
    causal: bool = True,
    scale: float | None = None,
) -> Tensor:
    """XAttention block scores ``[B, Hq, Qb, Kb]`` (float32); same contract as the reference.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; ``block_size % stride == 0``, ``block_size / stride`` a power of
            two, ``block_size`` a power of two.
    """
    bsz, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    r = block_size // stride
    if block_size & (block_size - 1) or r & (r - 1) or block_size < 16:
        raise ValueError(
            f"the Triton scorer needs power-of-two block_size >= 16 and block_size/stride; got {block_size}/{stride}"
        )
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    qb, kb = -(-lq // block_size), -(-lk // block_size)
    num_rows = qb * r  # reshaped query rows, padded to whole query blocks
    if r > 64:
        raise ValueError(f"the Triton scorer needs block_size/stride <= 64, got {r}")
    num_tiles = triton.cdiv(kb * r, 64)  # room for the narrowest column tile any config uses
    factor = (scale if scale is not None else 1.0 / math.sqrt(d)) / stride * LOG2E

    out = torch.zeros(bsz, hq, qb, kb, dtype=torch.float32, device=q.device)
    per_head = num_rows * (kb + num_tiles) * 4
    heads_per_launch = max(1, min(hq, PARTIAL_BUDGET_BYTES // max(1, bsz * per_head)))
    for h0 in range(0, hq, heads_per_launch):
        nh = min(heads_per_launch, hq - h0)
        partial = torch.empty(bsz * nh, num_rows, kb, dtype=torch.float32, device=q.device)
        tile_max = torch.empty(bsz * nh, num_rows, num_tiles, dtype=torch.float32, device=q.device)
        out_slice = out[:, h0 : h0 + nh] if nh != hq else out
        scores = torch.zeros(bsz, nh, qb, kb, dtype=torch.float32, device=q.device) if nh != hq else out_slice
        grid = lambda meta, n=bsz * nh: (n, triton.cdiv(num_rows, meta["BLOCK_T"]))
        _antidiagonal_scores_fwd[grid](
            q, k, partial, tile_max, scores,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            factor, lq, lk, nh, h0, num_rows, kb * r, kb, num_tiles,
            G=hq // hkv, S=stride, D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), R=r, CAUSAL=causal,
        )  # fmt: skip
        if nh != hq:
            out_slice.copy_(scores)
    return out
