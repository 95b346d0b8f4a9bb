"""The evaluation runner: results lines, resume after an interrupt, prompt reuse, batching, context checks, reports.

A fake model (its ``generate`` answers with the first 5-7 digit number of the prompt) and a fake integration make the
bookkeeping tests fast; one test runs a tiny random LlamaForCausalLM through the real Hugging Face integration.
"""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

import xattention as xa
from test_eval_tasks import WordTokenizer
from xattention.evaluation import report, runner
from xattention.evaluation.runner import EvalConfig, parse_lengths, parse_methods, read_results, run_eval
from xattention.evaluation.tasks import SampleGenerator


class EchoModel:
    """``generate`` answers each prompt with its first 5-7 digit number (the needle of passkey and niah_single_1)."""

    def __init__(self, tokenizer: WordTokenizer, *, context: int = 8192, fail_after: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = SimpleNamespace(max_position_embeddings=context)
        self.device = torch.device("cpu")
        self.fail_after = fail_after
        self.calls: list[dict] = []
        self.method: str | None = None

    def eval(self) -> EchoModel:
        return self

    def generate(self, input_ids, attention_mask, max_new_tokens, logits_processor=None, **kwargs):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt
        assert kwargs["do_sample"] is False
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            real = [i for i, m in zip(ids, mask, strict=True) if m]
            assert mask == sorted(mask), "padding must be on the left"
            self.calls.append({"method": self.method, "ids": real})
            number = re.search(r"\b\d{5,7}\b", self.tokenizer.decode(real))
            answer = self.tokenizer.encode(number.group(0) if number else "none", add_special_tokens=False)
            rows.append((answer + [self.tokenizer.eos_token_id] * max_new_tokens)[:max_new_tokens])
        if logits_processor is not None:
            logits_processor(input_ids, torch.zeros(len(rows), 8))
        return torch.cat([input_ids, torch.tensor(rows, dtype=torch.long)], dim=1)


class FakeIntegration:
    """Records apply/remove; reports two prefill layers (density 0.4 and 0.6 for sparse methods) and a decode step."""

    def __init__(self) -> None:
        self.model: EchoModel | None = None
        self.stats: list[dict] = []
        self.applied: list[str] = []
        self.thresholds: list[str | None] = []

    def apply(self, model, method, *, record_stats=False, record_mass=False, thresholds=None):
        assert record_stats and model.method is None
        model.method = method.name
        self.applied.append(method.name)
        self.thresholds.append(thresholds)
        return model

    def remove(self, model):
        model.method = None
        return model

    def reset_stats(self, model):
        self.stats = []

    def collected_stats(self, model):
        sparse = model.method != "dense"
        prefill = [
            {"layer": i, "q_len": 100, "k_len": 100, "density": d if sparse else None, "mass_kept": 0.9 if sparse else None}
            for i, d in enumerate((0.4, 0.6))
        ]
        return [*prefill, {"layer": 0, "q_len": 1, "k_len": 101, "density": 0.01, "mass_kept": 0.01}]


def make_loader(model: EchoModel, calls: list | None = None):
    def load_model(name, *, device=None, dtype=None):
        if calls is not None:
            calls.append(name)
        return model, model.tokenizer

    return load_model


def config(tmp_path, **kw) -> EvalConfig:
    base = dict(model="fake", tasks="passkey,niah_single_1", lengths="1k,2k", methods="dense,xattention:threshold=0.9",
                samples=3, out=tmp_path / "run", progress=False)  # fmt: skip
    base.update(kw)
    return EvalConfig(**base)


def keys(records):
    return [(r["task"], r["length"], r["sample"], r["method"]) for r in records]


def expected_keys(cfg: EvalConfig):
    return {(t, n, i, m) for t in ("passkey", "niah_single_1") for n in (1024, 2048) for i in range(cfg.samples) for m in
            ("dense", "xattention:threshold=0.9")}  # fmt: skip


def test_parse_lengths_and_methods() -> None:
    assert parse_lengths("4k, 1k,1024,1.5k") == [1024, 1536, 4096]
    for bad in ("4q", "-1", "1.3", "0", ""):
        with pytest.raises(ValueError, match="length"):
            parse_lengths(bad)
    labels = [label for label, _ in parse_methods("dense, xattention:threshold=0.9,stride=16,xattention:stride=8,dense")]
    assert labels == ["dense", "xattention:threshold=0.9,stride=16", "xattention:stride=8"]
    method = parse_methods("xattention:threshold=0.8,stride=16")[0][1]
    assert (method.threshold, method.stride, method.min_seq_len) == (0.8, 16, 0)  # sparse at every length
    with pytest.raises(ValueError, match="unknown method"):
        parse_methods("dense,nosuch")
    with pytest.raises(ValueError, match="no parameter 'tau'"):
        parse_methods("xattention:tau=0.9")


def test_results_lines(tmp_path) -> None:
    tok = WordTokenizer()
    model, integ = EchoModel(tok), FakeIntegration()
    cfg = config(tmp_path)
    path = run_eval(cfg, load_model=make_loader(model), integration=integ)
    records = read_results(path)
    assert len(records) == 24 and set(keys(records)) == expected_keys(cfg)
    for r in records:
        sample = SampleGenerator(WordTokenizer()).generate(r["task"], r["length"], r["sample"])
        assert r["references"] == sample.references and r["tokens"] == sample.tokens and r["seed"] == sample.seed
        assert r["prediction"] == sample.references[0] and r["score"] == 1.0  # the echo answer is right
        assert r["model"] == "fake" and r["prefill_ms"] >= 0 and r["mass_kept"] is None
        if r["method"] == "dense":
            assert r["density"] == 1.0 and r["method_params"]["block_size"] == 128
        else:  # mean over the two prefill layers; the decode step (q_len 1) is left out
            assert math.isclose(r["density"], 0.5) and r["method_params"]["threshold"] == 0.9
            assert r["layer_density"] == {"0": 0.4, "1": 0.6}
            assert r["method_params"]["min_seq_len"] == 0


def test_prompts_are_generated_once_and_shared_by_methods(tmp_path, monkeypatch) -> None:
    counted: list[tuple] = []
    original = SampleGenerator.generate

    def counting(self, task, length, index):
        counted.append((task, length, index))
        return original(self, task, length, index)

    monkeypatch.setattr(SampleGenerator, "generate", counting)
    model = EchoModel(WordTokenizer())
    run_eval(config(tmp_path), load_model=make_loader(model), integration=FakeIntegration())
    assert len(counted) == len(set(counted)) == 2 * 2 * 3
    by_method: dict[str, list] = {}
    for call in model.calls:
        by_method.setdefault(call["method"], []).append(call["ids"])
    assert by_method["dense"] == by_method["xattention"]


def test_resume_after_interrupt(tmp_path) -> None:
    tok = WordTokenizer()
    cfg = config(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_eval(cfg, load_model=make_loader(EchoModel(tok, fail_after=5)), integration=FakeIntegration())
    path = tmp_path / "run" / "results.jsonl"
    first = path.read_text().splitlines()
    assert len(first) == 5
    with path.open("a") as fh:  # a write cut short by the interrupt
        fh.write('{"task": "passkey", "length": 10')

    model = EchoModel(tok)
    run_eval(cfg, load_model=make_loader(model), integration=FakeIntegration())
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is whole JSON
    assert lines[:5] == first
    assert len(records) == 24 and len(set(keys(records))) == 24 and set(keys(records)) == expected_keys(cfg)
    assert len(model.calls) == 24 - 5  # only the missing ones ran

    loads: list[str] = []
    run_eval(cfg, load_model=make_loader(EchoModel(tok), loads), integration=FakeIntegration())
    assert loads == [] and path.read_text().splitlines() == lines  # nothing left: no model load, nothing appended


def test_time_budget_stops_between_batches_and_keeps_cells_balanced(tmp_path) -> None:
    tok = WordTokenizer()
    cfg = config(tmp_path, time_budget=1e-9, batch_size=2)
    rounds = 0
    while True:
        rounds += 1
        try:
            run_eval(cfg, load_model=make_loader(EchoModel(tok)), integration=FakeIntegration())
            break
        except runner.TimeBudgetExceeded as exc:
            records = read_results(tmp_path / "run" / "results.jsonl")
            assert exc.done == len(records) and exc.total == 24
    # one batch per run: a batch of 2 holds both tasks of one sample index, so 3 rounds (samples 0, 1, 2) x 2 lengths x
    # 2 methods; the last run ends normally
    assert rounds == 3 * 2 * 2
    records = read_results(tmp_path / "run" / "results.jsonl")
    assert sorted(keys(records)) == sorted(expected_keys(cfg))
    # samples 0-1 of every (task, length, method) come before any sample 2
    assert [r["sample"] for r in records[:16]].count(2) == 0


def test_more_samples_later_extends_the_run(tmp_path) -> None:
    tok = WordTokenizer()
    run_eval(config(tmp_path, samples=2), load_model=make_loader(EchoModel(tok)), integration=FakeIntegration())
    model = EchoModel(tok)
    run_eval(config(tmp_path, samples=3), load_model=make_loader(model), integration=FakeIntegration())
    records = read_results(tmp_path / "run" / "results.jsonl")
    assert len(records) == 24 and len(model.calls) == 8


def test_batching_left_pads_and_matches_single(tmp_path) -> None:
    tok = WordTokenizer()
    single = read_results(run_eval(config(tmp_path / "a"), load_model=make_loader(EchoModel(tok)), integration=FakeIntegration()))
    model = EchoModel(tok)
    batched = read_results(
        run_eval(config(tmp_path / "b", batch_size=2), load_model=make_loader(model), integration=FakeIntegration())
    )
    assert {k: r["prediction"] for k, r in zip(keys(single), single, strict=True)} == {
        k: r["prediction"] for k, r in zip(keys(batched), batched, strict=True)
    }
    assert max(r["batch_size"] for r in batched) == 2


def test_length_beyond_context_fails_before_generation(tmp_path) -> None:
    model = EchoModel(WordTokenizer(), context=1500)
    with pytest.raises(ValueError, match="length 2048 exceeds fake's context of 1500 tokens"):
        run_eval(config(tmp_path), load_model=make_loader(model), integration=FakeIntegration())
    assert model.calls == []


def test_context_from_files_before_loading(tmp_path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 1536}}))
    assert runner.context_limit_from_files(str(folder)) == 1536
    loads: list[str] = []
    with pytest.raises(ValueError, match="exceeds"):
        run_eval(config(tmp_path, model=str(folder)), load_model=make_loader(EchoModel(WordTokenizer()), loads))
    assert loads == []

    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(3000)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert runner.context_limit_from_files(str(path)) == 3000
    assert runner.context_limit_from_files("no-such-model") is None


