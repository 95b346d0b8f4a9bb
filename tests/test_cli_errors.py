"""The command line fails in one line, before any model loads: a missing extra names the extra to install, a device
torch cannot use and every bad number of ``demo``, ``calibrate`` and ``bench quality`` exit 2 without a traceback."""

from __future__ import annotations

import sys

import pytest
import torch

from test_eval_cli import no_model  # noqa: F401  (fixture: a models module whose load_model fails the test)
from xattention import cli

COMMANDS: dict[str, list[str]] = {
    "demo": ["demo"],
    "eval": ["eval", "--tasks", "passkey", "--lengths", "1k", "--samples", "1", "--no-progress"],
    "calibrate": ["calibrate", "--target", "mass=0.9", "--no-progress"],
    "bench quality": ["bench", "quality"],
}


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"xattention {command.split()[0]}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("module", ["rich", "transformers", "gguf", "matplotlib"])
def test_a_missing_extra_names_the_extra(tmp_path, capsys, monkeypatch, no_model, command, module) -> None:  # noqa: F811
    """A base install (no extras) used to list these commands and then die in ``ModuleNotFoundError``."""
    if command == "calibrate" and module in ("rich", "matplotlib"):
        pytest.skip("calibrate prints without rich and draws no plot")
    if command != "demo" and module == "rich":
        pytest.skip("only the demo needs rich")
    monkeypatch.setitem(sys.modules, module, None)  # what `import rich` sees when it is not installed
    args = [*COMMANDS[command], "--out", str(tmp_path / "out")]
    assert cli.main(args) == 1 and no_model == []
    err = _one_line_error(capsys, command)
    assert f'{module} is not installed; it comes with the hf extra: pip install "xattention[hf]"' in err


def test_a_module_missing_at_run_time_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    from test_eval_cli import fake_models

    def load_model(name, **kwargs):  # what transformers raises for a tokenizer whose backend is not installed
        raise ModuleNotFoundError("No module named 'sentencepiece'", name="sentencepiece")

    monkeypatch.setitem(sys.modules, "xattention.models", fake_models(load_model))
    assert cli.main([*COMMANDS["eval"], "--out", str(tmp_path)]) == 1
    assert "sentencepiece is not installed (pip install sentencepiece)" in _one_line_error(capsys, "eval")

    def broken(name, **kwargs):  # one of our own modules missing is a bug: keep its traceback
        raise ModuleNotFoundError("No module named 'xattention.nowhere'", name="xattention.nowhere")

    monkeypatch.setitem(sys.modules, "xattention.models", fake_models(broken))
    with pytest.raises(ModuleNotFoundError):
        cli.main([*COMMANDS["eval"], "--out", str(tmp_path)])


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(
    ("device", "message"),
    [("bogus", "unknown device 'bogus'"), ("cuda", "is a CPU-only build"), ("cuda:0", "is a CPU-only build")],
)
def test_a_device_torch_cannot_use_fails_first(tmp_path, capsys, monkeypatch, no_model, command, device, message) -> None:  # noqa: F811
    monkeypatch.setattr(torch.version, "cuda", None)  # as on a CPU-only build, whatever this machine has
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main([*COMMANDS[command], "--device", device, "--out", str(tmp_path / "out")]) == 2 and no_model == []
    assert message in _one_line_error(capsys, command)


def test_a_cuda_device_without_a_gpu(tmp_path, capsys, monkeypatch, no_model) -> None:  # noqa: F811
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main([*COMMANDS["demo"], "--device", "cuda"]) == 2 and no_model == []
    assert "no CUDA GPU is visible" in _one_line_error(capsys, "demo")


# the demo's flags that must be at least some number, and that number
AT_LEAST = (("--length", 1), ("--layer", 0), ("--head", 0), ("--max-new-tokens", 1))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--threshold", "2"], r"threshold must lie in (0, 1], got 2.0"),
        (["--threshold", "nan"], "threshold must lie in (0, 1]"),
        (["--stride", "3"], "multiple of stride (3)"),
        (["--block-size", "0"], "block_size must be a positive int"),
        (["--depth", "1.5"], "--depth must lie in [0, 1]"),
        (["--dtype", "float8"], "--dtype 'float8' is not a torch dtype"),
        *(([flag, str(least - 1)], f"{flag} must be at least {least}, got {least - 1}") for flag, least in AT_LEAST),
    ],
)
def test_bad_demo_arguments_fail_before_the_model_loads(tmp_path, capsys, no_model, extra, message) -> None:  # noqa: F811
    """``demo --threshold 2`` used to fail only after the ~18 s model load."""
    assert cli.main(["demo", *extra, "--out", str(tmp_path / "out.png")]) == 2 and no_model == []
    assert message in _one_line_error(capsys, "demo")


@pytest.mark.parametrize(
    ("command", "extra", "message"),
    [
        ("calibrate", ["--stride", "5"], "multiple of stride (5)"),
        ("calibrate", ["--samples", "0"], "--samples must be positive"),
        ("calibrate", ["--text", "/nonexistent/corpus.txt"], "--text /nonexistent/corpus.txt: cannot read it"),
        ("bench quality", ["--block-size", "24"], "block_size (24) must be a multiple of stride"),
    ],
)
def test_bad_arguments_fail_before_the_model_loads(tmp_path, capsys, no_model, command, extra, message) -> None:  # noqa: F811
    assert cli.main([*COMMANDS[command], *extra, "--out", str(tmp_path / "out")]) == 2 and no_model == []
    assert message in _one_line_error(capsys, command)
