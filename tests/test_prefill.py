"""Chunked prefill through the KV cache: chunked == one-shot at the last position (plain model, Dense and tau = 1 through
the sparse path; gemma-3's windowed layers), a decode step afterwards, left padding, and a sparse method stays close."""

from __future__ import annotations

import inspect

import pytest
import torch

import xattention as xa
from xattention.integrations import hf
from xattention.integrations.hf import collected_stats, reset_stats

transformers = pytest.importorskip("transformers")

from tiny_models import VOCAB, random_ids, tiny_gemma3, tiny_llama  # noqa: E402

LENGTH = 700


def xatt(threshold: float) -> xa.XAttention:
    return xa.XAttention(block_size=32, stride=4, threshold=threshold, min_seq_len=0)


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return tiny_llama(layers=2, max_positions=2048)


@pytest.fixture(scope="module")
def gemma() -> torch.nn.Module:
    layers = ["sliding_attention", "sliding_attention", "full_attention"]
    return tiny_gemma3(layers, kv_heads=1, head_dim=32, sliding_window=48, max_positions=2048)


@pytest.fixture(autouse=True)
def _clean(request: pytest.FixtureRequest):
    yield
    for name in ("llama", "gemma"):
        if name in request.fixturenames:
            xa.remove(request.getfixturevalue(name))


def ids(length: int = LENGTH, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return random_ids(length, batch, seed)


@torch.no_grad()
def last_logits(model: torch.nn.Module, input_ids: torch.Tensor, **kw) -> torch.Tensor:
    return model(input_ids=input_ids, **kw).logits[:, -1]


def _cache_arg(model: torch.nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@pytest.mark.parametrize("method", [None, xa.Dense(), xatt(1.0)], ids=["plain", "dense", "tau1"])
@pytest.mark.parametrize("model_name", ["llama", "gemma"])
def test_chunked_equals_one_shot(request: pytest.FixtureRequest, model_name: str, method: xa.Method | None) -> None:
    """Exact methods: every chunk size (dividing L or not, one token, more than L) gives the one-shot logits."""
    model = request.getfixturevalue(model_name)
    x = ids()
    expected = last_logits(model, x)
    if method is not None:
        xa.apply(model, method)
    for chunk_size in (None, 1000, 256, 100):
        result = xa.prefill(model, x, chunk_size=chunk_size)
        assert result.logits.shape == (1, VOCAB)
        assert result.cache.get_seq_length() == LENGTH
        torch.testing.assert_close(result.logits, expected, rtol=1e-4, atol=1e-4)


def test_gemma_chunks_run_windowed_attention(gemma, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the first chunk, a sliding layer sees the cache's last window - 1 keys plus the chunk: Lq < Lk, and the
    windowed path (not SDPA with the mask) serves it, bottom-right aligned."""
    calls = []
    real = hf.sliding_window_attention
    monkeypatch.setattr(hf, "sliding_window_attention", lambda q, k, v, **kw: calls.append(k.shape[2]) or real(q, k, v, **kw))
    x = ids()
    expected = last_logits(gemma, x)
    xa.apply(gemma, xa.Dense())
    torch.testing.assert_close(xa.prefill(gemma, x, chunk_size=256).logits, expected, rtol=1e-4, atol=1e-4)
    assert calls == [256, 256, 47 + 256, 47 + 256, 47 + 188, 47 + 188]


def test_one_token_chunks(llama) -> None:
    x = ids(length=40)
    xa.apply(llama, xatt(1.0))
    torch.testing.assert_close(xa.prefill(llama, x, chunk_size=1).logits, last_logits(llama, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_name", ["llama", "gemma"])
def test_decode_after_chunked_prefill(request: pytest.FixtureRequest, model_name: str) -> None:
    model = request.getfixturevalue(model_name)
    x = ids()
    nxt = ids(length=1, seed=5)
    expected = last_logits(model, torch.cat([x, nxt], dim=1))
    xa.apply(model, xatt(1.0))
    logits, cache = xa.prefill(model, x, chunk_size=256)  # a Prefilled unpacks as (logits, cache)
    assert logits.shape == (1, VOCAB)
    with torch.no_grad():
        step = model(input_ids=nxt, use_cache=True, **{_cache_arg(model): cache}).logits[:, -1]
    torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == LENGTH + 1


def test_sparse_chunks_run_through_the_sparse_path_and_stay_close(llama) -> None:
    """A sparse method selects per chunk (queries = the last Lq of Lk keys), so blocks differ from one shot; the last
    logits stay close to the one-shot sparse and dense ones."""
    x = ids()
    dense = last_logits(llama, x)
    xa.apply(llama, xatt(0.9), record_stats=True)
    one_shot = last_logits(llama, x)
    reset_stats(llama)
    chunked = xa.prefill(llama, x, chunk_size=256).logits
    stats = collected_stats(llama)
    assert [(s["q_len"], s["k_len"]) for s in stats] == [(256, 256)] * 2 + [(256, 512)] * 2 + [(188, 700)] * 2
    assert all(s["density"] < 1.0 for s in stats[2:])
    scale = dense.abs().max()
    assert (chunked - one_shot).abs().max() < 0.05 * scale
    assert (chunked - dense).abs().max() < 0.05 * scale


def test_left_padded_batch_equals_single_runs(llama) -> None:
    lengths = [LENGTH, 450]
    seqs = [ids(length=n, seed=10 + i) for i, n in enumerate(lengths)]
    xa.apply(llama, xatt(1.0))
    singles = torch.cat([xa.prefill(llama, s, chunk_size=200).logits for s in seqs])
    batch = torch.zeros(2, LENGTH, dtype=torch.long)
    mask = torch.zeros(2, LENGTH, dtype=torch.long)
    for b, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
        batch[b, LENGTH - n :], mask[b, LENGTH - n :] = s[0], 1
    result = xa.prefill(llama, batch, chunk_size=200, attention_mask=mask)
    torch.testing.assert_close(result.logits, singles, rtol=2e-4, atol=2e-4)


def test_extends_a_given_cache(llama) -> None:
    x = ids()
    expected = last_logits(llama, x)
    first = xa.prefill(llama, x[:, :300], chunk_size=128)
    second = xa.prefill(llama, x[:, 300:], chunk_size=128, cache=first.cache)
    torch.testing.assert_close(second.logits, expected, rtol=1e-4, atol=1e-4)


def test_invalid_arguments_raise(llama) -> None:
    x = ids(length=10)
    for chunk_size in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="chunk_size"):
            xa.prefill(llama, x, chunk_size=chunk_size)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="input_ids"):
        xa.prefill(llama, x[0])
    with pytest.raises(ValueError, match="attention_mask"):
        xa.prefill(llama, x, attention_mask=torch.ones(1, 9, dtype=torch.long))
