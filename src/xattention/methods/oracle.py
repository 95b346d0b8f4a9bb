"""The oracle: block selection from the exact attention, the ceiling every estimator is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..block_mask import BlockMask
from ..kernels.reference import true_block_scores
from .base import Geometry, Method, check_fraction

__all__ = ["Oracle"]


@dataclass(kw_only=True, eq=False)
class Oracle(Method):
    """Keeps, per row, the fewest blocks that hold ``threshold`` of the *true* attention mass.

    Scores are the exact softmax mass per block (:func:`~xattention.kernels.reference.true_block_scores`: float32,
    computed in chunks of query rows, never an ``Lq x Lk`` matrix at once), selected with the same rule as XAttention
    (:func:`~xattention.kernels.reference.select_blocks`: sink and diagonal blocks forced and counted first, then
    descending mass until ``threshold x`` the row's mass). ``Oracle(threshold=1.0)`` keeps every block with non-zero
    mass, i.e. every visible block for generic inputs. It costs a full attention pass, so it is a measuring stick
    (mass kept vs density), not a speed-up.

    Attributes:
        threshold: mass fraction ``τ`` in ``(0, 1]`` (default 0.9).
    """

    name: ClassVar[str] = "oracle"

    threshold: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("threshold", self.threshold)

    def choose_blocks(self, q: Tensor, k: Tensor, geo: Geometry, *, scale: float | None) -> BlockMask:
        """Oracle blocks, computed in PyTorch on the inputs' device (the scoring backend is not used)."""
        scores = true_block_scores(q, k, block_size=self.block_size, causal=geo.causal, scale=scale)
        return geo.block_mask(geo.select(scores, float(self.threshold)))