def _tiny_llama():
    """A 2-layer random LlamaForCausalLM (4 query / 2 KV heads) and a word tokenizer for it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval(), WordTokenizer(vocab_size=512)


def test_tiny_llama_through_the_real_integration(tmp_path) -> None:
    hf = pytest.importorskip("xattention.integrations.hf")
    model, tok = _tiny_llama()
    run = config(tmp_path, tasks="passkey", lengths="512", methods="dense,xattention:threshold=0.3", samples=2,
                 max_new_tokens=3, batch_size=2, mass=True)  # fmt: skip
    records = read_results(run_eval(run, load_model=lambda name, **kw: (model, tok), integration=hf))
    assert len(records) == 4
    by_method = {r["method"]: r for r in records if r["sample"] == 0}
    assert by_method["dense"]["density"] == 1.0 and by_method["dense"]["mass_kept"] == 1.0
    sparse = by_method["xattention:threshold=0.3"]
    assert 0.0 < sparse["density"] < 1.0 and 0.0 < sparse["mass_kept"] <= 1.0
    assert all(r["prefill_ms"] > 0 and 400 < r["tokens"] <= 509 for r in records)
    assert not hasattr(model, "_xattention_state")  # removed after the run


def test_report_numbers_and_files(tmp_path) -> None:
    records = []
    for i, s in enumerate((1.0, 0.0, 1.0, 1.0)):  # task a: mean 75, sd 50, se 25
        records.append({"model": "m", "task": "passkey", "length": 1024, "method": "dense", "score": s, "density": 1.0,
                        "sample": i, "seed": i})  # fmt: skip
    for i, s in enumerate((0.5, 0.5)):  # task b: mean 50, se 0
        records.append({"model": "m", "task": "vt", "length": 1024, "method": "dense", "score": s, "density": 1.0,
                        "sample": i, "seed": i})  # fmt: skip
    for i, (s, d) in enumerate(((1.0, 0.2), (0.0, 0.4))):
        records.append({"model": "m", "task": "vt", "length": 1024, "method": "xattention", "score": s, "density": d,
                        "sample": i, "seed": i})  # fmt: skip
    summary = report.write_report(tmp_path, records)
    cells = {(c["task"], c["method"]): c for c in summary["cells"]}
    assert cells[("passkey", "dense")]["score"] == 75.0 and math.isclose(cells[("passkey", "dense")]["stderr"], 25.0)
    assert cells[("vt", "xattention")]["stderr"] == 50.0 and math.isclose(cells[("vt", "xattention")]["density"], 0.3)
    (avg,) = [a for a in summary["averages"] if a["method"] == "dense"]
    assert avg["score"] == 62.5 and math.isclose(avg["stderr"], math.sqrt(25.0**2 + 0.0**2) / 2)
    # paired with dense on vt samples 0, 1: differences (1.0 - 0.5, 0.0 - 0.5) x 100 = (+50, -50)
    (diff,) = summary["differences"]
    assert (diff["method"], diff["tasks"], diff["difference"], diff["stderr"]) == ("xattention", 1, 0.0, 50.0)
    md = (tmp_path / "summary.md").read_text()
    assert "| xattention | +0.0 ± 50.0 |" in md
    assert "| dense | 62.5 ± 12.5 (d=1.00) |\n" in md and "| passkey | 1K | 75.0 ± 25.0 (d=1.00) |" in md
    assert "| xattention | 50.0 ± 50.0 (d=0.30) [1/2 tasks] |" in md  # averaged over fewer tasks: flagged
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    png = (tmp_path / "score_vs_density.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    with pytest.raises(ValueError, match=r"no results\.jsonl"):
        report.write_report(tmp_path / "empty")


class RowStatsIntegration(FakeIntegration):
    """Like FakeIntegration, but the sparse layers report one density per batch row: 0.1 x (row + 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.batch = 0

    def collected_stats(self, model):
        stats = super().collected_stats(model)
        if model.method != "dense":
            rows = [0.1 * (r + 1) for r in range(self.batch)]
            for st in stats[:2]:
                st["row_density"] = rows
                st["density"] = sum(rows) / len(rows)
        return stats


class CountingModel(EchoModel):
    """``generate`` answers every row with max_new_tokens number words: "0 1 2 ...", and records the batch tasks."""

    def __init__(self, tokenizer, integration: RowStatsIntegration) -> None:
        super().__init__(tokenizer)
        self.integration = integration
        self.budgets: list[int] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, logits_processor=None, **kwargs):
        self.integration.batch = len(input_ids)
        self.budgets.append(max_new_tokens)
        words = self.tokenizer.encode(" ".join(str(i % 10) for i in range(max_new_tokens)), add_special_tokens=False)
        rows = [words[:max_new_tokens]] * len(input_ids)
        return torch.cat([input_ids, torch.tensor(rows, dtype=torch.long)], dim=1)


