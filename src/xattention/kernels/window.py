"""Exact sliding-window attention in plain PyTorch at O(L·w) time and memory (the portable twin of FA4's window).

Queries are processed in chunks of ``C`` rows; a chunk attends only to the keys its rows can see, through
``torch.nn.functional.scaled_dot_product_attention`` with a small band mask ``[C, C + w - 1]``, so neither an
``[Lq, Lk]`` mask nor an ``[Lq, Lk]`` score matrix is ever built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DEFAULT_CHUNK", "window_attention"]

# Rows per chunk when the window is small: large enough that SDPA's launch cost is amortised, small enough that the
# chunk's [C, C + w] scores stay in cache-sized pieces.
DEFAULT_CHUNK = 256


def window_attention(
    q: Tensor, k: Tensor, v: Tensor, *, window: int, scale: float | None = None, chunk: int | None = None
) -> Tensor:
    """Bottom-right causal sliding-window attention, exact, in ``O(Lq·(C + w))`` memory.

    Query ``i`` sits at key position ``p_i = Lk - Lq + i`` and sees key ``j`` iff ``p_i - window < j <= p_i`` (its own
    key and the ``window - 1`` before it), the rule of transformers' ``sliding_window_causal_mask_function``.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` with ``Hq % Hkv == 0`` and ``Lq <= Lk`` (checked by the caller).
        window: keys per query, ``>= 1``.
        scale: softmax scale, default ``1/sqrt(D)``.
        chunk: query rows per SDPA call, default ``max(window, DEFAULT_CHUNK)``.
    Returns:
        ``[B, Hq, Lq, D]`` in q's dtype.
    """
    lq, lk = q.shape[2], k.shape[2]
    step = max(window, DEFAULT_CHUNK) if chunk is None else chunk
    offset = lk - lq
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for q0 in range(0, lq, step):
        q1 = min(q0 + step, lq)
        first, last = offset + q0, offset + q1 - 1  # key positions of the chunk's first and last query
        k0 = max(0, first - window + 1)
        q_pos = torch.arange(first, last + 1, device=q.device)[:, None]
        k_pos = torch.arange(k0, last + 1, device=q.device)[None, :]
        band = (k_pos <= q_pos) & (k_pos > q_pos - window)  # [C, C + w - 1] at most; every row sees its own key
        outs.append(
            F.scaled_dot_product_attention(
                q[:, :, q0:q1], k[:, :, k0 : last + 1], v[:, :, k0 : last + 1], attn_mask=band, scale=scale, enable_gqa=gqa
            )
        )
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
