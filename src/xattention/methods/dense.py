"""Dense attention as a method: every causally visible block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from .._validation import check_qkv
from ..block_mask import BlockMask
from .base import Method

__all__ = ["Dense"]


@dataclass(kw_only=True, eq=False)
class Dense(Method):
    """Keeps every causally visible block: the exact baseline. ``sparse_attention`` runs it as dense SDPA."""

    name: ClassVar[str] = "dense"
    padded_batch: ClassVar[str] = "geometry"

    def estimate(
        self, q: Tensor, k: Tensor, *, causal: bool = True, scale: float | None = None, backend: str = "auto"
    ) -> BlockMask:
        bsz, hq, _, lq, lk, _ = check_qkv(q, k)
        return BlockMask.full(bsz, hq, block_size=self.block_size, q_len=lq, k_len=lk, causal=causal, device=q.device)