def test_batches_mix_tasks_and_keep_each_sample_s_own_budget_and_statistics(tmp_path) -> None:
    from xattention.evaluation.tasks import TASKS

    tok = WordTokenizer()
    integ = RowStatsIntegration()
    model = CountingModel(tok, integ)
    cfg = config(tmp_path, tasks="passkey,vt", lengths="1k", samples=2, batch_size=4)
    records = read_results(run_eval(cfg, load_model=make_loader(model), integration=integ))
    assert len(records) == 8 and {r["batch_size"] for r in records} == {4}  # one batch per method: 2 tasks x 2 samples
    assert model.budgets == [max(TASKS["passkey"].max_new_tokens, TASKS["vt"].max_new_tokens)] * 2
    for r in records:  # each answer cut to its own task's budget
        assert len(r["prediction"].split()) == TASKS[r["task"]].max_new_tokens
    sparse = [r for r in records if r["method"] != "dense"]
    # rows in order passkey 0, passkey 1, vt 0, vt 1: each record carries its own row's density
    order = [("passkey", 0), ("passkey", 1), ("vt", 0), ("vt", 1)]
    for r in sparse:
        row = order.index((r["task"], r["sample"]))
        assert r["density"] == pytest.approx(0.1 * (row + 1))
        assert r["layer_density"] == {"0": pytest.approx(0.1 * (row + 1)), "1": pytest.approx(0.1 * (row + 1))}


