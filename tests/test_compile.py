"""torch.compile(fullgraph=True) of the public attention functions, and what autograd does on each path."""

from __future__ import annotations

import pytest
import torch

import xattention as xa

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(lq: int = 300, lk: int = 300, dtype: torch.dtype = torch.float32):
    q = torch.randn(1, 4, lq, 64, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(1, 2, lk, 64, device=DEVICE, dtype=dtype) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_public_functions_compile_fullgraph(backend: str) -> None:
    """No graph break (fullgraph=True raises on one), and the compiled result is the eager one. On CPU "triton" runs the
    custom ops under the interpreter, so their fake implementations are what dynamo traces."""
    q, k, v = _qkv(200, 300)
    method = xa.XAttention(min_seq_len=0, stride=4, block_size=64, threshold=0.8)
    mask = method.estimate(q, k, backend=backend)
    sparse = torch.compile(lambda q, k, v: xa.sparse_attention(q, k, v, method, backend=backend), fullgraph=True)
    attend = torch.compile(lambda q, k, v: xa.block_sparse_attention(q, k, v, mask, backend=backend), fullgraph=True)
    torch.testing.assert_close(sparse(q, k, v), xa.sparse_attention(q, k, v, method, backend=backend))
    torch.testing.assert_close(attend(q, k, v), xa.block_sparse_attention(q, k, v, mask, backend=backend))


@pytest.mark.gpu
def test_default_gpu_path_compiles_fullgraph() -> None:
    """The default path on a GPU (FA4 where present, else Triton) in bf16 at the 128-block default."""
    q, k, v = _qkv(2048, 2048, torch.bfloat16)
    method = xa.XAttention(min_seq_len=0)
    compiled = torch.compile(lambda q, k, v: xa.sparse_attention(q, k, v, method), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), xa.sparse_attention(q, k, v, method), atol=2e-2, rtol=2e-2)
    dense = torch.compile(lambda q, k, v: xa.dense_attention(q, k, v), fullgraph=True)
    torch.testing.assert_close(dense(q, k, v), xa.dense_attention(q, k, v), atol=2e-2, rtol=2e-2)


def test_reference_backward_matches_dense_on_the_full_mask() -> None:
    """The reference path is plain PyTorch (float32 inside): gradients flow, and over every block they are dense's."""
    q, k, v = (t.cpu().requires_grad_() for t in _qkv(130, 130))
    mask = xa.BlockMask.full(1, 4, block_size=16, q_len=130, k_len=130)
    grads = torch.autograd.grad(xa.block_sparse_attention(q, k, v, mask, backend="reference").square().sum(), (q, k, v))
    want = torch.autograd.grad(xa.dense_attention(q, k, v).square().sum(), (q, k, v))
    for got, ref in zip(grads, want, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_reference_backward_on_a_random_mask_matches_masked_softmax() -> None:
    q, k, v = (t.cpu().requires_grad_() for t in _qkv(100, 100))
    mask = xa.BlockMask(torch.rand(1, 4, 7, 7) < 0.5, 16, 100, 100)
    mask.mask[..., 0] = True
    out = xa.block_sparse_attention(q, k, v, mask, backend="reference")
    tok = mask.to_token_mask()
    kk, vv = (t.repeat_interleave(2, 1) for t in (k, v))
    want = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=tok)
    g = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, (q, k, v), g)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    for got, ref in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_gpu_kernels_refuse_inputs_that_need_grad() -> None:
    q, k, v = _qkv(128, 128)
    q.requires_grad_()
    mask = xa.BlockMask.full(1, 4, block_size=64, q_len=128, k_len=128, device=DEVICE)
    with pytest.raises(ValueError, match="forward-only"):
        xa.block_sparse_attention(q, k, v, mask, backend="triton")
    with torch.no_grad():
        xa.block_sparse_attention(q, k, v, mask, backend="triton")


def test_fa4_dispatch_traces_fullgraph(monkeypatch: pytest.MonkeyPatch) -> None:
    """The FA4 branch of the dispatch (capability and install checks, refusal, the custom ops and their fakes) traces
    without a graph break. FA4 is faked present, as a CUDA device of capability 9.0 whose kernels are the reference's."""
    from xattention import kernels
    from xattention.kernels import fa4, reference

    def fake_sparse(q, k, v, mask, *, block_size, causal, scale, return_lse, shared_heads):
        out, lse = reference.block_sparse_attention(
            q, k, v, mask, block_size=block_size, causal=causal, scale=scale, return_lse=True
        )
        return out, lse

    def fake_dense(q, k, v, *, causal=True, scale=None):
        return xa.dense_attention(q, k, v, causal=causal, scale=scale, backend="sdpa")

    monkeypatch.setattr(kernels, "fa4_usable", lambda device: True)
    monkeypatch.setattr(kernels, "capability", lambda device: 90)
    monkeypatch.setattr(fa4, "capability", lambda device: 90)
    monkeypatch.setattr(fa4, "block_sparse_attention", fake_sparse)
    monkeypatch.setattr(fa4, "dense_attention", fake_dense)
    q, k, v = (t.to(torch.bfloat16).cpu() for t in _qkv(256, 256))
    mask = xa.BlockMask(torch.rand(1, 4, 2, 2) < 0.7, 128, 256, 256)
    attend = torch.compile(lambda q, k, v: xa.block_sparse_attention(q, k, v, mask, backend="fa4"), fullgraph=True)
    dense = torch.compile(lambda q, k, v: xa.dense_attention(q, k, v, backend="fa4"), fullgraph=True)
    torch.testing.assert_close(attend(q, k, v), xa.block_sparse_attention(q, k, v, mask, backend="reference"))
    torch.testing.assert_close(dense(q, k, v), xa.dense_attention(q, k, v, backend="sdpa"))


def test_capability_checks_trace_as_constants(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compute-capability lookup is a constant under dynamo and compares like an int. (On the H200's torch 2.11 a
    constant tuple could not be compared there, which failed the first compiled GPU run; torch 2.13 here compares
    either, so this guards the int form rather than reproducing that failure.)"""
    from xattention import kernels

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    device = torch.device("cuda", 0)
    torch._dynamo.reset()
    hopper = lambda: kernels.capability(device) >= 80 and kernels.capability(device) // 10 == 9
    compiled = torch.compile(lambda x: x * (2 if hopper() else 3), fullgraph=True)
    assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 2.0))


def test_install_checks_are_constants_under_compile() -> None:
    """The checks the GPU dispatch makes (FA4 importable, Triton installed) trace as constants: dynamo cannot trace
    importlib.util.find_spec, and the H200 run of test_default_gpu_path_compiles_fullgraph broke on fa4_available."""
    from xattention.kernels import _installed, fa4_available

    def f(x: torch.Tensor) -> torch.Tensor:
        return x + (1.0 if fa4_available() else 2.0) + (1.0 if _installed("triton") else 0.0)

    x = torch.zeros(3)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))
