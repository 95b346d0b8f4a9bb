"""xattention: block-sparse attention with antidiagonal scoring for fast long-context prefill.

>>> import xattention as xa
>>> method = xa.XAttention(stride=8, threshold=0.9)
>>> mask = method.estimate(q, k)                    # xa.BlockMask, bool [B, Hq, Qb, Kb]
>>> out = xa.block_sparse_attention(q, k, v, mask)  # [B, Hq, Lq, D]
>>> out = xa.sparse_attention(q, k, v, method)      # estimate + attend (dense below method.min_seq_len)

Importing the package does no work: no CUDA initialisation, no Triton compilation, no model registration.
"""

from __future__ import annotations

from ._version import __version__
from .attention import block_sparse_attention, dense_attention, sparse_attention
from .block_mask import BlockMask
from .guard import AccuracyCheck, Tolerance, check_accuracy
from .integrations.hf import apply, register, remove  # transformers is imported inside these functions only
from .integrations.prefill import Prefilled, prefill
from .methods import (
    DEFAULT_MIN_SEQ_LEN,
    METHODS,
    Dense,
    FlexPrefill,
    Method,
    Oracle,
    Streaming,
    VerticalSlash,
    XAttention,
    method_from_spec,
)
from .metrics import attention_mass_kept
from .thresholds import load_thresholds, save_thresholds
from .window import sliding_window_attention

__all__ = [
    "DEFAULT_MIN_SEQ_LEN",
    "METHODS",
    "AccuracyCheck",
    "BlockMask",
    "Dense",
    "FlexPrefill",
    "Method",
    "Oracle",
    "Prefilled",
    "Streaming",
    "Tolerance",
    "VerticalSlash",
    "XAttention",
    "__version__",
    "apply",
    "attention_mass_kept",
    "block_sparse_attention",
    "check_accuracy",
    "dense_attention",
    "load_thresholds",
    "method_from_spec",
    "prefill",
    "register",
    "remove",
    "save_thresholds",
    "sliding_window_attention",
    "sparse_attention",
]