def _thresholds_file(path, value: float = 0.9) -> str:
    from xattention.thresholds import save_thresholds

    save_thresholds(path, torch.full((2, 4), value, dtype=torch.float64), model_name="tiny")
    return str(path)


def test_thresholds_in_a_method_spec(tmp_path) -> None:
    path = _thresholds_file(tmp_path / "t.json")
    ((label, method),) = parse_methods(f"xattention:stride=8,thresholds={path}")
    assert label == f"xattention:stride=8,thresholds={path}" and method.stride == 8
    assert runner.method_thresholds(label) == path and runner.method_thresholds("xattention:stride=8") is None
    with pytest.raises(ValueError, match="not both"):
        parse_methods(f"xattention:threshold=0.9,thresholds={path}")
    with pytest.raises(ValueError, match="does not exist"):
        parse_methods(f"xattention:thresholds={tmp_path / 'missing.json'}")
    with pytest.raises(ValueError, match="has no threshold"):
        parse_methods(f"streaming:thresholds={path}")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError):
        parse_methods(f"xattention:thresholds={tmp_path / 'bad.json'}")

    integ = FakeIntegration()
    cfg = config(tmp_path, methods=f"dense,xattention:thresholds={path}", lengths="1k", samples=1)
    records = read_results(run_eval(cfg, load_model=make_loader(EchoModel(WordTokenizer())), integration=integ))
    assert integ.thresholds.count(path) == integ.thresholds.count(None) == 2  # 2 tasks, dense and per-head
    assert {r["method"]: r["thresholds"] for r in records} == {"dense": None, f"xattention:thresholds={path}": path}


