"""Streaming (Λ-shape) attention as a method: attention sinks plus a local window.

The fixed pattern of StreamingLLM (Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks",
arXiv:2309.17453) and LM-Infinite (Han et al., 2024, arXiv:2308.16137), at block granularity as MInference's "A-shape"
baseline runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..block_mask import BlockMask, causal_block_bounds
from .base import Geometry, Method

__all__ = ["Streaming", "streaming_pattern"]


def streaming_pattern(
    q_len: int,
    k_len: int,
    block_size: int,
    sink_blocks: int,
    local_blocks: int,
    device: torch.device | str | None = None,
) -> Tensor:
    """bool ``[Qb, Kb]``: the Λ pattern shared by every batch element and head (see :class:`Streaming`)."""
    lo, hi = causal_block_bounds(q_len, k_len, block_size, device)
    cols = torch.arange(-(-k_len // block_size), device=device)[None, :]
    # The window ends at the row's last diagonal block and always reaches back to its first one, so every query keeps
    # its own position even when `local_blocks` is smaller than the number of diagonal blocks (unaligned Lk - Lq).
    start = torch.minimum(lo, hi - local_blocks + 1)[:, None]
    return (cols < sink_blocks) | ((cols >= start) & (cols <= hi[:, None]))


@dataclass(kw_only=True, eq=False)
class Streaming(Method):
    """Sink blocks plus a local window of blocks ending at the diagonal: the Λ ("A") shape.

    Row ``r`` (queries ``r*b … r*b+b-1``; ``lo``/``hi`` its first/last diagonal key block, see
    :func:`~xattention.block_mask.causal_block_bounds`) keeps exactly the key blocks ``c`` with

    * ``c < sink_blocks`` (the attention sinks at the start of the keys), or
    * ``min(lo, hi - local_blocks + 1) <= c <= hi`` (the ``local_blocks`` blocks counted back from the row's last visible
      block ``hi``, extended to ``lo`` when the diagonal spans more blocks than the window).

    The pattern does not look at ``q``/``k`` (beyond their shapes) and is the same for every batch element and head.
    With ``sink_blocks >= 1`` every row keeps the sink and all of its diagonal blocks. Non-causal inputs keep the same
    pattern (sinks and the window ending at the diagonal), without token-level causal masking inside the kept blocks.

    Attributes:
        sink_blocks: leading key blocks every row keeps (default 1; 0 gives a pure sliding window).
        local_blocks: window length in blocks, counted back from the diagonal block (default 31; with ``b = 128`` the
            default equals MInference's A-shape baseline, ``n_init = 128`` sink tokens plus ``n_local = 3968``).
    """

    name: ClassVar[str] = "streaming"
    padded_batch: ClassVar[str] = "geometry"

    sink_blocks: int = 1
    local_blocks: int = 31

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.sink_blocks, bool) or not isinstance(self.sink_blocks, int) or self.sink_blocks < 0:
            raise ValueError(f"sink_blocks must be a non-negative int, got {self.sink_blocks!r}")
        if isinstance(self.local_blocks, bool) or not isinstance(self.local_blocks, int) or self.local_blocks < 1:
            raise ValueError(f"local_blocks must be a positive int, got {self.local_blocks!r}")

    def choose_blocks(self, q: Tensor, k: Tensor, geo: Geometry, *, scale: float | None) -> BlockMask:
        """The Λ pattern of ``geo``'s shape (no kernel runs)."""
        b = self.block_size
        pattern = streaming_pattern(geo.q_len, geo.k_len, b, self.sink_blocks, self.local_blocks, q.device)
        mask = pattern.expand(geo.batch, geo.heads, *pattern.shape).contiguous()
        return BlockMask(mask, b, geo.q_len, geo.k_len, geo.causal)
