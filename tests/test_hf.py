"""Hugging Face integration on tiny random models (no download): dense equivalence at tau = 1, the sparse path really
runs at low tau, decode stays dense, remove() restores SDPA exactly, padding, per-layer control, thresholds, errors."""

from __future__ import annotations

import copy
import inspect
import subprocess
import sys

import pytest
import torch

import xattention as xa
from xattention.integrations import hf
from xattention.integrations.hf import capture_qk, collected_stats, reset_stats

transformers = pytest.importorskip("transformers")

from tiny_models import VOCAB, random_ids, tiny_gemma3, tiny_llama, tiny_mistral  # noqa: E402

SEQ = 300  # 10 blocks of 32 (the last one ragged)
BLOCK, STRIDE = 32, 4


def xatt(threshold: float, **kw) -> xa.XAttention:
    return xa.XAttention(block_size=BLOCK, stride=STRIDE, threshold=threshold, min_seq_len=0, **kw)


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return tiny_llama(layers=3, max_positions=1024)


@pytest.fixture(autouse=True)
def _clean(request: pytest.FixtureRequest):
    yield
    for name in ("llama", "gemma", "mistral"):
        if name in request.fixturenames:
            xa.remove(request.getfixturevalue(name))


def ids(length: int = SEQ, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return random_ids(length, batch, seed)


@torch.no_grad()
def logits(model: torch.nn.Module, input_ids: torch.Tensor, **kw) -> torch.Tensor:
    return model(input_ids=input_ids, **kw).logits


def test_threshold_one_equals_dense(llama) -> None:
    x = ids()
    dense = logits(llama, x)
    xa.apply(llama, xatt(1.0), record_stats=True)
    sparse = logits(llama, x)
    stats = collected_stats(llama)
    assert [s["layer"] for s in stats] == [0, 1, 2]
    assert all(s["density"] == pytest.approx(1.0) and s["q_len"] == s["k_len"] == SEQ for s in stats)
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)


def test_low_threshold_runs_sparse_and_remove_restores_exactly(llama) -> None:
    x = ids()
    assert llama.config._attn_implementation == "sdpa"
    dense = logits(llama, x)
    xa.apply(llama, xatt(0.3), record_stats=True, record_mass=True)
    assert llama.config._attn_implementation == "xattention"
    sparse = logits(llama, x)
    stats = collected_stats(llama)
    assert len(stats) == 3
    assert all(s["density"] < 0.9 for s in stats)
    assert all(0.0 < s["mass_kept"] < 1.0 for s in stats)
    assert (sparse - dense).abs().max() > 1e-2
    reset_stats(llama)
    assert collected_stats(llama) == []
    xa.remove(llama)
    assert llama.config._attn_implementation == "sdpa"
    assert torch.equal(logits(llama, x), dense)
    with pytest.raises(ValueError, match="no xattention applied"):
        collected_stats(llama)


def test_mass_kept_matches_an_independent_computation(llama) -> None:
    # Layer 0's input does not depend on attention, so its q/k are the ones capture_qk sees on the dense model.
    x = ids()
    q, k = capture_qk(llama, x)[0]
    method = xatt(0.3)
    mask = method.estimate(q, k, scale=llama.model.layers[0].self_attn.scaling)
    scores = q.float() @ k.float().repeat_interleave(2, dim=1).transpose(-1, -2) * q.shape[-1] ** -0.5
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    expected = (probs * mask.to_token_mask().float()).sum(-1).mean()
    xa.apply(llama, method, record_stats=True, record_mass=True)
    logits(llama, x)
    first = collected_stats(llama)[0]
    assert first["layer"] == 0
    assert first["density"] == pytest.approx(mask.density())
    assert first["mass_kept"] == pytest.approx(float(expected), abs=1e-5)


def test_generate_after_apply_decodes_densely(llama) -> None:
    x = ids(length=140)
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    expected = llama.generate(x, **kw)
    xa.apply(llama, xatt(1.0), record_stats=True)
    got = llama.generate(x, **kw)
    assert torch.equal(got, expected)
    stats = collected_stats(llama)  # one prefill, no decode step recorded
    assert [s["q_len"] for s in stats] == [140] * 3
    xa.apply(llama, xatt(0.2))
    assert llama.generate(x, **kw).shape == (1, 146)


