"""FlexPrefill as a block-sparse method (Lai et al., 2025, "FlexPrefill: A Context-Aware Sparse Attention Mechanism for
Efficient Long-Sequence Inference", ICLR 2025, arXiv:2502.20766)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .._validation import check_qkv
from ..block_mask import BlockMask, visible_blocks
from ..kernels import softmax_scale
from ..kernels.reference import cumulative_select
from .base import Geometry, Method
from .vertical_slash import keep_top_lines, last_queries_line_sums, line_block_sums

__all__ = ["FlexPrefill", "block_mean"]


def block_mean(x: Tensor, block_size: int) -> Tensor:
    """float32 ``[..., ceil(L/b), D]``: the mean of ``x`` ``[..., L, D]`` over each block of ``b`` rows (a partial last
    block averages only its real rows). Accumulates in float32 without a float32 copy of ``x``."""
    length = x.shape[-2]
    full = length // block_size
    parts = []
    if full:
        parts.append(x[..., : full * block_size, :].unflatten(-2, (full, block_size)).sum(dim=-2, dtype=torch.float32))
        parts[-1] /= block_size
    if length % block_size:
        parts.append(x[..., full * block_size :, :].sum(dim=-2, keepdim=True, dtype=torch.float32) / (length % block_size))
    return torch.cat(parts, dim=-2)


def _sqrt_js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """``sqrt(JSD(p || q))`` (natural log, so in ``[0, sqrt(ln 2)]``) over the last dim; zero entries contribute 0."""
    m = (p + q) / 2
    kl_pm = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(dim=-1)
    kl_qm = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(dim=-1)
    return (0.5 * kl_pm + 0.5 * kl_qm).clamp_min(0).sqrt()


def _select_global(scores: Tensor, forced: Tensor, visible: Tensor, gamma: float) -> Tensor:
    """Cumulative selection over a head's whole block matrix ``[B, H, Qb, Kb]``: forced blocks first, then descending
    score (ties: lower flat index) while the kept score is below ``gamma x`` the head's total; zero scores never."""
    flat = cumulative_select(scores.flatten(-2), gamma, forced=forced.flatten(), visible=visible.flatten())
    return flat.view(scores.shape)


def _top_up(mask: Tensor, scores: Tensor, visible: Tensor, min_blocks: int) -> Tensor:
    """Add each row's highest-scoring unkept visible blocks until it keeps ``min(min_blocks, visible)`` blocks."""
    if min_blocks <= 0:
        return mask
    kept = (mask & visible).sum(dim=-1, keepdim=True)
    need = (min_blocks - kept).clamp_min(0)
    candidate = torch.where(mask | ~visible, float("-inf"), scores.to(torch.float64))
    order = torch.sort(candidate, dim=-1, descending=True, stable=True).indices
    rank = torch.arange(mask.shape[-1], device=mask.device)
    add_sorted = (rank < need) & (torch.gather(candidate, -1, order) > float("-inf"))
    return mask | torch.zeros_like(add_sorted).scatter_(-1, order, add_sorted)


