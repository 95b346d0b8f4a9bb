"""Triton partial antidiagonal scores (the context-parallel selection statistics) vs their PyTorch reference.

On CPU the kernel runs under ``TRITON_INTERPRET=1`` (conftest.py sets it when no GPU is present) at small sizes; on a
GPU the same tests run compiled, plus a larger bf16 case.
"""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch

if importlib.util.find_spec("triton") is None:  # pragma: no cover - CI installs triton
    pytest.skip("triton is not installed", allow_module_level=True)

from xattention.kernels import antidiagonal
from xattention.kernels import reference as ref
from xattention.kernels.antidiagonal import antidiagonal_block_scores, antidiagonal_partial_scores

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 products run on tf32 tensor cores on GPU; exactly under the interpreter
TOL = 2e-3 if DEVICE == "cuda" else 1e-5

# name: (q_start, q_end, q_len, k_start, k_end, k_len), token ranges of a q shard and a k shard. Starts are multiples of
# 32, so every case is valid for block sizes 16 and 32.
SHARDS = {
    "before": (96, 160, 200, 0, 64, 200),  # every key precedes every query
    "diagonal": (64, 160, 200, 64, 160, 200),
    "after": (0, 64, 200, 160, 200, 200),  # causal: no key visible; the k shard ends inside a block
    "both_end_inside_a_block": (160, 200, 200, 96, 200, 200),  # padding query rows and padding keys
    "straddle": (64, 160, 200, 96, 200, 200),  # the k shard starts inside the q shard's rows
    "fewer_queries": (96, 135, 135, 128, 200, 200),  # queries aligned to the end of the keys, 65 apart (1 mod S)
}
# (block_size, stride)
GEOMETRIES = [(32, 8), (16, 4), (32, 4)]


