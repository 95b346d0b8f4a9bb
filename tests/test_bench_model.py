"""``xattention bench model`` on tiny random models on the CPU (no download): the CLI end to end (JSON fields, stage
split, answer check, PNG), gemma-3's sliding-window layers as the local stage, RoPE interpolation beyond the trained
context, the composed rows of random-weight models, and that profiling leaves transformers and the methods as found.
Only the CUDA-event and CUDA-memory calls are not exercised here."""

from __future__ import annotations

import json
import math

import pytest
import torch

from test_demo import PNG_MAGIC, tiny_llama, tiny_tokenizer
from xattention import XAttention
from xattention.benchmarks import model as bm
from xattention.cli import build_parser

transformers = pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

SPARSE = "xattention:block_size=64,threshold=0.5"
ROW_FIELDS = {
    "length", "tokens", "config", "label", "method", "composed", "ttft_ms", "prefill_ms", "decode_ms",
    "peak_memory_bytes", "start_memory_bytes", "density", "layer_density", "answer", "profiled", "rope_factor",
    "speed_only", "backend", "speed_valid", "ttft_vs_sdpa",
}  # fmt: skip
RECORD_FIELDS = {
    "benchmark", "model", "random_weights", "model_info", "gpu", "device", "date", "torch", "transformers", "triton",
    "cuda", "capability", "dtype", "fa4", "params", "rows", "notes", "stopped", "seconds",
}  # fmt: skip


def check_stages(row: dict) -> None:
    prof = row["profiled"]
    stages = prof["stages_ms"]
    assert set(stages) == set(bm.STAGES)
    assert all(v >= 0.0 for v in stages.values()), stages
    assert sum(stages.values()) <= prof["ttft_ms"] * (1 + 1e-9) + 1e-9
    assert prof["ttft_ms"] == pytest.approx(prof["prefill_ms"] + prof["decode_step_ms"])


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def run_cli(tmp_path, monkeypatch, tok, *options: str):
    """``xattention bench model`` on a tiny Llama (loaded by a stub) on the CPU, 320 tokens, with ``options``."""
    model = tiny_llama(len(tok))
    monkeypatch.setattr(bm, "load_bench_model", lambda name, device, dtype: (model, tok))
    args = build_parser().parse_args(["bench", "model", "--model", "tiny", "--lengths", "320", "--device", "cpu",
                                      "--dtype", "float32", "--out", str(tmp_path), *options])  # fmt: skip
    assert args._main(args) == 0
    return model


def test_cli_end_to_end_on_a_tiny_llama(tmp_path, monkeypatch, capsys, tok) -> None:
    model = run_cli(tmp_path, monkeypatch, tok, "--methods", f"sdpa,dense-xa,{SPARSE}", "--warmup", "1", "--repeats", "2",
                    "--answer-tokens", "4")  # fmt: skip
    (path,) = tmp_path.glob("cpu-*-model-tiny.json")
    record = json.loads(path.read_text())
    assert set(record) >= RECORD_FIELDS
    assert (record["gpu"], record["benchmark"], record["random_weights"]) == ("cpu", "model", False)
    assert record["params"]["repeats"] == 2 and record["params"]["specs"] == ["sdpa", "dense-xa", SPARSE]
    assert record["model_info"]["layers"] == 3 and record["fa4"]["usable"] in (False, None, True)
    assert [r["config"] for r in record["rows"]] == ["sdpa", "dense-xa", SPARSE]
    for row in record["rows"]:
        assert set(row) >= ROW_FIELDS, ROW_FIELDS - set(row)
        assert len(row["ttft_ms"]["all"]) == 2 and row["ttft_ms"]["best"] <= row["ttft_ms"]["median"]
        assert row["ttft_ms"]["best"] == pytest.approx(min(
            p + d for p, d in zip(row["prefill_ms"]["all"], row["decode_ms"]["all"], strict=True)))  # fmt: skip
        assert row["peak_memory_bytes"] is None  # CPU
        assert row["answer"]["expected"] and row["answer"]["status"] in ("pass", "same as dense", "fail")
        assert row["tokens"] <= 320 - 4 and not row["speed_only"] and row["rope_factor"] == 1.0
        check_stages(row)
    sdpa, dense_xa, sparse = record["rows"]
    assert sdpa["speed_valid"] and sdpa["method"] is None and sdpa["density"] == 1.0 and sdpa["ttft_vs_sdpa"] == 1.0
    assert sparse["ttft_vs_sdpa"] == pytest.approx(sdpa["ttft_ms"]["best"] / sparse["ttft_ms"]["best"])
    assert sdpa["profiled"]["attention_calls"] == {"sparse": 0, "dense": 3, "local": 0}
    assert dense_xa["method"]["name"] == "dense" and dense_xa["profiled"]["attention_calls"]["dense"] == 3
    assert sparse["method"]["min_seq_len"] == 0 and sparse["profiled"]["attention_calls"]["sparse"] == 3
    assert 0.0 < sparse["density"] < 1.0 and len(sparse["layer_density"]) == 3
    assert sparse["profiled"]["stages_ms"]["selection"] > 0 and sparse["profiled"]["stages_ms"]["dense_attention"] == 0
    assert (tmp_path / f"{path.stem}.png").read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert "TTFT best ms" in printed and SPARSE in printed
    assert model.config._attn_implementation == "sdpa"  # left as found


