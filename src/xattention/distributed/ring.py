"""Context-parallel block-sparse prefill: selection and attention with K/V shards travelling a ring of ranks.

Every rank holds the q, k, v of its own tokens (a block-aligned shard, see :mod:`.sharding`) and gets exactly its rows
of the single-device result. :func:`ring_estimate` selects: XAttention from the online-softmax statistics of K shards
travelling the ring (one pass, or two under ``memory_budget``), other methods by all-gathering q and k, Dense without
communication. :func:`ring_sparse_attention` then sends K/V shards round the ring (transfers overlapping compute) and
merges each rank's partial outputs by their log-sum-exp, skipping the shards and (query run, key run) pairs that no kept
block needs. :class:`RingStats` counts what each rank sent, received, computed and skipped. With one rank nothing is
communicated. The algorithm, its communication volume and the skipping rules: ``docs/ring.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .._validation import check_qkv
from ..attention import sparse_attention
from ..block_mask import BlockMask
from ..kernels import reference as ref
from ..kernels import resolve_backend
from ..methods.base import Method
from ..methods.dense import Dense
from ..methods.xattention import XAttention
from .sharding import SequenceLayout, ShardBlockMask, unshard_sequence

__all__ = ["PhaseStats", "RingStats", "attend_shard", "ring_estimate", "ring_sparse_attention"]

logger = logging.getLogger(__name__)

# Float32 elements the one-pass XAttention selection may keep for its per-shard block sums (1 GiB): beyond it the
# selection takes two ring passes instead of holding B*Hq*(L_r/S)*Kb floats.
DEFAULT_MEMORY_BUDGET = 1 << 28


@dataclass
class PhaseStats:
    """Traffic and work of one phase on one rank.

    Attributes:
        bytes_sent, bytes_received: payload bytes (an all-gather counts its piece ``W-1`` times each way, the volume of
            the ring algorithm).
        messages_sent: shard transfers this rank sent.
        messages_skipped: transfers a full ring would have sent from this rank that the need flags made unnecessary.
        computes: (query run, key run) pairs computed.
        computes_skipped: causally visible pairs not computed because no row kept a block there.
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_skipped: int = 0
    computes: int = 0
    computes_skipped: int = 0


@dataclass
class RingStats:
    """What one rank communicated and computed in :func:`ring_estimate` / :func:`ring_sparse_attention`.

    Pass an instance as ``stats=`` to have it filled (counts add up over calls).

    Attributes:
        metadata: lengths and need flags (tiny collectives).
        estimate: block selection (K ring for XAttention, all-gather of q and k for other methods).
        attention: the K/V ring.
        estimate_path: ``"dense"``, ``"local"`` (one rank), ``"ring-1pass"``, ``"ring-2pass"`` or ``"all-gather"``.
    """

    metadata: PhaseStats = field(default_factory=PhaseStats)
    estimate: PhaseStats = field(default_factory=PhaseStats)
    attention: PhaseStats = field(default_factory=PhaseStats)
    estimate_path: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------- group
@dataclass(frozen=True)
class _Ring:
    group: dist.ProcessGroup | None
    rank: int
    world: int

    @classmethod
    def of(cls, group: dist.ProcessGroup | None) -> _Ring:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("torch.distributed is not initialised: call torch.distributed.init_process_group first")
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def peer(self, group_rank: int) -> int:
        """Global rank of ``group_rank`` (point-to-point ops address global ranks)."""
        r = group_rank % self.world
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def all_gather(self, x: Tensor, stats: PhaseStats) -> list[Tensor]:
        if self.world == 1:
            return [x]
        out = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(out, x.contiguous(), group=self.group)
        nbytes = x.numel() * x.element_size() * (self.world - 1)
        stats.bytes_sent += nbytes
        stats.bytes_received += nbytes
        return out


