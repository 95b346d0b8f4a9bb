"""Triton kernels vs their PyTorch references.

On CPU the kernels run under ``TRITON_INTERPRET=1`` (conftest.py sets it when no GPU is present) at small sizes; on a
GPU the same tests run compiled, plus larger bf16 cases.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:  # pragma: no cover - CI installs triton
    pytest.skip("triton is not installed", allow_module_level=True)

import triton

from xattention.kernels import reference as ref
from xattention.kernels.antidiagonal import antidiagonal_block_scores
from xattention.kernels.block_sparse_attention import block_sparse_attention, mask_to_indices, unsupported_block_size
from xattention.kernels.select import select_blocks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, Hq, Hkv, Lq, Lk, D, block, stride, causal)
SHAPES = [
    (1, 2, 1, 1, 1, 64, 16, 4, True),
    (1, 2, 2, 127, 127, 64, 32, 4, True),
    (2, 4, 1, 100, 259, 80, 32, 8, True),
    (1, 7, 1, 64, 64, 32, 16, 2, True),
    (3, 2, 2, 50, 200, 64, 16, 4, False),
    (1, 4, 4, 300, 300, 96, 64, 8, True),
]


def _qk(b: int, hq: int, hkv: int, lq: int, lk: int, d: int, dtype: torch.dtype = torch.float32):
    q = torch.randn(b, hq, lq, d, device=DEVICE, dtype=dtype)
    k = torch.randn(b, hkv, lk, d, device=DEVICE, dtype=dtype)
    k[:, :, : max(1, lk // 50)] *= 3  # a sink, so rows are not uniform
    return q, k


@pytest.mark.parametrize("shape", SHAPES)
def test_antidiagonal_scores_match_reference(shape: tuple) -> None:
    b, hq, hkv, lq, lk, d, block, stride, causal = shape
    q, k = _qk(b, hq, hkv, lq, lk, d)
    got = antidiagonal_block_scores(q, k, stride=stride, block_size=block, causal=causal)
    want = ref.antidiagonal_block_scores(q, k, stride=stride, block_size=block, causal=causal)
    assert got.shape == want.shape
    # tf32 tensor-core products on GPU; exact float32 under the interpreter
    atol, rtol = (2e-3, 2e-3) if DEVICE == "cuda" else (2e-5, 1e-4)
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("search", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_select_matches_reference(shape: tuple, search: bool) -> None:
    b, hq, hkv, lq, lk, d, block, stride, causal = shape
    q, k = _qk(b, hq, hkv, lq, lk, d)
    scores = ref.antidiagonal_block_scores(q, k, stride=stride, block_size=block, causal=causal)
    for threshold in (0.5, 0.9, torch.linspace(0.3, 1.0, hq), 1.0):
        got = select_blocks(scores, threshold, q_len=lq, k_len=lk, block_size=block, causal=causal, search=search)
        want = ref.select_blocks(scores, threshold, q_len=lq, k_len=lk, block_size=block, causal=causal)
        assert torch.equal(got.cpu(), want.cpu())


def test_select_search_keeps_ties_lowest_column_first() -> None:
    """Exact ties at the cut-off: the bisection keeps the same lowest-column ties the sort does."""
    scores = torch.tensor([0.0, 0.2, 0.2, 0.2, 0.2, 0.1, 0.1], device=DEVICE).view(1, 1, 1, 7)
    for threshold in (0.3, 0.5, 0.55, 0.8, 0.95, 1.0):
        kw = {"q_len": 16, "k_len": 112, "block_size": 16, "causal": False}
        want = ref.select_blocks(scores, threshold, **kw)
        assert torch.equal(select_blocks(scores, threshold, search=True, **kw).cpu(), want.cpu()), threshold
        assert torch.equal(select_blocks(scores, threshold, search=False, **kw).cpu(), want.cpu()), threshold


def test_mask_to_indices_matches_block_mask() -> None:
    from xattention import BlockMask

    mask = torch.rand(2, 3, 5, 9, device=DEVICE) < 0.4
    idx, cnt = mask_to_indices(mask)
    want_idx, want_cnt = BlockMask(mask, 16, 80, 144, causal=False).to_indices()
    assert torch.equal(cnt, want_cnt)
    assert torch.equal(idx, want_idx)


def test_block_sparse_attention_rejects_what_the_kernel_cannot_take() -> None:
    assert all(unsupported_block_size(b) is None for b in (16, 32, 128))
    assert all("power-of-two" in (unsupported_block_size(b) or "") for b in (8, 48, 100))
    q, k = _qk(1, 2, 1, 64, 64, 16)
    mask = torch.ones(1, 2, 2, 2, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="power-of-two block_size >= 16, got 48"):
        block_sparse_attention(q, k, k, mask, block_size=48)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [1.0, 0.4])
def test_block_sparse_attention_matches_reference(shape: tuple, density: float) -> None:
    b, hq, hkv, lq, lk, d, block, _, causal = shape
    q, k = _qk(b, hq, hkv, lq, lk, d)
    v = torch.randn_like(k)
    qb, kb = -(-lq // block), -(-lk // block)
    mask = torch.rand(b, hq, qb, kb, device=DEVICE) < density
    out, lse = block_sparse_attention(q, k, v, mask, block_size=block, causal=causal, return_lse=True)
    want = ref.block_sparse_attention(q, k, v, mask, block_size=block, causal=causal)
    assert not out.isnan().any()
    # tf32 tensor-core products on GPU (up to 5.4e-3 seen on an H200 at D=96); exact float32 under the interpreter
    tol = 1e-2 if DEVICE == "cuda" else 1e-5
    torch.testing.assert_close(out, want, atol=tol, rtol=tol)
    # log-sum-exp against an explicit computation over the visible kept keys
    from xattention import BlockMask

    tok = BlockMask(mask, block, lq, lk, causal).to_token_mask()
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double().repeat_interleave(hq // hkv, 1)) / d**0.5
    want_lse = torch.logsumexp(scores.masked_fill(~tok, float("-inf")), dim=-1)
    lse_atol, lse_rtol = (2e-2, 2e-3) if DEVICE == "cuda" else (1e-4, 1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=lse_atol, rtol=lse_rtol)


@pytest.mark.gpu
@pytest.mark.parametrize("lq,lk", [(1000, 1000), (4097, 4097), (1024, 4096)])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("density", [1.0, 0.3])
def test_bf16_attention_error_within_twice_pytorch(lq: int, lk: int, d: int, density: float) -> None:
    """Kernel error vs an fp32 reference is at most 2x the error of PyTorch's own bf16 attention (plus a hair)."""
    b, hq, hkv, block = 2, 8, 2, 128
    q, k = _qk(b, hq, hkv, lq, lk, d, torch.bfloat16)
    v = torch.randn_like(k)
    qb, kb = -(-lq // block), -(-lk // block)
    mask = torch.rand(b, hq, qb, kb, device=DEVICE) < density
    mask[..., 0] = True
    from xattention import BlockMask

    tok = BlockMask(mask, block, lq, lk).to_token_mask()
    attn_mask = tok.repeat_interleave(1, 1)
    kk, vv = (t.repeat_interleave(hq // hkv, 1) for t in (k, v))
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), kk.float(), vv.float(), attn_mask=attn_mask)
    torch_bf16 = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=attn_mask)
    out = torch.full_like(q, float("nan"))
    out.copy_(block_sparse_attention(q, k, v, mask, block_size=block))
    rows = tok.any(-1)[..., None]  # rows with no visible key are zeros for us, NaN for SDPA
    err = ((out.float() - want) * rows).nan_to_num().abs().max()
    err_torch = ((torch_bf16.float() - want) * rows).nan_to_num().abs().max()
    assert not out[rows.expand_as(out)].isnan().any()
    assert err <= 2 * err_torch + 1e-4, (err, err_torch)


