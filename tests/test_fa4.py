"""The FlashAttention-4 backend: mask conversion, dispatch, and the kernel against the fp32 reference (bf16 rule).

GPU tests need CUDA, compute capability 9.x-11.x and ``flash-attn-4``; they skip with a reason elsewhere. The dispatch
tests run on CPU with FA4 faked as present or absent.
"""

from __future__ import annotations

import logging

import pytest
import torch

import xattention as xa
from xattention import kernels
from xattention._logging import WARNED
from xattention.block_mask import full_block_limit
from xattention.kernels import fa4

HAS_FA4 = torch.cuda.is_available() and kernels.fa4_usable(torch.device("cuda"))
needs_fa4 = pytest.mark.skipif(not HAS_FA4, reason="needs flash-attn-4 on a CUDA GPU of compute capability 9.x-11.x")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(b: int, hq: int, hkv: int, lq: int, lk: int, d: int, dtype: torch.dtype = torch.bfloat16):
    q = torch.randn(b, hq, lq, d, device=DEVICE, dtype=dtype)
    k = torch.randn(b, hkv, lk, d, device=DEVICE, dtype=dtype)
    k[:, :, : max(1, lk // 50)] *= 3
    return q, k, torch.randn_like(k)


def _random_mask(b: int, h: int, lq: int, lk: int, density: float, causal: bool = True, block: int = 128):
    qb, kb = -(-lq // block), -(-lk // block)
    keep = torch.rand(b, h, qb, kb, device=DEVICE) < density
    return xa.BlockMask(keep, block, lq, lk, causal)


def _check_bf16_rule(out: torch.Tensor, q, k, v, mask: xa.BlockMask) -> None:
    """Error vs fp32 at most 2x PyTorch's own bf16 error (plus a hair); zeros where a query sees no kept key."""
    hq, hkv = q.shape[1], k.shape[1]
    tok = mask.to_token_mask()
    kk, vv = (t.repeat_interleave(hq // hkv, 1) for t in (k, v))
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), kk.float(), vv.float(), attn_mask=tok)
    torch_bf16 = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=tok)
    rows = tok.any(-1)[..., None]
    assert not out.isnan().any()
    assert (out.float() * ~rows).abs().max() == 0  # no visible key: zeros
    err = ((out.float() - want) * rows).nan_to_num().abs().max()
    err_torch = ((torch_bf16.float() - want) * rows).nan_to_num().abs().max()
    assert err <= 2 * err_torch + 1e-4, (err, err_torch)


@pytest.mark.gpu
@needs_fa4
@pytest.mark.parametrize(
    "b,hq,hkv,lq,lk,d",
    [
        (1, 8, 8, 1, 1, 128),
        (3, 8, 2, 127, 127, 128),
        (1, 4, 1, 1000, 1000, 64),
        (2, 8, 1, 4097, 4097, 128),
        (1, 8, 8, 1000, 4097, 64),
        (1, 4, 4, 300, 33000, 128),
        (1, 4, 1, 1000, 1000, 256),  # refused on sm90 (block-sparse at D > 128): the Triton fallback answers
    ],
)
@pytest.mark.parametrize("causal", [True, False])
def test_fa4_matches_reference(b: int, hq: int, hkv: int, lq: int, lk: int, d: int, causal: bool) -> None:
    q, k, v = _inputs(b, hq, hkv, lq, lk, d)
    mask = _random_mask(b, hq, lq, lk, 0.3, causal)
    out = torch.full_like(q, float("nan"))
    out.copy_(xa.block_sparse_attention(q, k, v, mask, backend="fa4"))
    _check_bf16_rule(out, q, k, v, mask)


@pytest.mark.gpu
@needs_fa4
def test_fa4_at_33k_with_gqa_8() -> None:
    """The shape of record's heads at L = 33000 (not a multiple of 128), against the chunked fp32 reference."""
    q, k, v = _inputs(1, 32, 4, 33000, 33000, 128)
    mask = _random_mask(1, 32, 33000, 33000, 0.1)
    got = xa.block_sparse_attention(q, k, v, mask, backend="fa4").float()
    want = xa.block_sparse_attention(q.float(), k.float(), v.float(), mask, backend="reference")
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_fa4
@pytest.mark.parametrize("lq,lk", [(1000, 1000), (700, 4097)])
def test_fa4_lse_and_empty_rows(lq: int, lk: int) -> None:
    """LSE equals the Triton kernel's; rows with no kept block (and queries with no visible key) give zeros, -inf."""
    q, k, v = _inputs(2, 8, 2, lq, lk, 128)
    mask = _random_mask(2, 8, lq, lk, 0.2)
    mask.mask[0, 0, 3] = False  # a whole row kept nothing
    out, lse = xa.block_sparse_attention(q, k, v, mask, backend="fa4", return_lse=True)
    want_out, want_lse = xa.block_sparse_attention(q, k, v, mask, backend="triton", return_lse=True)
    torch.testing.assert_close(out.float(), want_out.float(), atol=2e-2, rtol=2e-2)
    finite = want_lse.isfinite()
    assert torch.equal(finite, lse.isfinite())
    torch.testing.assert_close(lse[finite], want_lse[finite], atol=1e-2, rtol=1e-3)
    assert (out[0, 0, 3 * 128 : 4 * 128] == 0).all()


@pytest.mark.gpu
@needs_fa4
@pytest.mark.parametrize("b", [1, 2])
def test_fa4_shared_gqa_mask_packs_and_matches(b: int) -> None:
    """A GQA-shared mask (``shared_heads`` = group) runs FA4 packed over the group; same answer as per-head."""
    q, k, v = _inputs(b, 8, 2, 3000, 3000, 128)
    mask = _random_mask(b, 2, 3000, 3000, 0.3)
    shared = xa.BlockMask(mask.mask.repeat_interleave(4, 1), 128, 3000, 3000, True, shared_heads=4)
    plain = xa.BlockMask(shared.mask, 128, 3000, 3000, True)
    got = xa.block_sparse_attention(q, k, v, shared, backend="fa4")
    want = xa.block_sparse_attention(q, k, v, plain, backend="fa4")
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@needs_fa4
def test_fa4_refused_shape_falls_back_to_triton_exactly(caplog: pytest.LogCaptureFixture) -> None:
    """Block size 64 is refused (FA4's block-sparse tiles are 128 wide): Triton answers, bit for bit, logged once."""
    q, k, v = _inputs(1, 4, 1, 2000, 2000, 128)
    mask = _random_mask(1, 4, 2000, 2000, 0.3, block=64)
    WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="xattention.attention"):
        got = xa.block_sparse_attention(q, k, v, mask, backend="auto")
        xa.block_sparse_attention(q, k, v, mask, backend="auto")
    want = xa.block_sparse_attention(q, k, v, mask, backend="triton")
    assert torch.equal(got, want)
    assert sum("refuses" in r.message for r in caplog.records) == 1


@pytest.mark.gpu
@needs_fa4
def test_auto_picks_fa4_and_dense_uses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_sparse, real_dense = fa4.block_sparse_attention, fa4.dense_attention
    monkeypatch.setattr(fa4, "block_sparse_attention", lambda *a, **kw: calls.append("sparse") or real_sparse(*a, **kw))
    monkeypatch.setattr(fa4, "dense_attention", lambda *a, **kw: calls.append("dense") or real_dense(*a, **kw))
    q, k, v = _inputs(1, 8, 2, 2048, 2048, 128)
    xa.sparse_attention(q, k, v, xa.XAttention(min_seq_len=0))
    xa.sparse_attention(q, k, v, xa.XAttention())  # below min_seq_len: dense
    assert calls == ["sparse", "dense"]
    dense = xa.dense_attention(q, k, v)
    sdpa = xa.dense_attention(q, k, v, backend="sdpa")
    torch.testing.assert_close(dense.float(), sdpa.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_fa4
@pytest.mark.parametrize("window", [1, 64, 511, 5000])
def test_fa4_window_matches_masked_sdpa(window: int) -> None:
    q, k, v = _inputs(1, 4, 1, 1500, 2000, 256)
    pos_q = torch.arange(1500, device=DEVICE)[:, None] + 500
    pos_k = torch.arange(2000, device=DEVICE)[None, :]
    band = (pos_k <= pos_q) & (pos_k > pos_q - window)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(4, 1), v.float().repeat_interleave(4, 1), attn_mask=band
    )
    got = fa4.window_attention(q, k, v, window=window)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


# ---- CPU: dispatch without a GPU --------------------------------------------------------------------------------


def test_auto_never_picks_fa4_off_cuda() -> None:
    assert kernels.resolve_backend("auto", torch.device("cpu"), ("reference", "triton", "fa4")) == "reference"


def test_explicit_fa4_without_it_is_one_clear_error() -> None:
    q, k, v = (torch.randn(1, 2, 256, 64) for _ in range(3))
    mask = xa.BlockMask.full(1, 2, block_size=128, q_len=256, k_len=256)
    with pytest.raises(ValueError, match="flash-attn-4"):
        xa.block_sparse_attention(q, k, v, mask, backend="fa4")


def test_block_sparse_lists_split_full_and_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The FA4 lists: full = kept blocks every query of the row sees whole; masked = the row's other visible kept
    blocks (ascending); blocks past the row's last visible one dropped. Checked against a loop over the geometry."""
    import sys
    import types

    if DEVICE == "cpu":  # the conversion is pure tensor code plus the interpreted index kernel: fake FA4's NamedTuple
        module = types.ModuleType("flash_attn.cute.block_sparsity")
        module.BlockSparseTensorsTorch = lambda **kw: types.SimpleNamespace(**kw)  # type: ignore[attr-defined]
        for name in ("flash_attn", "flash_attn.cute"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        monkeypatch.setitem(sys.modules, "flash_attn.cute.block_sparsity", module)
    b = 16
    for lq, lk, causal in [(100, 100, True), (50, 130, True), (64, 64, True), (40, 75, False), (1, 1, True)]:
        mask = torch.rand(2, 3, -(-lq // b), -(-lk // b)) < 0.6
        t = fa4.block_sparse_tensors(mask.to(DEVICE), q_len=lq, k_len=lk, block_size=b, causal=causal)
        full_lim = full_block_limit(lq, lk, b, causal)
        vis = xa.BlockMask(mask, b, lq, lk, causal).visible()
        for bi in range(2):
            for h in range(3):
                for r in range(mask.shape[2]):
                    kept = [c for c in range(mask.shape[3]) if mask[bi, h, r, c] and vis[r, c]]
                    full = [c for c in kept if c <= full_lim[r]]
                    part = [c for c in kept if c > full_lim[r]]
                    assert int(t.full_block_cnt[bi, h, r]) == len(full)
                    assert t.full_block_idx[bi, h, r, : len(full)].tolist() == full
                    assert int(t.mask_block_cnt[bi, h, r]) == len(part) <= fa4.MAX_MASKED_PER_ROW
                    assert t.mask_block_idx[bi, h, r, : len(part)].tolist() == part


def test_auto_picks_fa4_when_present_and_triton_when_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CUDA device of capability 9.0 (faked here): FA4 when it imports, Triton when it does not."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(kernels, "_installed", lambda module: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cuda = torch.device("cuda", 0)
    attention = ("reference", "triton", "flex", "fa4")
    monkeypatch.setattr(kernels, "fa4_available", lambda: True)
    assert kernels.resolve_backend("auto", cuda, attention) == "fa4"
    assert kernels.resolve_backend("auto", cuda) == "triton"  # selection has no FA4 kernel
    monkeypatch.setattr(kernels, "fa4_available", lambda: False)
    assert kernels.resolve_backend("auto", cuda, attention) == "triton"
    with pytest.raises(ValueError, match="flash-attn-4"):
        kernels.resolve_backend("fa4", cuda, attention)