def _ring_pass(
    ring: _Ring,
    local: Tensor,
    shape_of: Callable[[int], tuple[int, ...]],
    need: list[list[bool]],
    on_shard: Callable[[int, Tensor], None],
    stats: PhaseStats,
) -> None:
    """Send every rank's ``local`` around the ring; call ``on_shard(origin, tensor)`` for each shard this rank needs.

    ``need[p][j]``: rank ``p`` needs rank ``j``'s shard (the same matrix on every rank). Shard ``j`` travels from rank
    ``j`` through ``j+1, j+2, …`` only as far as the last rank on that path that needs it. The next step's transfer is
    posted before the current step's compute, so they overlap.
    """
    p, w = ring.rank, ring.world

    def forward(origin: int, hop: int) -> bool:  # does shard `origin` still have to reach rank origin + hop?
        return any(need[(origin + h) % w][origin] for h in range(hop, w))

    current: Tensor | None = local
    for step in range(w):
        origin = (p - step) % w
        incoming: Tensor | None = None
        works: list[Any] = []
        if step < w - 1:
            ops = []
            if current is not None and forward(origin, step + 1):
                ops.append(dist.P2POp(dist.isend, current, ring.peer(p + 1), ring.group))
                stats.messages_sent += 1
                stats.bytes_sent += current.numel() * current.element_size()
            else:
                stats.messages_skipped += 1
            source = (p - 1 - step) % w
            if forward(source, step + 1):
                incoming = torch.empty(shape_of(source), dtype=local.dtype, device=local.device)
                ops.append(dist.P2POp(dist.irecv, incoming, ring.peer(p - 1), ring.group))
                stats.bytes_received += incoming.numel() * incoming.element_size()
            if ops:
                works = dist.batch_isend_irecv(ops)
        if current is not None and need[p][origin]:
            on_shard(origin, current)
        for work in works:
            work.wait()
        current = incoming


# ------------------------------------------------------------------------------------------------------------ metadata
@dataclass(frozen=True)
class _Problem:
    ring: _Ring
    layout: SequenceLayout
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int

    @property
    def seq_len(self) -> int:
        return self.layout.seq_len

    def q_runs(self) -> list[tuple[int, int, int]]:
        """This rank's token runs as ``(global start, global end, local start)``."""
        return _with_local_offsets(self.layout.token_runs(self.ring.rank))

    def runs(self, origin: int) -> list[tuple[int, int, int]]:
        """Rank ``origin``'s token runs (as queries, or as the keys of its shard) as ``(global start, global end,
        local start)``."""
        return _with_local_offsets(self.layout.token_runs(origin))


