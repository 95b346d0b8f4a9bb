"""Triton cumulative-threshold block selection (twin of :func:`.reference.select_blocks`).

One program per (batch, head, query-block row). The row's scores are packed with their column into 64-bit keys
(score bits high, inverted column low: non-negative floats order like their bit patterns), sorted in registers
(descending score, lower column first on ties, forced blocks first), prefix-summed, and the keep flags scattered back.
Only the visible part of a row is ever sorted; the cumulative sum runs in float32 (the reference uses float64), so the
two can differ only where a row's running sum ties the threshold to within rounding.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["select_blocks"]

INF_BITS: tl.constexpr = tl.constexpr(0x7F800000)  # float32 +inf: forced blocks sort first


def _configs() -> list[triton.Config]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({}, num_warps=4)]
    return [triton.Config({}, num_warps=w) for w in (2, 4, 8)]


@triton.autotune(configs=_configs(), key=["KB_POW2", "CAUSAL"])
@triton.jit
def _select_blocks_fwd(
    Scores, Thr, Mask,
    q_len, k_len, num_heads, num_q_blocks, num_k_blocks, block_size,
    KB_POW2: tl.constexpr, CAUSAL: tl.constexpr,
):  # fmt: skip
    row_id = tl.program_id(0).to(tl.int64)
    row = row_id % num_q_blocks
    head = (row_id // num_q_blocks) % num_heads
    offset = k_len - q_len
    lo = (offset + row * block_size) // block_size
    hi = (offset + tl.minimum(row * block_size + block_size - 1, q_len - 1)) // block_size

    cols = tl.arange(0, KB_POW2)
    in_row = cols < num_k_blocks
    if CAUSAL:
        in_row = in_row & (cols <= hi)
    forced = in_row & ((cols == 0) | ((cols >= lo) & (cols <= hi)))
    base = Scores + row_id * num_k_blocks
    s = tl.load(base + cols, mask=in_row, other=0.0)
    total = tl.sum(s, 0)
    thr = tl.load(Thr + head)
    # threshold >= 1 keeps every non-zero block: no finite running sum may stop it.
    target = tl.where(thr >= 1.0, float("inf"), thr * total)

    bits = s.to(tl.int32, bitcast=True).to(tl.int64)
    bits = tl.where(forced, INF_BITS, bits)
    key = (bits << 32) | (KB_POW2 - 1 - cols).to(tl.int64)
    key = tl.sort(key, descending=True)
    col = (KB_POW2 - 1 - (key & 0xFFFFFFFF)).to(tl.int32)

    col_in_row = col < num_k_blocks
    if CAUSAL:
        col_in_row = col_in_row & (col <= hi)
    col_forced = col_in_row & ((col == 0) | ((col >= lo) & (col <= hi)))
    sorted_s = tl.load(base + col, mask=col_in_row, other=0.0)
    before = tl.cumsum(sorted_s, 0) - sorted_s
    keep = ((before < target) & (sorted_s > 0.0) & col_in_row) | col_forced
    tl.store(Mask + row_id * num_k_blocks + col, keep.to(tl.int8), mask=col < num_k_blocks)


def select_blocks(
    scores: Tensor,
    threshold: float | Tensor,
    *,
    q_len: int,
    k_len: int,
    block_size: int,
    causal: bool = True,
) -> Tensor:
    """bool ``[B, Hq, Qb, Kb]`` kept blocks for non-negative ``scores`` ``[B, Hq, Qb, Kb]``; same rule as the reference.

    Args:
        threshold: float, or per-head tensor ``[Hq]``, in ``(0, 1]``.
    """
    bsz, hq, qb, kb = scores.shape
    scores = scores.float().contiguous()
    thr = torch.as_tensor(threshold, dtype=torch.float32, device=scores.device).expand(hq).contiguous()
    mask = torch.empty(bsz, hq, qb, kb, dtype=torch.int8, device=scores.device)
    _select_blocks_fwd[(bsz * hq * qb,)](
        scores, thr, mask, q_len, k_len, hq, qb, kb, block_size,
        KB_POW2=max(16, triton.next_power_of_2(kb)), CAUSAL=causal,
    )  # fmt: skip
    return mask.view(torch.bool)
