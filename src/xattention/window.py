"""Sliding-window (local) attention: validate, then dispatch to FlashAttention-4's window kernel or the exact O(L·w)
PyTorch reference.

Local layers (gemma-3's ``sliding_attention`` layers, Mistral-style models with ``sliding_window`` on every layer) need
no block selection: their window already bounds the work, so they run exact windowed attention here.
"""

from __future__ import annotations

from types import ModuleType

from torch import Tensor

from ._validation import check_qkv

__all__ = ["WINDOW_BACKENDS", "sliding_window_attention"]

WINDOW_BACKENDS = ("auto", "fa4", "reference")


def _fa4() -> ModuleType | None:
    """:mod:`xattention.kernels.fa4`, or ``None`` where it (or the flash-attn-4 package under it) cannot be imported."""
    try:
        from .kernels import fa4
    except ImportError:
        return None
    return fa4


def _fa4_usable(q: Tensor) -> bool:
    if q.device.type != "cuda":  # never import FA4 (or touch CUDA) for CPU tensors
        return False
    fa4 = _fa4()
    return fa4 is not None and bool(fa4.fa4_usable(q))


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
            ``fa4_usable(q)``, else the reference).
    Returns:
        ``[B, Hq, Lq, D]`` in q's dtype.
    """
    check_qkv(q, k, v)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if backend not in WINDOW_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {WINDOW_BACKENDS}")
    if backend == "auto":
        backend = "fa4" if _fa4_usable(q) else "reference"
    if backend == "fa4":
        fa4 = _fa4()
        if fa4 is None or q.device.type != "cuda":
            raise ValueError(
                f"backend='fa4' needs a CUDA device and xattention.kernels.fa4 (the flash-attn-4 package); got {q.device}"
            )
        return fa4.window_attention(q, k, v, window=window, scale=scale)
    from .kernels.window import window_attention

    return window_attention(q, k, v, window=window, scale=scale)
