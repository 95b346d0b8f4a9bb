"""XAttention: block selection by antidiagonal scoring (Xu et al., 2025, arXiv:2503.16428)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..block_mask import BlockMask, check_lengths, length_tensor, padding_positions
from .base import Geometry, Method, check_fraction

__all__ = ["XAttention"]


@dataclass(kw_only=True, eq=False)
class XAttention(Method):
    """Antidiagonal block scoring with cumulative-threshold selection.

    Scores each ``b x b`` block by the softmax mass of its strided antidiagonals (one GEMM at ``1/S`` of the dense cost),
    then keeps per query-block row the sink and diagonal blocks plus the fewest others whose scores reach
    ``threshold x`` the row total. See :func:`xattention.kernels.reference.antidiagonal_block_scores` and
    :func:`~xattention.kernels.reference.select_blocks` for the exact rule.

    Attributes:
        stride: antidiagonal stride ``S`` (default 8); ``block_size % stride == 0``.
        threshold: ``tau`` in ``(0, 1]``, a float or a per-query-head tensor ``[Hq]`` (default 0.95: the
            evidence is in the README, "Accuracy").
        shared_kv_mask: choose one mask per GQA group from the group's mean block scores (threshold: the group's
            largest), so the attention kernel loads each K/V block once per group. Off by default.
    """

    name: ClassVar[str] = "xattention"
    padded_batch: ClassVar[str] = "lengths"

    stride: int = 8
    threshold: float | Tensor = 0.95
    shared_kv_mask: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.stride, int) or self.stride <= 0:
            raise ValueError(f"stride must be a positive int, got {self.stride!r}")
        if self.block_size % self.stride != 0:
            raise ValueError(f"block_size ({self.block_size}) must be a multiple of stride ({self.stride})")
        if isinstance(self.threshold, Tensor):
            if self.threshold.ndim != 1 or self.threshold.numel() == 0 or not self.threshold.is_floating_point():
                raise ValueError(
                    f"a per-head threshold must be a 1-D float tensor [Hq], got shape {tuple(self.threshold.shape)} "
                    f"and dtype {self.threshold.dtype}"
                )
            if self.threshold.is_meta:  # its values cannot be checked (nor used to select)
                raise ValueError("a per-head threshold must hold values, got a tensor on the meta device")
            bad = (self.threshold <= 0) | (self.threshold > 1) | self.threshold.isnan()
            if bool(bad.any()):
                raise ValueError(f"threshold values must lie in (0, 1], got {self.threshold.tolist()}")
        else:
            check_fraction("threshold", self.threshold)  # or a per-head tensor [Hq], checked above

    def head_thresholds(self, num_heads: int, device: torch.device) -> Tensor:
        """float64 ``[Hq]`` thresholds, checking a per-head tensor's length against ``num_heads``.

        float64 because the reference selection compares float64 running sums with ``tau x total``: a float32 ``0.9``
        (0.89999998) would move the cut-off.
        """
        if isinstance(self.threshold, Tensor):
            if self.threshold.numel() != num_heads:
                raise ValueError(f"per-head threshold has {self.threshold.numel()} entries but q has {num_heads} heads")
            return self.threshold.to(device=device, dtype=torch.float64)
        return torch.full((num_heads,), float(self.threshold), device=device, dtype=torch.float64)

    def pool_kv_groups(self, scores: Tensor, thresholds: Tensor, num_kv_heads: int) -> tuple[Tensor, Tensor]:
        """With ``shared_kv_mask``: the GQA group's mean block scores ``[B, Hkv, Qb, Kb]`` and largest threshold
        ``[Hkv]``; otherwise ``scores`` ``[B, Hq, Qb, Kb]`` and ``thresholds`` ``[Hq]`` unchanged."""
        hq = scores.shape[1]
        if not self.shared_kv_mask or hq == num_kv_heads:
            return scores, thresholds
        g = hq // num_kv_heads
        return scores.view(scores.shape[0], num_kv_heads, g, *scores.shape[2:]).mean(dim=2), thresholds.view(
            num_kv_heads, g
        ).amax(dim=1)

    def estimate(
        self,
        q: Tensor,
        k: Tensor,
        *,
        causal: bool = True,
        scale: float | None = None,
        backend: str = "auto",
        lengths: Sequence[int] | None = None,
    ) -> BlockMask:
        """See :meth:`Method.estimate`; ``lengths`` scores a right-padded batch in one pass (prefer
        :meth:`~Method.estimate_padded`, which also empties the rows past each length)."""
        return self.choose_blocks(q, k, self.geometry(q, k, causal=causal, backend=backend), scale=scale, lengths=lengths)

    def choose_blocks(
        self, q: Tensor, k: Tensor, geo: Geometry, *, scale: float | None, lengths: Sequence[int] | None = None
    ) -> BlockMask:
        """Antidiagonal scores on ``geo.backend``, then the cumulative selection per row (see :meth:`estimate`)."""
        causal = geo.causal
        thresholds = self.head_thresholds(geo.heads, q.device)
        lens = None
        if lengths is not None:  # positions past each length read as the zeros a lone element is padded with
            lens = length_tensor(check_lengths(lengths, geo.batch, geo.q_len, geo.k_len, causal), q.device)
            padding = padding_positions(lens, geo.q_len)[:, None, :, None]
            q, k = q.masked_fill(padding, 0.0), k.masked_fill(padding, 0.0)
        on_triton = geo.backend == "triton"
        if on_triton:
            from ..kernels import ops

            scores = ops.block_scores(q, k, self.stride, self.block_size, causal, scale, lens)
        else:
            from ..kernels import reference

            scores = reference.antidiagonal_block_scores(
                q, k, stride=self.stride, block_size=self.block_size, causal=causal, scale=scale, lengths=lens
            )
        scores, thresholds = self.pool_kv_groups(scores, thresholds, geo.kv_heads)
        if on_triton:
            mask = ops.select(scores, thresholds, geo.q_len, geo.k_len, self.block_size, causal)
        else:
            mask = geo.select(scores, thresholds)
        shared = geo.heads // mask.shape[1]
        if shared > 1:
            mask = mask.repeat_interleave(shared, dim=1)
        return BlockMask(mask, self.block_size, geo.q_len, geo.k_len, causal, shared_heads=shared)
