"""``xattention eval``: bad arguments fail with one line and exit 2 before any model loads; a run and a report work."""

from __future__ import annotations

import json
import sys
import types

import pytest

from test_eval_runner import EchoModel, FakeIntegration
from test_eval_tasks import WordTokenizer
from xattention import cli
from xattention.models import TokenizerMismatchError


def fake_models(load_model) -> types.SimpleNamespace:
    """Stands in for xattention.models (the CLI router also asks it for its `fetch-model` subcommand)."""
    return types.SimpleNamespace(load_model=load_model, add_arguments=lambda parser: None, main=lambda args: 0)


@pytest.fixture
def no_model(monkeypatch):
    """A models module whose load_model fails the test if it is ever called."""
    loads: list[str] = []

    def load_model(name, **kwargs):
        loads.append(name)
        raise AssertionError("load_model must not be called")

    monkeypatch.setitem(sys.modules, "xattention.models", fake_models(load_model))
    return loads


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "niah_single_1,bogus"], "unknown task 'bogus'"),
        (["--methods", "dense,nosuch:threshold=0.9"], "unknown method 'nosuch'"),
        (["--methods", "xattention:tau=0.9"], "xattention has no parameter 'tau'"),
        (["--methods", "xattention:threshold=1.5"], "threshold must lie in (0, 1]"),
        (["--lengths", "1k,4q"], "bad length '4q'"),
        (["--lengths", "100"], "too short"),
        (["--samples", "0"], "samples must be a positive integer"),
        (["--batch-size", "0"], "batch size must be a positive integer"),
        (["--dtype", "float8"], "unknown dtype"),
    ],
)
def test_bad_arguments_fail_before_loading(tmp_path, capsys, no_model, extra, message) -> None:
    code = cli.main(["eval", "--out", str(tmp_path / "run"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and no_model == []
    assert err.startswith("xattention eval: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_length_beyond_a_local_models_context(tmp_path, capsys, no_model) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    code = cli.main(["eval", "--model", str(folder), "--lengths", "1k,4k", "--out", str(tmp_path / "run")])
    assert code == 2 and no_model == []
    assert "length 4096 exceeds" in capsys.readouterr().err


def test_missing_out_and_stray_arguments(capsys, no_model) -> None:
    assert cli.main(["eval"]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
    assert cli.main(["eval", "summarize", "x"]) == 2
    assert "xattention eval report DIR" in capsys.readouterr().err


def test_a_tokenizer_transformers_cannot_read_fails_in_one_line(tmp_path, capsys, monkeypatch) -> None:
    def load_model(name, **kwargs):
        raise TokenizerMismatchError("the tokenizer transformers 5.17.0 built splits 196 of 200 whole-word tokens")

    monkeypatch.setitem(sys.modules, "xattention.models", fake_models(load_model))
    args = ["eval", "--tasks", "passkey", "--lengths", "1k", "--samples", "1", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(args) == 1
    assert "xattention eval: error: the tokenizer transformers 5.17.0 built splits 196" in capsys.readouterr().err


def test_run_then_report(tmp_path, capsys, monkeypatch) -> None:
    tok = WordTokenizer()
    monkeypatch.setitem(sys.modules, "xattention.models", fake_models(lambda name, **kw: (EchoModel(tok), tok)))
    monkeypatch.setitem(sys.modules, "xattention.integrations.hf", FakeIntegration())
    out = tmp_path / "run"
    sparse = "xattention:threshold=0.9,stride=16"
    args = ["eval", "--tasks", "passkey", "--lengths", "1k", "--methods", "dense", "--methods", sparse,
            "--samples", "2", "--out", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "| dense | 100.0 ± 0.0 (d=1.00) |" in printed
    assert f"| {sparse} | 100.0 ± 0.0 (d=0.50) |" in printed
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4
    for name in ("summary.md", "summary.json", "score_vs_density.png"):
        (out / name).unlink()

    assert cli.main(["eval", "report", str(out)]) == 0
    assert (out / "summary.md").read_text() in capsys.readouterr().out
    assert (out / "score_vs_density.png").stat().st_size > 0
    assert cli.main(["eval", "--report-only", "--out", str(out)]) == 0
    assert cli.main([*args[:-1], "--samples", "3", "--time-budget", "1e-9"]) == 3  # one batch, then stop
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert len((out / "results.jsonl").read_text().splitlines()) == 5
    assert cli.main(["eval", "report", str(tmp_path / "nothing")]) == 2
    assert "no results.jsonl" in capsys.readouterr().err
