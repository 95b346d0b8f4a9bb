"""Sliding-window (local) attention: validate, then dispatch to FlashAttention-4's window kernel or the exact O(L·w)
PyTorch reference.

Local layers (gemma-3's ``sliding_attention`` layers, Mistral-style models with ``sliding_window`` on every layer) need
no block selection: their window already bounds the work, so they run exact windowed attention here.
"""

from __future__ import annotations

import logging

from torch import Tensor

from ._logging import warn_once
from ._validation import check_qkv
from .kernels import fa4, resolve_backend

logger = logging.getLogger(__name__)

__all__ = ["WINDOW_BACKENDS", "sliding_window_attention"]

WINDOW_BACKENDS = ("auto", "fa4", "reference")


def sliding_window_attention(
    q: Tensor, k: Tensor, v: Tensor, *, window: int, scale: float | None = None, backend: str = "auto"
) -> Tensor:
    """Exact bottom-right causal sliding-window attention.

    Query ``i`` sits at key position ``p_i = Lk - Lq + i`` (queries aligned to the end of the keys, as in a chunked
    prefill through a KV cache) and sees key ``j`` iff ``p_i - window < j <= p_i``: its own key and the ``window - 1``
    keys before it. This is transformers' rule (5.x ``masking_utils.sliding_window_causal_mask_function``:
    ``kv_idx > q_idx - sliding_window`` and ``kv_idx <= q_idx``), used by gemma-3's ``sliding_attention`` layers and by
    Mistral's ``sliding_window``; FlashAttention's ``window_size=(window - 1, 0)`` is the same set.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` (``Hq % Hkv == 0``, ``Lq <= Lk``, one device and dtype).
        window: keys each query sees, an int ``>= 1``; ``window >= Lk`` is plain causal attention.
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: ``"fa4"`` (:func:`xattention.kernels.fa4.window_attention`, CUDA), ``"reference"`` (portable, exact,
            ``O(Lq·(w + C))`` memory, see :func:`xattention.kernels.window.window_attention`) or ``"auto"`` (FA4 where
            it runs, else the reference). Inputs FA4 refuses (fp32, an odd head dim) run the reference, logged once.
    Returns:
        ``[B, Hq, Lq, D]`` in q's dtype.
    """
    check_qkv(q, k, v)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if backend not in WINDOW_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {WINDOW_BACKENDS}")
    if resolve_backend(backend, q.device, supported=WINDOW_BACKENDS[1:]) == "fa4":
        reason = fa4.refusal(q, k)
        if reason is None:
            return fa4.window_attention(q, k, v, window=window, scale=scale)
        warn_once(logger, f"FlashAttention-4 refuses {reason}: sliding-window attention runs the PyTorch reference")
    from .kernels.window import window_attention

    return window_attention(q, k, v, window=window, scale=scale)