@dataclass(kw_only=True, eq=False)
class FlexPrefill(Method):
    """FlexPrefill: per head, a Jensen-Shannon test picks a query-aware block pattern or a vertical-slash pattern, each
    sized by cumulative attention (arXiv:2502.20766, Sec. 3, "Query-Aware Sparse Pattern Determination" and
    "Cumulative-Attention Based Index Selection").

    Per head: ``sqrt(JSD)`` between the last query block's pooled estimate and its true block distribution
    (:meth:`pattern_divergence`) below ``tau`` makes it query-aware (:meth:`head_patterns`): the fewest blocks of its
    pooled block attention (:meth:`pooled_block_attention`) over the whole head whose scores reach ``gamma`` of the
    total; otherwise the fewest vertical and slash lines of the last block's exact attention holding ``gamma`` of each
    mass, as a block cover (:class:`~xattention.methods.vertical_slash.VerticalSlash`). Every row keeps the sink and
    diagonal blocks and at least ``min(min_budget, visible)`` blocks. ``docs/methods.md`` gives the steps and where
    they differ from the paper and its code.

    Attributes:
        gamma: cumulative attention threshold ``γ`` in ``(0, 1]`` (default 0.9, the paper's).
        tau: Jensen-Shannon threshold ``τ`` in ``[0, 1]`` (default 0.1, the paper's); ``0`` makes every head
            vertical-slash, anything above ``sqrt(ln 2) ≈ 0.833`` makes every head query-aware.
        min_budget: minimum kept blocks per row (default 4).
    """

    name: ClassVar[str] = "flexprefill"

    gamma: float = 0.9
    tau: float = 0.1
    min_budget: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not 0.0 < float(self.gamma) <= 1.0:
            raise ValueError(f"gamma must be a float in (0, 1], got {self.gamma!r}")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0.0 <= float(self.tau) <= 1.0:
            raise ValueError(f"tau must be a float in [0, 1], got {self.tau!r}")
        if isinstance(self.min_budget, bool) or not isinstance(self.min_budget, int) or self.min_budget < 0:
            raise ValueError(f"min_budget must be a non-negative int (blocks per row), got {self.min_budget!r}")

    def _divergence(self, q: Tensor, k: Tensor, vertical: Tensor, scale: float | None) -> Tensor:
        """sqrt-JSD ``[B, Hq]`` from the last block's vertical sums ``[B, Hq, Lk]``."""
        bsz, hq, lq, d = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        b = self.block_size
        t = min(b, lq)
        kb = -(-lk // b)
        factor = softmax_scale(scale, d)
        true = torch.nn.functional.pad(vertical, (0, kb * b - lk)).view(bsz, hq, kb, b).sum(dim=-1) / t
        q_pool = q[:, :, lq - t :].sum(dim=-2, dtype=torch.float32).view(bsz, hkv, hq // hkv, d) / t
        k_pool = block_mean(k, b)  # [B, Hkv, Kb, D]
        estimate = torch.softmax(torch.einsum("bhgd,bhcd->bhgc", q_pool, k_pool) * factor, dim=-1).view(bsz, hq, kb)
        return _sqrt_js_divergence(estimate, true)

    def pattern_divergence(self, q: Tensor, k: Tensor, *, causal: bool = True, scale: float | None = None) -> Tensor:
        """float32 ``[B, Hq]``: ``sqrt(JSD)`` between the pooled estimate and the true last-block distribution."""
        check_qkv(q, k)
        vertical, _ = last_queries_line_sums(q, k, last_q=self.block_size, causal=causal, scale=scale)
        return self._divergence(q, k, vertical, scale)

    def head_patterns(self, q: Tensor, k: Tensor, *, causal: bool = True, scale: float | None = None) -> Tensor:
        """bool ``[B, Hq]``: ``True`` where the head is query-aware (``pattern_divergence < tau``), ``False`` where it
        uses the vertical-slash pattern."""
        return self.pattern_divergence(q, k, causal=causal, scale=scale) < self.tau

    def pooled_block_attention(self, q: Tensor, k: Tensor, *, causal: bool = True, scale: float | None = None) -> Tensor:
        """float32 ``[B, Hq, Qb, Kb]``: softmax of pooled queries against pooled keys, causal at block level (each
        row's columns after its last diagonal block get zero)."""
        bsz, hq, hkv, lq, lk, d = check_qkv(q, k)
        b = self.block_size
        factor = softmax_scale(scale, d)
        q_pool = block_mean(q, b).view(bsz, hkv, hq // hkv, -1, d)
        k_pool = block_mean(k, b)
        logits = torch.einsum("bhgrd,bhcd->bhgrc", q_pool, k_pool).reshape(bsz, hq, q_pool.shape[-2], -1) * factor
        visible = visible_blocks(lq, lk, b, q.device, causal=causal)
        return torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)

    def choose_blocks(self, q: Tensor, k: Tensor, geo: Geometry, *, scale: float | None) -> BlockMask:
        """FlexPrefill blocks, computed in PyTorch on the inputs' device (the scoring backend is not used)."""
        causal = geo.causal
        lq, lk, b, gamma = geo.q_len, geo.k_len, self.block_size, float(self.gamma)
        visible, forced = geo.visible, geo.forced  # the forced blocks are always visible

        vertical, slash = last_queries_line_sums(q, k, last_q=b, causal=causal, scale=scale)
        query_aware = (self._divergence(q, k, vertical, scale) < self.tau)[..., None, None]

        v_keep = keep_top_lines(vertical, threshold=gamma)
        s_keep = keep_top_lines(slash, threshold=gamma)
        vs_mask = ((line_block_sums(v_keep, s_keep, q_len=lq, k_len=lk, block_size=b) > 0) | forced) & visible
        vs_scores = line_block_sums(vertical, slash, q_len=lq, k_len=lk, block_size=b)

        qa_scores = self.pooled_block_attention(q, k, causal=causal, scale=scale)
        qa_mask = _select_global(qa_scores, forced, visible, gamma)

        mask = torch.where(query_aware, qa_mask, vs_mask)
        scores = torch.where(query_aware, qa_scores.to(torch.float64), vs_scores)
        return geo.block_mask(_top_up(mask, scores, visible, self.min_budget))
