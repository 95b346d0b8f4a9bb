"""BlockMask: which key blocks each (batch, head, query block) row attends to.

Indexing (the contract every method and kernel shares):

* row ``r`` covers queries ``r*b … r*b+b-1`` of ``q`` (counted from the first query);
* column ``c`` covers keys ``c*b … c*b+b-1``;
* queries are aligned to the **end** of the keys: query ``i`` sits at key position ``k_len - q_len + i``;
* token-level visibility = block kept AND (not causal OR key position <= query position).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "BlockMask",
    "block_indices",
    "causal_block_bounds",
    "check_lengths",
    "forced_blocks",
    "full_block_limit",
    "length_tensor",
    "padding_positions",
    "visible_blocks",
]


def causal_block_bounds(
    q_len: int, k_len: int, block_size: int, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Per query-block row, the first and last key block that hold the row's own (diagonal) positions.

    Returns ``(lo, hi)``, each int64 ``[Qb]``. Row ``r``'s first query sits at key position ``k_len - q_len + r*b`` and
    its last at ``k_len - q_len + min(r*b + b - 1, q_len - 1)``; ``lo``/``hi`` are the key blocks holding those positions.
    They differ when ``k_len - q_len`` is not a multiple of ``b``. Under causal masking ``hi`` is the last visible block.
    """
    num_q_blocks = -(-q_len // block_size)
    offset = k_len - q_len
    first = torch.arange(num_q_blocks, device=device) * block_size
    last = torch.clamp(first + block_size - 1, max=q_len - 1)
    return (offset + first) // block_size, (offset + last) // block_size


def _rows_bounds(
    q_len: int, k_len: int, block_size: int, rows: Tensor | None, device: torch.device | str | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(lo, hi)`` of :func:`causal_block_bounds` for ``rows`` (default: every row) and the column indices ``[1, Kb]``."""
    lo, hi = causal_block_bounds(q_len, k_len, block_size, device)
    if rows is not None:
        rows = rows.to(lo.device)
        lo, hi = lo[rows], hi[rows]
    return lo, hi, torch.arange(-(-k_len // block_size), device=device)[None, :]


def visible_blocks(
    q_len: int,
    k_len: int,
    block_size: int,
    device: torch.device | str | None = None,
    *,
    rows: Tensor | None = None,
    causal: bool = True,
) -> Tensor:
    """bool ``[R, Kb]``: the key blocks holding at least one (query, key) pair a row may see, for query-block ``rows``
    (int ``[R]``, default every row ``0 … Qb-1``): under causal masking the blocks up to the row's last diagonal block
    (``hi`` of :func:`causal_block_bounds`), else every block.

    The one causal-visibility rule of every method, the selection and :class:`BlockMask`'s density.
    """
    _, hi, cols = _rows_bounds(q_len, k_len, block_size, rows, device)
    if not causal:
        return torch.ones(hi.numel(), cols.shape[1], dtype=torch.bool, device=device)
    return cols <= hi[:, None]


def forced_blocks(
    q_len: int, k_len: int, block_size: int, device: torch.device | str | None = None, *, rows: Tensor | None = None
) -> Tensor:
    """bool ``[R, Kb]``: blocks every row keeps regardless of score — the sink (column 0) and the diagonal blocks
    (those holding the row's own query positions; two when ``k_len - q_len`` is not a multiple of ``block_size``), for
    query-block ``rows`` (default every row)."""
    lo, hi, cols = _rows_bounds(q_len, k_len, block_size, rows, device)
    return (cols == 0) | ((cols >= lo[:, None]) & (cols <= hi[:, None]))


def block_indices(mask: Tensor) -> tuple[Tensor, Tensor]:
    """bool ``[..., Kb]`` -> ``(indices, counts)``: int32 ``[..., Kb]`` with each row's kept columns in ascending order
    followed by padding ``Kb``, and int32 ``[...]`` with the number kept. Plain PyTorch (no sort): each kept column is
    scattered to its rank among the row's kept columns; the rest go to a spare slot that is cut off."""
    kb = mask.shape[-1]
    cols = torch.arange(kb, device=mask.device, dtype=torch.int32).expand_as(mask)
    slots = torch.where(mask, mask.cumsum(dim=-1) - 1, kb)
    indices = torch.full((*mask.shape[:-1], kb + 1), kb, dtype=torch.int32, device=mask.device)
    indices.scatter_(-1, slots, torch.where(mask, cols, kb))
    return indices[..., :kb].contiguous(), mask.sum(dim=-1, dtype=torch.int32).contiguous()


def full_block_limit(
    q_len: int, k_len: int, block_size: int, causal: bool = True, device: torch.device | str | None = None
) -> Tensor:
    """int64 ``[Qb]``: per query-block row, the last key block that is *full*, i.e. every key in it is real (``< k_len``)
    and, when ``causal``, visible to every query of the row. Kept blocks ``<= limit`` need no mask; -1 when none is.

    The one geometry behind every kernel's split into unmasked and masked blocks (Triton, FlexAttention, FA4).
    """
    num_q_blocks = -(-q_len // block_size)
    limit = torch.full((num_q_blocks,), k_len // block_size - 1, dtype=torch.long, device=device)
    if causal:
        first = (k_len - q_len) + torch.arange(num_q_blocks, device=device) * block_size  # each row's first query
        limit = torch.minimum(limit, (first + 1) // block_size - 1)
    return limit


def check_lengths(lengths: object, batch: int, q_len: int, k_len: int, causal: bool = True) -> tuple[int, ...]:
    """The per-element token counts of a right-padded batch as a tuple of ints; ``ValueError`` unless there is one
    int in ``[0, q_len]`` per batch element, ``q_len == k_len`` and attention is causal."""
    if isinstance(lengths, Tensor):
        lengths = lengths.tolist()
    if not isinstance(lengths, (list, tuple)) or len(lengths) != batch:
        raise ValueError(f"lengths must be a sequence of {batch} ints (one per batch element), got {lengths!r}")
    if any(isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= q_len for n in lengths):
        raise ValueError(f"lengths must be ints in [0, {q_len}], got {list(lengths)}")
    if q_len != k_len or not causal:
        raise ValueError(
            f"lengths (a right-padded batch) need causal attention with as many queries as keys, got q_len={q_len}, "
            f"k_len={k_len}, causal={causal}"
        )
    return tuple(lengths)


def length_tensor(lengths: Sequence[int], device: torch.device | str | None) -> Tensor:
    """int64 ``[B]`` on ``device`` holding ``lengths``, copied without waiting for the device."""
    return torch.tensor(lengths, dtype=torch.int64).to(device, non_blocking=True)


def padding_positions(lengths: Tensor, length: int) -> Tensor:
    """bool ``[B, length]``: True at the padding of a right-padded batch, positions ``lengths[b]`` onward."""
    return torch.arange(length, device=lengths.device)[None, :] >= lengths[:, None]


@dataclass(frozen=True)
class BlockMask:
    """Boolean block mask ``[B, Hq, Qb, Kb]`` plus the geometry needed to interpret it.

    Attributes:
        mask: bool ``[B, Hq, Qb, Kb]`` with ``Qb = ceil(q_len / block_size)``, ``Kb = ceil(k_len / block_size)``.
        block_size: tokens per block along both axes.
        q_len: number of queries ``Lq``.
        k_len: number of keys ``Lk`` (``Lq <= Lk``; queries aligned to the end of the keys).
        causal: whether token-level causal masking applies inside the kept blocks.
        shared_heads: a promise that every ``shared_heads`` consecutive heads hold the same mask (a GQA-shared mask);
            kernels may then load each K/V block once for the group. 1 (default) promises nothing.
        lengths: ``None``, or for a right-padded batch (``q_len == k_len``, causal) each element's token count: its
            positions ``lengths[b]`` onward are padding, its block rows past them are empty, and :meth:`density` counts
            only the blocks its real tokens can see.
    """

    mask: Tensor
    block_size: int
    q_len: int
    k_len: int
    causal: bool = True
    shared_heads: int = 1
    lengths: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.mask, Tensor) or self.mask.dtype != torch.bool:
            raise ValueError(f"BlockMask.mask must be a bool tensor, got {getattr(self.mask, 'dtype', type(self.mask))}")
        if self.mask.ndim != 4:
            raise ValueError(f"BlockMask.mask must be [B, Hq, Qb, Kb] (4-D), got shape {tuple(self.mask.shape)}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.q_len <= 0 or self.k_len <= 0:
            raise ValueError(f"q_len and k_len must be positive, got q_len={self.q_len}, k_len={self.k_len}")
        if isinstance(self.shared_heads, bool) or not isinstance(self.shared_heads, int) or self.shared_heads < 1:
            raise ValueError(f"shared_heads must be a positive int, got {self.shared_heads!r}")
        if self.mask.shape[1] % self.shared_heads:
            raise ValueError(f"shared_heads ({self.shared_heads}) must divide the mask's {self.mask.shape[1]} heads")
        if self.q_len > self.k_len:
            raise ValueError(f"q_len ({self.q_len}) must not exceed k_len ({self.k_len})")
        expected = (-(-self.q_len // self.block_size), -(-self.k_len // self.block_size))
        if tuple(self.mask.shape[2:]) != expected:
            raise ValueError(
                f"BlockMask.mask has {tuple(self.mask.shape[2:])} blocks but q_len={self.q_len}, k_len={self.k_len}, "
                f"block_size={self.block_size} need (Qb, Kb) = {expected}"
            )
        if self.lengths is not None:
            check_lengths(self.lengths, self.mask.shape[0], self.q_len, self.k_len, self.causal)

    @property
    def num_q_blocks(self) -> int:
        return self.mask.shape[2]

    @property
    def num_k_blocks(self) -> int:
        return self.mask.shape[3]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.mask.shape)  # type: ignore[return-value]

    def visible(self) -> Tensor:
        """bool ``[Qb, Kb]``: blocks holding at least one causally visible (query, key) pair (all blocks if not causal)."""
        return visible_blocks(self.q_len, self.k_len, self.block_size, self.mask.device, causal=self.causal)

    def visible_per_element(self) -> Tensor:
        """bool ``[B, Qb, Kb]`` (``[1, Qb, Kb]`` without ``lengths``): the blocks each element's real tokens can see."""
        vis = self.visible()[None]
        if self.lengths is None:
            return vis
        rows = -(-length_tensor(self.lengths, vis.device) // self.block_size)  # block rows holding real queries
        return vis & ~padding_positions(rows, vis.shape[1])[:, :, None]

    def density_per_head(self) -> Tensor:
        """float ``[B, Hq]``: kept visible blocks over visible blocks (0 for an element with no real token)."""
        vis = self.visible_per_element()
        kept = (self.mask & vis[:, None]).sum(dim=(-1, -2)).to(torch.float64)
        total = vis.sum(dim=(-1, -2)).to(torch.float64)[:, None]
        return torch.where(total > 0, kept / total.clamp(min=1), 0.0).to(torch.float32)

    def density(self) -> float:
        """Fraction of causally visible blocks that are kept, over every batch element and head."""
        if self.mask.is_meta:
            raise ValueError("a BlockMask on the meta device has no values: density() needs a real device")
        return float(self.density_per_head().mean())

    def to_token_mask(self) -> Tensor:
        """bool ``[B, Hq, Lq, Lk]``: the token-level visibility this mask means. For tests and small inputs only."""
        b = self.block_size
        tok = self.mask.repeat_interleave(b, dim=2).repeat_interleave(b, dim=3)[..., : self.q_len, : self.k_len]
        if self.causal:
            q_pos = torch.arange(self.q_len, device=tok.device) + (self.k_len - self.q_len)
            k_pos = torch.arange(self.k_len, device=tok.device)
            tok = tok & (k_pos[None, :] <= q_pos[:, None])
        if self.lengths is not None:
            real = ~padding_positions(length_tensor(self.lengths, tok.device), self.q_len)
            tok = tok & real[:, None, :, None] & real[:, None, None, :]
        return tok

    def to_indices(self) -> tuple[Tensor, Tensor]:
        """Per-row index lists of kept blocks.

        Returns ``(indices, counts)``: int32 ``[B, Hq, Qb, Kb]`` holding each row's kept column indices in ascending order
        followed by padding (``Kb``), and int32 ``[B, Hq, Qb]`` with the number of kept columns per row. Blocks above the
        causal diagonal are dropped (they hold no visible pair).
        """
        return block_indices(self.mask & self.visible())

    @classmethod
    def from_indices(
        cls,
        indices: Tensor,
        counts: Tensor,
        *,
        block_size: int,
        q_len: int,
        k_len: int,
        causal: bool = True,
    ) -> BlockMask:
        """Inverse of :meth:`to_indices`: the first ``counts[..., r]`` entries of ``indices[..., r, :]`` are kept."""
        if indices.ndim != 4 or counts.shape != indices.shape[:3]:
            raise ValueError(
                f"indices must be [B, Hq, Qb, n] and counts [B, Hq, Qb], got {tuple(indices.shape)} / {tuple(counts.shape)}"
            )
        kb = -(-k_len // block_size)
        n = indices.shape[-1]
        valid = torch.arange(n, device=indices.device)[None, None, None, :] < counts[..., None]
        if bool((valid & ((indices < 0) | (indices >= kb))).any()):
            raise ValueError(f"indices hold key blocks outside [0, {kb})")
        mask = torch.zeros(*indices.shape[:3], kb + 1, dtype=torch.bool, device=indices.device)
        safe = torch.where(valid, indices.long(), torch.full_like(indices, kb, dtype=torch.long))
        mask.scatter_(-1, safe, True)
        return cls(mask[..., :kb].contiguous(), block_size, q_len, k_len, causal)

    @classmethod
    def full(
        cls,
        batch: int,
        heads: int,
        *,
        block_size: int,
        q_len: int,
        k_len: int,
        causal: bool = True,
        device: torch.device | str | None = None,
    ) -> BlockMask:
        """Every (causally) visible block kept: the dense pattern."""
        qb, kb = -(-q_len // block_size), -(-k_len // block_size)
        probe = cls(torch.zeros(1, 1, qb, kb, dtype=torch.bool, device=device), block_size, q_len, k_len, causal)
        mask = probe.visible().expand(batch, heads, qb, kb).contiguous()
        return cls(mask, block_size, q_len, k_len, causal)

    def element(self, index: int) -> BlockMask:
        """The mask of batch element ``index`` alone, ``[1, Hq, Qb_i, Kb_i]``: with ``lengths``, cut to its real tokens."""
        one = self.mask[index : index + 1]
        if self.lengths is None:
            return dataclasses.replace(self, mask=one)
        n = self.lengths[index]
        if n == 0:
            raise ValueError(f"batch element {index} has no real token")
        blocks = -(-n // self.block_size)
        return dataclasses.replace(self, mask=one[:, :, :blocks, :blocks], q_len=n, k_len=n, lengths=None)

    def to(self, device: torch.device | str) -> BlockMask:
        return dataclasses.replace(self, mask=self.mask.to(device))

    def __repr__(self) -> str:
        density = "meta" if self.mask.is_meta else f"{self.density():.3f}"
        return (
            f"BlockMask(shape={self.shape}, block_size={self.block_size}, q_len={self.q_len}, k_len={self.k_len}, "
            f"causal={self.causal}, density={density})"
        )