def test_per_head_thresholds_reach_a_real_model(tmp_path) -> None:
    hf = pytest.importorskip("xattention.integrations.hf")
    model, tok = _tiny_llama()
    low, high = _thresholds_file(tmp_path / "low.json", 0.3), _thresholds_file(tmp_path / "high.json", 1.0)
    run = config(tmp_path, tasks="passkey", lengths="512", samples=1, max_new_tokens=3, mass=True,
                 methods=f"xattention:threshold=0.3,xattention:thresholds={low},xattention:thresholds={high}")  # fmt: skip
    records = {r["method"]: r for r in read_results(run_eval(run, load_model=lambda name, **kw: (model, tok), integration=hf))}
    # every head at 0.3 from a file is the same as threshold=0.3; every head at 1.0 keeps every visible block
    assert records[f"xattention:thresholds={low}"]["density"] == records["xattention:threshold=0.3"]["density"] < 1.0
    assert records[f"xattention:thresholds={high}"]["density"] == 1.0
    from xattention.thresholds import save_thresholds

    wrong = tmp_path / "wrong.json"  # thresholds of a 3-layer model
    save_thresholds(wrong, torch.full((3, 4), 0.9, dtype=torch.float64), model_name="other")
    run = config(tmp_path / "w", tasks="passkey", lengths="512", samples=1, max_new_tokens=3,
                 methods=f"xattention:thresholds={wrong}")  # fmt: skip
    with pytest.raises(ValueError, match=r"\[3, 4\] but the model needs \[2, 4\]"):
        run_eval(run, load_model=lambda name, **kw: (model, tok), integration=hf)


