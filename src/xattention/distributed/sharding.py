"""How a sequence is cut into block-aligned shards, one per rank.

The sequence of ``L`` tokens is cut into ``nb = ceil(L / b)`` blocks of ``b`` tokens (``b = method.block_size``; only the
very last block may be partial). The blocks are dealt to ranks in whole blocks, so every shard boundary is a multiple of
``b`` and a query block never straddles two ranks:

* ``"contiguous"``: the blocks are cut into ``W`` runs of consecutive blocks, rank ``i`` holds run ``i`` (the first
  ``nb % W`` runs are one block longer). Causal attention makes the last rank the bottleneck: it sees every key.
* ``"zigzag"``: the blocks are cut into ``2W`` runs, rank ``i`` holds runs ``i`` and ``2W - 1 - i`` (Brandon et al.,
  2023, "Striped Attention", and the zig-zag ring of Megatron-LM's context parallelism). Every rank then holds one early
  and one late run, so causal work is balanced across ranks.

A rank's local tokens are its runs concatenated in ascending position. The rank holding the last block (the last rank for
``"contiguous"``, rank 0 for ``"zigzag"``) may hold a partial block. Every rank must hold at least one token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..block_mask import BlockMask, visible_blocks

__all__ = ["LAYOUTS", "SequenceLayout", "ShardBlockMask", "shard_sequence", "unshard_sequence"]

LAYOUTS = ("contiguous", "zigzag")
Layout = Literal["contiguous", "zigzag"]


def _split_even(total: int, parts: int) -> list[int]:
    """``parts`` sizes summing to ``total``, differing by at most one (larger ones first)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@dataclass(frozen=True)
