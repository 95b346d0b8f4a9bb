"""Attention entry points: validate, then dispatch to FlashAttention-4, Triton, FlexAttention or the PyTorch reference."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from ._logging import warn_once
from ._validation import check_block_mask, check_qkv
from .block_mask import BlockMask, check_lengths, length_tensor, padding_positions
from .kernels import fa4, ops, resolve_backend
from .methods.base import Method
from .methods.dense import Dense

__all__ = ["block_sparse_attention", "dense_attention", "sparse_attention"]

logger = logging.getLogger(__name__)


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _check_no_grad(*tensors: Tensor, backend: str) -> None:
    if _needs_grad(*tensors):
        raise ValueError(
            f"backend={backend!r} is forward-only (prefill): run under torch.no_grad(), or use backend='reference' "
            "(PyTorch ops, differentiable) or 'flex' for gradients"
        )


def dense_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None, backend: str = "auto"
) -> Tensor:
    """Dense attention: FlashAttention-4 where it runs (``backend="auto"`` or ``"fa4"``), else
    ``torch.nn.functional.scaled_dot_product_attention`` (bottom-right causal, GQA).

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``.
        backend: ``"auto"``, ``"fa4"`` or ``"sdpa"``.
    Returns:
        ``[B, Hq, Lq, D]``.
    """
    _, hq, hkv, lq, lk, _ = check_qkv(q, k, v)
    if backend not in ("auto", "fa4", "sdpa"):
        raise ValueError(f"dense_attention backend must be 'auto', 'fa4' or 'sdpa', got {backend!r}")
    if backend != "sdpa" and resolve_backend(backend, q.device, supported=("reference", "fa4")) == "fa4":
        reason = fa4.refusal(q, k)
        if reason is None and not _needs_grad(q, k, v):
            return ops.fa4_dense_attention(q, k, v, causal, scale).transpose(1, 2)
        warn_once(logger, f"FlashAttention-4 dense takes no {reason or 'gradients here'}: dense attention runs through SDPA")
    mask: Tensor | None = None
    is_causal = causal and lq == lk
    if causal and lq != lk:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(lq, lk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=hq != hkv)


def _gpu_attention(q: Tensor, k: Tensor, v: Tensor, mask: BlockMask, scale: float | None, backend: str):
    """``(out, lse)`` through the FA4 or Triton custom op; FA4 refusals known from the shapes go to Triton here,
    any other refusal inside the op (logged once)."""
    _check_no_grad(q, k, v, backend=backend)
    if backend == "fa4":
        reason = fa4.refusal(q, k, block_size=mask.block_size)
        if reason is None:
            out, lse = ops.fa4_block_sparse_attention(q, k, v, mask.mask, mask.block_size, mask.causal, scale,
                                                      mask.shared_heads)  # fmt: skip
            return out.transpose(1, 2), lse
        warn_once(logger, f"FlashAttention-4 refuses {reason}: block-sparse attention runs through Triton")
    return ops.triton_block_sparse_attention(q, k, v, mask.mask, mask.block_size, mask.causal, scale)


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: BlockMask,
    *,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact softmax attention over the kept blocks of ``mask`` (causality taken from ``mask.causal``).

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` (``Hq % Hkv == 0``, ``Lq <= Lk``, queries aligned to the end of
            the keys).
        mask: a :class:`BlockMask` of shape ``[B, Hq, ceil(Lq/b), ceil(Lk/b)]``.
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: ``"auto"`` (FlashAttention-4 on compute capability 9.x-11.x when ``flash_attn.cute`` imports, else
            Triton on capability >= 8.0, else the reference), ``"fa4"``, ``"triton"``, ``"flex"``, ``"reference"``.
            Where FA4 refuses an input (dtype, head dim, block size) the Triton kernel runs instead, logged once.
            The GPU kernels are forward-only: with an input that requires grad they raise ``ValueError`` (the
            reference, plain PyTorch, and ``"flex"`` are differentiable).
        return_lse: also return the float32 natural-log LSE ``[B, Hq, Lq]`` (``-inf`` where a query sees no key), for
            merging partial results; not with ``"flex"``.
    Returns:
        ``[B, Hq, Lq, D]`` in q's dtype (possibly a strided view), and the LSE with ``return_lse``. A query with no
        visible kept key gets zeros.
    """
    check_qkv(q, k, v)
    check_block_mask(mask, q, k)
    chosen = resolve_backend(backend, q.device, supported=("reference", "triton", "flex", "fa4"))
    if chosen in ("fa4", "triton"):
        out, lse = _gpu_attention(q, k, v, mask, scale, chosen)
        return (out, lse) if return_lse else out
    kwargs = {"block_size": mask.block_size, "causal": mask.causal, "scale": scale}
    if chosen == "flex":
        if return_lse:
            raise ValueError("backend='flex' does not return the LSE; use 'fa4', 'triton' or 'reference'")
        from .kernels.flex import block_sparse_attention as flex_kernel

        return flex_kernel(q, k, v, mask.mask, **kwargs)
    from .kernels import reference

    return reference.block_sparse_attention(q, k, v, mask.mask, return_lse=return_lse, **kwargs)


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
    lengths: Sequence[int] | None = ...,
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
    lengths: Sequence[int] | None = ...,
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
    lengths: Sequence[int] | None = None,
    return_mask: bool = False,
) -> Tensor | tuple[Tensor, BlockMask | None]:
    """Select blocks with ``method`` and attend over them; dense attention when ``Lk < method.min_seq_len`` or the
    method is :class:`Dense`, so short inputs never pay for selection.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``.
        method: any :class:`~xattention.methods.base.Method`.
        lengths: a right-padded batch (``Lq == Lk``, causal): element ``b``'s tokens are positions
            ``0 … lengths[b]-1``, the rest padding. Each element gets what it would get alone (selection on its real
            tokens, dense below ``min_seq_len``) with one launch per stage for the whole batch; padding rows get zeros.
        return_mask: also return the :class:`BlockMask` used (``None`` when the dense path ran).
    Returns:
        ``[B, Hq, Lq, D]``, or ``(out, mask)`` with ``return_mask=True``.
    """
    if not isinstance(method, Method):
        raise ValueError(f"method must be an xattention method (e.g. xa.XAttention()), got {type(method).__name__}")
    bsz, _, _, lq, lk, _ = check_qkv(q, k, v)
    dense_backend = {"auto": "auto", "fa4": "fa4"}.get(backend, "sdpa")
    estimate_backend = "auto" if backend in ("flex", "fa4") else backend
    if lengths is not None:
        lens = check_lengths(lengths, bsz, lq, lk, causal)
        long = [n >= method.min_seq_len for n in lens]
        mask = None
        if isinstance(method, Dense) or not any(long):
            out = dense_attention(q, k, v, scale=scale, backend=dense_backend)
        else:
            mask = _dense_rows(method.estimate_padded(q, k, lens, scale=scale, backend=estimate_backend), long)
            out = block_sparse_attention(q, k, v, mask, scale=scale, backend=backend)
        out = out.masked_fill(padding_positions(length_tensor(lens, q.device), lq)[:, None, :, None], 0)
        return (out, mask) if return_mask else out
    if isinstance(method, Dense) or lk < method.min_seq_len:
        out = dense_attention(q, k, v, causal=causal, scale=scale, backend=dense_backend)
        return (out, None) if return_mask else out
    mask = method.estimate(q, k, causal=causal, scale=scale, backend=estimate_backend)
    out = block_sparse_attention(q, k, v, mask, scale=scale, backend=backend)
    return (out, mask) if return_mask else out


def _dense_rows(mask: BlockMask, sparse: list[bool]) -> BlockMask:
    """``mask`` with every visible block kept for the batch elements whose ``sparse`` is False (dense, as alone)."""
    if all(sparse):
        return mask
    dense = ~torch.tensor(sparse).to(mask.mask.device, non_blocking=True)[:, None, None, None]
    rows = torch.where(dense, mask.visible_per_element()[:, None], mask.mask)
    return dataclasses.replace(mask, mask=rows)