def test_chunked_prefill_uses_bottom_right_alignment(llama) -> None:
    x = ids()
    dense = logits(llama, x)
    xa.apply(llama, xatt(1.0), record_stats=True)
    with torch.no_grad():
        first = llama(input_ids=x[:, :200], use_cache=True)
        cache = getattr(first, "cache", None)
        cache = first.past_key_values if cache is None else cache
        name = "cache" if "cache" in inspect.signature(llama.forward).parameters else "past_key_values"
        second = llama(input_ids=x[:, 200:], use_cache=True, **{name: cache}).logits
    torch.testing.assert_close(second, dense[:, 200:], rtol=1e-4, atol=1e-4)
    assert [(s["q_len"], s["k_len"]) for s in collected_stats(llama)[3:]] == [(100, 300)] * 3


def _spy_sparse(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, tuple[int, ...] | None]]:
    """Record (B, L, lengths) of every call the hook makes to sparse_attention."""
    calls: list[tuple[int, int, tuple[int, ...] | None]] = []
    real = hf.sparse_attention

    def spy(q, k, v, method, **kw):
        calls.append((q.shape[0], q.shape[2], kw.get("lengths")))
        return real(q, k, v, method, **kw)

    monkeypatch.setattr(hf, "sparse_attention", spy)
    return calls


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("threshold", [1.0, 0.5])
def test_padded_batch_equals_single_runs(llama, side: str, threshold: float, monkeypatch: pytest.MonkeyPatch) -> None:
    lengths = [SEQ, 200, 77]
    seqs = [ids(length=n, seed=10 + i) for i, n in enumerate(lengths)]
    xa.apply(llama, xatt(threshold), record_stats=True, record_mass=True)
    singles = [logits(llama, s)[0] for s in seqs]
    single_density = [s["density"] for s in collected_stats(llama)]
    single_mass = [s["mass_kept"] for s in collected_stats(llama)]
    reset_stats(llama)

    batch = torch.zeros(len(seqs), SEQ, dtype=torch.long)
    mask = torch.zeros(len(seqs), SEQ, dtype=torch.long)
    for b, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
        cols = slice(SEQ - n, SEQ) if side == "left" else slice(0, n)
        batch[b, cols], mask[b, cols] = s[0], 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    calls = _spy_sparse(monkeypatch)
    out = logits(llama, batch, attention_mask=mask, position_ids=position_ids)
    assert calls == [(len(seqs), SEQ, tuple(lengths))] * 3  # one call per layer, on the right-aligned batch
    for b, n in enumerate(lengths):
        cols = slice(SEQ - n, SEQ) if side == "left" else slice(0, n)
        torch.testing.assert_close(out[b, cols], singles[b], rtol=2e-4, atol=2e-4)
    # density of the batch = mean of the single runs' densities, layer by layer
    stats = collected_stats(llama)
    per_layer = [sum(single_density[i::3]) / len(seqs) for i in range(3)]
    assert [s["density"] for s in stats] == pytest.approx(per_layer, abs=1e-6)
    # and row by row: row b of layer i is sequence b's own statistic
    for i, st in enumerate(stats):
        assert st["row_density"] == pytest.approx(single_density[i::3], abs=1e-6)
        assert st["row_mass_kept"] == pytest.approx(single_mass[i::3], abs=1e-5)


def test_non_contiguous_mask_is_rejected(llama) -> None:
    x = ids()
    mask = torch.ones_like(x)
    mask[0, 100:110] = 0
    xa.apply(llama, xatt(0.5))
    with pytest.raises(ValueError, match="contiguous"):
        logits(llama, x, attention_mask=mask)


def test_per_layer_mapping_and_thresholds(llama, tmp_path) -> None:
    x = ids()
    xa.apply(llama, {1: xatt(0.3)}, record_stats=True)
    stats = collected_stats(llama)
    logits(llama, x)
    stats = collected_stats(llama)
    assert [s["layer"] for s in stats] == [0, 1, 2]
    assert stats[0]["density"] is None and stats[2]["density"] is None
    assert stats[1]["density"] < 0.9

    # per-head thresholds: layer 0 at tau = 1 (everything kept), layers 1-2 low; from a tensor and from a file
    table = torch.full((3, 4), 0.3)
    table[0] = 1.0
    path = tmp_path / "thr.json"
    xa.save_thresholds(path, table, model_name="tiny-llama")
    for thresholds in (table, path, str(path)):
        xa.apply(llama, xatt(0.9), thresholds=thresholds, record_stats=True)
        logits(llama, x)
        density = [s["density"] for s in collected_stats(llama)]
        assert density[0] == pytest.approx(1.0)
        assert density[1] < 0.9 and density[2] < 0.9

    xa.save_thresholds(path, torch.full((3, 2), 0.5), model_name="tiny-llama")
    with pytest.raises(ValueError, match=r"\[3, 2\].*\[3, 4\]"):
        xa.apply(llama, xatt(0.9), thresholds=path)
    with pytest.raises(ValueError, match=r"\[2, 4\].*\[3, 4\]"):
        xa.apply(llama, xatt(0.9), thresholds=torch.full((2, 4), 0.5))
    with pytest.raises(ValueError, match="Dense has no threshold"):
        xa.apply(llama, xa.Dense(), thresholds=table)
    with pytest.raises(ValueError, match="not in"):
        xa.apply(llama, {5: xatt(0.5)})


