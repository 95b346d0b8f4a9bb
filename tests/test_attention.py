"""Block-sparse attention (reference backend) against an independent float64 masked attention; Dense against SDPA.

Tolerance rule (flash-attention's): the error of our output against the float64 reference must be at most twice the
error of plain PyTorch computing the same masked attention at the input precision, plus a small epsilon.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import xattention as xa
from naive import naive_token_mask, reference_attention_fp64
from xattention.kernels import reference as ref

EPS = 1e-5


def _qkv(b: int, hq: int, hkv: int, lq: int, lk: int, d: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=gen)
    k = torch.randn(b, hkv, lk, d, generator=gen)
    v = torch.randn(b, hkv, lk, d, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _random_mask(b: int, hq: int, lq: int, lk: int, block: int, density: float, causal: bool, seed: int = 1) -> xa.BlockMask:
    gen = torch.Generator().manual_seed(seed)
    qb, kb = -(-lq // block), -(-lk // block)
    return xa.BlockMask(torch.rand(b, hq, qb, kb, generator=gen) < density, block, lq, lk, causal)


def _plain_pytorch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """The same masked attention computed the obvious way at the inputs' precision (the error yardstick)."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    logits = (q @ kk.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    probs = torch.softmax(logits.masked_fill(~token_mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return probs @ vv


def _check_against_fp64(out: torch.Tensor, q, k, v, token_mask: torch.Tensor) -> None:
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not bool(out.isnan().any()), "NaN in the output: an element was not written or a row divided by zero"
    want = reference_attention_fp64(q, k, v, token_mask)
    err = (out.double() - want).abs().max().item()
    pt_err = (_plain_pytorch(q, k, v, token_mask).double() - want).abs().max().item()
    assert err <= 2 * pt_err + EPS, f"error {err:.3g} vs plain PyTorch {pt_err:.3g} ({q.dtype})"
    empty_rows = ~token_mask.any(dim=-1)
    assert bool((out[empty_rows] == 0).all()), "a query that sees no key must get zeros"


# (B, Hq, Hkv, Lq, Lk, D, block, causal)
SHAPES = [
    (1, 1, 1, 1, 1, 64, 16, True),
    (3, 4, 1, 127, 127, 80, 32, True),
    (1, 7, 1, 128, 128, 96, 64, True),
    (1, 2, 2, 1000, 1000, 64, 128, True),
    (3, 8, 2, 100, 1000, 128, 64, True),  # chunked prefill, offset 900 not a multiple of the block
    (1, 14, 2, 127, 300, 256, 32, True),  # GQA 7, D 256
    (2, 4, 4, 1, 1000, 64, 128, True),  # a single query over many keys
    (2, 4, 1, 200, 333, 80, 64, False),  # non-causal
    (1, 7, 7, 128, 256, 96, 128, False),
]
SHAPE_IDS = [f"B{s[0]}-H{s[1]}/{s[2]}-L{s[3]}x{s[4]}-D{s[5]}-b{s[6]}-{'causal' if s[7] else 'full'}" for s in SHAPES]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("density", [0.3, 0.8])
def test_block_sparse_attention_fp32(shape: tuple, density: float) -> None:
    b, hq, hkv, lq, lk, d, block, causal = shape
    q, k, v = _qkv(b, hq, hkv, lq, lk, d)
    mask = _random_mask(b, hq, lq, lk, block, density, causal)
    out = xa.block_sparse_attention(q, k, v, mask, backend="reference")
    _check_against_fp64(out, q, k, v, naive_token_mask(mask.mask, block, lq, lk, causal))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[4], SHAPES[5], SHAPES[7]], ids=[SHAPE_IDS[i] for i in (1, 4, 5, 7)])
def test_block_sparse_attention_half(shape: tuple, dtype: torch.dtype) -> None:
    b, hq, hkv, lq, lk, d, block, causal = shape
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dtype)
    mask = _random_mask(b, hq, lq, lk, block, 0.5, causal)
    out = xa.block_sparse_attention(q, k, v, mask)  # auto: the reference on CPU
    _check_against_fp64(out, q, k, v, naive_token_mask(mask.mask, block, lq, lk, causal))


