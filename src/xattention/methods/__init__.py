"""Block-selection methods. Each is a validated dataclass with one ``estimate(q, k) -> BlockMask``.

The registry (:data:`~xattention.methods.registry.METHODS`) is what the CLI, the evaluation runner and the benchmarks
read: add a class there to expose it everywhere.
"""

from __future__ import annotations

from .base import DEFAULT_MIN_SEQ_LEN, Method
from .dense import Dense
from .flexprefill import FlexPrefill
from .oracle import Oracle
from .registry import METHODS, method_from_spec
from .streaming import Streaming
from .vertical_slash import VerticalSlash
from .xattention import XAttention

__all__ = [
    "DEFAULT_MIN_SEQ_LEN",
    "METHODS",
    "Dense",
    "FlexPrefill",
    "Method",
    "Oracle",
    "Streaming",
    "VerticalSlash",
    "XAttention",
    "method_from_spec",
]
