"""The same block mask run through PyTorch FlexAttention (``torch.nn.attention.flex_attention``).

An alternative backend and the baseline our Triton kernel is measured against. Kept blocks that every query of the row
sees entirely go in as FlexAttention "full" blocks (no mask_mod call); the diagonal and padded ones as partial blocks
with a bottom-right causal ``mask_mod``. Needs torch only (the index lists come from
:func:`~xattention.block_mask.block_indices`, not from the Triton module).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from ..block_mask import block_indices, full_block_limit
from . import softmax_scale

__all__ = ["block_sparse_attention", "flex_block_mask"]


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_block_mask(mask: Tensor, *, block_size: int, q_len: int, k_len: int, causal: bool = True):
    """Build a FlexAttention ``BlockMask`` from our bool ``[B, H, Qb, Kb]`` with ``BlockMask.from_kv_blocks``."""
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

    kb = mask.shape[3]
    cols = torch.arange(kb, device=mask.device)[None, :]
    full = cols <= full_block_limit(q_len, k_len, block_size, causal, mask.device)[:, None]
    partial_idx, partial_cnt = block_indices(mask & ~full)
    full_idx, full_cnt = block_indices(mask & full)
    offset = k_len - q_len

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        visible = kv_idx < k_len
        return visible & (kv_idx <= q_idx + offset) if causal else visible

    return FlexBlockMask.from_kv_blocks(
        partial_cnt,
        partial_idx,
        full_cnt,
        full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(q_len, k_len),
    )


def block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, *, block_size: int, causal: bool = True, scale: float | None = None
) -> Tensor:
    """Exact attention over the kept blocks of ``mask`` through FlexAttention; same contract as the reference.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``; mask: bool ``[B, Hq, Qb, Kb]``.
    """
    lq, lk, d = q.shape[2], k.shape[2], q.shape[3]
    block_mask = flex_block_mask(mask, block_size=block_size, q_len=lq, k_len=lk, causal=causal)
    factor = softmax_scale(scale, d)
    out = _compiled_flex()(q, k, v, block_mask=block_mask, scale=factor, enable_gqa=q.shape[1] != k.shape[1])
    return out