def test_a_thresholds_spec_from_method_from_spec_runs_in_apply(tmp_path) -> None:
    """``method_from_spec`` takes ``thresholds=FILE`` as eval does; its per-layer dict gives apply(thresholds=FILE)'s logits."""
    hf = pytest.importorskip("xattention.integrations.hf")
    model, _ = _tiny_llama()
    table = torch.tensor([[0.3, 0.5, 0.7, 0.9], [1.0, 0.4, 0.6, 0.8]], dtype=torch.float64)
    path = tmp_path / "t.json"
    xa.save_thresholds(path, table, model_name="tiny")
    ids = torch.randint(0, 512, (1, 200), generator=torch.Generator().manual_seed(0))
    base = xa.XAttention(block_size=16, stride=4, min_seq_len=0)
    with torch.no_grad():
        hf.apply(model, base, thresholds=path)
        expected = model(input_ids=ids).logits
        hf.apply(model, xa.method_from_spec(f"xattention:block_size=16,stride=4,thresholds={path}", min_seq_len=0))
        got = model(input_ids=ids).logits
        hf.remove(model)
        dense = model(input_ids=ids).logits
    assert torch.equal(got, expected) and not torch.allclose(got, dense)


def test_paired_differences_against_any_baseline() -> None:
    def rec(method: str, task: str, sample: int, score: float) -> dict:
        return {"model": "m", "task": task, "length": 4096, "method": method, "score": score, "sample": sample,
                "seed": 7 + sample}  # fmt: skip

    records = [rec("dense", "vt", i, 1.0) for i in range(2)]
    records += [rec("global", "vt", i, s) for i, s in enumerate((1.0, 0.0))]
    records += [rec("global", "cwe", i, s) for i, s in enumerate((0.5, 0.5))]
    records += [rec("calibrated", "vt", i, s) for i, s in enumerate((0.0, 0.0))]
    records += [rec("calibrated", "cwe", i, s) for i, s in enumerate((1.0, 0.5, 1.0))]  # sample 2: no global twin
    rows = {r["method"]: r for r in report.paired_differences(records, baseline="global")}
    assert set(rows) == {"dense", "calibrated"}  # dense shares vt only
    # calibrated - global: vt (-100, 0) mean -50 se 50; cwe (+50, 0) mean +25 se 25; over 2 tasks
    cal = rows["calibrated"]
    assert (cal["tasks"], cal["difference"]) == (2, -12.5)
    assert math.isclose(cal["stderr"], math.sqrt(50.0**2 + 25.0**2) / 2)
    assert (rows["dense"]["tasks"], rows["dense"]["difference"]) == (1, 50.0)
    assert report.paired_differences(records) == report.summarize(records)["differences"]
    with pytest.raises(ValueError, match="no results of the baseline method 'global '"):
        report.paired_differences(records, baseline="global ")


def test_method_family_groups_a_sweep_into_one_curve() -> None:
    assert report.method_family("xattention:stride=8,threshold=0.9") == ("xattention:stride=8", "0.9")
    assert report.method_family("xattention:threshold=0.9,stride=8") == ("xattention:stride=8", "0.9")
    assert report.method_family("xattention:stride=8,thresholds=runs/thresholds-m-4k-mass0.85.json") == (
        "xattention:stride=8 thresholds-m-4k",
        "mass0.85",
    )
    # calibration_heldout.sh's files: one curve per statistic and granularity, the point is the matched global tau
    for per in ("head", "layer"):
        assert report.method_family(f"xattention:stride=8,thresholds=t/m-4096-mass-{per}-tau0.9.json") == (
            f"xattention:stride=8 m-4096-mass-{per}",
            "tau0.9",
        )
    assert report.method_family("xattention:thresholds=t.json") == ("xattention thresholds", "t")
    assert report.method_family("streaming:sink_blocks=1,local_blocks=4") == ("streaming:sink_blocks=1", "4")
    assert report.method_family("flexprefill:gamma=0.95") == ("flexprefill", "0.95")
    assert report.method_family("dense") == ("dense", "")


def test_legend_columns_shrink_for_long_labels() -> None:
    short = ["dense", "oracle", "streaming", "flexprefill"]
    long = [f"xattention:stride=8 smollm2-4096-answer_mass-{per}" for per in ("head", "layer")] + ["xattention:stride=8"]
    assert report._legend_columns(short, 5.2) == 4
    assert report._legend_columns(long, 5.2) == 1  # two 50-character labels do not fit side by side in one panel
    assert report._legend_columns(long, 15.6) == 3  # three panels wide