def tiny_gemma(vocab_size: int):
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=64, max_position_embeddings=1024,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    )  # fmt: skip
    return transformers.Gemma3ForCausalLM(config).eval()


def test_gemma3_sliding_layers_are_the_local_stage(tok) -> None:
    model = tiny_gemma(len(tok))
    settings = bm.Settings(lengths=(320,), specs=("sdpa", SPARSE), warmup=0, repeats=1, answer_tokens=3)
    record = bm.run(model, tok, "tiny-gemma", settings)
    assert record["model_info"]["sliding_window_layers"] == 2
    sdpa, sparse = record["rows"]
    assert sdpa["profiled"]["attention_calls"] == {"sparse": 0, "dense": 2, "local": 2}
    assert sparse["profiled"]["attention_calls"] == {"sparse": 2, "dense": 0, "local": 2}
    assert len(sparse["layer_density"]) == 2  # the full-attention layers only
    for row in record["rows"]:
        check_stages(row)
        assert row["profiled"]["stages_ms"]["local_attention"] > 0


def test_rope_interpolation_beyond_the_trained_context(tok) -> None:
    model = tiny_llama(len(tok))
    model.config.max_position_embeddings = 256
    rotary = model.model.rotary_emb
    original = rotary.inv_freq.clone()
    state = bm._rope_settings(model)
    bm.set_rope_factor(model, 2.0, state)
    torch.testing.assert_close(rotary.inv_freq, original / 2)
    assert model.config.rope_parameters["rope_type"] == "linear"
    bm.set_rope_factor(model, 1.0, state)
    torch.testing.assert_close(rotary.inv_freq, original)

    assert bm.rope_factor("auto", 256, 256) == 1.0 and bm.rope_factor("auto", 400, 256) == 1.75
    assert bm.rope_factor(3.0, 100, 256) == 3.0 and bm.rope_factor("auto", 10**6, None) == 1.0
    settings = bm.Settings(lengths=(256, 512), specs=("sdpa",), warmup=0, repeats=1, answer_tokens=3)
    seen = []

    def during(record: dict) -> None:
        seen.append(float(rotary.inv_freq[1] / original[1]))

    record = bm.run(model, tok, "tiny", settings, on_row=during)
    short, long = record["rows"]
    assert (short["rope_factor"], short["speed_only"]) == (1.0, False)
    assert (long["rope_factor"], long["speed_only"], long["speed_valid"]) == (2.0, True, True)
    assert seen == pytest.approx([1.0, 0.5])
    assert any("speed only" in n for n in record["notes"])
    torch.testing.assert_close(rotary.inv_freq, original)  # restored after the run