def test_block_sparse_attention_long_4097() -> None:
    q, k, v = _qkv(1, 1, 1, 4097, 4097, 64)
    mask = _random_mask(1, 1, 4097, 4097, 128, 0.5, True)
    mask.mask[..., 0] = True  # every row sees something, so the comparison covers the whole length
    out = xa.block_sparse_attention(q, k, v, mask, backend="reference")
    _check_against_fp64(out, q, k, v, naive_token_mask(mask.mask, 128, 4097, 4097, True))


def test_random_masks_leave_empty_rows_and_they_get_zeros() -> None:
    # the zero-row rule is exercised for real: a mask with whole rows dropped
    q, k, v = _qkv(1, 2, 1, 100, 200, 64)
    mask = _random_mask(1, 2, 100, 200, 32, 0.5, True)
    mask.mask[0, 1, 2] = False
    out = xa.block_sparse_attention(q, k, v, mask)
    assert bool((out[0, 1, 64:96] == 0).all())
    _check_against_fp64(out, q, k, v, naive_token_mask(mask.mask, 32, 100, 200, True))


def test_explicit_scale() -> None:
    q, k, v = _qkv(1, 4, 2, 60, 90, 64)
    mask = _random_mask(1, 4, 60, 90, 16, 0.6, True)
    out = xa.block_sparse_attention(q, k, v, mask, scale=0.05)
    want = reference_attention_fp64(q, k, v, naive_token_mask(mask.mask, 16, 60, 90, True), scale=0.05)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_non_contiguous_inputs() -> None:
    q, k, v = _qkv(2, 4, 2, 70, 130, 64)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    mask = _random_mask(2, 4, 70, 130, 32, 0.6, True)
    torch.testing.assert_close(xa.block_sparse_attention(qt, kt, vt, mask), xa.block_sparse_attention(q, k, v, mask))
    torch.testing.assert_close(xa.attention_mass_kept(qt, kt, mask), xa.attention_mass_kept(q, k, mask))


# ---------------------------------------------------------------------------------------------------------------------
# every element written


def _nan_empty(original):
    def empty(*args, **kwargs):
        out = original(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    return empty


@pytest.mark.parametrize(("lq", "lk", "block"), [(127, 127, 32), (100, 333, 64), (1, 50, 16), (1000, 1000, 128)])
def test_every_output_element_is_written(monkeypatch: pytest.MonkeyPatch, lq: int, lk: int, block: int) -> None:
    q, k, v = _qkv(2, 2, 1, lq, lk, 64)
    mask = _random_mask(2, 2, lq, lk, block, 0.5, True)
    whole = ref.block_sparse_attention(q, k, v, mask.mask, block_size=block)
    monkeypatch.setattr(torch, "empty", _nan_empty(torch.empty))  # outputs start as NaN: an unwritten row shows
    for chunk in (1, 4 * block * lk, 3 * 8 * block * lk):  # one block row per chunk, a few, and ragged splits
        out = ref.block_sparse_attention(q, k, v, mask.mask, block_size=block, chunk_elements=chunk)
        assert not bool(out.isnan().any())
        torch.testing.assert_close(out, whole, atol=1e-6, rtol=1e-6)
    scores = ref.antidiagonal_block_scores(q, k, stride=8, block_size=block, chunk_elements=1)
    assert not bool(scores.isnan().any())
    true = ref.true_block_scores(q, k, block_size=block, chunk_elements=1)
    assert not bool(true.isnan().any())


# ---------------------------------------------------------------------------------------------------------------------
# Dense and the dispatching entry points


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """torch SDPA with an explicit bottom-right causal mask and repeated K/V (independent of our GQA/causal handling)."""
    lq, lk = q.shape[2], k.shape[2]
    g = q.shape[1] // k.shape[1]
    allowed = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq) if causal else None
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), attn_mask=allowed)


