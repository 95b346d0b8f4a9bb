"""XAttention selection (reference scoring + cumulative-threshold rule) against the loop-based naive implementation.

`tests/naive.py` computes every antidiagonal sum, softmax and greedy choice with explicit loops in float64; the library
computes them with one reshaped GEMM per chunk, float32 statistics and sorted cumsums. Scores must agree to float32
rounding; selections must agree exactly when fed the same scores, and end to end everywhere except rows where a
float32 rounding could legitimately flip the cut-off (``fragile_rows``; asserted rare).
"""

from __future__ import annotations

import pytest
import torch

import xattention as xa
from naive import (
    diagonal_columns,
    fragile_rows,
    naive_antidiagonal_block_scores,
    naive_select,
    visible_columns,
)
from xattention.kernels import reference as ref

# (B, Hq, Hkv, Lq, Lk, D, block, stride, causal)
CASES = [
    (1, 1, 1, 64, 64, 16, 16, 4, True),  # everything aligned
    (1, 2, 1, 100, 100, 32, 16, 2, True),  # L not a multiple of the block; S = 2
    (3, 4, 1, 77, 203, 16, 16, 8, True),  # offset 126: not a multiple of the block nor the stride; batch 3, GQA 4
    (1, 7, 1, 64, 192, 16, 32, 4, True),  # offset 128: a multiple of the block; GQA 7
    (1, 2, 2, 50, 90, 16, 32, 8, True),  # offset 40: a multiple of the stride, not of the block
    (3, 2, 1, 45, 45, 24, 32, 2, False),  # non-causal, ragged
    (1, 4, 4, 30, 161, 16, 16, 4, False),  # non-causal, Lq < Lk
    (1, 1, 1, 1, 1, 16, 16, 4, True),  # a single token
    (1, 1, 1, 1, 70, 16, 16, 8, True),  # one query over many keys
    (1, 7, 7, 300, 300, 16, 32, 8, True),  # longer, many blocks
    (1, 2, 1, 33, 257, 16, 32, 2, True),  # offset 224 = 7 blocks; Lk ragged
    (1, 3, 1, 5, 13, 8, 16, 4, True),  # shorter than one block and not a multiple of the stride
]
IDS = [f"B{c[0]}-H{c[1]}/{c[2]}-L{c[3]}x{c[4]}-D{c[5]}-b{c[6]}-S{c[7]}-{'causal' if c[8] else 'full'}" for c in CASES]
THRESHOLDS = [0.3, 0.7, 0.9, 0.95, 1.0]