@pytest.mark.gpu
@pytest.mark.parametrize("stride", [8, 16])
def test_selection_agrees_at_scale(stride: int) -> None:
    """End-to-end Triton selection vs the reference on bf16 inputs: >= 99% of blocks identical."""
    from xattention import XAttention

    q, k = _qk(1, 8, 2, 8192, 8192, 128, torch.bfloat16)
    method = XAttention(stride=stride, threshold=0.9, min_seq_len=0)
    got = method.estimate(q, k, backend="triton").mask
    want = method.estimate(q, k, backend="reference").mask
    agree = (got == want).float().mean().item()
    assert agree >= 0.99, agree


@pytest.mark.gpu
def test_selection_with_head_dim_256() -> None:
    """gemma-3's shape (4 query heads on 1 K/V head of dimension 256): Triton scoring and selection match the reference."""
    from xattention import XAttention

    q, k = _qk(2, 4, 1, 4096, 4096, 256, torch.bfloat16)
    torch.testing.assert_close(
        antidiagonal_block_scores(q, k, stride=8, block_size=128, scale=256**-0.5),
        ref.antidiagonal_block_scores(q, k, stride=8, block_size=128, scale=256**-0.5),
        rtol=2e-2,
        atol=1e-3,
    )
    method = XAttention(stride=8, threshold=0.9, min_seq_len=0)
    agree = (method.estimate(q, k, backend="triton").mask == method.estimate(q, k, backend="reference").mask).float()
    assert agree.mean().item() >= 0.99