def _with_local_offsets(runs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    out, offset = [], 0
    for s, e in runs:
        out.append((s, e, offset))
        offset += e - s
    return out


def _describe(
    q: Tensor, k: Tensor, ring: _Ring, block_size: int, layout: str, stats: RingStats, v: Tensor | None = None
) -> _Problem:
    """Validate the local inputs and agree on the global problem (one all-gather of 5 integers)."""
    bsz, hq, hkv, lq, lk, d = check_qkv(q, k, v)
    if lq != lk:
        raise ValueError(f"each rank passes q, k, v of the same tokens: got {lq} queries and {lk} keys on rank {ring.rank}")
    mine = torch.tensor([lq, bsz, hq, hkv, d], dtype=torch.int64, device=q.device)
    every = [t.tolist() for t in ring.all_gather(mine, stats.metadata)]
    for name, i in (("batch", 1), ("query heads", 2), ("key/value heads", 3), ("head dim", 4)):
        values = [e[i] for e in every]
        if len(set(values)) > 1:
            raise ValueError(f"ranks disagree on the {name}: {values}")
    lengths = [e[0] for e in every]
    lay = SequenceLayout(sum(lengths), ring.world, block_size, layout)  # type: ignore[arg-type]
    expected = [lay.local_len(r) for r in range(ring.world)]
    if lengths != expected:
        raise ValueError(
            f"ranks hold {lengths} tokens, but a {lay.seq_len}-token sequence in blocks of {block_size} with layout "
            f"{layout!r} over {ring.world} ranks gives {expected} (use xattention.distributed.shard_sequence)"
        )
    return _Problem(ring, lay, bsz, hq, hkv, d)


def _pair_relation(q_run: tuple[int, int, int], k_run: tuple[int, int, int], causal: bool) -> str:
    """``"same"`` (the diagonal run: causal inside), ``"before"`` (every key precedes every query) or ``"after"``.

    Runs are block-aligned pieces of one sequence, so they are identical or disjoint. Without causal masking every pair
    is ``"before"`` (fully visible)."""
    if not causal:
        return "before"
    if k_run[0] == q_run[0]:
        return "same"
    return "before" if k_run[1] <= q_run[0] else "after"


# ----------------------------------------------------------------------------------------------------------- selection
def _dense_rows(prob: _Problem, block_size: int, causal: bool, device: torch.device) -> Tensor:
    rows = prob.layout.blocks(prob.ring.rank, device)
    _, visible = ref.block_rows_geometry(prob.seq_len, prob.seq_len, block_size, rows, causal=causal, device=device)
    return visible.expand(prob.batch, prob.q_heads, *visible.shape).contiguous()


def _all_gather_rows(
    q: Tensor, k: Tensor, method: Method, prob: _Problem, causal: bool, scale: float | None, stats: PhaseStats
) -> Tensor:
    """Exact fallback for any method: all-gather q and k, estimate on the full sequence, keep this rank's rows."""
    ring, lay = prob.ring, prob.layout
    longest = max(lay.local_len(r) for r in range(ring.world))
    full = []
    for x in (q, k):
        padded = torch.nn.functional.pad(x, (0, 0, 0, longest - x.shape[2]))
        pieces = ring.all_gather(padded, stats)
        shards = [piece[:, :, : lay.local_len(r)] for r, piece in enumerate(pieces)]
        full.append(unshard_sequence(shards, lay.kind, block_size=lay.block_size))
    mask = method.estimate(full[0], full[1], causal=causal, scale=scale)
    return mask.mask[:, :, lay.blocks(ring.rank, q.device)].contiguous()


def _xattention_rows(
    q: Tensor,
    k: Tensor,
    method: XAttention,
    prob: _Problem,
    causal: bool,
    scale: float | None,
    passes: int | None,
    memory_budget: int,
    stats: RingStats,
) -> Tensor:
    """XAttention selection with K shards on the ring and online-softmax statistics (``docs/ring.md``)."""
    ring, lay = prob.ring, prob.layout
    b, s = method.block_size, method.stride
    bsz, hq, hkv = prob.batch, prob.q_heads, prob.kv_heads
    rows_total = sum(-(-(e - st) // b) for st, e, _ in prob.q_runs()) * (b // s)
    if passes is None:
        passes = 1 if bsz * hq * rows_total * lay.num_blocks <= memory_budget else 2
    if passes not in (1, 2):
        raise ValueError(f"passes must be None, 1 or 2, got {passes!r}")
    stats.estimate_path = f"ring-{passes}pass"
    scores = _ring_block_scores(q, k, prob, b, s, causal, scale, passes, stats)
    scores, thresholds = method.pool_kv_groups(scores, method.head_thresholds(hq, q.device), hkv)
    rows = lay.blocks(ring.rank, q.device)
    forced, visible = ref.block_rows_geometry(prob.seq_len, prob.seq_len, b, rows, causal=causal, device=q.device)
    mask = ref.select_blocks_masked(scores, thresholds, forced=forced, visible=visible)
    if mask.shape[1] != hq:
        mask = mask.repeat_interleave(hq // hkv, dim=1)
    return mask


def _ring_block_scores(
    q: Tensor, k: Tensor, prob: _Problem, b: int, s: int, causal: bool, scale: float | None, passes: int, stats: RingStats
) -> Tensor:
    """float32 ``[B, Hq, Qb_r, Kb]``: this rank's rows of the global XAttention block scores, from the online-softmax
    statistics of every K shard that travels past (``passes`` 2: a second ring pass against the merged row max)."""
    ring, lay, length, r = prob.ring, prob.layout, prob.seq_len, b // s
    q_runs = prob.q_runs()
    # need[p][j]: some key of rank j's shard is visible to some query of rank p (geometry only, known everywhere).
    need = [
        [any(_pair_relation(qr, kr, causal) != "after" for qr in prob.runs(p) for kr in prob.runs(j))
         for j in range(ring.world)]
        for p in range(ring.world)
    ]  # fmt: skip
    # per query run: list of (first key block, row_max, sums or row sums)
    parts: list[list[tuple[int, Tensor, Tensor]]] = [[] for _ in q_runs]
    score_shard: Callable[..., tuple[Tensor, Tensor]] = ref.antidiagonal_partial_scores
    if resolve_backend("auto", q.device) == "triton":
        from ..kernels import antidiagonal

        if antidiagonal.unsupported_geometry(b, s) is None:
            score_shard = antidiagonal.antidiagonal_partial_scores

    def shard_stats(origin: int, shard: Tensor, row_max: list[Tensor] | None, keep_sums: bool) -> None:
        for k_run in prob.runs(origin):
            ks, ke, k_off = k_run
            kc = shard[:, :, k_off : k_off + ke - ks]
            for i, q_run in enumerate(q_runs):
                qs, qe, q_off = q_run
                if _pair_relation(q_run, k_run, causal) == "after":
                    continue
                m, sums = score_shard(
                    q[:, :, q_off : q_off + qe - qs], kc, stride=s, block_size=b, q_start=qs, k_start=ks,
                    q_len=length, k_len=length, causal=causal, scale=scale,
                    row_max=None if row_max is None else row_max[i],
                )  # fmt: skip
                stats.estimate.computes += 1
                parts[i].append((ks // b, m, sums if keep_sums else sums.sum(dim=-1)))

    def shape_of(origin: int) -> tuple[int, ...]:
        return (prob.batch, prob.kv_heads, lay.local_len(origin), prob.head_dim)

    kk = k.contiguous()
    _ring_pass(ring, kk, shape_of, need, lambda o, t: shard_stats(o, t, None, passes == 1), stats.estimate)
    totals = []
    for i in range(len(q_runs)):
        row_maxes = [m for _, m, _ in parts[i]]
        row_sums = [x.sum(dim=-1) if passes == 1 else x for _, _, x in parts[i]]
        totals.append(ref.merge_partial_row_stats(row_maxes, row_sums))
    if passes == 2:
        for run_parts in parts:
            run_parts.clear()
        global_max = [t[0] for t in totals]
        _ring_pass(ring, kk, shape_of, need, lambda o, t: shard_stats(o, t, global_max, True), stats.estimate)

    pieces = []
    for i, (qs, qe, _) in enumerate(q_runs):
        total_max, total_sum = totals[i]
        scores = torch.zeros(prob.batch, prob.q_heads, -(-(qe - qs) // b), lay.num_blocks, dtype=torch.float32, device=q.device)
        for kb0, m, sums in parts[i]:
            block = ref.partial_block_scores(sums, m, total_max, total_sum, rows_per_block=r)
            scores[..., kb0 : kb0 + block.shape[-1]] = block
        pieces.append(scores)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)


def _estimate_rows(
    q: Tensor,
    k: Tensor,
    method: Method,
    prob: _Problem,
    causal: bool,
    scale: float | None,
    passes: int | None,
    memory_budget: int,
    stats: RingStats,
    dense: bool,
) -> Tensor:
    b = method.block_size
    if dense:
        stats.estimate_path = "dense"
        return _dense_rows(prob, b, causal, q.device)
    if prob.ring.world == 1:
        stats.estimate_path = "local"
        return method.estimate(q, k, causal=causal, scale=scale).mask
    if isinstance(method, XAttention):
        return _xattention_rows(q, k, method, prob, causal, scale, passes, memory_budget, stats)
    stats.estimate_path = "all-gather"
    return _all_gather_rows(q, k, method, prob, causal, scale, stats.estimate)


def ring_estimate(
    q: Tensor,
    k: Tensor,
    method: Method,
    group: dist.ProcessGroup | None = None,
    *,
    causal: bool = True,
    scale: float | None = None,
    layout: str = "contiguous",
    passes: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    stats: RingStats | None = None,
) -> BlockMask:
    """Context-parallel ``method.estimate``: this rank's rows of the mask the method picks for the full sequence.

    Collective: every rank of ``group`` must call it with its own shard.

    Args:
        q: ``[B, Hq, L_r, D]``, k: ``[B, Hkv, L_r, D]``: this rank's tokens, sharded with ``layout`` in blocks of
            ``method.block_size`` (see :func:`~xattention.distributed.shard_sequence`).
        method: any method; XAttention runs the ring statistics path, Dense needs no communication, others all-gather.
        group: the process group (default: the world).
        causal, scale: as for ``method.estimate`` on the full sequence.
        layout: ``"contiguous"`` or ``"zigzag"``.
        passes: XAttention only: 1 (keep per-shard block sums), 2 (recompute them in a second ring pass) or ``None``
            (1 when ``B·Hq·(L_r/S)·Kb <= memory_budget``).
        stats: filled with this rank's communication counts.
    Returns:
        A :class:`~xattention.distributed.ShardBlockMask` whose ``mask`` is bool ``[B, Hq, Qb_r, Kb]``: the full mask's
        rows for this rank's query blocks (in local order, i.e. global blocks ``SequenceLayout(...).blocks(rank)``, its
        ``rows``) over all ``Kb = ceil(L/b)`` global key blocks. Its ``q_len`` is ``L_r`` and ``k_len`` is ``L``; its
        ``visible()`` and ``density()`` are those of these rows in the full sequence.
    """
    stats = stats if stats is not None else RingStats()
    if not isinstance(method, Method):
        raise ValueError(f"method must be an xattention method, got {type(method).__name__}")
    ring = _Ring.of(group)
    prob = _describe(q, k, ring, method.block_size, layout, stats)
    rows = _estimate_rows(q, k, method, prob, causal, scale, passes, memory_budget, stats, isinstance(method, Dense))
    blocks = prob.layout.blocks(ring.rank, q.device)
    return ShardBlockMask(rows, method.block_size, q.shape[2], prob.seq_len, causal, rows=blocks)


# ----------------------------------------------------------------------------------------------------------- attention
def attend_shard(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, *, block_size: int, causal: bool, scale: float | None
) -> tuple[Tensor, Tensor]:
    """Block-sparse attention of q ``[B, Hq, Lq, D]`` to one K/V piece ``[B, Hkv, Lk, D]`` with its log-sum-exp.

    Same contract as :func:`xattention.kernels.reference.block_sparse_attention` (mask bool ``[B, Hq, Qb, Kb]``,
    queries aligned to the end of the keys). Returns ``(out, lse)``: ``[B, Hq, Lq, D]`` in q's dtype and float32
    ``[B, Hq, Lq]`` (``-inf`` where a query sees no key). The Triton kernel on CUDA (power-of-two ``block_size >= 16``),
    the PyTorch reference elsewhere.
    """
    if resolve_backend("auto", q.device) == "triton":
        from ..kernels.block_sparse_attention import block_sparse_attention, unsupported_block_size

        if unsupported_block_size(block_size) is None:
            out, lse = block_sparse_attention(q, k, v, mask, block_size=block_size, causal=causal, scale=scale, return_lse=True)
            return out, lse
    return ref.block_sparse_attention(q, k, v, mask, block_size=block_size, causal=causal, scale=scale, return_lse=True)


def _merge(acc: tuple[Tensor, Tensor] | None, part: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Merge two partial attention results over disjoint keys: ``lse = logaddexp``, outputs weighted by their mass."""
    if acc is None:
        return part
    (out_a, lse_a), (out_b, lse_b) = acc, part
    lse = torch.logaddexp(lse_a, lse_b)
    shift = torch.where(torch.isfinite(lse), lse, 0.0)  # both -inf: weights exp(-inf) = 0, not NaN
    out = out_a.float() * torch.exp(lse_a - shift)[..., None] + out_b.float() * torch.exp(lse_b - shift)[..., None]
    return out, lse


class _KeptPairs:
    """Which (query run, key run) pairs hold a kept block of this rank's mask ``rows``: the attention ring computes
    only those, and a shard travels only as far as the last rank needing it."""

    def __init__(self, rows: Tensor, prob: _Problem, block_size: int, causal: bool) -> None:
        self.prob, self.b, self.causal = prob, block_size, causal
        self.q_runs = prob.q_runs()
        self.counts = [-(-(e - s) // block_size) for s, e, _ in self.q_runs]  # query blocks per run
        self.row_starts = [sum(self.counts[:i]) for i in range(len(self.q_runs))]
        # Which key blocks each query run kept anywhere (one host sync for every decision below).
        self.kept_cols = torch.stack(
            [rows[:, :, r0 : r0 + n].any(dim=2).any(dim=1).any(dim=0) for r0, n in zip(self.row_starts, self.counts, strict=True)]
        ).tolist()

    def needed(self, i: int, q_run: tuple[int, int, int], k_run: tuple[int, int, int]) -> bool:
        """Query run ``i`` (``q_run``) attends to ``k_run``: it is not after the queries and holds a kept block."""
        visible = _pair_relation(q_run, k_run, self.causal) != "after"
        return visible and any(self.kept_cols[i][k_run[0] // self.b : -(-k_run[1] // self.b)])

    def need_matrix(self, ring: _Ring, stats: RingStats, device: torch.device) -> list[list[bool]]:
        """``need[p][j]`` for every rank pair (one all-gather of this rank's flags); counts the skipped computes."""
        w, runs = ring.world, self.prob.runs
        pairs = [(i, qr, kr) for i, qr in enumerate(self.q_runs) for j in range(w) for kr in runs(j)]
        stats.attention.computes_skipped += sum(
            _pair_relation(qr, kr, self.causal) != "after" and not self.needed(i, qr, kr) for i, qr, kr in pairs
        )
        mine = [any(self.needed(i, qr, kr) for i, qr in enumerate(self.q_runs) for kr in runs(j)) for j in range(w)]
        flags = torch.tensor(mine, dtype=torch.uint8, device=device)
        return [[bool(x) for x in t.tolist()] for t in ring.all_gather(flags, stats.metadata)]


def _attention_ring(
    q: Tensor, k: Tensor, v: Tensor, rows: Tensor, prob: _Problem, b: int, causal: bool, scale: float | None,
    stats: RingStats,
) -> Tensor:  # fmt: skip
    """This rank's output ``[B, Hq, L_r, D]``: K/V shards travel the ring, partial results merge by their LSE."""
    ring, lay, p = prob.ring, prob.layout, prob.ring.rank
    kept = _KeptPairs(rows, prob, b, causal)
    q_runs = kept.q_runs
    need = kept.need_matrix(ring, stats, q.device)
    acc: list[tuple[Tensor, Tensor] | None] = [None] * len(q_runs)

    def attend(origin: int, kv: Tensor | None) -> None:
        kk, vv = (k, v) if kv is None else (kv[0], kv[1])
        for k_run in prob.runs(origin):
            ks, ke, k_off = k_run
            for i, q_run in enumerate(q_runs):
                qs, qe, q_off = q_run
                if not kept.needed(i, q_run, k_run):
                    continue
                r0 = kept.row_starts[i]
                sub = rows[:, :, r0 : r0 + kept.counts[i], ks // b : -(-ke // b)]
                part = attend_shard(
                    q[:, :, q_off : q_off + qe - qs], kk[:, :, k_off : k_off + ke - ks],
                    vv[:, :, k_off : k_off + ke - ks], sub.contiguous(), block_size=b,
                    causal=_pair_relation(q_run, k_run, causal) == "same", scale=scale,
                )  # fmt: skip
                stats.attention.computes += 1
                acc[i] = _merge(acc[i], part)

    def shape_of(origin: int) -> tuple[int, ...]:
        return (2, prob.batch, prob.kv_heads, lay.local_len(origin), prob.head_dim)

    _ring_pass(ring, torch.stack([k, v]), shape_of, need, lambda o, t: attend(o, None if o == p else t), stats.attention)
    outs = []
    for (s, e, _), part in zip(q_runs, acc, strict=True):
        if part is None:  # no query of the run sees a kept key
            outs.append(torch.zeros(*q.shape[:2], e - s, q.shape[3], dtype=q.dtype, device=q.device))
        else:
            outs.append(part[0].to(q.dtype))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def ring_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    method: Method,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = True,
    scale: float | None = None,
    layout: str = "contiguous",
    passes: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    stats: RingStats | None = None,
    return_mask: bool = False,
) -> Tensor | tuple[Tensor, BlockMask]:
    """Context-parallel :func:`xattention.sparse_attention`: this rank's rows of the full sequence's output.

    Collective: every rank of ``group`` calls it with its own shard. Selection as :func:`ring_estimate` (every causally
    visible block when ``method`` is Dense or the global length is below ``method.min_seq_len``, as
    ``sparse_attention`` runs dense attention there), then K/V shards travel the ring and each rank merges its partial
    outputs with their log-sum-exp (``docs/ring.md``).

    Args:
        q: ``[B, Hq, L_r, D]``; k, v: ``[B, Hkv, L_r, D]``: this rank's tokens (``layout``, blocks of
            ``method.block_size``; see :func:`~xattention.distributed.shard_sequence`).
        method, group, causal, scale, layout, passes, memory_budget: as :func:`ring_estimate`.
        stats: filled with this rank's communication and compute counts.
        return_mask: also return this rank's mask rows (a :class:`~xattention.distributed.ShardBlockMask`; at one rank the
            :class:`BlockMask` of :func:`xattention.sparse_attention`).
    Returns:
        ``[B, Hq, L_r, D]`` in q's dtype (and the mask rows).
    """
    stats = stats if stats is not None else RingStats()
    if not isinstance(method, Method):
        raise ValueError(f"method must be an xattention method (e.g. xa.XAttention()), got {type(method).__name__}")
    ring = _Ring.of(group)
    b = method.block_size
    prob = _describe(q, k, ring, b, layout, stats, v)
    if ring.world == 1:  # nothing to shard or send: exactly the single-device call, no ring bookkeeping
        out, mask = sparse_attention(q, k, v, method, causal=causal, scale=scale, return_mask=True)
        stats.estimate_path = "dense" if mask is None else "local"
        if not return_mask:
            return out
        if mask is None:  # the dense path ran: every visible block
            bsz, hq, lq = q.shape[:3]
            mask = BlockMask.full(bsz, hq, block_size=b, q_len=lq, k_len=k.shape[2], causal=causal, device=q.device)
        return out, mask
    dense = isinstance(method, Dense) or prob.seq_len < method.min_seq_len
    rows = _estimate_rows(q, k, method, prob, causal, scale, passes, memory_budget, stats, dense)
    out = _attention_ring(q, k, v, rows, prob, b, causal, scale, stats)
    p = ring.rank
    if p == 0 and logger.isEnabledFor(logging.DEBUG):
        logger.debug("ring %s over %d ranks: %s", type(method).__name__, ring.world, stats)
    if return_mask:
        return out, ShardBlockMask(rows, b, q.shape[2], prob.seq_len, causal, rows=prob.layout.blocks(p, q.device))
    return out