def fake_kernel_record(tmp_path, length: int) -> str:
    s8 = {"stride": 8, "shared_kv_mask": False, "density": 0.1, "estimate_ms": 0.25, "end_to_end_ms": 0.75}
    s16 = {"stride": 16, "shared_kv_mask": False, "density": 0.1, "estimate_ms": 0.1, "end_to_end_ms": 0.5}
    row = {"length": length, "dense_cudnn_ms": 2.0, "selection": [s8, s16]}
    record = {"gpu": "NVIDIA H200", "date": "2026-11-29", "params": {"q_heads": 4, "kv_heads": 2, "head_dim": 16,
              "threshold": 0.9}, "rows": [row]}  # fmt: skip
    path = tmp_path / "nvidia-h200-2026-11-29-kernels.json"
    path.write_text(json.dumps(record))
    return str(path)


def test_random_weights_add_composed_rows(tmp_path) -> None:
    model = tiny_llama(100)  # 3 layers, 4 query / 2 KV heads of 16: the fake kernel record's shape
    settings = bm.Settings(lengths=(256,), specs=("sdpa", "xattention:block_size=64,stride=8"), warmup=0, repeats=1)
    record = bm.run(model, None, "tiny-random", settings, random_weights=True, kernel_record=fake_kernel_record(tmp_path, 256))
    measured = [r for r in record["rows"] if not r["composed"]]
    composed = {r["config"]: r for r in record["rows"] if r["composed"]}
    assert [r["answer"]["status"] for r in measured] == ["skipped (random weights)"] * 2
    assert measured[0]["tokens"] == 256 and measured[1]["density"] <= 1.0
    assert set(composed) == {"dense (composed)", "xattention:block_size=64,stride=8 (composed)"}
    stages = measured[0]["profiled"]["stages_ms"]
    other = stages["rest"] + stages["decode_step"]
    dense = composed["dense (composed)"]
    assert dense["ttft_ms"]["best"] == pytest.approx(other + 3 * 2.0)
    sparse = composed["xattention:block_size=64,stride=8 (composed)"]
    assert sparse["ttft_ms"]["best"] == pytest.approx(other + 3 * 0.75)
    assert sparse["profiled"]["stages_ms"]["selection"] == pytest.approx(3 * 0.25)
    assert sparse["composition"]["non_attention_ms"] == pytest.approx(other) and sparse["density"] == 0.1
    for row in record["rows"]:
        assert ROW_FIELDS - {"backend", "start_memory_bytes", "prefill_ms", "decode_ms"} <= set(row)
        if not row["composed"]:
            check_stages(row)
    assert "composed rows (2)" in " ".join(record["notes"])
    bm.plot(record, tmp_path / "r.png")
    assert "(composed)" in bm.format_table(record)

    missing = bm.run(model, None, "tiny-random", settings, random_weights=True, kernel_record=tmp_path / "none.json")
    assert not any(r["composed"] for r in missing["rows"]) and "no kernel record" in missing["notes"][0]


def test_profiling_restores_transformers_and_the_method(tok) -> None:
    from transformers.modeling_utils import AttentionInterface

    from xattention.integrations import hf

    model = tiny_llama(len(tok))
    ids = torch.randint(0, len(tok), (1, 200))
    sdpa_before = AttentionInterface._global_mapping["sdpa"]
    method = XAttention(block_size=64, threshold=0.5, min_seq_len=0)
    with bm.applied(model, method):
        xa_before = AttentionInterface._global_mapping["xattention"]
        result = bm.profile_stages(model, ids, method)
        assert AttentionInterface._global_mapping["xattention"] is xa_before
    assert AttentionInterface._global_mapping["sdpa"] is sdpa_before
    assert XAttention.__dict__["estimate"].__name__ == "estimate" and "_timed" not in XAttention.estimate.__qualname__
    assert result["attention_calls"] == {"sparse": 3, "dense": 0, "local": 0}
    assert result["ttft_ms"] == pytest.approx(sum(result["stages_ms"].values()))
    assert not hasattr(model, "_xattention_state") and model.config._attn_implementation != hf.ATTN_IMPLEMENTATION