def test_capture_qk_returns_post_rope_keys(llama) -> None:
    x = ids(length=64)
    captured = capture_qk(llama, x)
    assert sorted(captured) == [0, 1, 2]
    q, k = captured[2]
    assert q.shape == (1, 4, 64, 16) and k.shape == (1, 2, 64, 16)
    assert llama.config._attn_implementation == "sdpa"  # capture on a plain model leaves it plain
    with torch.no_grad():
        out = llama(input_ids=x, use_cache=True)
    cache = getattr(out, "cache", None)
    cache = out.past_key_values if cache is None else cache
    torch.testing.assert_close(k, cache.layers[2].keys)
    assert list(capture_qk(llama, x, layers=[1])) == [1]


def test_registered_name_works_in_from_config(llama) -> None:
    xa.register()
    xa.register()  # idempotent
    # a copy: _from_config sets the implementation on the config it is given, which the fixture's model shares
    model = transformers.LlamaForCausalLM._from_config(copy.deepcopy(llama.config), attn_implementation="xattention")
    model.load_state_dict(llama.state_dict())
    model.eval()
    assert model.config._attn_implementation == "xattention"
    assert llama.config._attn_implementation == "sdpa"
    x = ids()
    # default XAttention(): min_seq_len 12288 > 300, so the dense path runs
    torch.testing.assert_close(logits(model, x), logits(llama, x), rtol=1e-5, atol=1e-5)


def test_model_without_attention_interface_is_rejected() -> None:
    config = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=2)
    model = transformers.BloomForCausalLM(config)
    with pytest.raises(ValueError, match="BloomForCausalLM"):
        xa.apply(model, xatt(0.5))


def test_import_registers_nothing() -> None:
    # registering needs transformers: if importing xattention does not import it, nothing was registered
    code = "import sys, xattention; assert 'transformers' not in sys.modules, 'import xattention imported transformers'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def gemma() -> torch.nn.Module:
    layers = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    return tiny_gemma3(layers, kv_heads=2, head_dim=16, sliding_window=64, max_positions=1024)


