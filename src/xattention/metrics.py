"""Quality measures for block masks against exact attention."""

from __future__ import annotations

from torch import Tensor

from ._validation import check_block_mask, check_qkv
from .block_mask import BlockMask
from .kernels.reference import true_block_scores

__all__ = ["attention_mass_kept"]


def attention_mass_kept(
    q: Tensor, k: Tensor, mask: BlockMask, *, scale: float | None = None, chunk_elements: int | None = None
) -> Tensor:
    """Fraction of the exact softmax attention mass that falls inside ``mask``'s kept blocks, per head.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; mask: a :class:`BlockMask` for them.
        chunk_elements: scores held at once (default: see
            :func:`~xattention.kernels.reference.rows_per_chunk`).
    Returns:
        float32 ``[B, Hq]``, the mean over queries of the kept probability mass (1.0 for the dense mask).
    """
    _, _, _, lq, _, _ = check_qkv(q, k)
    check_block_mask(mask, q, k)
    true = true_block_scores(q, k, block_size=mask.block_size, causal=mask.causal, scale=scale, chunk_elements=chunk_elements)
    return (true * mask.mask.to(true.dtype)).sum(dim=(-1, -2)) / lq
