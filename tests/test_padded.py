"""Right-padded batches in one launch: ``sparse_attention(..., lengths=)``, ``Method.estimate_padded``, the scorers'
``lengths``, ``BlockMask.lengths`` and the HF hook's alignment of padded batches. Each element must get exactly what
it gets alone."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import xattention as xa
from xattention.integrations.masks import real_spans
from xattention.integrations.padding import RightAligned
from xattention.kernels import reference

BLOCK = 16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None
# the longest element first, one ragged in its last block and stride group, one shorter than a block, one empty
LENGTHS = [100, 53, 9, 0]


def _method(name: str, **kwargs: object) -> xa.Method:
    settings = {"xattention": {"threshold": 0.6, "stride": 4}, "streaming": {"local_blocks": 2},
                "vertical_slash": {"threshold": 0.7}, "flexprefill": {"gamma": 0.8}, "oracle": {"threshold": 0.7}}  # fmt: skip
    return xa.METHODS[name](**{"block_size": BLOCK, "min_seq_len": 0, **settings.get(name, {}), **kwargs})


def _qkv(lengths: list[int], hq: int = 4, hkv: int = 2, d: int = 16, device: str = "cpu"):
    gen = torch.Generator().manual_seed(sum(lengths))
    bsz, length = len(lengths), max(lengths)
    q, k, v = (torch.randn(bsz, h, length, d, generator=gen) for h in (hq, hkv, hkv))
    k[:, :, :3] *= 3  # a sink, so rows are not uniform
    for b, n in enumerate(lengths):  # garbage in the padding: it must not matter
        for t in (q, k, v):
            t[b, :, n:] = 1e3
    return q.to(device), k.to(device), v.to(device)


@pytest.mark.parametrize("name", sorted(xa.METHODS))
def test_estimate_padded_equals_each_element_alone(name: str) -> None:
    method = _method(name)
    q, k, _ = _qkv(LENGTHS)
    mask = method.estimate_padded(q, k, LENGTHS)
    assert mask.lengths == tuple(LENGTHS) and mask.shape == (4, 4, 7, 7)
    for b, n in enumerate(LENGTHS):
        rows = -(-n // BLOCK)
        assert not mask.mask[b, :, rows:].any(), "rows past an element's length must be empty"
        if n:
            alone = method.estimate(q[b : b + 1, :, :n], k[b : b + 1, :, :n])
            assert torch.equal(mask.mask[b, :, :rows, :rows], alone.mask[0])
            assert torch.equal(mask.element(b).mask, alone.mask)
            assert mask.density_per_head()[b].tolist() == pytest.approx(alone.density_per_head()[0].tolist())
    assert mask.density_per_head()[3].tolist() == [0.0] * 4


def test_padded_scores_equal_each_element_alone_reference() -> None:
    q, k, _ = _qkv(LENGTHS[:3])
    lens = torch.tensor(LENGTHS[:3])
    zero = (torch.arange(q.shape[2]) >= lens[:, None])[:, None, :, None]
    scores = reference.antidiagonal_block_scores(
        q.masked_fill(zero, 0), k.masked_fill(zero, 0), stride=4, block_size=BLOCK, lengths=lens
    )
    for b, n in enumerate(LENGTHS[:3]):
        alone = reference.antidiagonal_block_scores(q[b : b + 1, :, :n], k[b : b + 1, :, :n], stride=4, block_size=BLOCK)
        rows = alone.shape[2]
        torch.testing.assert_close(scores[b, :, :rows, :rows], alone[0], rtol=1e-6, atol=1e-7)
        assert not scores[b, :, rows:].any()


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_padded_scores_triton_equal_reference() -> None:
    from xattention.kernels import antidiagonal

    lengths = [100, 53, 9]
    q, k, _ = _qkv(lengths, device=DEVICE)
    lens = torch.tensor(lengths, device=DEVICE)
    zero = (torch.arange(q.shape[2], device=DEVICE) >= lens[:, None])[:, None, :, None]
    q, k = q.masked_fill(zero, 0), k.masked_fill(zero, 0)
    want = reference.antidiagonal_block_scores(q, k, stride=4, block_size=BLOCK, lengths=lens)
    got = antidiagonal.antidiagonal_block_scores(q, k, stride=4, block_size=BLOCK, lengths=lens)
    torch.testing.assert_close(got, want, rtol=2e-3 if DEVICE == "cuda" else 1e-5, atol=1e-4 if DEVICE == "cuda" else 1e-6)


BACKENDS = ["reference"] + (["triton"] if HAS_TRITON else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("min_seq_len", [0, 50, 1000])
def test_sparse_attention_with_lengths_equals_each_element_alone(backend: str, min_seq_len: int) -> None:
    """Sparse, dense below min_seq_len (50: the 100-token element sparse, the others dense; 1000: all dense), and
    zeros on padding rows and on an element without tokens."""
    method = _method("xattention", min_seq_len=min_seq_len)
    q, k, v = _qkv(LENGTHS)
    out, mask = xa.sparse_attention(q, k, v, method, lengths=LENGTHS, backend=backend, return_mask=True)
    assert (mask is None) == (min_seq_len == 1000)
    for b, n in enumerate(LENGTHS):
        assert not out[b, :, n:].any(), "padding rows must be zero"
        if n:
            alone = xa.sparse_attention(q[b : b + 1, :, :n], k[b : b + 1, :, :n], v[b : b + 1, :, :n], method, backend=backend)
            torch.testing.assert_close(out[b : b + 1, :, :n], alone, rtol=1e-5, atol=1e-5)
            if mask is not None and n < min_seq_len:  # dense, as alone: every visible block
                assert torch.equal(
                    mask.element(b).mask, xa.Dense(block_size=BLOCK).estimate(q[b : b + 1, :, :n], k[b : b + 1, :, :n]).mask
                )


def test_lengths_errors() -> None:
    method = _method("xattention")
    q, k, v = _qkv([20, 10])
    with pytest.raises(ValueError, match="one per batch element"):
        xa.sparse_attention(q, k, v, method, lengths=[20])
    with pytest.raises(ValueError, match=r"ints in \[0, 20\]"):
        xa.sparse_attention(q, k, v, method, lengths=[21, 3])
    with pytest.raises(ValueError, match=r"ints in \[0, 20\]"):
        xa.sparse_attention(q, k, v, method, lengths=[True, 3])
    with pytest.raises(ValueError, match="as many queries as keys"):
        xa.sparse_attention(q[:, :, :10], k, v, method, lengths=[10, 3])
    with pytest.raises(ValueError, match="causal"):
        xa.sparse_attention(q, k, v, method, lengths=[20, 3], causal=False)
    with pytest.raises(ValueError, match="one per batch element"):
        xa.BlockMask(torch.ones(2, 1, 2, 2, dtype=torch.bool), BLOCK, 20, 20, lengths=(3,))


def test_right_aligned_round_trip() -> None:
    """Left and right padding and an empty element: gather moves each span to the front, scatter puts it back with
    zeros elsewhere."""
    spans = [(3, 9, 3, 9), (0, 4, 0, 4), None]  # left-padded 7 tokens, right-padded 5, nothing
    aligned = RightAligned.from_spans(spans, 10, torch.device("cpu"))
    assert aligned is not None and aligned.lengths == (7, 5, 0)
    x = torch.arange(3 * 10, dtype=torch.float32).view(3, 1, 10, 1).expand(3, 2, 10, 4).contiguous()
    q, k, _ = aligned.gather(x, x, x)
    assert q.shape == (3, 2, 7, 4)
    assert q[0, 0, :, 0].tolist() == list(range(3, 10)) and k[1, 0, :5, 0].tolist() == list(range(10, 15))
    back = aligned.scatter(q)
    want = x.clone()
    want[0, :, :3] = 0
    want[1, :, 5:] = 0
    want[2] = 0
    assert torch.equal(back, want)
    # a cache offset (more keys than queries) cannot be right-aligned
    assert RightAligned.from_spans([(0, 4, 2, 9), (0, 4, 0, 9)], 5, torch.device("cpu")) is None


def _window_mask(pad: list[tuple[int, int]], length: int, window: int) -> torch.Tensor:
    """transformers' boolean [B, 1, L, L] mask: causal, within the window, keys inside each element's (start, end)."""
    pos = torch.arange(length)
    causal = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
    rows = []
    for start, end in pad:
        real = (pos >= start) & (pos < end)
        rows.append(causal & real[None, :])
    return torch.stack(rows)[:, None]


def test_real_spans_of_sliding_window_masks() -> None:
    mask = _window_mask([(0, 30), (12, 30), (0, 20)], 30, window=8)
    assert real_spans(mask, 30, 30, 0, window=8) == [(0, 29, 0, 29), (12, 29, 12, 29), (0, 19, 0, 19)]
    with pytest.raises(ValueError, match="contiguous run"):  # read with the wrong window
        real_spans(mask, 30, 30, 0, window=6)
    holes = mask.clone()
    holes[0, 0, 20:, 15] = False
    with pytest.raises(ValueError, match="contiguous run"):
        real_spans(holes, 30, 30, 0, window=8)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_cuda_padded_sparse_attention_matches_each_element_alone(backend: str) -> None:
    """On the GPU (bf16, FA4 or Triton attention, the Triton scorer with TMA): the batched masks agree with the single
    runs' (a tile order may flip a tie) and the batched output is exact attention over the batched mask."""
    lengths = [4097, 2000, 129, 0]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(4, h, 4097, 128, device="cuda", generator=gen, dtype=torch.bfloat16) for h in (8, 2, 2))
    method = xa.XAttention(block_size=128, stride=8, threshold=0.9, min_seq_len=0)
    out, mask = xa.sparse_attention(q, k, v, method, lengths=lengths, backend=backend, return_mask=True)
    assert mask is not None
    for b, n in enumerate(lengths):
        assert not out[b, :, n:].any()
        if not n:
            continue
        qb, kb, vb = q[b : b + 1, :, :n], k[b : b + 1, :, :n], v[b : b + 1, :, :n]
        alone = method.estimate(qb, kb)
        assert (mask.element(b).mask == alone.mask).float().mean() > 0.99
        want = xa.block_sparse_attention(qb, kb, vb, mask.element(b), backend="reference")
        torch.testing.assert_close(out[b : b + 1, :, :n].float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_cuda_padded_scores_triton_equal_reference() -> None:
    from xattention.kernels import antidiagonal

    lengths = torch.tensor([3000, 1029, 77], device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k = (torch.randn(3, h, 3000, 128, device="cuda", generator=gen, dtype=torch.bfloat16) for h in (8, 2))
    zero = (torch.arange(3000, device="cuda") >= lengths[:, None])[:, None, :, None]
    q, k = q.masked_fill(zero, 0), k.masked_fill(zero, 0)
    want = reference.antidiagonal_block_scores(q, k, stride=8, block_size=128, lengths=lengths)
    got = antidiagonal.antidiagonal_block_scores(q, k, stride=8, block_size=128, lengths=lengths)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-4)


def test_real_spans_reads_the_mask_in_row_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Row chunks of a few rows (as a 128K-key mask gets) give the spans of one whole read, windowed or not."""
    from xattention.integrations import masks

    mask = _window_mask([(0, 30), (12, 30), (0, 20)], 30, window=8)
    causal = _window_mask([(0, 30), (12, 30), (0, 20)], 30, window=30)
    whole = real_spans(mask, 30, 30, 0, window=8), real_spans(causal, 30, 30, 0)
    monkeypatch.setattr(masks, "ROW_CHUNK_BYTES", 7 * 30)  # 7 rows per chunk: the last chunk is ragged
    assert (real_spans(mask, 30, 30, 0, window=8), real_spans(causal, 30, 30, 0)) == whole
    assert whole[1] == [(0, 29, 0, 29), (12, 29, 12, 29), (0, 19, 0, 19)]
