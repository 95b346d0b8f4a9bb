"""Dense attention as a method: every causally visible block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..block_mask import BlockMask
from .base import Geometry, Method

__all__ = ["Dense"]


@dataclass(kw_only=True, eq=False)
class Dense(Method):
    """Keeps every causally visible block: the exact baseline. ``sparse_attention`` runs it as dense SDPA."""

    name: ClassVar[str] = "dense"
    padded_batch: ClassVar[str] = "geometry"

    def choose_blocks(self, q: Tensor, k: Tensor, geo: Geometry, *, scale: float | None) -> BlockMask:
        """Every visible block of ``geo``."""
        return geo.block_mask(geo.visible.expand(geo.batch, geo.heads, -1, -1))
