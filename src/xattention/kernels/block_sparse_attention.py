"""Triton block-sparse flash attention forward (twin of :func:`.reference.block_sparse_attention`).

One program per (batch x query head, query block): it loads its ``b`` queries once, walks the row's kept key blocks
from an index list (no branch per masked block) with an online softmax (Dao, 2023, FlashAttention-2, Alg. 1), and
applies the causal/padding mask only to the trailing blocks that need it. Programs of the heads that share a K/V head
are launched next to each other, so a K/V block fetched for one is served from L2 to the others.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..block_mask import causal_block_bounds, full_block_limit
from . import softmax_scale, tma_usable

__all__ = ["block_sparse_attention", "mask_to_indices", "split_block_lists", "unsupported_block_size"]

LOG2E = 1.4426950408889634
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # natural log of 2: converts log2 sums back to nats


def _configs() -> list[triton.Config]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({}, num_warps=4, num_stages=1)]
    # One stage (no K/V prefetch) is there for head dims above 128: a 128 x 256 bf16 tile of Q, K and V each is 64 KB,
    # so two stages of K/V do not fit in shared memory (the autotuner skips configs that do not compile).
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3, 4)]


@triton.jit
def _attend_blocks(
    q, m_i, l_i, acc, KDesc, VDesc, k_base, v_base, idx_base, lo, hi, skl, svl, batch, kv_head, q_pos, scale_log2, k_len,
    D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    USE_TMA: tl.constexpr,
):  # fmt: skip
    """Online-softmax update of ``(m_i, l_i, acc)`` over the kept key blocks listed at ``idx_base[lo:hi]``.

    ``MASKED``: apply the causal and padding mask (the row's diagonal and last blocks); else every key is visible.
    """
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    for j in range(lo, hi):
        col = tl.load(idx_base + j)
        offs_k = col * BLOCK + offs_n
        k_ok = offs_k < k_len
        if USE_TMA:  # the copy engine zero-fills rows past k_len
            k = KDesc.load([batch, kv_head, col * BLOCK, 0]).reshape(BLOCK, BLOCK_D)
            v = VDesc.load([batch, kv_head, col * BLOCK, 0]).reshape(BLOCK, BLOCK_D)
        elif MASKED:
            kv_ok = k_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + offs_k[:, None] * skl + offs_d[None, :], mask=kv_ok, other=0.0)
            v = tl.load(v_base + offs_k[:, None] * svl + offs_d[None, :], mask=kv_ok, other=0.0)
        else:
            k = tl.load(k_base + offs_k[:, None] * skl + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            v = tl.load(v_base + offs_k[:, None] * svl + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        if MASKED:
            ok = k_ok[None, :]
            if CAUSAL:
                ok = ok & (offs_k[None, :] <= q_pos[:, None])
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = m_new
        if MASKED:  # a row that has seen no visible key yet keeps max -inf; shift by 0 so exp2 gives 0, not NaN
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return m_i, l_i, acc


@triton.autotune(configs=_configs(), key=["BLOCK", "BLOCK_D", "CAUSAL", "G", "USE_TMA"])
@triton.jit
def _block_sparse_attention_fwd(
    Q, K, V, KDesc, VDesc, Out, Lse, Idx, Cnt, NFull,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
    scale_log2, q_len, k_len, num_heads, num_q_blocks, num_k_blocks,
    G: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, STORE_LSE: tl.constexpr, USE_TMA: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    # Late query blocks keep the most key blocks: start them first so the tail of the launch is short.
    row = num_q_blocks - 1 - tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    kv_head = head // G

    offs_m = row * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(
        Q + batch * sqb + head * sqh + offs_m[:, None] * sql + offs_d[None, :],
        mask=(offs_m < q_len)[:, None] & d_ok[None, :],
        other=0.0,
    )
    k_base = K + batch * skb + kv_head * skh
    v_base = V + batch * svb + kv_head * svh
    row_id = pid_bh.to(tl.int64) * num_q_blocks + row
    count = tl.load(Cnt + row_id)
    n_full = tl.load(NFull + row_id)
    idx_base = Idx + row_id * num_k_blocks
    q_pos = (k_len - q_len) + offs_m

    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    # Blocks entirely visible to every query of the row need no mask; the diagonal and last (partial) ones do.
    m_i, l_i, acc = _attend_blocks(
        q, m_i, l_i, acc, KDesc, VDesc, k_base, v_base, idx_base, 0, n_full, skl, svl, batch, kv_head, q_pos, scale_log2,
        k_len, D, BLOCK, BLOCK_D, MASKED=False, CAUSAL=CAUSAL, USE_TMA=USE_TMA,
    )  # fmt: skip
    m_i, l_i, acc = _attend_blocks(
        q, m_i, l_i, acc, KDesc, VDesc, k_base, v_base, idx_base, n_full, count, skl, svl, batch, kv_head, q_pos,
        scale_log2, k_len, D, BLOCK, BLOCK_D, MASKED=True, CAUSAL=CAUSAL, USE_TMA=USE_TMA,
    )  # fmt: skip

    has_key = l_i > 0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    tl.store(
        Out + batch * sob + head * soh + offs_m[:, None] * sol + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=(offs_m < q_len)[:, None] & d_ok[None, :],
    )
    if STORE_LSE:
        lse = tl.where(has_key, (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) * LN2, float("-inf"))
        tl.store(Lse + pid_bh.to(tl.int64) * q_len + offs_m, lse, mask=offs_m < q_len)


@triton.jit
def _mask_to_indices_fwd(
    Mask, Idx, Cnt, NFull, FullMax, VisMax, num_q_blocks, num_k_blocks,
    KB_POW2: tl.constexpr, HAS_FULL: tl.constexpr, HAS_VIS: tl.constexpr,
):  # fmt: skip
    row_id = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, KB_POW2)
    in_row = cols < num_k_blocks
    kept = tl.load(Mask + row_id * num_k_blocks + cols, mask=in_row, other=0) != 0
    if HAS_VIS:  # blocks past the row's last visible one hold no visible pair: drop them
        kept = kept & (cols <= tl.load(VisMax + row_id % num_q_blocks))
    kept_i = kept.to(tl.int32)
    before = tl.cumsum(kept_i, 0) - kept_i  # kept blocks left of each column
    count = tl.sum(kept_i, 0)
    # kept columns in ascending order, then the padding value num_k_blocks: every slot written once
    slot = tl.where(kept, before, count + cols - before)
    value = tl.where(kept, cols, num_k_blocks)
    tl.store(Idx + row_id * num_k_blocks + slot, value, mask=in_row)
    tl.store(Cnt + row_id, count)
    if HAS_FULL:
        full_max = tl.load(FullMax + row_id % num_q_blocks)
        tl.store(NFull + row_id, tl.sum((kept & (cols <= full_max)).to(tl.int32), 0))


def mask_to_indices(mask: Tensor, full_max: Tensor | None = None, visible_max: Tensor | None = None) -> tuple[Tensor, ...]:
    """bool ``[B, H, Qb, Kb]`` -> index lists in one pass (no sort).

    Returns ``(indices, counts)``: int32 ``[B, H, Qb, Kb]`` with each row's kept columns ascending then padding ``Kb``,
    and int32 ``[B, H, Qb]`` counts. With ``full_max`` (int ``[Qb]``: the last column each row sees entirely), also the
    number of kept columns ``<= full_max`` (they lead the list, since it is ascending). With ``visible_max`` (int
    ``[Qb]``), columns past it are treated as not kept.
    """
    bsz, heads, qb, kb = mask.shape
    mask = mask.contiguous()
    indices = torch.empty(bsz, heads, qb, kb, dtype=torch.int32, device=mask.device)
    counts = torch.empty(bsz, heads, qb, dtype=torch.int32, device=mask.device)
    n_full = torch.empty_like(counts) if full_max is not None else counts
    _mask_to_indices_fwd[(bsz * heads * qb,)](
        mask.view(torch.int8), indices, counts, n_full,
        full_max.to(torch.int32).contiguous() if full_max is not None else counts,
        visible_max.to(torch.int32).contiguous() if visible_max is not None else counts,
        qb, kb, KB_POW2=max(16, triton.next_power_of_2(kb)), HAS_FULL=full_max is not None,
        HAS_VIS=visible_max is not None,
    )  # fmt: skip
    return (indices, counts) if full_max is None else (indices, counts, n_full)


def split_block_lists(mask: Tensor, *, q_len: int, k_len: int, block_size: int, causal: bool) -> tuple[Tensor, ...]:
    """The attention kernels' index lists of bool ``[B, H, Qb, Kb]``: ``(indices, counts, n_full)`` of
    :func:`mask_to_indices`, the first ``n_full`` of a row's kept columns those every query of the row sees entirely
    (:func:`~xattention.block_mask.full_block_limit`, no mask needed), columns past the row's last visible one dropped."""
    full_max = full_block_limit(q_len, k_len, block_size, causal, mask.device)
    visible_max = causal_block_bounds(q_len, k_len, block_size, mask.device)[1] if causal else None
    return mask_to_indices(mask, full_max, visible_max)


def unsupported_block_size(block_size: int) -> str | None:
    """Why the Triton attention kernel cannot take ``block_size``, or ``None`` when it can (a power of two >= 16)."""
    if block_size < 16 or block_size & (block_size - 1):
        return f"the Triton kernel needs a power-of-two block_size >= 16, got {block_size}"
    return None


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor,
    *,
    block_size: int,
    causal: bool = True,
    scale: float | None = None,
    return_lse: bool = False,
    use_tma: bool | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention over the kept blocks of ``mask``; same contract as the reference.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``; mask: bool ``[B, Hq, Qb, Kb]``.
        return_lse: also return the float32 log-sum-exp of each query's scores ``[B, Hq, Lq]`` (``-inf`` for a query that
            sees no key), for merging partial results (context parallelism).
        use_tma: load K/V blocks with the Hopper tensor-memory-accelerator (bulk copies, no per-thread address math);
            default: on devices of compute capability >= 9.0 when the strides allow it.
    Returns:
        ``[B, Hq, Lq, D]`` in q's dtype (and the LSE).
    """
    bsz, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    error = unsupported_block_size(block_size)
    if error is not None:
        raise ValueError(error)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    qb, kb = mask.shape[2], mask.shape[3]
    indices, counts, n_full = split_block_lists(mask, q_len=lq, k_len=lk, block_size=block_size, causal=causal)

    block_d = max(16, triton.next_power_of_2(d))
    if use_tma is None:
        use_tma = tma_usable(k, v)
    k_desc = v_desc = None
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        k_desc, v_desc = (TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_size, block_d]) for t in (k, v))
    out = torch.empty_like(q)
    lse = torch.empty(bsz, hq, lq, dtype=torch.float32, device=q.device) if return_lse else out
    factor = softmax_scale(scale, d) * LOG2E
    grid = (bsz * hq, qb)
    _block_sparse_attention_fwd[grid](
        q, k, v, k_desc, v_desc, out, lse, indices, counts, n_full,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        factor, lq, lk, hq, qb, kb,
        G=hq // hkv, D=d, BLOCK=block_size, BLOCK_D=block_d,
        CAUSAL=causal, STORE_LSE=return_lse, USE_TMA=use_tma,
    )  # fmt: skip
    return (out, lse) if return_lse else out
