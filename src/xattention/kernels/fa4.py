"""FlashAttention-4 (``flash-attn-4``, CuTe-DSL kernels compiled just in time) behind our ``[B, H, L, D]`` contract.

Block-sparse, dense and sliding-window forwards. A :class:`~xattention.block_mask.BlockMask` becomes FA4's
``BlockSparseTensorsTorch`` on the device without a host synchronisation: the kept blocks each row sees entirely go in
the "full" lists (no masking), the rest of its visible kept blocks (at most two: the diagonal ones and the padded last
block) in the "mask" lists, where FA4 applies the causal and length masks. The split is
:func:`~xattention.kernels.block_sparse_attention.split_block_lists`, the one the Triton kernel uses.

Nothing here imports ``flash_attn`` at import time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import capability, softmax_scale

__all__ = [
    "block_sparse_attention",
    "block_sparse_tensors",
    "dense_attention",
    "refusal",
    "window_attention",
]


# FA4's Hopper/Blackwell forward tiles are 128 x 128 at head dims <= 128; its block-sparse path needs the sparse KV block
# to equal the tile (sm90), so block-sparse runs at block_size 128 only.
FA4_BLOCK = 128
# Most mask-list entries a row can have: the one or two blocks holding its own positions (two when k_len - q_len is not
# a multiple of the block) -- the padded last block is always one of them or full-limit + 1.
MAX_MASKED_PER_ROW = 2


def refusal(q: Tensor, k: Tensor, *, block_size: int | None = None) -> str | None:
    """Why FA4 would refuse these inputs (``None`` when it takes them): dtype, head dim, and for block-sparse
    (``block_size`` given) the block geometry. The checks FA4's interface makes, made before calling it, from shapes
    and dtypes alone (so they trace under ``torch.compile``)."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (FA4 takes float16/bfloat16)"
    d = q.shape[-1]
    major = capability(q.device) // 10
    if d % 8 or d > 256 or (major != 9 and d > 128 and d != 256):
        return f"head dim {d}"
    if block_size is not None:
        if block_size != FA4_BLOCK:
            return f"block_size {block_size} (FA4 block-sparse uses {FA4_BLOCK})"
        if major == 9 and d > 128:  # the sm90 tile for D > 128 is narrower than a 128-key block
            return f"block-sparse at head dim {d} on compute capability 9.x"
    if any(t.stride(-1) != 1 for t in (q, k)):
        return "inputs without unit stride along D"
    return None


def _bshd(t: Tensor) -> Tensor:
    """``[B, H, L, D]`` -> FA4's ``[B, L, H, D]`` as a view (FA4 takes any 16-byte aligned strides)."""
    return t.transpose(1, 2)


def block_sparse_tensors(mask: Tensor, *, q_len: int, k_len: int, block_size: int, causal: bool):
    """bool ``[B, H, Qb, Kb]`` -> ``flash_attn.cute.block_sparsity.BlockSparseTensorsTorch``, on the device, no sync.

    Full lists: ``[B, H, Qb, Kb]`` kept columns ``<= full_block_limit`` (ascending); mask lists: ``[B, H, Qb, 2]`` the
    row's other visible kept columns (ascending). Blocks past a row's last visible one are dropped.
    """
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    from .block_sparse_attention import split_block_lists

    indices, counts, n_full = split_block_lists(mask, q_len=q_len, k_len=k_len, block_size=block_size, causal=causal)
    width = min(MAX_MASKED_PER_ROW, indices.shape[-1])
    slots = (n_full.long()[..., None] + torch.arange(width, device=mask.device)).clamp_(max=indices.shape[-1] - 1)
    masked_idx = torch.gather(indices, -1, slots).contiguous()
    return BlockSparseTensorsTorch(
        mask_block_cnt=counts - n_full,
        mask_block_idx=masked_idx,
        full_block_cnt=n_full,
        full_block_idx=indices,
        block_size=(block_size, block_size),
    )


def _fa4_forward(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None, **kwargs) -> tuple[Tensor, Tensor | None]:
    """One ``flash_attn_func`` call on ``[B, H, L, D]`` tensors; returns the output as a ``[B, H, L, D]`` view of FA4's
    ``[B, L, H, D]`` result, and its LSE ``[B, H, L]`` when asked (``return_lse=True`` in ``kwargs``)."""
    from flash_attn.cute import flash_attn_func

    factor = softmax_scale(scale, q.shape[-1])
    out, lse = flash_attn_func(_bshd(q), _bshd(k), _bshd(v), softmax_scale=factor, **kwargs)
    return out.transpose(1, 2), lse


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
    shared_heads: int = 1,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention over the kept blocks of ``mask`` through FA4; same contract as the reference.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``; mask: bool ``[B, Hq, Qb, Kb]``.
        return_lse: also return the float32 natural-log LSE ``[B, Hq, Lq]`` (``-inf`` where a query sees no key).
        shared_heads: the caller's promise that every ``shared_heads`` consecutive heads of ``mask`` are equal; when it
            is the GQA group size, the group's query heads run packed in one tile (K/V loaded once for the group).
    Returns:
        ``[B, Hq, Lq, D]`` in q's dtype (and the LSE).
    """
    bsz, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    if shared_heads == group > 1 and bsz == 1:
        # one "batch" element per K/V head, each with its group's G query heads and one mask broadcast over them
        fq = q.reshape(hkv, group, lq, d)
        fk, fv = (t.reshape(hkv, 1, lk, d) for t in (k, v))
        tensors = block_sparse_tensors(mask[0, ::group].unsqueeze(1), q_len=lq, k_len=lk, block_size=block_size, causal=causal)
        out, lse = _fa4_forward(fq, fk, fv, scale=scale, return_lse=return_lse, causal=causal,
                                block_sparse_tensors=tensors, pack_gqa=True)  # fmt: skip
        # FA4 wrote [Hkv, Lq, G, D]: one copy into [1, Lq, Hq, D], returned as the usual [B, Hq, Lq, D] view
        out = out.transpose(1, 2).permute(1, 0, 2, 3).reshape(bsz, lq, hq, d).transpose(1, 2)
        lse = lse.reshape(bsz, hq, lq) if lse is not None else None
    else:
        tensors = block_sparse_tensors(mask, q_len=lq, k_len=lk, block_size=block_size, causal=causal)
        out, lse = _fa4_forward(q, k, v, scale=scale, return_lse=return_lse, causal=causal, block_sparse_tensors=tensors)
    return (out, lse) if return_lse else out


def dense_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None, return_lse: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Dense attention through FA4 (bottom-right causal, GQA). q ``[B, Hq, Lq, D]``; k, v ``[B, Hkv, Lk, D]``."""
    out, lse = _fa4_forward(q, k, v, scale=scale, return_lse=return_lse, causal=causal)
    return (out, lse) if return_lse else out


def window_attention(q: Tensor, k: Tensor, v: Tensor, *, window: int, scale: float | None = None) -> Tensor:
    """Causal sliding-window attention through FA4: query at position ``p`` sees keys ``p - window < j <= p``.

    q ``[B, Hq, Lq, D]``; k, v ``[B, Hkv, Lk, D]`` (queries aligned to the end of the keys); returns ``[B, Hq, Lq, D]``.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out, _ = _fa4_forward(q, k, v, scale=scale, causal=True, window_size=(window - 1, 0))
    return out