class SequenceLayout:
    """The block-aligned assignment of a ``seq_len``-token sequence to ``world_size`` ranks.

    Attributes:
        seq_len: global number of tokens ``L``.
        world_size: number of ranks ``W``.
        block_size: tokens per block ``b``.
        kind: ``"contiguous"`` or ``"zigzag"`` (see the module docstring).
    """

    seq_len: int
    world_size: int
    block_size: int
    kind: Layout = "contiguous"

    def __post_init__(self) -> None:
        if self.kind not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.kind!r}")
        for name in ("seq_len", "world_size", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        empty = [r for r in range(self.world_size) if self.local_len(r) == 0]
        if empty:
            raise ValueError(
                f"a {self.seq_len}-token sequence has {self.num_blocks} blocks of {self.block_size}: too few to give each "
                f"of {self.world_size} ranks at least one with layout {self.kind!r} (ranks {empty} would be empty)"
            )

    @property
    def num_blocks(self) -> int:
        return -(-self.seq_len // self.block_size)

    def block_runs(self, rank: int) -> list[tuple[int, int]]:
        """Rank ``rank``'s runs of global block indices ``[start, end)``, ascending; empty runs left out, adjacent ones
        merged."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must lie in [0, {self.world_size}), got {rank}")
        parts = self.world_size if self.kind == "contiguous" else 2 * self.world_size
        sizes = _split_even(self.num_blocks, parts)
        starts = [sum(sizes[:i]) for i in range(parts)]
        picks = [rank] if self.kind == "contiguous" else [rank, parts - 1 - rank]
        runs: list[tuple[int, int]] = []
        for i in picks:
            if sizes[i] == 0:
                continue
            if runs and runs[-1][1] == starts[i]:  # adjacent runs (zig-zag with one rank) are one run
                runs[-1] = (runs[-1][0], starts[i] + sizes[i])
            else:
                runs.append((starts[i], starts[i] + sizes[i]))
        return runs

    def token_runs(self, rank: int) -> list[tuple[int, int]]:
        """Rank ``rank``'s runs of global token positions ``[start, end)``, ascending (starts are multiples of ``b``)."""
        b = self.block_size
        return [(s * b, min(e * b, self.seq_len)) for s, e in self.block_runs(rank)]

    def local_len(self, rank: int) -> int:
        """Number of tokens rank ``rank`` holds."""
        return sum(e - s for s, e in self.token_runs(rank))

    def blocks(self, rank: int, device: torch.device | str | None = None) -> Tensor:
        """int64 ``[nb_rank]``: the global block indices of rank ``rank``'s local blocks, in local order."""
        runs = self.block_runs(rank)
        return torch.cat([torch.arange(s, e, device=device) for s, e in runs])

    def positions(self, rank: int, device: torch.device | str | None = None) -> Tensor:
        """int64 ``[L_rank]``: the global position of each of rank ``rank``'s local tokens."""
        return torch.cat([torch.arange(s, e, device=device) for s, e in self.token_runs(rank)])


def shard_sequence(
    x: Tensor, rank: int, world_size: int, layout: Layout = "contiguous", *, block_size: int, dim: int = -2
) -> Tensor:
    """Rank ``rank``'s tokens of a full sequence ``x`` (sequence along ``dim``, e.g. ``[B, H, L, D]`` with ``dim=-2``).

    Returns a contiguous tensor with ``x``'s shape except ``L_rank`` tokens along ``dim`` (see :class:`SequenceLayout`).
    """
    lay = SequenceLayout(x.shape[dim], world_size, block_size, layout)
    return torch.cat([x.narrow(dim, s, e - s) for s, e in lay.token_runs(rank)], dim=dim).contiguous()


def unshard_sequence(shards: list[Tensor], layout: Layout = "contiguous", *, block_size: int, dim: int = -2) -> Tensor:
    """Inverse of :func:`shard_sequence`: ``shards[r]`` is rank ``r``'s piece; returns the full sequence along ``dim``."""
    if not shards:
        raise ValueError("unshard_sequence needs at least one shard")
    world = len(shards)
    lay = SequenceLayout(sum(s.shape[dim] for s in shards), world, block_size, layout)
    pieces: list[tuple[int, Tensor]] = []
    for rank, shard in enumerate(shards):
        if shard.shape[dim] != lay.local_len(rank):
            raise ValueError(
                f"shard {rank} has {shard.shape[dim]} tokens but layout {layout!r} of {lay.seq_len} tokens over {world} "
                f"ranks (block {block_size}) gives it {lay.local_len(rank)}"
            )
        offset = 0
        for s, e in lay.token_runs(rank):
            pieces.append((s, shard.narrow(dim, offset, e - s)))
            offset += e - s
    return torch.cat([p for _, p in sorted(pieces, key=lambda item: item[0])], dim=dim)


@dataclass(frozen=True, repr=False)
class ShardBlockMask(BlockMask):
    """One rank's rows of a sequence's :class:`~xattention.BlockMask`: ``mask`` bool ``[B, Hq, Qb_r, Kb]`` holds the
    rows of the global query blocks ``rows`` (int64 ``[Qb_r]``, in local order: :meth:`SequenceLayout.blocks`) over all
    ``Kb`` key blocks; ``q_len`` is the rank's token count ``L_r``, ``k_len`` the sequence length ``L`` (queries and keys
    are the same ``L`` tokens).

    A plain :class:`BlockMask` of these rows would place them at the end of the sequence (its bottom-right alignment),
    which only the last rank of a contiguous layout holds: visibility, :meth:`density` and :meth:`to_token_mask` here use
    each row's global position instead.
    """

    rows: Tensor | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.rows, Tensor) or self.rows.ndim != 1 or self.rows.numel() != self.num_q_blocks:
            raise ValueError(f"rows must be a 1-D tensor of the mask's {self.num_q_blocks} global query-block indices")

    def visible(self) -> Tensor:
        """bool ``[Qb_r, Kb]``: the blocks each of this rank's rows may see (all when not causal)."""
        return visible_blocks(self.k_len, self.k_len, self.block_size, self.mask.device, rows=self.rows, causal=self.causal)

    def to_token_mask(self) -> Tensor:
        """bool ``[B, Hq, L_r, L]``: which of the sequence's keys each of this rank's queries sees."""
        b = self.block_size
        tok = self.mask.repeat_interleave(b, dim=2).repeat_interleave(b, dim=3)[..., : self.q_len, : self.k_len]
        if self.causal:
            local = torch.arange(self.q_len, device=tok.device)
            q_pos = self.rows.to(tok.device)[local // b] * b + local % b  # type: ignore[union-attr]
            tok = tok & (torch.arange(self.k_len, device=tok.device)[None, :] <= q_pos[:, None])
        return tok

    def to(self, device: torch.device | str) -> ShardBlockMask:
        return dataclasses.replace(self, mask=self.mask.to(device), rows=self.rows.to(device))  # type: ignore[union-attr]

    def __repr__(self) -> str:
        return f"Shard{super().__repr__()[:-1]}, rows={self.rows.tolist()})"  # type: ignore[union-attr]
