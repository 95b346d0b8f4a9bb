"""The method interface: a validated configuration with one ``choose_blocks(q, k, geometry) -> BlockMask``.

The base owns what every method shares: input checks, the row geometry (sink and diagonal blocks forced, nothing above
the causal diagonal; :class:`Geometry`) and the cumulative selection rule
(:func:`~xattention.kernels.reference.cumulative_select`). A method computes its scores and hands them over.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from .._validation import check_qkv
from ..block_mask import BlockMask, check_lengths, forced_blocks, visible_blocks
from ..kernels import resolve_backend
from ..kernels.reference import cumulative_select

__all__ = ["DEFAULT_MIN_SEQ_LEN", "Geometry", "Method", "check_fraction", "describe_types", "field_types"]

# Below this many keys `sparse_attention` runs dense attention: selection plus a sparse kernel does not pay for itself on
# short inputs. Measured crossover on an H200 (see README, "Speed"); override per method with `min_seq_len=`.
DEFAULT_MIN_SEQ_LEN = 12288


def check_fraction(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a real number (not a bool) in ``(0, 1]``: thresholds, mass targets."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a float in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must lie in (0, 1], got {value}")


_TYPE_NAMES: dict[type, str] = {bool: "a bool", int: "an int", float: "a float", Tensor: "a Tensor", type(None): "None"}


@functools.cache
def field_types(cls: type) -> dict[str, tuple[type, ...]]:
    """The types each dataclass field of ``cls`` admits, from its annotation: ``float | None`` -> ``(float, NoneType)``,
    ``list[int]`` -> ``(list,)``. Fields whose annotation is no class (``Any``, ``Literal[...]``) are left out: they are
    the subclass's to check."""
    hints = _type_hints(cls)
    out = {}
    for f in fields(cls):
        if f.name not in hints:
            continue
        hint = hints[f.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        allowed = tuple(typing.get_origin(t) or t for t in (typing.get_args(hint) if union else (hint,)))
        if all(isinstance(t, type) and t is not Any for t in allowed):  # Any is a class on Python >= 3.11
            out[f.name] = allowed
    return out


def _type_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints`` of ``cls``, or of its nearest base whose annotations resolve (a class defined in a
    function may name types only that function's scope knows: its own fields are then the class's to check)."""
    for klass in cls.__mro__:
        try:
            return typing.get_type_hints(klass)
        except NameError:
            continue
    return {}


def describe_types(allowed: tuple[type, ...]) -> str:
    """``(float, NoneType)`` -> ``"a float or None"`` (for error messages)."""
    return " or ".join(_TYPE_NAMES.get(t, f"a {t.__name__}") for t in allowed)


def _has_type(value: object, allowed: tuple[type, ...]) -> bool:
    """Exact field typing: a bool is only a bool (not an int), an int also serves a float field (PEP 484's numeric
    tower), anything else must be an instance of one of the annotated types (so NumPy scalars other than float64 fail)."""
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int):
        return int in allowed or float in allowed
    if isinstance(value, float):
        return float in allowed
    return any(isinstance(value, t) for t in allowed if t not in (bool, int, float))


@dataclass(frozen=True)
class Geometry:
    """One estimate's problem, as :meth:`Method.geometry` reads it off q ``[B, Hq, Lq, D]`` and k ``[B, Hkv, Lk, D]``.

    Attributes:
        batch, heads, kv_heads, q_len, k_len: ``B``, ``Hq``, ``Hkv``, ``Lq``, ``Lk``.
        block_size, causal: the method's ``b`` and the attention's masking.
        backend: the resolved scoring backend (``"reference"`` or ``"triton"``).
        device: where q and k are.

    ``forced`` and ``visible`` are computed on each access (``[Qb, Kb]`` bools, cheap; a cache's lock would stop
    ``torch.compile`` tracing the estimate).
    """

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    k_len: int
    block_size: int
    causal: bool
    backend: str
    device: torch.device

    @property
    def forced(self) -> Tensor:
        """bool ``[Qb, Kb]``: the sink and diagonal blocks every row keeps (:func:`~xattention.block_mask.forced_blocks`)."""
        return forced_blocks(self.q_len, self.k_len, self.block_size, self.device)

    @property
    def visible(self) -> Tensor:
        """bool ``[Qb, Kb]``: the blocks a row may keep (:func:`~xattention.block_mask.visible_blocks`)."""
        return visible_blocks(self.q_len, self.k_len, self.block_size, self.device, causal=self.causal)

    def select(self, scores: Tensor, threshold: float | Tensor) -> Tensor:
        """Per row of ``scores`` ``[B, H, Qb, Kb]``: the forced blocks, then the fewest others whose scores reach
        ``threshold x`` the row's visible total (float or per-head ``[H]``). bool, ``scores``' shape."""
        return cumulative_select(scores, threshold, forced=self.forced, visible=self.visible)

    def block_mask(self, keep: Tensor, *, shared_heads: int = 1) -> BlockMask:
        """The :class:`BlockMask` of ``keep`` ``[B, Hq, Qb, Kb]`` with the forced blocks added and nothing invisible."""
        mask = (keep | self.forced) & self.visible
        return BlockMask(mask, self.block_size, self.q_len, self.k_len, self.causal, shared_heads=shared_heads)


@dataclass(kw_only=True, eq=False)
class Method(ABC):
    """Base class of every block-selection method.

    Subclasses are ``@dataclass(kw_only=True, eq=False)`` configurations that validate in ``__post_init__`` (calling
    ``super().__post_init__()`` first) and implement :meth:`choose_blocks`; :meth:`estimate` checks the inputs and
    calls it. The base checks every field's type against its annotation exactly (a bool is not an int, a string is not
    a bool), so subclasses only check ranges.

    Attributes:
        block_size: tokens per block along queries and keys (default 128).
        min_seq_len: ``sparse_attention`` runs dense attention when ``Lk < min_seq_len``.
    """

    name: ClassVar[str] = "method"
    # How :meth:`estimate_padded` serves a right-padded batch: "rows" estimates each element alone; "geometry" once for
    # the whole batch (the mask depends on the shape only); "lengths" once, passing ``lengths=`` to :meth:`estimate`.
    padded_batch: ClassVar[Literal["rows", "geometry", "lengths"]] = "rows"

    block_size: int = 128
    min_seq_len: int = DEFAULT_MIN_SEQ_LEN

    def __post_init__(self) -> None:
        for name, allowed in field_types(type(self)).items():
            value = getattr(self, name)
            if not _has_type(value, allowed):
                raise ValueError(f"{name} must be {describe_types(allowed)}, got {value!r}")
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if not isinstance(self.min_seq_len, int) or self.min_seq_len < 0:
            raise ValueError(f"min_seq_len must be a non-negative int, got {self.min_seq_len!r}")

    def estimate(
        self, q: Tensor, k: Tensor, *, causal: bool = True, scale: float | None = None, backend: str = "auto"
    ) -> BlockMask:
        """Choose the key blocks each query block attends to: checks the inputs, then :meth:`choose_blocks`.

        Args:
            q: ``[B, Hq, Lq, D]`` post-RoPE queries; k: ``[B, Hkv, Lk, D]`` post-RoPE keys (``Hq % Hkv == 0``,
                ``Lq <= Lk``, queries aligned to the end of the keys).
            causal: bottom-right causal masking.
            scale: the attention's softmax scale (default ``1/sqrt(D)``).
            backend: ``"auto"``, ``"reference"`` or ``"triton"``.
        Returns:
            A :class:`BlockMask` of shape ``[B, Hq, ceil(Lq/b), ceil(Lk/b)]``.
        """
        return self.choose_blocks(q, k, self.geometry(q, k, causal=causal, backend=backend), scale=scale)

    @abstractmethod
    def choose_blocks(self, q: Tensor, k: Tensor, geo: Geometry, *, scale: float | None) -> BlockMask:
        """The method itself: the :class:`BlockMask` ``[B, Hq, Qb, Kb]`` for q and k, already checked and described by
        ``geo`` (its forced and visible blocks, the selection rule and the resolved scoring backend)."""

    def estimate_padded(
        self, q: Tensor, k: Tensor, lengths: Sequence[int], *, scale: float | None = None, backend: str = "auto"
    ) -> BlockMask:
        """One causal :class:`BlockMask` for a right-padded batch: element ``b``'s tokens are positions
        ``0 … lengths[b]-1`` of q ``[B, Hq, L, D]`` and k ``[B, Hkv, L, D]``. Each element's rows equal the mask
        :meth:`estimate` gives its real tokens alone; its rows past them are empty. The returned mask carries
        ``lengths`` (see :class:`BlockMask`). Elements shorter than ``min_seq_len`` are not treated apart here."""
        geo = self.geometry(q, k, causal=True, backend=backend)
        lens = check_lengths(lengths, geo.batch, geo.q_len, geo.k_len)
        b = self.block_size
        if self.padded_batch == "rows":
            mask = torch.zeros(geo.batch, geo.heads, -(-geo.q_len // b), -(-geo.k_len // b), dtype=torch.bool,
                               device=q.device)  # fmt: skip
            for i, n in enumerate(lens):
                if n:
                    row = self.estimate(q[i : i + 1, :, :n], k[i : i + 1, :, :n], scale=scale, backend=backend).mask
                    mask[i, :, : row.shape[2], : row.shape[3]] = row[0]
            shared = 1
        else:
            extra = {"lengths": lens} if self.padded_batch == "lengths" else {}
            full = self.estimate(q, k, causal=True, scale=scale, backend=backend, **extra)
            mask, shared = full.mask, full.shared_heads
        padded = BlockMask(mask, b, geo.q_len, geo.k_len, True, shared_heads=shared, lengths=lens)
        return dataclasses.replace(padded, mask=mask & padded.visible_per_element()[:, None])

    def geometry(self, q: Tensor, k: Tensor, *, causal: bool = True, backend: str = "auto") -> Geometry:
        """Check q ``[B, Hq, Lq, D]``, k ``[B, Hkv, Lk, D]`` and the backend name; the :class:`Geometry` to select in."""
        bsz, hq, hkv, lq, lk, _ = check_qkv(q, k)
        chosen = resolve_backend(backend, q.device)
        return Geometry(bsz, hq, hkv, lq, lk, self.block_size, causal, chosen, q.device)

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