@pytest.mark.gpu
@pytest.mark.parametrize("lq,lk,causal", [(1000, 1000, True), (700, 2000, True), (1000, 1000, False)])
def test_flex_backend_matches_reference(lq: int, lk: int, causal: bool) -> None:
    from xattention import BlockMask
    from xattention import block_sparse_attention as attend

    q, k = _qk(1, 8, 2, lq, lk, 64, torch.bfloat16)
    v = torch.randn_like(k)
    mask = BlockMask(torch.rand(1, 8, -(-lq // 128), -(-lk // 128), device=DEVICE) < 0.5, 128, lq, lk, causal)
    got = attend(q, k, v, mask, backend="flex").float()
    want = attend(q.float(), k.float(), v.float(), mask, backend="reference")
    rows = mask.to_token_mask().any(-1)[..., None]
    torch.testing.assert_close(got * rows, want * rows, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("shape", SHAPES[1:4])
def test_block_sparse_attention_tma_path_matches_reference(shape: tuple) -> None:
    """The bulk-copy (TMA) K/V path computes the same function as the pointer path (interpreted on CPU)."""
    b, hq, hkv, lq, lk, d, block, _, causal = shape
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # the interpreter mis-handles bf16 products
    q, k = _qk(b, hq, hkv, lq, lk, d, dtype)
    v = torch.randn_like(k)
    mask = torch.rand(b, hq, -(-lq // block), -(-lk // block), device=DEVICE) < 0.5
    out = block_sparse_attention(q, k, v, mask, block_size=block, causal=causal, use_tma=True)
    want = ref.block_sparse_attention(q.float(), k.float(), v.float(), mask, block_size=block, causal=causal)
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)


def test_scorer_configs_never_split_head_dim_below_a_16_deep_dot() -> None:
    """Small head dims (tiny test models, D=16) must not reach a config whose D chunks are narrower than tl.dot takes:
    the autotuner would stop on the compile error instead of skipping it."""
    from xattention.kernels import antidiagonal

    configs = [triton.Config({"BLOCK_T": 128, "BLOCK_U": 256, "SPLIT_D": sp}) for sp in (1, 2)]
    assert [c.kwargs["SPLIT_D"] for c in antidiagonal._prune_configs(configs, {}, BLOCK_D=16)] == [1]
    assert len(antidiagonal._prune_configs(configs, {}, BLOCK_D=128)) == 2


def test_every_backends_attention_kernel_has_the_references_contract() -> None:
    """One typed contract for the three kernels of block-sparse attention: same leading parameters and defaults."""
    import inspect

    from xattention.kernels import fa4

    contract = ["q", "k", "v", "mask", "block_size", "causal", "scale", "return_lse"]
    reference_sig = inspect.signature(ref.block_sparse_attention)
    for fn in (ref.block_sparse_attention, block_sparse_attention, fa4.block_sparse_attention):
        params = inspect.signature(fn).parameters
        assert list(params)[: len(contract)] == contract, fn.__module__
        for name in contract[4:]:
            assert params[name].default == reference_sig.parameters[name].default, (fn.__module__, name)
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, (fn.__module__, name)
