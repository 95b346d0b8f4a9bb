"""Sliding-window attention: the O(L·w) reference against a float64 full masked softmax over awkward shapes, its memory
bound, the dispatch (auto/fa4/reference), validation, compile, and (GPU) FA4's window against the reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import xattention as xa
from xattention.kernels import window as window_kernel


def _qkv(b: int, hq: int, hkv: int, lq: int, lk: int, d: int, dtype: torch.dtype = torch.float64, device: str = "cpu"):
    g = torch.Generator().manual_seed(lq * 7 + lk)
    q = torch.randn(b, hq, lq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float | None = None) -> torch.Tensor:
    """Full [Lq, Lk] scores in float64, masked by the rule written out position by position."""
    lq, lk, d = q.shape[2], k.shape[2], q.shape[3]
    group = q.shape[1] // k.shape[1]
    kf, vf = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = q.double() @ kf.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(d))
    visible = torch.zeros(lq, lk, dtype=torch.bool)
    for i in range(lq):
        p = lk - lq + i
        for j in range(max(0, p - window + 1), p + 1):
            visible[i, j] = True
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ vf


SHAPES = [  # (B, Hq, Hkv, Lq, Lk, D)
    (1, 1, 1, 1, 1, 16),
    (2, 4, 2, 127, 127, 32),
    (1, 7, 1, 1000, 1000, 16),
    (2, 4, 1, 100, 1000, 16),  # chunked prefill: Lq < Lk
    (1, 2, 2, 1, 300, 64),  # one decode row
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("window", [1, 64, 5000])
def test_reference_equals_naive_float64(shape: tuple, window: int) -> None:
    b, hq, hkv, lq, lk, d = shape
    q, k, v = _qkv(b, hq, hkv, lq, lk, d)
    out = xa.sliding_window_attention(q, k, v, window=window, backend="reference")
    assert out.shape == (b, hq, lq, d) and out.dtype == torch.float64
    torch.testing.assert_close(out, _naive(q, k, v, window), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 16, 100])
def test_chunk_boundaries_do_not_matter(chunk: int) -> None:
    q, k, v = _qkv(2, 4, 2, 127, 150, 16)
    expected = _naive(q, k, v, 33, scale=0.3)
    out = window_kernel.window_attention(q, k, v, window=33, scale=0.3, chunk=chunk)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_float32_error_within_twice_plain_pytorch() -> None:
    q, k, v = _qkv(2, 4, 1, 1000, 1000, 32, dtype=torch.float32)
    expected = _naive(q, k, v, 64)
    idx = torch.arange(1000)
    band = (idx[None] <= idx[:, None]) & (idx[None] > idx[:, None] - 64)
    plain = F.scaled_dot_product_attention(q, k, v, attn_mask=band, enable_gqa=True)
    out = xa.sliding_window_attention(q, k, v, window=64)
    assert out.dtype == torch.float32
    assert (out.double() - expected).abs().max() <= 2 * (plain.double() - expected).abs().max() + 1e-7


def test_memory_is_bounded_by_chunk_times_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every SDPA call sees at most C query rows and C + w - 1 keys: O(L·w), never an [L, L] mask."""
    sizes: list[tuple[int, int]] = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        sizes.append((q.shape[2], k.shape[2]))
        assert attn_mask is not None and tuple(attn_mask.shape) == (q.shape[2], k.shape[2])
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(window_kernel.F, "scaled_dot_product_attention", spy)
    q, k, v = _qkv(1, 2, 1, 3000, 3000, 16, dtype=torch.float32)
    xa.sliding_window_attention(q, k, v, window=64, backend="reference")
    chunk = max(64, window_kernel.DEFAULT_CHUNK)
    assert len(sizes) == math.ceil(3000 / chunk)
    assert all(rows <= chunk and keys <= chunk + 64 - 1 for rows, keys in sizes)


def test_auto_on_cpu_is_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = window_kernel.window_attention
    monkeypatch.setattr(window_kernel, "window_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _qkv(1, 2, 2, 10, 10, 8, dtype=torch.float32)
    xa.sliding_window_attention(q, k, v, window=4)
    assert calls == [1]


def test_compiles_fullgraph() -> None:
    q, k, v = _qkv(1, 4, 2, 300, 300, 16, dtype=torch.float32)
    compiled = torch.compile(xa.sliding_window_attention, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v, window=50), xa.sliding_window_attention(q, k, v, window=50))


def test_invalid_arguments_raise() -> None:
    q, k, v = _qkv(1, 2, 2, 10, 10, 8, dtype=torch.float32)
    for window in (0, -3, True, 2.0):
        with pytest.raises(ValueError, match="window must be an int"):
            xa.sliding_window_attention(q, k, v, window=window)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown backend"):
        xa.sliding_window_attention(q, k, v, window=4, backend="triton")
    with pytest.raises(ValueError, match="fa4"):
        xa.sliding_window_attention(q, k, v, window=4, backend="fa4")  # CPU tensors
    with pytest.raises(ValueError, match="must not exceed"):
        xa.sliding_window_attention(q, k[:, :, :5], v[:, :, :5], window=4)


def _fa4_or_skip(q: torch.Tensor):
    from xattention import kernels
    from xattention.kernels import fa4

    if not kernels.fa4_usable(q.device):
        pytest.skip("FlashAttention-4 is not usable on this GPU / install")
    return fa4


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 4, 1, 32768, 32768, 256), (2, 8, 2, 1000, 1000, 128), (1, 8, 8, 500, 4000, 64)])
@pytest.mark.parametrize("window", [1, 512, 5000])
def test_fa4_window_matches_reference_bf16(shape: tuple, window: int) -> None:
    """bf16 rule: FA4's error against an fp32 reference is at most twice plain PyTorch's bf16 error."""
    b, hq, hkv, lq, lk, d = shape
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dtype=torch.bfloat16, device="cuda")
    _fa4_or_skip(q)
    expected = xa.sliding_window_attention(q.float(), k.float(), v.float(), window=window, backend="reference")
    plain = xa.sliding_window_attention(q, k, v, window=window, backend="reference")
    out = xa.sliding_window_attention(q, k, v, window=window, backend="fa4")
    assert out.shape == (b, hq, lq, d) and out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max() <= 2 * (plain.float() - expected).abs().max() + 1e-3
    auto = xa.sliding_window_attention(q, k, v, window=window)
    torch.testing.assert_close(auto, out, rtol=0, atol=0)


def test_auto_runs_the_reference_where_fa4_refuses_the_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 where the dispatch picks FA4 (faked here: a CUDA device of capability 9.0): FA4's window kernel takes only
    fp16/bf16, so the reference answers instead of FA4 failing."""
    from xattention import window
    from xattention.kernels import fa4
    from xattention.kernels.window import window_attention

    monkeypatch.setattr(window, "resolve_backend", lambda backend, device, supported: "fa4")
    monkeypatch.setattr(fa4, "capability", lambda device: 90)
    monkeypatch.setattr(fa4, "window_attention", lambda *a, **kw: pytest.fail("FA4 must not get fp32 inputs"))
    q, k, v = (torch.randn(1, 2, 100, 32) for _ in range(3))
    got = xa.sliding_window_attention(q, k, v, window=16)
    assert torch.equal(got, window_attention(q, k, v, window=16))
