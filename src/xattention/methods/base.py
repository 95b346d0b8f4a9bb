"""The method interface: a validated configuration with one ``estimate(q, k) -> BlockMask``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from torch import Tensor

from ..block_mask import BlockMask

__all__ = ["DEFAULT_MIN_SEQ_LEN", "Method", "check_fraction"]

# Below this many keys `sparse_attention` runs dense attention: selection plus a sparse kernel does not pay for itself on
# short inputs. Measured crossover on an H200 (see README, "Speed"); override per method with `min_seq_len=`.
DEFAULT_MIN_SEQ_LEN = 12288


def check_fraction(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a real number (not a bool) in ``(0, 1]``: thresholds, mass targets."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a float in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must lie in (0, 1], got {value}")


@dataclass(kw_only=True, eq=False)
class Method(ABC):
    """Base class of every block-selection method.

    Subclasses are ``@dataclass(kw_only=True, eq=False)`` configurations that validate in ``__post_init__`` (calling
    ``super().__post_init__()``) and implement :meth:`estimate`.

    Attributes:
        block_size: tokens per block along queries and keys (default 128).
        min_seq_len: ``sparse_attention`` runs dense attention when ``Lk < min_seq_len``.
    """

    name: ClassVar[str] = "method"

    block_size: int = 128
    min_seq_len: int = DEFAULT_MIN_SEQ_LEN

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if not isinstance(self.min_seq_len, int) or self.min_seq_len < 0:
            raise ValueError(f"min_seq_len must be a non-negative int, got {self.min_seq_len!r}")

    @abstractmethod
    def estimate(
        self,
        q: Tensor,
        k: Tensor,
        *,
        causal: bool = True,
        scale: float | None = None,
        backend: str = "auto",
    ) -> BlockMask:
        """Choose the key blocks each query block attends to.

        Args:
            q: ``[B, Hq, Lq, D]`` post-RoPE queries; k: ``[B, Hkv, Lk, D]`` post-RoPE keys (``Hq % Hkv == 0``,
                ``Lq <= Lk``, queries aligned to the end of the keys).
            causal: bottom-right causal masking.
            scale: the attention's softmax scale (default ``1/sqrt(D)``).
            backend: ``"auto"``, ``"reference"`` or ``"triton"``.
        Returns:
            A :class:`BlockMask` of shape ``[B, Hq, ceil(Lq/b), ceil(Lk/b)]``.
        """

    def params(self) -> dict[str, Any]:
        """The configuration as a plain dict (for result files and logs)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.tolist() if isinstance(value, Tensor) else value
        return out

    def __repr__(self) -> str:
        def show(v: Any) -> str:
            return f"Tensor{list(v.shape)}" if isinstance(v, Tensor) else repr(v)

        return f"{type(self).__name__}({', '.join(f'{f.name}={show(getattr(self, f.name))}' for f in fields(self))})"
