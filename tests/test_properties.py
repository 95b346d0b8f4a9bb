"""Hypothesis property tests over random small shapes: selection == the loop-based naive rule; attention == float64.

Shapes cover batch, GQA group sizes, Lq <= Lk with arbitrary offsets, ragged lengths, several block sizes and strides,
causal and non-causal, scalar and per-head thresholds.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xattention as xa
from naive import (
    diagonal_columns,
    fragile_rows,
    naive_antidiagonal_block_scores,
    naive_select,
    naive_token_mask,
    reference_attention_fp64,
    visible_columns,
)
from xattention.kernels import reference as ref

SETTINGS = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# (B, Hkv, group): kept small so the loop-based naive scores stay fast
HEADS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 4), (2, 2, 2), (1, 1, 7), (1, 2, 3)]


@st.composite
def problems(draw: st.DrawFn) -> dict:
    b, hkv, group = draw(st.sampled_from(HEADS))
    block = draw(st.sampled_from([16, 32]))
    stride = draw(st.sampled_from([s for s in (1, 2, 4, 8, 16) if block % s == 0 and s <= block]))
    lk = draw(st.integers(1, 160))
    lq = draw(st.integers(1, lk))
    d = draw(st.sampled_from([8, 16, 24, 64]))
    causal = draw(st.booleans())
    hq = hkv * group
    if draw(st.booleans()):
        threshold: float | torch.Tensor = draw(st.floats(0.01, 1.0))
    else:
        threshold = torch.tensor(draw(st.lists(st.floats(0.01, 1.0), min_size=hq, max_size=hq)), dtype=torch.float64)
    seed = draw(st.integers(0, 2**31 - 1))
    return {
        "b": b,
        "hq": hq,
        "hkv": hkv,
        "lq": lq,
        "lk": lk,
        "d": d,
        "block": block,
        "stride": stride,
        "causal": causal,
        "threshold": threshold,
        "seed": seed,
    }


def _inputs(p: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(p["seed"])
    q = torch.randn(p["b"], p["hq"], p["lq"], p["d"], generator=gen)
    k = torch.randn(p["b"], p["hkv"], p["lk"], p["d"], generator=gen) * (1 + 2 * torch.rand(p["lk"], 1, generator=gen))
    v = torch.randn(p["b"], p["hkv"], p["lk"], p["d"], generator=gen)
    return q, k, v


@SETTINGS
@given(problems())
def test_estimate_equals_naive(p: dict) -> None:
    q, k, _ = _inputs(p)
    lq, lk, block, causal, threshold = p["lq"], p["lk"], p["block"], p["causal"], p["threshold"]
    method = xa.XAttention(block_size=block, stride=p["stride"], threshold=threshold, min_seq_len=0)
    mask = method.estimate(q, k, causal=causal, backend="reference")
    assert mask.shape == (p["b"], p["hq"], -(-lq // block), -(-lk // block))

    scores = naive_antidiagonal_block_scores(q, k, p["stride"], block, causal)
    got_scores = ref.antidiagonal_block_scores(q, k, stride=p["stride"], block_size=block, causal=causal)
    torch.testing.assert_close(got_scores.double(), scores, atol=2e-6, rtol=1e-5)
    want = naive_select(scores, threshold, lq, lk, block, causal)
    fragile = fragile_rows(scores, threshold, lq, lk, block, causal)
    differ = (mask.mask != want).any(dim=-1)
    assert not bool((differ & ~fragile).any()), f"rows differ from the naive rule: {differ.nonzero().tolist()}"

    for r in range(mask.num_q_blocks):
        lo, hi = diagonal_columns(r, lq, lk, block)
        assert bool(mask.mask[:, :, r, 0].all()) and bool(mask.mask[:, :, r, lo : hi + 1].all())
        if causal:
            hidden = [c for c in range(mask.num_k_blocks) if c not in visible_columns(r, lq, lk, block, True)]
            assert not bool(mask.mask[:, :, r, hidden].any())


@SETTINGS
@given(problems(), st.floats(0.0, 1.0))
def test_block_sparse_attention_equals_fp64(p: dict, density: float) -> None:
    q, k, v = _inputs(p)
    lq, lk, block, causal = p["lq"], p["lk"], p["block"], p["causal"]
    gen = torch.Generator().manual_seed(p["seed"] + 1)
    qb, kb = -(-lq // block), -(-lk // block)
    random_mask = xa.BlockMask(torch.rand(p["b"], p["hq"], qb, kb, generator=gen) < density, block, lq, lk, causal)
    selected = xa.XAttention(block_size=block, stride=p["stride"], threshold=p["threshold"]).estimate(q, k, causal=causal)
    for mask in (random_mask, selected):
        out = xa.block_sparse_attention(q, k, v, mask, backend="reference")
        assert out.shape == q.shape and not bool(out.isnan().any())
        want = reference_attention_fp64(q, k, v, naive_token_mask(mask.mask, block, lq, lk, causal))
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-5)
