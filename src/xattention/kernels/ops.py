"""The GPU kernels as ``torch.library`` custom ops, so the public functions compile with ``torch.compile(fullgraph=True)``.

Each op wraps one launcher (Triton scoring, Triton selection, Triton or FA4 attention); its fake implementation gives
dynamo and inductor the output's shape, dtype and strides without running it. The public functions here call the op
while compiling and the launcher directly in eager mode (the op's dispatch costs host time that short calls feel).
Registering an op is a declaration: the kernel modules (Triton, ``flash_attn``) are imported only when one first runs.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from .._logging import warn_once

__all__ = ["block_scores", "fa4_block_sparse_attention", "fa4_dense_attention", "select", "triton_block_sparse_attention"]

logger = logging.getLogger(__name__)


def _block_scores(
    q: Tensor, k: Tensor, stride: int, block_size: int, causal: bool, scale: float | None, lengths: Tensor | None = None
) -> Tensor:
    """Triton :func:`~xattention.kernels.antidiagonal.antidiagonal_block_scores`: float32 ``[B, Hq, Qb, Kb]``."""
    from .antidiagonal import antidiagonal_block_scores

    return antidiagonal_block_scores(q, k, stride=stride, block_size=block_size, causal=causal, scale=scale, lengths=lengths)


_block_scores_op = torch.library.custom_op("xattention::block_scores", _block_scores, mutates_args=())


@_block_scores_op.register_fake
def _(
    q: Tensor, k: Tensor, stride: int, block_size: int, causal: bool, scale: float | None, lengths: Tensor | None = None
) -> Tensor:
    qb, kb = -(-q.shape[2] // block_size), -(-k.shape[2] // block_size)
    return q.new_empty(q.shape[0], q.shape[1], qb, kb, dtype=torch.float32)


def _select(scores: Tensor, thresholds: Tensor, q_len: int, k_len: int, block_size: int, causal: bool) -> Tensor:
    """Triton :func:`~xattention.kernels.select.select_blocks` with per-head ``thresholds`` ``[H]``: bool, ``scores``' shape."""
    from .select import select_blocks

    return select_blocks(scores, thresholds, q_len=q_len, k_len=k_len, block_size=block_size, causal=causal)


_select_op = torch.library.custom_op("xattention::select", _select, mutates_args=())


@_select_op.register_fake
def _(scores: Tensor, thresholds: Tensor, q_len: int, k_len: int, block_size: int, causal: bool) -> Tensor:
    return torch.empty_like(scores, dtype=torch.bool, memory_format=torch.contiguous_format)


def _triton_block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, block_size: int, causal: bool, scale: float | None
) -> tuple[Tensor, Tensor]:
    """The Triton attention kernel: ``(out [B, Hq, Lq, D] like q, float32 LSE [B, Hq, Lq])``."""
    from .block_sparse_attention import block_sparse_attention

    return block_sparse_attention(q, k, v, mask, block_size=block_size, causal=causal, scale=scale, return_lse=True)


_triton_block_sparse_attention_op = torch.library.custom_op(
    "xattention::triton_block_sparse_attention", _triton_block_sparse_attention, mutates_args=()
)


@_triton_block_sparse_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, block_size: int, causal: bool, scale: float | None):
    # the kernel writes unit-stride D; like q otherwise
    out = torch.empty_like(q) if q.stride(-1) == 1 else torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty(q.shape[:3], dtype=torch.float32)


def _bshd_like(q: Tensor) -> Tensor:
    b, h, lq, d = q.shape
    return q.new_empty(b, lq, h, d)


def _fa4_block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, block_size: int, causal: bool, scale: float | None, shared_heads: int
) -> tuple[Tensor, Tensor]:
    """FA4 block-sparse attention: ``(out [B, Lq, Hq, D] contiguous, float32 LSE [B, Hq, Lq])``; callers transpose."""
    from .block_sparse_attention import block_sparse_attention as triton_attention
    from .fa4 import block_sparse_attention

    try:
        out, lse = block_sparse_attention(
            q, k, v, mask, block_size=block_size, causal=causal, scale=scale, return_lse=True, shared_heads=shared_heads
        )
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # a shape FA4's JIT cannot take: the exact Triton kernel answers instead
        warn_once(logger, f"FlashAttention-4 refuses this input ({type(exc).__name__}: {exc}): running Triton")
        out, lse = triton_attention(q, k, v, mask, block_size=block_size, causal=causal, scale=scale, return_lse=True)
    return out.transpose(1, 2).contiguous(), lse.contiguous()


_fa4_block_sparse_attention_op = torch.library.custom_op(
    "xattention::fa4_block_sparse_attention", _fa4_block_sparse_attention, mutates_args=()
)


@_fa4_block_sparse_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, block_size: int, causal: bool, scale: float | None, shared_heads: int):
    return _bshd_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _fa4_dense_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None) -> Tensor:
    """FA4 dense attention: ``out [B, Lq, Hq, D]`` contiguous; callers transpose."""
    from .fa4 import dense_attention

    return dense_attention(q, k, v, causal=causal, scale=scale).transpose(1, 2).contiguous()


_fa4_dense_attention_op = torch.library.custom_op("xattention::fa4_dense_attention", _fa4_dense_attention, mutates_args=())


@_fa4_dense_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None) -> Tensor:
    return _bshd_like(q)


def _op_when_compiling(op: torch.library.CustomOpDef, launcher):
    """The op under ``torch.compile``, the plain launcher otherwise (same arguments, same results)."""

    def call(*args):
        return (op if torch.compiler.is_compiling() else launcher)(*args)

    call.__doc__ = launcher.__doc__
    return call


block_scores = _op_when_compiling(_block_scores_op, _block_scores)
select = _op_when_compiling(_select_op, _select)
triton_block_sparse_attention = _op_when_compiling(_triton_block_sparse_attention_op, _triton_block_sparse_attention)
fa4_block_sparse_attention = _op_when_compiling(_fa4_block_sparse_attention_op, _fa4_block_sparse_attention)
fa4_dense_attention = _op_when_compiling(_fa4_dense_attention_op, _fa4_dense_attention)