def _qk(bsz: int, hq: int, hkv: int, lq: int, lk: int, d: int, dtype: torch.dtype = torch.float32):
    q = torch.randn(bsz, hq, lq, d, device=DEVICE, dtype=dtype)
    k = torch.randn(bsz, hkv, lk, d, device=DEVICE, dtype=dtype)
    k[:, :, : max(1, lk // 50)] *= 3  # a sink, so rows are not uniform
    return q, k


def _assert_stats_close(got: tuple, want: tuple, *, atol: float = TOL, rtol: float = 10 * TOL) -> None:
    (got_max, got_sums), (want_max, want_sums) = got, want
    assert got_max.dtype == got_sums.dtype == torch.float32
    assert got_max.shape == want_max.shape and got_sums.shape == want_sums.shape
    assert torch.equal(got_max == float("-inf"), want_max == float("-inf"))  # the same rows see no key
    torch.testing.assert_close(got_max, want_max, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_sums, want_sums, atol=atol, rtol=rtol)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shard", sorted(SHARDS))
def test_partial_scores_match_reference(shard: str, causal: bool, geometry: tuple[int, int]) -> None:
    """One (q shard, k shard) pair, GQA 4:2: its own row max, and sums against a given (global) row max."""
    qs, qe, q_len, ks, ke, k_len = SHARDS[shard]
    block, stride = geometry
    q, k = _qk(2, 4, 2, q_len, k_len, 24)
    qc, kc = q[:, :, qs:qe], k[:, :, ks:ke]
    kw = dict(stride=stride, block_size=block, q_start=qs, k_start=ks, q_len=q_len, k_len=k_len, causal=causal)
    own = antidiagonal_partial_scores(qc, kc, **kw)
    _assert_stats_close(own, ref.antidiagonal_partial_scores(qc, kc, **kw))
    if causal and shard == "after":
        assert bool((own[0] == float("-inf")).all()) and bool((own[1] == 0).all())
    else:
        assert bool(own[1].sum(-1).amax(-1).gt(0).all())  # the shard is visible to some row of every head

    # second pass: sums against the max over every key; rows that see none of this shard's keys get 0, not NaN
    global_max, _ = ref.antidiagonal_partial_scores(qc, k, **{**kw, "k_start": 0})
    given = antidiagonal_partial_scores(qc, kc, **kw, row_max=global_max)
    assert not given[1].isnan().any()
    assert torch.equal(given[0], global_max)
    _assert_stats_close(given, ref.antidiagonal_partial_scores(qc, kc, **kw, row_max=global_max))


@pytest.mark.parametrize("geometry", GEOMETRIES[:2], ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_partial_scores_merge_to_block_scores(causal: bool, geometry: tuple[int, int]) -> None:
    """Merged over key shards, one pass (own maxima) or two (a global max), the partials give the block scores."""
    block, stride = geometry
    length, r = 200, block // stride
    q, k = _qk(1, 4, 2, length, length, 16)
    want = antidiagonal_block_scores(q, k, stride=stride, block_size=block, causal=causal)
    reference = ref.antidiagonal_block_scores(q, k, stride=stride, block_size=block, causal=causal)
    torch.testing.assert_close(want, reference, atol=2 * TOL, rtol=10 * TOL)
    q_cuts, k_cuts = [0, 96, length], [0, 64, 160, length]
    for qs, qe in itertools.pairwise(q_cuts):
        kw = dict(stride=stride, block_size=block, q_start=qs, q_len=length, k_len=length, causal=causal)
        parts = [
            antidiagonal_partial_scores(q[:, :, qs:qe], k[:, :, a:e], k_start=a, **kw) for a, e in itertools.pairwise(k_cuts)
        ]
        total_max, total_sum = ref.merge_partial_row_stats([m for m, _ in parts], [x.sum(-1) for _, x in parts])
        one_pass = torch.cat([ref.partial_block_scores(x, m, total_max, total_sum, rows_per_block=r) for m, x in parts], -1)
        torch.testing.assert_close(one_pass, want[:, :, qs // block : -(-qe // block)], atol=2 * TOL, rtol=10 * TOL)
        second = [
            antidiagonal_partial_scores(q[:, :, qs:qe], k[:, :, a:e], k_start=a, row_max=total_max, **kw)
            for a, e in itertools.pairwise(k_cuts)
        ]
        two_pass = torch.cat([ref.partial_block_scores(x, m, total_max, total_sum, rows_per_block=r) for m, x in second], -1)
        torch.testing.assert_close(two_pass, one_pass, atol=2 * TOL, rtol=10 * TOL)


def test_partial_scores_one_head_per_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Heads split over launches (a tiny memory budget) index the right rows, maxima and block scores."""
    monkeypatch.setattr(antidiagonal, "PARTIAL_BUDGET_BYTES", 1)
    q, k = _qk(2, 4, 2, 200, 200, 16)
    qc, kc = q[:, :, 64:200], k[:, :, 32:200]
    kw = dict(stride=8, block_size=32, q_start=64, k_start=32, q_len=200, k_len=200)
    own = antidiagonal_partial_scores(qc, kc, **kw)
    _assert_stats_close(own, ref.antidiagonal_partial_scores(qc, kc, **kw))
    global_max = own[0] + torch.rand_like(own[0])  # any max at least the shard's: per-head values must line up
    given = antidiagonal_partial_scores(qc, kc, **kw, row_max=global_max)
    _assert_stats_close(given, ref.antidiagonal_partial_scores(qc, kc, **kw, row_max=global_max))
    want = ref.antidiagonal_block_scores(q, k, stride=8, block_size=32)
    torch.testing.assert_close(antidiagonal_block_scores(q, k, stride=8, block_size=32), want, atol=2 * TOL, rtol=10 * TOL)


def test_partial_scores_reject_what_the_kernel_cannot_do() -> None:
    q, k = _qk(1, 2, 1, 64, 64, 16)
    with pytest.raises(ValueError, match="multiple of stride"):
        antidiagonal_partial_scores(q, k, stride=12, block_size=32)
    with pytest.raises(ValueError, match="power-of-two"):
        antidiagonal_partial_scores(q, k, stride=4, block_size=48)
    with pytest.raises(ValueError, match="<= 64"):
        antidiagonal_partial_scores(q, k, stride=1, block_size=128)
    with pytest.raises(ValueError, match="q_start"):
        antidiagonal_partial_scores(q, k, stride=4, block_size=32, q_start=16, q_len=128)
    with pytest.raises(ValueError, match="ends inside a block"):
        antidiagonal_partial_scores(q[:, :, :40], k, stride=4, block_size=32, q_len=64)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_partial_scores_bf16_at_scale(causal: bool) -> None:
    """4096 bf16 tokens in four shards, block 128, stride 8: every (q shard, k shard) pair against the float32
    reference on the same (bf16-rounded) inputs, with its own max and with the global one."""
    length, block, stride, shard = 4096, 128, 8, 1024
    q, k = _qk(1, 8, 2, length, length, 128, torch.bfloat16)
    for qs, ks in itertools.product(range(0, length, shard), repeat=2):
        qc, kc = q[:, :, qs : qs + shard], k[:, :, ks : ks + shard]
        kw = dict(stride=stride, block_size=block, q_start=qs, k_start=ks, q_len=length, k_len=length, causal=causal)
        want = ref.antidiagonal_partial_scores(qc.float(), kc.float(), **kw)
        _assert_stats_close(antidiagonal_partial_scores(qc, kc, **kw), want, atol=1e-4, rtol=1e-3)
        global_max, _ = ref.antidiagonal_partial_scores(qc.float(), k.float(), **{**kw, "k_start": 0})
        want = ref.antidiagonal_partial_scores(qc.float(), kc.float(), **kw, row_max=global_max)
        _assert_stats_close(antidiagonal_partial_scores(qc, kc, **kw, row_max=global_max), want, atol=1e-4, rtol=1e-3)
