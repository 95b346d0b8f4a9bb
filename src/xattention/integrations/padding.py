"""A padded batch as one right-aligned batch: each element's real tokens moved to positions ``0 …``, and back.

Under causal attention a query of a right-padded element sees only real keys, so one kernel launch over the
right-aligned batch gives every element what it would get alone; the per-element ``lengths`` tell block selection
where each one ends. Left padding (what generation uses) and right padding both map onto it with one gather.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .masks import Span

__all__ = ["RightAligned"]


@dataclass(frozen=True)
class RightAligned:
    """Index tensors moving each element's span (see :func:`~.masks.real_spans`) to the front, and back.

    Attributes:
        lengths: real tokens per element (0 for one without any).
        queries, keys: int64 ``[B, L]`` (``L = max(lengths)``): the source row of each right-aligned position; past an
            element's length they repeat its first row (padding, never seen by its real queries).
        back: int64 ``[B, Lq]``: each original query row's right-aligned position, ``L`` (a zero row) for padding.
    """

    lengths: tuple[int, ...]
    queries: Tensor
    keys: Tensor
    back: Tensor

    @classmethod
    def from_spans(cls, spans: Sequence[Span | None], q_len: int, device: torch.device) -> RightAligned | None:
        """The alignment of ``spans``, or ``None`` unless every element has as many real queries as real keys (a
        first prefill; with a cache offset the per-element query positions would differ)."""
        if any(span is not None and span[1] - span[0] != span[3] - span[2] for span in spans):
            return None
        lengths = tuple(0 if span is None else span[1] - span[0] + 1 for span in spans)
        width = max(max(lengths), 1)
        pos = torch.arange(width)
        queries, keys, back = [], [], []
        for span, n in zip(spans, lengths, strict=True):
            i0, _, s, _ = span if span is not None else (0, 0, 0, 0)
            queries.append(i0 + torch.where(pos < n, pos, 0))
            keys.append(s + torch.where(pos < n, pos, 0))
            rows = torch.arange(q_len) - i0
            back.append(torch.where((rows >= 0) & (rows < n), rows, width))
        stacked = (torch.stack(t).to(device, non_blocking=True) for t in (queries, keys, back))
        return cls(lengths, *stacked)

    def gather(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(q [B, Hq, L, D], k, v [B, Hkv, L, D])`` right-aligned from the model's ``query``/``key``/``value``."""
        return _rows(query, self.queries), _rows(key, self.keys), _rows(value, self.keys)

    def scatter(self, out: Tensor) -> Tensor:
        """The right-aligned ``out`` ``[B, Hq, L, D]`` back at the original query rows ``[B, Hq, Lq, D]``; zeros on
        padding rows."""
        padded = torch.cat([out, out.new_zeros(*out.shape[:2], 1, out.shape[3])], dim=2)
        return _rows(padded, self.back)


def _rows(t: Tensor, index: Tensor) -> Tensor:
    """``t[b, :, index[b]]`` for ``t`` ``[B, H, L, D]`` and ``index`` ``[B, M]``: ``[B, H, M, D]``."""
    return t.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))