def _qk(b: int, hq: int, hkv: int, lq: int, lk: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=gen)
    k = torch.randn(b, hkv, lk, d, generator=gen)
    # structure, so rows are far from uniform: a strong sink and a few loud keys
    k[:, :, :3] *= 4
    k[:, :, torch.randint(0, lk, (max(1, lk // 20),), generator=gen)] *= 3
    return q, k


def _assert_equal_off_fragile(
    got: torch.Tensor, scores: torch.Tensor, threshold, lq: int, lk: int, block: int, causal: bool
) -> None:
    """``got`` equals the naive selection on ``scores`` on every row that float32 rounding cannot flip."""
    want = naive_select(scores, threshold, lq, lk, block, causal)
    fragile = fragile_rows(scores, threshold, lq, lk, block, causal)
    differ = (got.cpu() != want).any(dim=-1)
    assert not bool((differ & ~fragile).any()), f"rows differ: {differ.nonzero().tolist()}"
    assert fragile.float().mean().item() <= 0.05, "too many near-tie rows for the comparison to mean much"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_scores_match_naive(case: tuple) -> None:
    b, hq, hkv, lq, lk, d, block, stride, causal = case
    q, k = _qk(b, hq, hkv, lq, lk, d)
    want = naive_antidiagonal_block_scores(q, k, stride, block, causal)
    got = ref.antidiagonal_block_scores(q, k, stride=stride, block_size=block, causal=causal)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)
    # chunked over query-block rows (one row per chunk) must not change anything: bit for bit on the CPU; on CUDA the
    # matmul kernel depends on the chunk's shape, which moves the last bit (seen on an H200: 4.8e-7 at values ~1)
    chunked = ref.antidiagonal_block_scores(q, k, stride=stride, block_size=block, causal=causal, chunk_elements=1)
    exact = q.device.type == "cpu"
    torch.testing.assert_close(chunked, got, atol=0 if exact else 1e-6, rtol=0 if exact else 1e-6)


def test_scores_with_explicit_scale_and_half_inputs() -> None:
    q, k = _qk(2, 4, 2, 70, 130, 32)
    want = naive_antidiagonal_block_scores(q, k, 4, 16, True, scale=0.3)
    got = ref.antidiagonal_block_scores(q, k, stride=4, block_size=16, causal=True, scale=0.3)
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)
    # bf16 inputs: statistics in float32, so equal to the naive scores of the bf16-rounded inputs
    qh, kh = q.bfloat16(), k.bfloat16()
    got = ref.antidiagonal_block_scores(qh, kh, stride=4, block_size=16, causal=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), naive_antidiagonal_block_scores(qh, kh, 4, 16, True), atol=2e-6, rtol=1e-5)


def test_scores_rows_sum_to_their_reshaped_row_count() -> None:
    # every non-padding reshaped query row contributes probability 1 to its block row
    lq, lk, block, stride = 45, 77, 16, 4
    q, k = _qk(1, 2, 1, lq, lk, 16)
    got = ref.antidiagonal_block_scores(q, k, stride=stride, block_size=block, causal=True).sum(dim=-1)
    rows_per_block = [sum(1 for t in range(r * block // stride, (r + 1) * block // stride) if t * stride < lq) for r in range(3)]
    torch.testing.assert_close(got, torch.tensor(rows_per_block, dtype=torch.float32).expand(1, 2, 3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_select_blocks_matches_naive_on_same_scores(case: tuple) -> None:
    b, hq, hkv, lq, lk, d, block, stride, causal = case
    q, k = _qk(b, hq, hkv, lq, lk, d)
    scores = ref.antidiagonal_block_scores(q, k, stride=stride, block_size=block, causal=causal)
    per_head = torch.linspace(0.2, 1.0, hq, dtype=torch.float64)
    for threshold in [*THRESHOLDS, per_head]:
        got = ref.select_blocks(scores, threshold, q_len=lq, k_len=lk, block_size=block, causal=causal)
        want = naive_select(scores, threshold, lq, lk, block, causal)
        assert got.dtype == torch.bool
        assert torch.equal(got, want), f"threshold {threshold}"


def test_select_blocks_ties_prefer_lower_column() -> None:
    # one row, 6 key blocks, non-causal; forced: sink 0 and diagonal 5 (Lq = 16 at the end of Lk = 96)
    scores = torch.tensor([[[[0.0, 1.0, 2.0, 2.0, 1.0, 0.0]]]])
    # total 6; tau 0.3 -> need 1.8: one of the two 2.0s is enough -> column 2 (lower)
    got = ref.select_blocks(scores, 0.3, q_len=16, k_len=96, block_size=16, causal=False)
    assert got[0, 0, 0].tolist() == [True, False, True, False, False, True]
    assert torch.equal(got, naive_select(scores, 0.3, 16, 96, 16, False))
    # tau 0.5 -> need 3: after column 2 the kept 2.0 is still below 3, so column 3 joins too
    got = ref.select_blocks(scores, 0.5, q_len=16, k_len=96, block_size=16, causal=False)
    assert got[0, 0, 0].tolist() == [True, False, True, True, False, True]
    # tau 0.8 -> need 4.8: both 2.0s (4.0) then the first 1.0 -> column 1
    got = ref.select_blocks(scores, 0.8, q_len=16, k_len=96, block_size=16, causal=False)
    assert got[0, 0, 0].tolist() == [True, True, True, True, False, True]


def test_select_blocks_stops_when_kept_mass_reaches_threshold_exactly() -> None:
    # forced: sink 0 (0.5) and diagonal 3 (0.125) -> kept 0.625 == 0.625 x total 1.0: "reaches", so nothing is added
    scores = torch.tensor([[[[0.5, 0.25, 0.125, 0.125]]]])
    got = ref.select_blocks(scores, 0.625, q_len=16, k_len=64, block_size=16, causal=False)
    assert got[0, 0, 0].tolist() == [True, False, False, True]
    got = ref.select_blocks(scores, 0.6251, q_len=16, k_len=64, block_size=16, causal=False)
    assert got[0, 0, 0].tolist() == [True, True, False, True]


def test_select_blocks_never_adds_zero_score_blocks() -> None:
    scores = torch.tensor([[[[0.5, 0.0, 0.0, 0.25, 0.0, 0.25]]]])
    for tau in (0.9, 1.0):
        got = ref.select_blocks(scores, tau, q_len=16, k_len=96, block_size=16, causal=False)
        assert got[0, 0, 0].tolist() == [True, False, False, True, False, True]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_estimate_matches_naive_end_to_end(case: tuple) -> None:
    b, hq, hkv, lq, lk, d, block, stride, causal = case
    q, k = _qk(b, hq, hkv, lq, lk, d, seed=1)
    naive_scores = naive_antidiagonal_block_scores(q, k, stride, block, causal)
    per_head = torch.linspace(0.5, 0.99, hq)
    for threshold in (0.6, 0.9, 1.0, per_head):
        method = xa.XAttention(block_size=block, stride=stride, threshold=threshold, min_seq_len=0)
        mask = method.estimate(q, k, causal=causal, backend="reference")
        assert isinstance(mask, xa.BlockMask)
        assert mask.shape == (b, hq, -(-lq // block), -(-lk // block))
        assert (mask.block_size, mask.q_len, mask.k_len, mask.causal) == (block, lq, lk, causal)
        _assert_equal_off_fragile(mask.mask, naive_scores, threshold, lq, lk, block, causal)


GQA_CASES = [(c, i) for c, i in zip(CASES, IDS, strict=True) if c[1] != c[2]]


@pytest.mark.parametrize("case", [c for c, _ in GQA_CASES], ids=[i for _, i in GQA_CASES])
def test_shared_kv_mask_is_one_mask_per_group(case: tuple) -> None:
    b, hq, hkv, lq, lk, d, block, stride, causal = case
    g = hq // hkv
    q, k = _qk(b, hq, hkv, lq, lk, d, seed=2)
    thresholds = torch.linspace(0.6, 0.95, hq)
    method = xa.XAttention(block_size=block, stride=stride, threshold=thresholds, shared_kv_mask=True)
    mask = method.estimate(q, k, causal=causal).mask
    grouped = mask.view(b, hkv, g, *mask.shape[2:])
    assert torch.equal(grouped, grouped[:, :, :1].expand_as(grouped))
    # the documented rule: select on the group's mean scores with the group's largest threshold
    naive_scores = naive_antidiagonal_block_scores(q, k, stride, block, causal)
    group_scores = naive_scores.view(b, hkv, g, *naive_scores.shape[2:]).mean(dim=2)
    _assert_equal_off_fragile(grouped[:, :, 0], group_scores, thresholds.view(hkv, g).amax(dim=1), lq, lk, block, causal)


def test_estimate_accepts_transposed_inputs() -> None:
    # HF hands attention [B, L, H, D] tensors transposed to [B, H, L, D]: not contiguous
    q, k = _qk(1, 4, 2, 64, 128, 16)
    qt, kt = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous() and not kt.is_contiguous()
    method = xa.XAttention(block_size=32, stride=4, threshold=0.8)
    assert torch.equal(method.estimate(qt, kt).mask, method.estimate(q, k).mask)


def test_estimate_bf16_inputs_use_float32_statistics() -> None:
    q, k = _qk(1, 2, 1, 96, 160, 32, seed=3)
    qh, kh = q.bfloat16(), k.bfloat16()
    mask = xa.XAttention(block_size=16, stride=4, threshold=0.85).estimate(qh, kh)
    _assert_equal_off_fragile(mask.mask, naive_antidiagonal_block_scores(qh, kh, 4, 16, True), 0.85, 96, 160, 16, True)


# ---------------------------------------------------------------------------------------------------------------------
# properties of the rule


def _forced_and_visible(lq: int, lk: int, block: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    qb, kb = -(-lq // block), -(-lk // block)
    forced = torch.zeros(qb, kb, dtype=torch.bool)
    visible = torch.zeros(qb, kb, dtype=torch.bool)
    for r in range(qb):
        lo, hi = diagonal_columns(r, lq, lk, block)
        forced[r, 0] = True
        forced[r, lo : hi + 1] = True
        visible[r, visible_columns(r, lq, lk, block, causal)] = True
    return forced, visible


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_selection_properties(case: tuple) -> None:
    b, hq, hkv, lq, lk, d, block, stride, causal = case
    q, k = _qk(b, hq, hkv, lq, lk, d, seed=4)
    forced, visible = _forced_and_visible(lq, lk, block, causal)
    scores = ref.antidiagonal_block_scores(q, k, stride=stride, block_size=block, causal=causal)
    previous = None
    densities = []
    for tau in (0.01, 0.2, 0.5, 0.8, 0.9, 0.97, 1.0):
        mask = xa.XAttention(block_size=block, stride=stride, threshold=tau).estimate(q, k, causal=causal).mask
        assert bool(mask[..., forced].all()), "sink and diagonal blocks are always kept"
        if causal:
            assert not bool(mask[..., ~visible].any()), "nothing above the causal diagonal"
        if previous is not None:
            assert not bool((previous & ~mask).any()), "a larger threshold keeps a superset"
        densities.append(xa.BlockMask(mask, block, lq, lk, causal).density())
        previous = mask
    assert densities == sorted(densities)
    # tau = 1 keeps exactly the forced blocks plus every visible block with a non-zero score
    assert torch.equal(previous, (forced | (scores > 0)) & visible)


def test_scores_vanish_exactly_above_the_diagonal() -> None:
    q, k = _qk(1, 2, 1, 40, 100, 16)
    _, visible = _forced_and_visible(40, 100, 16, True)
    scores = ref.antidiagonal_block_scores(q, k, stride=4, block_size=16, causal=True)
    assert bool((scores[..., ~visible] == 0).all())
    assert bool((scores[..., visible] > 0).all())


def test_smaller_threshold_is_sparser_on_structured_input() -> None:
    # not a tautology check: on a long input with a sink, tau = 0.5 must actually drop blocks
    q, k = _qk(1, 2, 1, 512, 512, 32)
    k[:, :, :8] *= 4
    dense = xa.XAttention(block_size=32, stride=8, threshold=1.0).estimate(q, k).density()
    sparse = xa.XAttention(block_size=32, stride=8, threshold=0.5).estimate(q, k).density()
    assert sparse < dense