def _spy_windows(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """Record (Lq, Lk, window) of every call the hook makes to sliding_window_attention."""
    calls: list[tuple[int, int, int]] = []
    real = hf.sliding_window_attention

    def spy(q, k, v, *, window, scale=None, backend="auto"):
        calls.append((q.shape[2], k.shape[2], window))
        return real(q, k, v, window=window, scale=scale, backend=backend)

    monkeypatch.setattr(hf, "sliding_window_attention", spy)
    return calls


def test_gemma3_local_layers_run_windowed_attention(gemma, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sliding layers (0, 2) go through sliding_window_attention, whatever the method; logits equal the untouched
    model's (fp32: tight) with Dense everywhere and with tau = 1 on the global layers (1, 3)."""
    x = ids()
    dense = logits(gemma, x)
    calls = _spy_windows(monkeypatch)
    for method in (xa.Dense(), xatt(1.0)):
        xa.apply(gemma, method, record_stats=True)
        torch.testing.assert_close(logits(gemma, x), dense, rtol=1e-5, atol=1e-5)
        assert calls == [(SEQ, SEQ, 64)] * 2
        calls.clear()
        assert [s["layer"] for s in collected_stats(gemma)] == [1, 3]  # statistics stay per full-attention layer
    xa.apply(gemma, xatt(0.3), record_stats=True)
    assert (logits(gemma, x) - dense).abs().max() > 1e-3
    assert all(s["density"] < 0.9 for s in collected_stats(gemma))
    assert len(calls) == 2
    assert sorted(capture_qk(gemma, x)) == [1, 3]


@pytest.fixture(scope="module")
def mistral() -> torch.nn.Module:
    return tiny_mistral(sliding_window=64, max_positions=2048)


def test_mistral_sliding_window_on_every_layer_runs_exactly(mistral, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 700-token prompt (raised "not causal attention over one contiguous run" before): every layer is local, so even
    a sparse method gives the untouched model's logits, and no [L, L] SDPA runs."""
    x = ids(length=700)
    dense = logits(mistral, x)
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    expected = mistral.generate(x[:, :200], **kw)
    calls = _spy_windows(monkeypatch)
    xa.apply(mistral, xatt(0.3))
    torch.testing.assert_close(logits(mistral, x), dense, rtol=1e-5, atol=1e-5)
    assert calls == [(700, 700, 64)] * 2
    # decode after a windowed prefill: the sliding cache keeps window - 1 keys; decode stays transformers' SDPA
    assert torch.equal(mistral.generate(x[:, :200], **kw), expected)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_sliding_layers_run_windowed_in_one_call(mistral, monkeypatch: pytest.MonkeyPatch, side: str) -> None:
    """A padded batch through sliding-window layers: one windowed call per layer on the right-aligned batch (was
    transformers' SDPA with its [B, 1, L, L] mask), each element's logits those of its single run."""
    lengths = [200, 150, 90]
    seqs = [ids(length=n, seed=20 + i) for i, n in enumerate(lengths)]
    xa.apply(mistral, xatt(0.5))
    singles = [logits(mistral, s)[0] for s in seqs]
    calls = _spy_windows(monkeypatch)
    batch = torch.zeros(3, 210, dtype=torch.long)
    mask = torch.zeros(3, 210, dtype=torch.long)
    cols = [slice(210 - n, 210) if side == "left" else slice(0, n) for n in lengths]
    for b, s in enumerate(seqs):
        batch[b, cols[b]], mask[b, cols[b]] = s[0], 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = logits(mistral, batch, attention_mask=mask, position_ids=position_ids)
    assert calls == [(200, 200, 64)] * 2  # width of the right-aligned batch: the longest element
    for b in range(3):
        torch.testing.assert_close(out[b, cols[b]], singles[b], rtol=2e-4, atol=2e-4)


def test_mask_is_read_once_per_forward(gemma, monkeypatch: pytest.MonkeyPatch) -> None:
    """One device read per mask tensor, not per layer: gemma-3 builds one full and one sliding mask per forward."""
    counts = {"real_spans": 0}
    for name in counts:
        real = getattr(hf, name)

        def counted(*args, _real=real, _name=name, **kw):
            counts[_name] += 1
            return _real(*args, **kw)

        monkeypatch.setattr(hf, name, counted)
    x = ids(length=200, batch=2)
    mask = torch.ones_like(x)
    mask[1, :50] = 0
    xa.apply(gemma, xatt(0.5))
    logits(gemma, x, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    assert counts == {"real_spans": 2}  # the full and the sliding mask
    logits(gemma, x[:1])  # no padding: the full layers' mask is None, only the sliding mask is read
    assert counts == {"real_spans": 3}


def test_gemma2_soft_capping_runs_transformers_eager_attention() -> None:
    """gemma-2 passes softcap (and sliding_window): SDPA cannot soft-cap, so every call runs the model's own eager
    attention and the logits are the untouched model's (its default implementation is eager)."""
    config = transformers.Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=32,
        max_position_embeddings=1024,
    )
    model = transformers.Gemma2ForCausalLM(config).eval()
    assert config.attn_logit_softcapping is not None
    x = ids(length=100)
    expected = logits(model, x)
    xa.apply(model, xatt(0.3))
    torch.testing.assert_close(logits(model, x), expected, rtol=1e-5, atol=1e-5)


def _compiled_generate(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Greedy 20 tokens with ``model.forward`` compiled; returns (tokens, frames compiled, graph breaks). The eager
    backend: recompiles are dynamo's decision (guards), independent of the backend, and it keeps the test fast."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model.forward = torch.compile(model.forward, backend="eager")
    try:
        out = model.generate(x, max_new_tokens=20, do_sample=False, pad_token_id=0)
    finally:
        del model.forward  # back to the class's forward
        frames, breaks = counters["frames"]["total"], sum(counters["graph_break"].values())
        torch._dynamo.reset()
    return out, frames, breaks


def test_compiled_decode_recompiles_no_more_than_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17: a graph break in every layer's prefill made dynamo compile each layer's frames apart (and every model
    forward sharing transformers' deprecation wrapper), so decode ran into the recompile limit. Now the compiled
    prefill traces the sparse path whole and a compiled xattention model compiles no more frames than a dense one."""
    model = tiny_llama(layers=2, max_positions=1024)
    x = ids(length=100)
    _, dense_frames, dense_breaks = _compiled_generate(model, x)
    xa.apply(model, xatt(0.9))
    expected = model.generate(x, max_new_tokens=20, do_sample=False, pad_token_id=0)
    traced = []
    real = hf.block_sparse_attention
    monkeypatch.setattr(hf, "block_sparse_attention", lambda *a, **kw: traced.append(1) or real(*a, **kw))
    got, frames, breaks = _compiled_generate(model, x)
    assert breaks == dense_breaks == 0
    assert frames <= dense_frames
    assert traced, "the compiled prefill did not trace the sparse path"
    assert torch.equal(got, expected)


def _count_syncs_in_hook(model: torch.nn.Module, mode: str, **inputs) -> int:
    """Run one forward with the registered attention function under ``torch.cuda.set_sync_debug_mode(mode)`` (only
    xattention's own code and the kernels it calls; transformers' model code is outside) and count the synchronising
    operations it reported ("warn" mode)."""
    import warnings

    from transformers.modeling_utils import AttentionInterface

    def guarded(*args, **kwargs):
        torch.cuda.set_sync_debug_mode(mode)
        try:
            return hf.xattention_attention_forward(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    AttentionInterface.register(hf.ATTN_IMPLEMENTATION, guarded)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                model(**inputs)
            torch.cuda.synchronize()
    finally:
        xa.register()
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.gpu
def test_cuda_prefill_never_synchronises_and_padding_reads_once(llama) -> None:
    """No host synchronisation in the sparse prefill of an unpadded prompt (error mode raises on the first one); a
    padded batch reads its mask once per forward, not once per layer (3 layers here)."""
    model = copy.deepcopy(llama).to("cuda", torch.bfloat16)
    xa.apply(model, xa.XAttention(block_size=64, stride=8, threshold=0.9, min_seq_len=0))
    x = ids(length=1024).cuda()
    _count_syncs_in_hook(model, "error", input_ids=x)
    mask = torch.ones(2, 1024, dtype=torch.long, device="cuda")
    mask[1, :300] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    syncs = _count_syncs_in_hook(model, "warn", input_ids=torch.cat([x, x]), attention_mask=mask, position_ids=position_ids)
    assert syncs == 1


@pytest.mark.gpu
def test_cuda_gemma3_prefill_reads_the_sliding_mask_once(gemma) -> None:
    """gemma-3 without padding: the full layers' mask is None (no read), the sliding layers' band mask is checked once
    for the forward; the local layers then run sliding_window_attention (FA4 where usable) without synchronising."""
    model = copy.deepcopy(gemma).to("cuda", torch.bfloat16)
    xa.apply(model, xa.XAttention(block_size=64, stride=8, threshold=0.9, min_seq_len=0))
    assert _count_syncs_in_hook(model, "warn", input_ids=ids(length=1024).cuda()) == 1


def test_dense_layers_run_fa4_dense_where_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dense layers and short inputs of an unpadded prefill go to the library's dense dispatch (FA4 where usable: faked
    present here), not transformers' SDPA; a padded batch keeps transformers' path."""
    calls: list[tuple[int, ...]] = []

    def fake_fa4_dense(q, k, v, *, causal=True, scale=None, backend="auto"):
        calls.append(tuple(q.shape))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    monkeypatch.setattr(hf, "fa4_usable", lambda device: True)
    monkeypatch.setattr(hf, "dense_attention", fake_fa4_dense)
    ids = torch.randint(1, VOCAB, (1, SEQ))
    llama = tiny_llama()
    with torch.no_grad():
        want = llama(ids).logits
        assert calls == []
        xa.apply(llama, xa.Dense())
        got = llama(ids).logits
        assert len(calls) == 3  # one prefill call per layer
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        calls.clear()
        # a padded batch: one call per layer on the right-aligned batch, each element as alone
        padded = torch.cat([torch.cat([torch.zeros(1, 20, dtype=torch.long), ids[:, :280]], dim=1), ids])
        mask = (padded != 0).long()
        got = llama(padded, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        assert calls == [(2, 4, SEQ, 16)] * 3
        torch.testing.assert_close(got[0, 20:], llama(ids[:, :280]).logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], want[0], atol=1e-5, rtol=1e-5)
    xa.remove(llama)
