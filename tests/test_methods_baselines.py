"""The baseline methods (Streaming, VerticalSlash, FlexPrefill, Oracle) against loop-built references and hand-checked
cases. References here are written independently of the library: explicit loops over tokens and blocks, Python sorts."""

from __future__ import annotations

import math

import pytest
import torch

import xattention as xa
from xattention.block_mask import BlockMask

# (B, Hq, Hkv, Lq, Lk, D, block): L = 1, 127, 300; GQA 1/4/7; batch 3; Lq < Lk with Lk - Lq not a multiple of the block.
SHAPES = [
    (1, 1, 1, 1, 1, 16, 16),
    (3, 4, 1, 127, 127, 16, 32),
    (1, 7, 1, 300, 300, 16, 64),
    (2, 2, 2, 45, 300, 16, 32),
    (1, 4, 2, 100, 259, 8, 16),
]


def _qk(bsz: int, hq: int, hkv: int, lq: int, lk: int, d: int, dtype: torch.dtype = torch.float32):
    q = torch.randn(bsz, hq, lq, d, dtype=dtype)
    k = torch.randn(bsz, hkv, lk, d, dtype=dtype)
    k[:, :, : max(1, lk // 40)] *= 3  # a sink, so rows are not uniform
    return q, k


def _methods(block: int) -> list[xa.Method]:
    common = {"block_size": block, "min_seq_len": 0}
    return [
        xa.Streaming(sink_blocks=1, local_blocks=2, **common),
        xa.VerticalSlash(last_q=16, vertical_size=5, slash_size=7, **common),
        xa.VerticalSlash(last_q=8, vertical_size=0.05, slash_size=0.1, **common),
        xa.VerticalSlash(threshold=0.8, **common),
        xa.FlexPrefill(**common),
        xa.FlexPrefill(tau=0.0, min_budget=0, **common),
        xa.FlexPrefill(tau=1.0, gamma=0.7, **common),
        xa.Oracle(threshold=0.9, **common),
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Geometry by loops (independent of xattention.block_mask)
# ---------------------------------------------------------------------------------------------------------------------


def _rows(lq: int, lk: int, b: int) -> list[list[int]]:
    """Key positions of each query block's queries."""
    qb = -(-lq // b)
    return [[lk - lq + i for i in range(r * b, min(lq, r * b + b))] for r in range(qb)]


def _loop_visible(lq: int, lk: int, b: int, causal: bool) -> torch.Tensor:
    qb, kb = -(-lq // b), -(-lk // b)
    vis = torch.zeros(qb, kb, dtype=torch.bool)
    for r, positions in enumerate(_rows(lq, lk, b)):
        for c in range(kb):
            vis[r, c] = (not causal) or c * b <= max(positions)
    return vis


def _loop_forced(lq: int, lk: int, b: int) -> torch.Tensor:
    qb, kb = -(-lq // b), -(-lk // b)
    forced = torch.zeros(qb, kb, dtype=torch.bool)
    for r, positions in enumerate(_rows(lq, lk, b)):
        forced[r, 0] = True
        for p in positions:
            forced[r, p // b] = True
    return forced


def _check_valid(mask: BlockMask, bsz: int, hq: int, lq: int, lk: int, b: int, causal: bool) -> None:
    assert isinstance(mask, BlockMask)
    assert mask.mask.dtype == torch.bool
    assert mask.shape == (bsz, hq, -(-lq // b), -(-lk // b))
    assert (mask.block_size, mask.q_len, mask.k_len, mask.causal) == (b, lq, lk, causal)
    visible = _loop_visible(lq, lk, b, causal)
    assert not bool((mask.mask & ~visible).any()), "a block above the causal diagonal was kept"
    forced = _loop_forced(lq, lk, b)
    assert bool((mask.mask | ~forced).all()), "a sink or diagonal block is missing"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_masks_are_valid(shape: tuple, causal: bool) -> None:
    bsz, hq, hkv, lq, lk, d, b = shape
    q, k = _qk(bsz, hq, hkv, lq, lk, d)
    for method in _methods(b):
        _check_valid(method.estimate(q, k, causal=causal), bsz, hq, lq, lk, b, causal)


# ---------------------------------------------------------------------------------------------------------------------
# Oracle
# ---------------------------------------------------------------------------------------------------------------------


def _dense_probs(q: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    """float64 softmax attention [B, Hq, Lq, Lk] with k repeated over the GQA group."""
    lq, lk, d = q.shape[2], k.shape[2], q.shape[3]
    kr = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = q.double() @ kr.transpose(-1, -2) / math.sqrt(d)
    if causal:
        pos = torch.arange(lk - lq, lk)
        s = s.masked_fill(torch.arange(lk)[None, :] > pos[:, None], float("-inf"))
    return torch.softmax(s, dim=-1)


def _block_sums(p: torch.Tensor, b: int) -> torch.Tensor:
    lq, lk = p.shape[-2:]
    qb, kb = -(-lq // b), -(-lk // b)
    out = torch.zeros(*p.shape[:-2], qb, kb, dtype=p.dtype)
    for r in range(qb):
        for c in range(kb):
            out[..., r, c] = p[..., r * b : r * b + b, c * b : c * b + b].sum(dim=(-1, -2))
    return out


def _greedy_row(scores: list[float], forced: set[int], candidates: list[int], tau: float) -> set[int]:
    """Forced first, then descending score (ties: lower index) while the kept mass is below tau x total."""
    total = sum(scores[c] for c in candidates)
    kept = set(forced)
    mass = sum(scores[c] for c in forced)
    for c in sorted((c for c in candidates if c not in forced), key=lambda c: (-scores[c], c)):
        if scores[c] <= 0 or (mass >= tau * total and tau < 1):
            break
        kept.add(c)
        mass += scores[c]
    return kept


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_oracle_one_keeps_every_visible_block(shape: tuple, causal: bool) -> None:
    bsz, hq, hkv, lq, lk, d, b = shape
    q, k = _qk(bsz, hq, hkv, lq, lk, d)
    mask = xa.Oracle(threshold=1.0, block_size=b).estimate(q, k, causal=causal)
    assert torch.equal(mask.mask, _loop_visible(lq, lk, b, causal).expand(bsz, hq, -1, -1))


@pytest.mark.parametrize("causal", [True, False])
def test_oracle_matches_greedy_reference(causal: bool) -> None:
    bsz, hq, hkv, lq, lk, d, b = 2, 4, 2, 70, 150, 16, 16
    q, k = _qk(bsz, hq, hkv, lq, lk, d)
    tau = 0.7
    mask = xa.Oracle(threshold=tau, block_size=b).estimate(q, k, causal=causal).mask
    scores = _block_sums(_dense_probs(q, k, causal), b)
    visible, forced = _loop_visible(lq, lk, b, causal), _loop_forced(lq, lk, b)
    for bi in range(bsz):
        for h in range(hq):
            for r in range(scores.shape[2]):
                cand = [c for c in range(scores.shape[3]) if visible[r, c]]
                want = _greedy_row(scores[bi, h, r].tolist(), {c for c in cand if forced[r, c]}, cand, tau)
                got = set(torch.nonzero(mask[bi, h, r]).flatten().tolist())
                assert got == want, (bi, h, r)
    kept = xa.attention_mass_kept(q, k, xa.Oracle(threshold=tau, block_size=b).estimate(q, k, causal=causal))
    assert bool((kept >= tau - 1e-5).all())


# ---------------------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sink,local", [(1, 1), (1, 3), (2, 2), (0, 1), (3, 100)])
@pytest.mark.parametrize("shape", SHAPES)
def test_streaming_keeps_exactly_its_pattern(shape: tuple, sink: int, local: int) -> None:
    bsz, hq, hkv, lq, lk, d, b = shape
    q, k = _qk(bsz, hq, hkv, lq, lk, d)
    mask = xa.Streaming(sink_blocks=sink, local_blocks=local, block_size=b).estimate(q, k).mask
    qb, kb = -(-lq // b), -(-lk // b)
    want = torch.zeros(qb, kb, dtype=torch.bool)
    for r, positions in enumerate(_rows(lq, lk, b)):
        first_diag, last_diag = positions[0] // b, positions[-1] // b
        for c in range(kb):
            in_window = last_diag - local + 1 <= c <= last_diag or first_diag <= c <= last_diag
            want[r, c] = c < sink or in_window
    assert torch.equal(mask, want.expand(bsz, hq, qb, kb))


# ---------------------------------------------------------------------------------------------------------------------
# Vertical-slash: a loop-built token-level reference, then its block cover
# ---------------------------------------------------------------------------------------------------------------------


def _ref_lines(q: torch.Tensor, k: torch.Tensor, last_q: int, causal: bool) -> tuple[torch.Tensor, dict]:
    """Per (b, h): vertical sums [Lk] and a dict offset -> slash sum, by looping over the last queries' pairs."""
    lq, lk = q.shape[2], k.shape[2]
    t = min(last_q, lq)
    kr = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = q[:, :, lq - t :].double() @ kr.transpose(-1, -2) / math.sqrt(q.shape[3])
    if causal:  # these queries sit at key positions lk - t ... lk - 1
        pos = torch.arange(lk - t, lk)
        s = s.masked_fill(torch.arange(lk)[None, :] > pos[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    vertical = p.sum(dim=-2)
    slash = {}
    for bi in range(q.shape[0]):
        for h in range(q.shape[1]):
            d: dict[int, float] = {}
            for a in range(t):
                for j in range(lk):
                    o = lk - t + a - j
                    d[o] = d.get(o, 0.0) + float(p[bi, h, a, j])
            slash[bi, h] = d
    return vertical, slash


def _pick(scores: dict[int, float], count: int | None, threshold: float | None) -> set[int]:
    order = sorted((i for i in scores if scores[i] > 0), key=lambda i: (-scores[i], i))
    if count is not None:
        return set(order[:count])
    total, mass, kept = sum(scores.values()), 0.0, set()
    for i in order:
        if mass >= threshold * total and threshold < 1:
            break
        kept.add(i)
        mass += scores[i]
    return kept


def _cover(lq: int, lk: int, b: int, columns: set[int], offsets: set[int], causal: bool) -> torch.Tensor:
    """Block cover of a token-level pattern: any (query, key) pair in the block on a kept column or slash."""
    pos = torch.arange(lk - lq, lk)[:, None]
    j = torch.arange(lk)[None, :]
    token = torch.isin(j, torch.tensor(sorted(columns), dtype=torch.long)).expand(lq, lk).clone()
    token |= torch.isin(pos - j, torch.tensor(sorted(offsets), dtype=torch.long))
    if causal:
        token &= j <= pos
    qb, kb = -(-lq // b), -(-lk // b)
    out = torch.zeros(qb, kb, dtype=torch.bool)
    for r in range(qb):
        for c in range(kb):
            out[r, c] = bool(token[r * b : r * b + b, c * b : c * b + b].any())
    return (out | _loop_forced(lq, lk, b)) & _loop_visible(lq, lk, b, causal)


def _ref_vertical_slash(q, k, b, last_q, causal, *, vertical_size=None, slash_size=None, threshold=None) -> torch.Tensor:
    lq, lk = q.shape[2], k.shape[2]
    # a float size is a fraction of Lk, rounded up
    vertical_size = math.ceil(vertical_size * lk) if isinstance(vertical_size, float) else vertical_size
    slash_size = math.ceil(slash_size * lk) if isinstance(slash_size, float) else slash_size
    vertical, slash = _ref_lines(q, k, last_q, causal)
    out = torch.zeros(q.shape[0], q.shape[1], -(-lq // b), -(-lk // b), dtype=torch.bool)
    for bi in range(q.shape[0]):
        for h in range(q.shape[1]):
            cols = _pick(dict(enumerate(vertical[bi, h].tolist())), vertical_size, threshold)
            offs = _pick(slash[bi, h], slash_size, threshold)
            out[bi, h] = _cover(lq, lk, b, cols, offs, causal)
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "shape,params",
    [
        ((1, 2, 1, 64, 64, 16, 16), {"vertical_size": 3, "slash_size": 4}),
        ((2, 4, 2, 45, 110, 8, 16), {"vertical_size": 6, "slash_size": 2}),
        ((1, 2, 1, 45, 110, 8, 16), {"vertical_size": 0.04, "slash_size": 0.03}),
        ((1, 3, 1, 37, 37, 8, 8), {"threshold": 0.6}),
        ((1, 2, 2, 20, 53, 8, 16), {"threshold": 0.9}),
    ],
)
def test_vertical_slash_matches_token_level_reference(shape: tuple, params: dict, causal: bool) -> None:
    bsz, hq, hkv, lq, lk, d, b = shape
    q, k = _qk(bsz, hq, hkv, lq, lk, d)
    last_q = 12
    got = xa.VerticalSlash(block_size=b, last_q=last_q, **params).estimate(q, k, causal=causal).mask
    want = _ref_vertical_slash(q, k, b, last_q, causal, **params)
    assert torch.equal(got, want)


def test_vertical_slash_pure_vertical_column() -> None:
    # Every query matches key 37 only: one vertical line at column 37, in key block 37 // 16 = 2.
    b, length, d = 16, 80, 16
    q = torch.zeros(1, 1, length, d)
    q[..., 0] = 40.0
    k = torch.zeros(1, 1, length, d)
    k[0, 0, 37, 0] = 1.0
    mask = xa.VerticalSlash(block_size=b, last_q=16, vertical_size=1, slash_size=0).estimate(q, k).mask[0, 0]
    # row r keeps the sink (0), its diagonal (r) and, once visible (r >= 2), the column's block 2
    want = [{0}, {0, 1}, {0, 2}, {0, 2, 3}, {0, 2, 4}]
    assert [set(torch.nonzero(row).flatten().tolist()) for row in mask] == want


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lq,lk,last_q", [(1, 1, 4), (5, 9, 3), (20, 37, 7), (37, 37, 64)])
def test_line_sums_match_loops(lq: int, lk: int, last_q: int, causal: bool) -> None:
    from xattention.methods.vertical_slash import last_queries_line_sums

    q, k = _qk(2, 4, 2, lq, lk, 8)
    vertical, slash = last_queries_line_sums(q, k, last_q=last_q, causal=causal)
    want_v, want_s = _ref_lines(q, k, last_q, causal)
    torch.testing.assert_close(vertical.double(), want_v, atol=1e-5, rtol=1e-5)
    for bi in range(2):
        for h in range(4):
            dense = torch.zeros(2 * lk - 1, dtype=torch.float64)
            for o, value in want_s[bi, h].items():
                dense[o + lk - 1] = value
            torch.testing.assert_close(slash[bi, h].double(), dense, atol=1e-5, rtol=1e-5)


def _one_slash_inputs(lq: int, lk: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot codes: the query at key position p matches key p - offset only (when it exists)."""
    k = torch.eye(lk).view(1, 1, lk, lk)
    q = torch.zeros(1, 1, lq, lk)
    for i in range(lq):
        p = lk - lq + i
        if p - offset >= 0:
            q[0, 0, i, p - offset] = 40.0
    return q, k


@pytest.mark.parametrize("lq,lk,offset", [(80, 80, 17), (80, 80, 31), (45, 100, 40), (45, 100, 46)])
def test_vertical_slash_single_slash_touches_corner_blocks(lq: int, lk: int, offset: int) -> None:
    # With b = 16, offset 17 reaches block r-2 only through the row's first query and its last key, offset 31 reaches
    # block r-1 only through the row's last query and its first key: the cover must include these corner blocks.
    b = 16
    q, k = _one_slash_inputs(lq, lk, offset)
    mask = xa.VerticalSlash(block_size=b, last_q=16, vertical_size=0, slash_size=1).estimate(q, k).mask[0, 0]
    want = _loop_forced(lq, lk, b)
    for r, positions in enumerate(_rows(lq, lk, b)):
        for p in positions:
            if p - offset >= 0:
                want[r, (p - offset) // b] = True
    assert torch.equal(mask, want)


def test_vertical_slash_pure_slash_line() -> None:
    # Query i matches key i - 20 only (one-hot codes): one slash line at offset 20.
    b, length, offset = 16, 80, 20
    k = torch.eye(length).view(1, 1, length, length)
    q = torch.zeros(1, 1, length, length)
    for i in range(offset, length):
        q[0, 0, i, i - offset] = 40.0
    mask = xa.VerticalSlash(block_size=b, last_q=16, vertical_size=0, slash_size=1).estimate(q, k).mask[0, 0]
    # row r holds queries 16r..16r+15; those >= 20 hit keys i - 20 in blocks (i - 20) // 16:
    # r=0: none; r=1: keys 0..11 -> {0}; r=2: 12..27 -> {0, 1}; r=3: 28..43 -> {1, 2}; r=4: 44..59 -> {2, 3}
    # plus the sink (0) and the diagonal (r)
    want = [{0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {0, 2, 3, 4}]
    assert [set(torch.nonzero(row).flatten().tolist()) for row in mask] == want


# ---------------------------------------------------------------------------------------------------------------------
# FlexPrefill
# ---------------------------------------------------------------------------------------------------------------------


def _pattern_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Head 0 is query-aware by construction, head 1 vertical-slash (b = 16, L = 128, one KV head per query head)."""
    b, length, d = 16, 128, 16
    w = torch.randn(d)
    w = 4.0 * w / w.norm()
    q = 0.05 * torch.randn(1, 2, length, d)
    q[0, :, -b:] = w  # the last block's queries, identical
    k = 0.05 * torch.randn(1, 2, length, d)
    # head 0: keys constant within each block, so pooling loses nothing; the diagonal block points away
    for c in range(length // b):
        k[0, 0, c * b : c * b + b] = torch.randn(d) if c < length // b - 1 else -w
    # head 1: a sharp column (key 40) whose block average cancels (key 41 = -key 40): pooled estimate ~ uniform
    k[0, 1, 40] = 10.0 * w / w.norm()
    k[0, 1, 41] = -10.0 * w / w.norm()
    return q, k


def test_flexprefill_head_patterns_on_constructed_heads() -> None:
    q, k = _pattern_inputs()
    method = xa.FlexPrefill(block_size=16, tau=0.1)
    divergence = method.pattern_divergence(q, k)
    assert divergence.shape == (1, 2)
    assert float(divergence[0, 0]) < 0.02 and float(divergence[0, 1]) > 0.3
    assert method.head_patterns(q, k).tolist() == [[True, False]]
    assert xa.FlexPrefill(block_size=16, tau=0.0).head_patterns(q, k).tolist() == [[False, False]]
    assert xa.FlexPrefill(block_size=16, tau=1.0).head_patterns(q, k).tolist() == [[True, True]]


def _ref_query_aware(q, k, b, gamma, causal) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled block attention by loops, then one global greedy selection per head. Returns (mask, scores)."""
    bsz, hq, lq, d = q.shape
    lk = k.shape[2]
    qb, kb = -(-lq // b), -(-lk // b)
    kr = k.double().repeat_interleave(hq // k.shape[1], dim=1)
    qp = torch.stack([q.double()[:, :, r * b : r * b + b].mean(dim=2) for r in range(qb)], dim=2)
    kp = torch.stack([kr[:, :, c * b : c * b + b].mean(dim=2) for c in range(kb)], dim=2)
    visible, forced = _loop_visible(lq, lk, b, causal), _loop_forced(lq, lk, b)
    scores = torch.softmax((qp @ kp.transpose(-1, -2) / math.sqrt(d)).masked_fill(~visible, float("-inf")), dim=-1)
    mask = torch.zeros(bsz, hq, qb, kb, dtype=torch.bool)
    cells = [(r, c) for r in range(qb) for c in range(kb) if visible[r, c]]
    for bi in range(bsz):
        for h in range(hq):
            flat = {r * kb + c: float(scores[bi, h, r, c]) for r, c in cells}
            kept = _greedy_row(flat, {r * kb + c for r, c in cells if forced[r, c]}, list(flat), gamma)
            for idx in kept:
                mask[bi, h, idx // kb, idx % kb] = True
    return mask, scores


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(1, 2, 1, 64, 64, 16, 16), (2, 4, 2, 45, 110, 8, 16), (1, 3, 3, 37, 37, 8, 8)])
def test_flexprefill_matches_references(shape: tuple, causal: bool) -> None:
    bsz, hq, hkv, lq, lk, d, b = shape
    q, k = _qk(bsz, hq, hkv, lq, lk, d)
    gamma = 0.8
    # tau = 0: every head vertical-slash, gamma mass of columns and of slashes from the last block
    got = xa.FlexPrefill(block_size=b, gamma=gamma, tau=0.0, min_budget=0).estimate(q, k, causal=causal).mask
    assert torch.equal(got, _ref_vertical_slash(q, k, b, b, causal, threshold=gamma))
    # tau = 1: every head query-aware, one global cumulative selection on the pooled block attention
    got = xa.FlexPrefill(block_size=b, gamma=gamma, tau=1.0, min_budget=0).estimate(q, k, causal=causal).mask
    want, _ = _ref_query_aware(q, k, b, gamma, causal)
    assert torch.equal(got, want)


def test_flexprefill_uses_each_heads_pattern() -> None:
    q, k = _pattern_inputs()
    b, gamma = 16, 0.9
    got = xa.FlexPrefill(block_size=b, gamma=gamma, tau=0.1, min_budget=0).estimate(q, k).mask
    want_qa, _ = _ref_query_aware(q, k, b, gamma, True)
    want_vs = _ref_vertical_slash(q, k, b, b, True, threshold=gamma)
    assert torch.equal(got[:, 0], want_qa[:, 0])
    assert torch.equal(got[:, 1], want_vs[:, 1])


@pytest.mark.parametrize("causal", [True, False])
def test_flexprefill_min_budget(causal: bool) -> None:
    bsz, hq, hkv, lq, lk, d, b = 1, 2, 1, 90, 160, 8, 16
    q, k = _qk(bsz, hq, hkv, lq, lk, d)
    visible = _loop_visible(lq, lk, b, causal)
    for tau in (0.0, 1.0):
        base = xa.FlexPrefill(block_size=b, gamma=0.3, tau=tau, min_budget=0).estimate(q, k, causal=causal).mask
        for budget in (3, 7, 100):
            mask = xa.FlexPrefill(block_size=b, gamma=0.3, tau=tau, min_budget=budget).estimate(q, k, causal=causal).mask
            assert bool((mask | ~base).all()), "the budget only adds blocks"
            counts = mask.sum(dim=-1)
            floor = torch.clamp(visible.sum(dim=-1), max=budget)
            assert bool((counts >= floor).all())
            extra = (mask & ~base).sum(dim=-1)
            # a row gets exactly what it lacks, never more
            assert torch.equal(extra, torch.clamp(floor - base.sum(dim=-1), min=0))
    # for query-aware heads the added blocks are the row's highest pooled scores among those not yet kept
    base = xa.FlexPrefill(block_size=b, gamma=0.3, tau=1.0, min_budget=0).estimate(q, k, causal=causal).mask
    mask = xa.FlexPrefill(block_size=b, gamma=0.3, tau=1.0, min_budget=5).estimate(q, k, causal=causal).mask
    _, scores = _ref_query_aware(q, k, b, 0.3, causal)
    for h in range(hq):
        for r in range(mask.shape[2]):
            rest = [c for c in range(mask.shape[3]) if visible[r, c] and not base[0, h, r, c]]
            added = {c for c in rest if mask[0, h, r, c]}
            assert added == set(sorted(rest, key=lambda c: -float(scores[0, h, r, c]))[: len(added)])


# ---------------------------------------------------------------------------------------------------------------------
# Parameters and entry points
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls,kwargs,word",
    [
        (xa.Streaming, {"sink_blocks": -1}, "sink_blocks"),
        (xa.Streaming, {"local_blocks": 0}, "local_blocks"),
        (xa.Streaming, {"local_blocks": 2.0}, "local_blocks"),
        (xa.Streaming, {"block_size": 0}, "block_size"),
        (xa.VerticalSlash, {"last_q": 0}, "last_q"),
        (xa.VerticalSlash, {"vertical_size": -1}, "vertical_size"),
        (xa.VerticalSlash, {"vertical_size": 1.5}, "vertical_size"),
        (xa.VerticalSlash, {"slash_size": True}, "slash_size"),
        (xa.VerticalSlash, {"slash_size": "all"}, "slash_size"),
        (xa.VerticalSlash, {"threshold": 0.0}, "threshold"),
        (xa.VerticalSlash, {"threshold": 1.2}, "threshold"),
        (xa.FlexPrefill, {"gamma": 0.0}, "gamma"),
        (xa.FlexPrefill, {"gamma": 1.5}, "gamma"),
        (xa.FlexPrefill, {"tau": -0.1}, "tau"),
        (xa.FlexPrefill, {"min_budget": -1}, "min_budget"),
        (xa.FlexPrefill, {"min_budget": 1.5}, "min_budget"),
        (xa.Oracle, {"threshold": 0.0}, "threshold"),
        (xa.Oracle, {"threshold": 1.01}, "threshold"),
        (xa.Oracle, {"threshold": "0.9"}, "threshold"),
    ],
)
def test_bad_parameters_raise(cls: type, kwargs: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        cls(**kwargs)


def test_bad_inputs_raise() -> None:
    q, k = _qk(1, 3, 2, 16, 16, 8)  # 3 query heads over 2 KV heads
    for method in _methods(16):
        with pytest.raises(ValueError):
            method.estimate(q, k)
    q, k = _qk(1, 2, 1, 16, 16, 8)
    for method in _methods(16):
        with pytest.raises(ValueError, match="backend"):
            method.estimate(q, k, backend="nope")


@pytest.mark.parametrize("causal", [True, False])
def test_sparse_attention_runs_each_method(causal: bool) -> None:
    bsz, hq, hkv, lq, lk, d, b = 2, 4, 2, 45, 100, 16, 16
    q, k = _qk(bsz, hq, hkv, lq, lk, d)
    v = torch.randn(bsz, hkv, lk, d)
    for method in _methods(b):
        out, mask = xa.sparse_attention(q, k, v, method, causal=causal, return_mask=True)
        assert mask is not None and out.shape == q.shape
        # reference: dense softmax restricted to the mask's token-level visibility
        s = q.double() @ k.double().repeat_interleave(hq // hkv, 1).transpose(-1, -2) / math.sqrt(d)
        p = torch.softmax(s.masked_fill(~mask.to_token_mask(), float("-inf")), dim=-1)
        want = p @ v.double().repeat_interleave(hq // hkv, 1)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    # the oracle at 1.0 keeps everything: dense attention
    out = xa.sparse_attention(q, k, v, xa.Oracle(threshold=1.0, block_size=b, min_seq_len=0), causal=causal)
    torch.testing.assert_close(out, xa.dense_attention(q, k, v, causal=causal), atol=1e-5, rtol=1e-5)


def test_method_from_spec_builds_each_method() -> None:
    cases = {
        "streaming:sink_blocks=2,local_blocks=3": (xa.Streaming, {"sink_blocks": 2, "local_blocks": 3}),
        "vertical_slash:vertical_size=0.25,slash_size=8,last_q=16": (
            xa.VerticalSlash,
            {"vertical_size": 0.25, "slash_size": 8, "last_q": 16, "threshold": None},
        ),
        "vertical_slash:threshold=0.8": (xa.VerticalSlash, {"threshold": 0.8}),
        "flexprefill:gamma=0.95,tau=0.2,min_budget=2": (xa.FlexPrefill, {"gamma": 0.95, "tau": 0.2, "min_budget": 2}),
        "oracle:threshold=0.8": (xa.Oracle, {"threshold": 0.8}),
    }
    q, k = _qk(1, 2, 1, 40, 70, 8)
    for spec, (cls, params) in cases.items():
        method = xa.method_from_spec(spec, block_size=16, min_seq_len=0)
        assert type(method) is cls and xa.METHODS[cls.name] is cls
        for key, value in params.items():
            assert getattr(method, key) == value
        assert method.block_size == 16 and method.min_seq_len == 0
        _check_valid(method.estimate(q, k), 1, 2, 40, 70, 16, True)
    with pytest.raises(ValueError, match="local_blocks"):
        xa.method_from_spec("streaming:local_blocks=0")


def test_estimates_are_bounded_in_memory_by_chunking() -> None:
    # the last-query statistics must agree whatever the chunk size (one query at a time vs all at once)
    from xattention.methods.vertical_slash import last_queries_line_sums, line_block_sums

    q, k = _qk(2, 4, 2, 50, 90, 8)
    whole = last_queries_line_sums(q, k, last_q=20)
    pieces = last_queries_line_sums(q, k, last_q=20, chunk_elements=1)
    for a, b in zip(whole, pieces, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    cover = line_block_sums(*whole, q_len=50, k_len=90, block_size=16)
    torch.testing.assert_close(cover, line_block_sums(*whole, q_len=50, k_len=90, block_size=16, chunk_elements=1))


def test_chunk_budget_is_larger_off_the_cpu() -> None:
    """CPU chunks stay cache-sized; other devices get 16x larger ones (with the CPU's, VerticalSlash and FlexPrefill
    ran 3-5x slower on the H200: launch-bound loops). An explicit budget wins everywhere."""
    from xattention.kernels import reference as ref

    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device descriptor needs no GPU
    assert ref.rows_per_chunk(10**9, 1000, None, cpu) == ref.DEFAULT_CHUNK_ELEMENTS // 1000
    assert ref.rows_per_chunk(10**9, 1000, None, cuda) == ref.ACCELERATOR_CHUNK_ELEMENTS // 1000
    assert ref.ACCELERATOR_CHUNK_ELEMENTS == 16 * ref.DEFAULT_CHUNK_ELEMENTS
    assert ref.rows_per_chunk(10**9, 1000, 5000, cuda) == 5
    assert ref.rows_per_chunk(3, 1000, None, cuda) == 3
    assert ref.rows_per_chunk(10, 10**12, None, cpu) == 1


@pytest.mark.gpu
def test_methods_run_on_cuda_and_match_cpu() -> None:
    bsz, hq, hkv, lq, lk, d, b = 1, 8, 2, 1000, 4097, 64, 128
    q, k = _qk(bsz, hq, hkv, lq, lk, d)
    for method in _methods(b):
        cpu = method.estimate(q, k)
        gpu = method.estimate(q.cuda(), k.cuda())
        assert gpu.mask.device.type == "cuda"
        # float32 sums may tie-break differently on the two devices: allow a sliver of disagreement
        assert float((gpu.mask.cpu() != cpu.mask).float().mean()) < 0.01, type(method).__name__
