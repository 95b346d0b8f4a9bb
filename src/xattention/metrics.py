"""Quality measures for block masks against exact attention."""

from __future__ import annotations

from torch import Tensor

from ._validation import check_block_mask, check_qkv
from .block_mask import BlockMask
from .kernels.reference import DEFAULT_CHUNK_ELEMENTS, true_block_scores

__all__ = ["attention_mass_kept"]

# Exact attention is computed in chunks of this many scores: small on CPUs (cache-sized pieces ran fastest there),
# 16x larger on accelerators, where one chunk is a handful of kernel launches and launch overhead dominates.
ACCELERATOR_CHUNK_ELEMENTS = 1 << 26


def attention_mass_kept(
    q: Tensor, k: Tensor, mask: BlockMask, *, scale: float | None = None, chunk_elements: int | None = None
) -> Tensor:
    """Fraction of the exact softmax attention mass that falls inside ``mask``'s kept blocks, per head.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; mask: a :class:`BlockMask` for them.
        chunk_elements: scores held at once (default: ``DEFAULT_CHUNK_ELEMENTS`` on the CPU,
            ``ACCELERATOR_CHUNK_ELEMENTS`` elsewhere).
    Returns:
        float32 ``[B, Hq]``, the mean over queries of the kept probability mass (1.0 for the dense mask).
    """
    _, _, _, lq, _, _ = check_qkv(q, k)
    check_block_mask(mask, q, k)
    if chunk_elements is None:
        chunk_elements = DEFAULT_CHUNK_ELEMENTS if q.device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    true = true_block_scores(q, k, block_size=mask.block_size, causal=mask.causal, scale=scale, chunk_elements=chunk_elements)
    return (true * mask.mask.to(true.dtype)).sum(dim=(-1, -2)) / lq