def test_ttft_and_configs_check_their_arguments() -> None:
    configs = bm.parse_configs(["dense", "dense-xa", "xattention:stride=16"])
    assert [c.spec for c in configs] == ["sdpa", "dense-xa", "xattention:stride=16"]
    assert [c.dense for c in configs] == [True, True, False] and configs[2].method.min_seq_len == 0
    assert bm.parse_configs(["xattention:min_seq_len=12288"])[0].method.min_seq_len == 12288
    with pytest.raises(ValueError, match="twice"):
        bm.parse_configs(["sdpa", "dense"])
    with pytest.raises(ValueError, match="unknown method"):
        bm.parse_configs(["nope"])
    with pytest.raises(ValueError, match="repeats"):
        bm.time_to_first_token(None, torch.zeros(1, 4, dtype=torch.long), repeats=0)
    with pytest.raises(ValueError, match="cuda or cpu"):
        bm._Clock(torch.device("meta"))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "model", "--rope-scale", "0.5"])


def test_llama_8b_shape_and_the_demo_length_helper() -> None:
    config = bm.llama_8b_config()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (
        4096, 32, 32, 8)  # fmt: skip
    assert (config.intermediate_size, config.vocab_size, config.head_dim) == (14336, 128256, 128)
    theta = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
    assert theta["rope_theta"] == 500000.0
    # 8B parameters: 16 GB in bf16 (counted from the shapes, without building it)
    h, i, v, n = 4096, 14336, 128256, 32
    params = 2 * v * h + n * (2 * h * h + 2 * h * 1024 + 3 * h * i + 2 * h) + h
    assert math.isclose(params / 1e9, 8.03, rel_tol=0.01)
    small = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    model = bm.random_llama(small, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and torch.get_default_dtype() == torch.float32
    model.config.max_position_embeddings = 8192
    assert bm.longest_prompt(model, 12) == 8192 - 12 - bm.PROMPT_SLACK


def test_demo_prints_ttft_at_the_longest_prompt(tmp_path, tok) -> None:
    """The demo's GPU behaviour on the CPU: length None (the model's longest prompt) and measured TTFT for both."""
    pytest.importorskip("rich")
    from rich.console import Console

    from xattention import demo

    model = tiny_llama(len(tok))
    model.config.max_position_embeddings = 600
    console = Console(record=True, width=140)
    result = demo.run_demo(model, tok, length=None, threshold=0.3, block_size=64, layer=1, out=tmp_path / "d.png",
                           console=console, ttft_repeats=1, max_new_tokens=4)  # fmt: skip
    assert result["prompt"].input_ids.shape[1] <= 600 - 4
    assert result["prompt"].input_ids.shape[1] >= 600 - 4 - bm.PROMPT_SLACK - 30
    assert all(r.ttft_s is not None and r.ttft_s > 0 for r in result["results"])
    text = console.export_text()
    assert "TTFT" in text and "time to first token" in text
    assert model.config._attn_implementation == "sdpa"


def test_chunked_prefill_rows(tmp_path, monkeypatch, tok) -> None:
    """--chunk-size: the timed and profiled prefills go through xattention.prefill in chunks (one attention call per
    layer and chunk), and the record is written apart (model-NAME-chunkN)."""
    run_cli(tmp_path, monkeypatch, tok, "--methods", f"sdpa,{SPARSE}", "--warmup", "0", "--repeats", "1",
            "--answer-tokens", "2", "--chunk-size", "128")  # fmt: skip
    (path,) = tmp_path.glob("cpu-*-model-tiny-chunk128.json")
    record = json.loads(path.read_text())
    assert record["params"]["chunk_size"] == 128
    sdpa, sparse = record["rows"]
    chunks = math.ceil(sparse["tokens"] / 128)
    assert sdpa["profiled"]["attention_calls"]["dense"] == 3 * chunks
    assert sum(sparse["profiled"]["attention_calls"].values()) == 3 * chunks
    bad = build_parser().parse_args(["bench", "model", "--model", "tiny", "--chunk-size", "0", "--device", "cpu"])
    with pytest.raises(ValueError, match="chunk-size"):
        bad._main(bad)
