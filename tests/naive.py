"""Loop-based, obviously-correct implementations of XAttention's semantics (README.md, "Semantics"; stated in full in
``xattention.kernels.reference.antidiagonal_block_scores`` and ``select_blocks``). Used only by tests.

Everything here is written for clarity, not speed: explicit Python loops over batch, head, row and column in float64,
so the library's vectorised reference (reshape trick, sorting, cumsums, chunking) is checked against a second,
independent reading of the rules. Keep inputs tiny (L up to a few hundred).

Conventions (:mod:`xattention.block_mask`, "Indexing"): queries are aligned to the end of the keys
(query ``i`` sits at key position ``Lk - Lq + i``); query head ``h`` reads key/value head ``h // (Hq // Hkv)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def diagonal_columns(row: int, q_len: int, k_len: int, block_size: int) -> tuple[int, int]:
    """First and last key block holding the positions of query block ``row`` (its "diagonal" blocks)."""
    offset = k_len - q_len
    first_query = row * block_size
    last_query = min(row * block_size + block_size - 1, q_len - 1)
    return (offset + first_query) // block_size, (offset + last_query) // block_size


def visible_columns(row: int, q_len: int, k_len: int, block_size: int, causal: bool) -> list[int]:
    """Key blocks holding at least one (query, key) pair that query block ``row`` may see."""
    num_k_blocks = _ceil_div(k_len, block_size)
    if not causal:
        return list(range(num_k_blocks))
    last_position = k_len - q_len + min(row * block_size + block_size - 1, q_len - 1)
    return [c for c in range(num_k_blocks) if c * block_size <= last_position]


def naive_antidiagonal_block_scores(
    q: Tensor, k: Tensor, stride: int, block_size: int, causal: bool, scale: float | None = None
) -> Tensor:
    """XAttention block scores by explicit loops, float64 ``[B, Hq, Qb, Kb]``.

    For reshaped query row ``t`` and reshaped key ``u``: ``sum_i q[t*S+S-1-i] . k[u*S+i]`` (positions past the end count
    as zero vectors), times ``scale / S`` (``scale`` default ``1/sqrt(D)``). Reshaped key ``u`` exists when ``u*S < Lk``
    and, when causal, is visible to row ``t`` when ``u*S <= Lk - Lq + t*S + S - 1``. Each row ``t`` with ``t*S < Lq`` is
    soft-maxed over its visible keys; its probabilities are added to block ``(t // (b/S), u // (b/S))``.
    """
    bsz, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    s = stride
    per_block = block_size // s
    num_q_blocks, num_k_blocks = _ceil_div(lq, block_size), _ceil_div(lk, block_size)
    rows, cols = num_q_blocks * per_block, num_k_blocks * per_block
    factor = (scale if scale is not None else 1.0 / math.sqrt(d)) / s
    out = np.zeros((bsz, hq, num_q_blocks, num_k_blocks), dtype=np.float64)
    for bi in range(bsz):
        for h in range(hq):
            qn = q[bi, h].double().numpy()
            kn = k[bi, h // group].double().numpy()
            dots = qn @ kn.T  # dots[i, j] = q[i] . k[j]; the antidiagonal sums below are plain loops over it

            def dot(i: int, j: int, dots: np.ndarray = dots) -> float:
                return float(dots[i, j]) if i < lq and j < lk else 0.0  # padded positions are zero vectors

            for t in range(rows):
                if t * s >= lq:
                    continue  # a row made only of padding carries no mass
                logits: dict[int, float] = {}
                for u in range(cols):
                    if u * s >= lk:
                        continue
                    if causal and u * s > lk - lq + t * s + s - 1:
                        continue
                    total = 0.0
                    for i in range(s):
                        total += dot(t * s + s - 1 - i, u * s + i)
                    logits[u] = total * factor
                top = max(logits.values())
                weights = {u: math.exp(x - top) for u, x in logits.items()}
                norm = sum(weights.values())
                for u, w in weights.items():
                    out[bi, h, t // per_block, u // per_block] += w / norm
    return torch.from_numpy(out)


def _row_thresholds(threshold: float | Sequence[float] | Tensor, heads: int) -> list[float]:
    if isinstance(threshold, Tensor):
        threshold = threshold.double().tolist()
    if isinstance(threshold, (int, float)):
        return [float(threshold)] * heads
    values = [float(x) for x in threshold]
    assert len(values) == heads
    return values


def _row_plan(
    row_scores: Sequence[float], tau: float, row: int, q_len: int, k_len: int, block_size: int, causal: bool
) -> tuple[set[int], list[float], list[int], float]:
    """The greedy rule for one row. Returns (kept columns, running sums before each candidate, candidates, total)."""
    visible = visible_columns(row, q_len, k_len, block_size, causal)
    lo, hi = diagonal_columns(row, q_len, k_len, block_size)
    forced = {c for c in visible if c == 0 or lo <= c <= hi}
    total = sum(row_scores[c] for c in visible)
    kept_mass = sum(row_scores[c] for c in sorted(forced))
    kept = set(forced)
    candidates = sorted((c for c in visible if c not in forced), key=lambda c: (-row_scores[c], c))
    befores: list[float] = []
    for c in candidates:
        befores.append(kept_mass)
        if row_scores[c] <= 0:
            break  # zero-score blocks are never added (and everything after is zero too)
        if tau >= 1.0 or kept_mass < tau * total:
            kept.add(c)
            kept_mass += row_scores[c]
        else:
            break
    return kept, befores, candidates, total


def naive_select(
    scores: Tensor,
    threshold: float | Sequence[float] | Tensor,
    q_len: int,
    k_len: int,
    block_size: int,
    causal: bool,
) -> Tensor:
    """Cumulative-threshold selection, one row at a time, bool ``[B, Hq, Qb, Kb]``.

    Per row: keep the sink (column 0) and the diagonal blocks; then visit the other visible blocks by descending score
    (ties: lower column first), adding each while the kept score is below ``tau x row total`` (``tau >= 1``: always)
    and its score is positive. Blocks above the causal diagonal are never kept.
    """
    bsz, hq, qb, kb = scores.shape
    taus = _row_thresholds(threshold, hq)
    values = scores.double().tolist()
    out = torch.zeros(bsz, hq, qb, kb, dtype=torch.bool)
    for bi in range(bsz):
        for h in range(hq):
            for row in range(qb):
                kept, _, _, _ = _row_plan(values[bi][h][row], taus[h], row, q_len, k_len, block_size, causal)
                for c in kept:
                    out[bi, h, row, c] = True
    return out


def fragile_rows(
    scores: Tensor,
    threshold: float | Sequence[float] | Tensor,
    q_len: int,
    k_len: int,
    block_size: int,
    causal: bool,
    rel_eps: float = 1e-4,
) -> Tensor:
    """bool ``[B, Hq, Qb]``: rows whose selection could flip under a relative perturbation ``rel_eps`` of the scores.

    A row is fragile when a running sum lies within ``rel_eps x total`` of ``tau x total`` or when the last kept and the
    first dropped candidate have scores within ``rel_eps x total`` of each other. Comparisons between float32 selection
    and float64 naive scores are exact everywhere else.
    """
    bsz, hq, qb, _ = scores.shape
    taus = _row_thresholds(threshold, hq)
    values = scores.double().tolist()
    out = torch.zeros(bsz, hq, qb, dtype=torch.bool)
    for bi in range(bsz):
        for h in range(hq):
            for row in range(qb):
                row_scores = values[bi][h][row]
                kept, befores, candidates, total = _row_plan(row_scores, taus[h], row, q_len, k_len, block_size, causal)
                eps = rel_eps * max(total, 1e-30)
                if taus[h] < 1.0 and any(abs(x - taus[h] * total) < eps for x in befores):
                    out[bi, h, row] = True
                added = [c for c in candidates if c in kept]
                dropped = [c for c in candidates if c not in kept]
                if added and dropped and abs(row_scores[added[-1]] - row_scores[dropped[0]]) < eps:
                    out[bi, h, row] = True
    return out


def naive_token_mask(mask: Tensor, block_size: int, q_len: int, k_len: int, causal: bool) -> Tensor:
    """bool ``[B, Hq, Lq, Lk]``: query ``i`` sees key ``j`` when block ``(i // b, j // b)`` is kept and, if causal,
    ``j <= Lk - Lq + i``. Built by indexing, independently of :meth:`BlockMask.to_token_mask`."""
    q_block = torch.arange(q_len) // block_size
    k_block = torch.arange(k_len) // block_size
    tok = mask.cpu()[:, :, q_block][:, :, :, k_block]
    if causal:
        allowed = torch.arange(k_len)[None, :] <= (k_len - q_len) + torch.arange(q_len)[:, None]
        tok = tok & allowed
    return tok


def reference_attention_fp64(q: Tensor, k: Tensor, v: Tensor, token_mask: Tensor, scale: float | None = None) -> Tensor:
    """Masked softmax attention in float64, ``[B, Hq, Lq, D]``; a query that sees no key gets zeros.

    ``token_mask`` is bool ``[B, Hq, Lq, Lk]`` (or broadcastable); K/V heads are repeated for GQA.
    """
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    group = hq // hkv
    qd = q.double().cpu()
    kd = k.double().cpu().repeat_interleave(group, dim=1)
    vd = v.double().cpu().repeat_interleave(group, dim=1)
    factor = scale if scale is not None else 1.0 / math.sqrt(d)
    logits = (qd @ kd.transpose(-1, -2)) * factor
    logits = logits.masked_fill(~token_mask.cpu(), float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # fully masked rows: softmax gives NaN, we want zeros
    return probs @ vd
