"""Attention entry points: validate, then dispatch to Triton, FlexAttention or the PyTorch reference."""

from __future__ import annotations

import logging
from typing import Literal, overload

import torch.nn.functional as F
from torch import Tensor

from ._validation import check_qkv
from .block_mask import BlockMask
from .kernels import resolve_backend
from .methods.base import Method
from .methods.dense import Dense

__all__ = ["block_sparse_attention", "dense_attention", "sparse_attention"]

logger = logging.getLogger(__name__)


def dense_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None) -> Tensor:
    """Dense attention through ``torch.nn.functional.scaled_dot_product_attention`` (bottom-right causal, GQA).

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``.
    Returns:
        ``[B, Hq, Lq, D]``.
    """
    _, hq, hkv, lq, lk, _ = check_qkv(q, k, v)
    mask: Tensor | None = None
    is_causal = causal and lq == lk
    if causal and lq != lk:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(lq, lk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=hq != hkv)


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: BlockMask,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Exact softmax attention over the kept blocks of ``mask`` (causality taken from ``mask.causal``).

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` (``Hq % Hkv == 0``, ``Lq <= Lk``, queries aligned to the end of
            the keys).
        mask: a :class:`BlockMask` of shape ``[B, Hq, ceil(Lq/b), ceil(Lk/b)]``.
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: ``"auto"`` (Triton on CUDA capability >= 8.0, else reference), ``"triton"``, ``"flex"``, ``"reference"``.
    Returns:
        ``[B, Hq, Lq, D]`` in q's dtype. A query with no visible kept key gets zeros.
    """
    bsz, hq, _, lq, lk, _ = check_qkv(q, k, v)
    if not isinstance(mask, BlockMask):
        raise ValueError(f"mask must be an xattention.BlockMask, got {type(mask).__name__}")
    expected = (bsz, hq, -(-lq // mask.block_size), -(-lk // mask.block_size))
    if mask.shape != expected or mask.q_len != lq or mask.k_len != lk:
        raise ValueError(
            f"BlockMask of shape {mask.shape} (q_len={mask.q_len}, k_len={mask.k_len}) does not fit q/k: "
            f"need shape {expected} with q_len={lq}, k_len={lk}"
        )
    if mask.mask.device != q.device:
        raise ValueError(f"BlockMask is on {mask.mask.device} but q is on {q.device}")
    chosen = resolve_backend(backend, q.device, supported=("reference", "triton", "flex"))
    if chosen == "triton":
        from .kernels.block_sparse_attention import block_sparse_attention as kernel
    elif chosen == "flex":
        from .kernels.flex import block_sparse_attention as kernel
    else:
        from .kernels.reference import block_sparse_attention as kernel
    return kernel(q, k, v, mask.mask, block_size=mask.block_size, causal=mask.causal, scale=scale)


@overload
def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    method: Method,
    *,
    causal: bool = ...,
    scale: float | None = ...,
    backend: str = ...,
    return_mask: Literal[False] = ...,
) -> Tensor: ...


@overload
def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    method: Method,
    *,
    causal: bool = ...,
    scale: float | None = ...,
    backend: str = ...,
    return_mask: Literal[True],
) -> tuple[Tensor, BlockMask | None]: ...


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    method: Method,
    *,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
    return_mask: bool = False,
) -> Tensor | tuple[Tensor, BlockMask | None]:
    """Select blocks with ``method`` and attend over them; dense SDPA when ``Lk < method.min_seq_len`` or the method is
    :class:`Dense`, so short inputs never pay for selection.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``.
        method: any :class:`~xattention.methods.base.Method`.
        return_mask: also return the :class:`BlockMask` used (``None`` when the dense path ran).
    Returns:
        ``[B, Hq, Lq, D]``, or ``(out, mask)`` with ``return_mask=True``.
    """
    if not isinstance(method, Method):
        raise ValueError(f"method must be an xattention method (e.g. xa.XAttention()), got {type(method).__name__}")
    _, _, _, _, lk, _ = check_qkv(q, k, v)
    if isinstance(method, Dense) or lk < method.min_seq_len:
        out = dense_attention(q, k, v, causal=causal, scale=scale)
        return (out, None) if return_mask else out
    estimate_backend = "auto" if backend == "flex" else backend
    mask = method.estimate(q, k, causal=causal, scale=scale, backend=estimate_backend)
    if logger.isEnabledFor(logging.DEBUG):  # density() synchronises the device: only when asked for
        logger.debug("%s kept %.3f of the blocks at Lk=%d", type(method).__name__, mask.density(), lk)
    out = block_sparse_attention(q, k, v, mask, scale=scale, backend=backend)
    return (out, mask) if return_mask else out