@pytest.mark.parametrize(
    ("b", "hq", "hkv", "lq", "lk", "d"),
    [(1, 1, 1, 1, 1, 64), (3, 4, 1, 127, 127, 80), (1, 7, 1, 128, 300, 96), (2, 8, 2, 200, 1000, 128), (1, 2, 2, 1, 129, 256)],
)
def test_dense_equals_sdpa(b: int, hq: int, hkv: int, lq: int, lk: int, d: int) -> None:
    q, k, v = _qkv(b, hq, hkv, lq, lk, d)
    want = _sdpa_causal(q, k, v)
    torch.testing.assert_close(xa.sparse_attention(q, k, v, xa.Dense()), want, atol=1e-5, rtol=1e-5)
    _, mask = xa.sparse_attention(q, k, v, xa.Dense(), return_mask=True)
    assert mask is None
    for block in (16, 128):
        dense_mask = xa.Dense(block_size=block).estimate(q, k)
        assert dense_mask.density() == pytest.approx(1.0)
        torch.testing.assert_close(xa.block_sparse_attention(q, k, v, dense_mask), want, atol=1e-5, rtol=1e-5)


def test_dense_non_causal_equals_sdpa() -> None:
    q, k, v = _qkv(2, 4, 2, 90, 150, 64)
    want = _sdpa_causal(q, k, v, causal=False)
    torch.testing.assert_close(xa.sparse_attention(q, k, v, xa.Dense(), causal=False), want, atol=1e-5, rtol=1e-5)
    mask = xa.Dense(block_size=32).estimate(q, k, causal=False)
    assert bool(mask.mask.all())
    torch.testing.assert_close(xa.block_sparse_attention(q, k, v, mask), want, atol=1e-5, rtol=1e-5)


def test_dense_bf16_within_tolerance() -> None:
    q, k, v = _qkv(1, 4, 1, 127, 250, 128, torch.bfloat16)
    full = torch.ones(1, 4, 127, 250, dtype=torch.bool).tril(250 - 127)
    for out in (xa.sparse_attention(q, k, v, xa.Dense()), xa.block_sparse_attention(q, k, v, xa.Dense().estimate(q, k))):
        _check_against_fp64(out, q, k, v, full)


def test_sparse_attention_estimates_then_attends() -> None:
    q, k, v = _qkv(1, 4, 2, 150, 300, 64)
    k[:, :, :4] *= 4
    method = xa.XAttention(block_size=32, stride=4, threshold=0.7, min_seq_len=0)
    out, mask = xa.sparse_attention(q, k, v, method, return_mask=True)
    assert isinstance(mask, xa.BlockMask) and mask.density() < 1.0
    _check_against_fp64(out, q, k, v, naive_token_mask(mask.mask, 32, 150, 300, True))
    # below min_seq_len: dense SDPA, no mask
    short = xa.XAttention(block_size=32, stride=4, threshold=0.7, min_seq_len=301)
    out, mask = xa.sparse_attention(q, k, v, short, return_mask=True)
    assert mask is None
    torch.testing.assert_close(out, _sdpa_causal(q, k, v), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# attention mass kept


def _mass_kept_fp64(q: torch.Tensor, k: torch.Tensor, mask: xa.BlockMask) -> torch.Tensor:
    lq, lk = q.shape[2], k.shape[2]
    causal_ok = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq) if mask.causal else torch.ones(lq, lk, dtype=torch.bool)
    g = q.shape[1] // k.shape[1]
    logits = q.double() @ k.double().repeat_interleave(g, dim=1).transpose(-1, -2) / math.sqrt(q.shape[-1])
    probs = torch.softmax(logits.masked_fill(~causal_ok, float("-inf")), dim=-1)
    kept = naive_token_mask(mask.mask, mask.block_size, lq, lk, causal=False)
    return (probs * kept).sum(dim=-1).mean(dim=-1)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_mass_kept(causal: bool) -> None:
    q, k, _ = _qkv(2, 6, 2, 90, 200, 64)
    mask = _random_mask(2, 6, 90, 200, 32, 0.5, causal)
    got = xa.attention_mass_kept(q, k, mask)
    assert got.shape == (2, 6) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _mass_kept_fp64(q, k, mask), atol=1e-5, rtol=1e-5)
    for chunk in (1, 5000, 1 << 30):  # one block row per chunk ... everything at once
        torch.testing.assert_close(xa.attention_mass_kept(q, k, mask, chunk_elements=chunk), got, atol=1e-6, rtol=1e-6)
    dense = xa.Dense(block_size=32).estimate(q, k, causal=causal)
    torch.testing.assert_close(xa.attention_mass_kept(q, k, dense), torch.ones(2, 6), atol=1e-5, rtol=0)
