"""The accuracy guard: check_accuracy on a tiny random Llama (dense passes exactly, a block-dropping method fails), its
verdict rules, the model left as found (also on error), and ``xattention check`` end to end with the loader patched.

Independent references: next-token logits from a plain ``model(...)`` forward (not ``generate``), KL from
``torch.nn.functional.kl_div``, and probes whose references are what dense itself answers (so dense is right by
construction and any change of answer under the method is a loss the guard must count).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import xattention as xa
from test_eval_tasks import WordTokenizer
from xattention import guard
from xattention.guard import LengthCheck, ProbeResult, Tolerance, check_accuracy, logit_agreement

transformers = pytest.importorskip("transformers")

LENGTH = 512
NEW = 4  # answer budget: short, the tiny model's answers are noise anyway
DROPPING = dict(block_size=32, sink_blocks=1, local_blocks=1, min_seq_len=0)  # keeps ~1/4 of the blocks at 512


class NamedTokenizer(WordTokenizer):
    """A word tokenizer whose ``decode`` names every id (``t123`` for ids it never encoded), so a random model's
    answers are distinct strings rather than empty ones."""

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        keep = [int(i) for i in ids if int(i) >= 3 or not skip_special_tokens]
        return " ".join(self.pieces.get(i, f"t{i}") for i in keep)


def tiny_llama():
    """2 layers, 4 query / 2 KV heads; q/k and the LM head scaled up so attention is peaked and the next-token
    distribution is not flat (a block-dropping method then moves it measurably)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
        model.lm_head.weight.mul_(10)
    return model, NamedTokenizer(vocab_size=512)


def run(model, tok, method, **kw):
    kw = {"lengths": [LENGTH], "samples": 4, "max_new_tokens": NEW, "progress": False, **kw}
    return check_accuracy(model, tok, method, **kw)


def last_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].double()


def assert_as_found(model, training: bool = False) -> None:
    assert not xa.integrations.hf.is_applied(model)
    assert model.config._attn_implementation == "sdpa"
    assert model.training is training


# ---------------------------------------------------------------------------------------------------------------------
# check_accuracy on a tiny model


def test_dense_passes_with_zero_kl_and_every_answer_kept() -> None:
    model, tok = tiny_llama()
    result = run(model, tok, xa.Dense())
    (c,) = result.lengths
    assert result.passed and c.passed and c.failures() == []
    assert [p.kl for p in c.probes] == [0.0] * 4 and all(p.top1_agree for p in c.probes)
    assert c.kept == 4 and c.lost == c.gained == 0 and c.density == 1.0
    assert [p.dense_answer for p in c.probes] == [p.sparse_answer for p in c.probes]
    # probes cycle through the guard's tasks at the asked length, prompt + answer budget within it
    assert result.tasks == list(guard.GUARD_TASKS) and [p.task for p in c.probes] == list(guard.GUARD_TASKS)
    assert all(LENGTH - 64 < p.tokens <= LENGTH - NEW for p in c.probes)
    assert result.summary().startswith("PASS")
    assert_as_found(model)


def test_a_block_dropping_method_moves_the_logits_and_fails_a_tight_tolerance() -> None:
    model, tok = tiny_llama()
    result = run(model, tok, xa.Streaming(**DROPPING))
    (c,) = result.lengths
    assert 0.0 < c.density < 0.5
    assert c.mean_kl > 0.05 and not result.passed
    assert "mean KL" in c.failures()[0] and result.summary().startswith("FAIL")
    # the KL is the one between plain forwards' last-position logits, dense vs with the method applied
    probes = guard.build_probes(tok, [LENGTH], samples=4, max_new_tokens=NEW)[LENGTH]
    for probe, sample in zip(c.probes, probes, strict=True):
        dense = last_logits(model, sample.input_ids)
        xa.apply(model, xa.Streaming(**DROPPING))
        try:
            sparse = last_logits(model, sample.input_ids)
        finally:
            xa.remove(model)
        expected = torch.nn.functional.kl_div(sparse.log_softmax(-1), dense.log_softmax(-1), log_target=True, reduction="sum")
        assert probe.kl == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
        assert probe.top1_agree == bool(dense.argmax() == sparse.argmax())
    # the verdict is the tolerance's: the same figures pass a loose one
    loose = run(model, tok, xa.Streaming(**DROPPING), tolerance=Tolerance(max_mean_kl=1e9))
    assert loose.passed and loose.lengths[0].mean_kl == pytest.approx(c.mean_kl)
    assert_as_found(model)


def test_answers_lost_are_counted(monkeypatch) -> None:
    """Probes whose reference is dense's own answer: dense is right on all of them; the block-dropping method changes
    answers, and each change is a lost answer that fails the check whatever the KL tolerance."""
    from xattention.evaluation.runner import generate_answers

    model, tok = tiny_llama()
    build = guard.build_probes

    def dense_is_right(tokenizer, lengths, **kw):
        out = {}
        for length, samples in build(tokenizer, lengths, **kw).items():
            answers = [generate_answers(model, tokenizer, [s], torch.device("cpu")).texts[0] for s in samples]
            assert all(answers), "each dense answer must be a non-empty string to serve as a reference"
            out[length] = [dataclasses.replace(s, references=[a]) for s, a in zip(samples, answers, strict=True)]
        return out

    monkeypatch.setattr(guard, "build_probes", dense_is_right)
    loose_kl = Tolerance(max_mean_kl=1e9)
    dense = run(model, tok, xa.Dense(), tolerance=loose_kl).lengths[0]
    assert dense.dense_correct == dense.kept == 4 and dense.lost == 0
    result = run(model, tok, xa.Streaming(**DROPPING), tolerance=loose_kl)
    c = result.lengths[0]
    changed = sum(p.sparse_answer != p.dense_answer for p in c.probes)
    assert c.dense_correct == 4 and changed >= 1 and c.lost == changed
    assert not result.passed and f"{changed} of 4 answers lost" in c.failures()[0]
    allow = run(model, tok, xa.Streaming(**DROPPING), tolerance=Tolerance(max_answers_lost=changed, max_mean_kl=1e9))
    assert allow.passed


def test_the_model_is_left_as_found_even_on_error(monkeypatch) -> None:
    import xattention.evaluation.runner as runner

    model, tok = tiny_llama()
    model.train()  # the check runs in eval mode and restores training mode
    real, calls = runner.generate_answers, []

    def fail_on_the_sparse_run(*args, **kwargs):
        calls.append(xa.integrations.hf.is_applied(args[0]))
        if calls[-1]:
            raise RuntimeError("boom")
        assert not args[0].training
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "generate_answers", fail_on_the_sparse_run)
    with pytest.raises(RuntimeError, match="boom"):
        run(model, tok, xa.Streaming(**DROPPING))
    assert calls == [False, True]
    assert_as_found(model, training=True)


def test_spec_strings_and_bad_arguments() -> None:
    model, tok = tiny_llama()
    result = run(model, tok, "streaming:block_size=32,local_blocks=1", samples=1, tasks="passkey")
    # a spec is built as xattention eval builds it: sparse at every length
    assert result.method == "streaming:block_size=32,local_blocks=1" and result.method_params["min_seq_len"] == 0
    assert result.lengths[0].density < 0.5 and result.tasks == ["passkey"]
    bad = [
        ({"samples": 0}, "samples"),
        ({"lengths": "4q"}, "length"),
        ({"lengths": [100]}, "too short"),
        ({"tasks": "nosuch"}, "unknown task"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"tolerance": 0.05}, "Tolerance"),
        ({"lengths": [4096]}, "exceeds"),  # the model's context is 2048
    ]
    for kw, message in bad:
        with pytest.raises(ValueError, match=message):
            run(model, tok, xa.Dense(), **kw)
    for spec, message in (("nosuch", "unknown method"), ("dense,streaming", "one method")):
        with pytest.raises(ValueError, match=message):
            run(model, tok, spec)
    with pytest.raises(ValueError, match="is on cpu"):
        run(model, tok, xa.Dense(), device="cuda")
    xa.apply(model, xa.Dense())
    with pytest.raises(ValueError, match="already has xattention applied"):
        run(model, tok, xa.Dense())
    xa.remove(model)
    for kw in ({"max_answers_lost": -1}, {"max_answers_lost": True}, {"max_mean_kl": -0.1}, {"max_mean_kl": float("nan")}):
        with pytest.raises(ValueError):
            Tolerance(**kw)


# ---------------------------------------------------------------------------------------------------------------------
# verdict rules and the KL helper


def probe(dense: float, sparse: float, kl: float = 0.0) -> ProbeResult:
    return ProbeResult(task="passkey", index=0, seed=0, tokens=500, depth=0.0, references=["1"], dense_answer="",
                       sparse_answer="", dense_score=dense, sparse_score=sparse, kl=kl, top1_agree=True, density=0.3)  # fmt: skip


def test_losses_count_per_probe_not_net_of_gains() -> None:
    c = LengthCheck(1024, [probe(1.0, 0.0), probe(0.0, 1.0), probe(1.0, 1.0)], Tolerance())
    assert (c.dense_correct, c.kept, c.lost, c.gained) == (2, 1, 1, 1)
    assert not c.passed and c.failures() == ["1 of 3 answers lost (tolerance 0)"]
    assert LengthCheck(1024, c.probes, Tolerance(max_answers_lost=1)).passed
    # a partial score below dense's (multi-value tasks) is a loss too
    assert LengthCheck(1024, [probe(1.0, 0.5)], Tolerance()).lost == 1
    # the KL rule: mean over probes, at most the tolerance; NaN never passes
    assert LengthCheck(1024, [probe(1, 1, 0.04), probe(1, 1, 0.06)], Tolerance()).passed
    assert not LengthCheck(1024, [probe(1, 1, 0.05), probe(1, 1, 0.06)], Tolerance()).passed
    assert not LengthCheck(1024, [probe(1, 1, float("nan"))], Tolerance()).passed
    assert "dense answers none" in LengthCheck(1024, [probe(0.0, 0.0)], Tolerance()).notes()[0]


def test_logit_agreement_matches_kl_div() -> None:
    gen = torch.Generator().manual_seed(3)
    p, q = torch.randn(5, 50, generator=gen) * 3, torch.randn(5, 50, generator=gen) * 3
    kl, agree = logit_agreement(p, q)
    expected = torch.nn.functional.kl_div(q.double().log_softmax(-1), p.double().log_softmax(-1), log_target=True,
                                          reduction="none").sum(-1)  # fmt: skip
    torch.testing.assert_close(kl, expected)
    assert agree.tolist() == (p.argmax(-1) == q.argmax(-1)).tolist()
    same, all_agree = logit_agreement(p, p.clone())
    assert same.tolist() == [0.0] * 5 and bool(all_agree.all())
    # tokens dense rules out (-inf) add nothing, where the sparse run gives them
    masked = p.clone()
    masked[:, :10] = -float("inf")
    kl_masked, _ = logit_agreement(masked, q)
    assert torch.isfinite(kl_masked).all() and bool((kl_masked > 0).all())
    with pytest.raises(ValueError, match="shapes"):
        logit_agreement(p, q[:, :10])


# ---------------------------------------------------------------------------------------------------------------------
# xattention check


@pytest.fixture
def loader(monkeypatch):
    import xattention.models

    calls: list[dict] = []
    model, tok = tiny_llama()

    def load_model(name, *, device=None, dtype=None):
        calls.append({"name": name, "device": device, "dtype": dtype})
        return model, tok

    monkeypatch.setattr(xattention.models, "load_model", load_model)
    return calls


def cli_args(*extra: str, method: str = "dense") -> list[str]:
    return ["check", "--model", "tiny", "--lengths", str(LENGTH), "--method", method, "--samples", "2",
            "--max-new-tokens", str(NEW), "--device", "cpu", "--no-progress", *extra]  # fmt: skip


def test_cli_exit_codes_table_and_json(tmp_path, capsys, loader) -> None:
    from xattention import cli

    out = tmp_path / "check.json"
    assert cli.main(cli_args("--out", str(out))) == 0
    assert loader == [{"name": "tiny", "device": "cpu", "dtype": None}]
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("PASS: dense at 512 tokens")
    assert any(line.split()[:1] == ["512"] and line.split()[-1] == "PASS" for line in printed)
    data = json.loads(out.read_text())
    assert data["verdict"] == "PASS" and data["passed"] is True and data["model"] == "tiny" and data["method"] == "dense"
    assert data["tolerance"] == {"max_answers_lost": 0, "max_mean_kl": 0.05} and data["samples"] == 2
    (length,) = data["lengths"]
    assert length["length"] == LENGTH and length["mean_kl"] == 0.0 and length["kept"] == 2 and len(length["results"]) == 2
    assert {"dense_answer", "sparse_answer", "kl", "top1_agree", "density", "references"} <= set(length["results"][0])
    assert data["versions"]["torch"] == torch.__version__

    spec = "streaming:block_size=32,local_blocks=1"
    assert cli.main(cli_args("--out", str(out), method=spec)) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"FAIL: {spec}: 512: mean KL")
    data = json.loads(out.read_text())
    assert data["verdict"] == "FAIL" and data["lengths"][0]["mean_kl"] > 0.05 and data["lengths"][0]["density"] < 0.5
    assert cli.main(cli_args("--tolerance-kl", "1e9", method=spec)) == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lengths", "4q"], "bad length"),
        (["--lengths", "64"], "too short"),
        (["--samples", "0"], "samples"),
        (["--method", "nosuch"], "unknown method"),
        (["--method", "dense,streaming"], "one method"),
        (["--method", "xattention:thresholds=missing.json"], "does not exist"),
        (["--tasks", "nosuch"], "unknown task"),
        (["--tolerance-kl", "-1"], "--tolerance-kl"),
        (["--tolerance-kl", "nan"], "--tolerance-kl"),
        (["--max-lost", "-1"], "--max-lost"),
        (["--dtype", "int3"], "dtype"),
        (["--device", "nonsense"], "device"),
        (["--out", "/no/such/folder/check.json"], "folder does not exist"),
    ],
)
def test_cli_rejects_bad_arguments_before_loading(extra, message, capsys, monkeypatch) -> None:
    import xattention.models
    from xattention import cli

    def load_model(*args, **kwargs):
        raise AssertionError("load_model must not be called")

    monkeypatch.setattr(xattention.models, "load_model", load_model)
    assert cli.main(cli_args(*extra)) == 2  # argparse keeps the last --method / --lengths given
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("xattention check: error:") and message in err[0], err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of asking for CUDA on a machine without it")
def test_cli_rejects_cuda_without_a_gpu(capsys, monkeypatch) -> None:
    from xattention import cli

    monkeypatch.setattr("xattention.models.load_model", lambda *a, **k: pytest.fail("load_model must not be called"))
    assert cli.main(cli_args("--device", "cuda")) == 2
    err = capsys.readouterr().err  # the one device check every command shares (CPU-only build, or no GPU)
    assert err.count("\n") == 1 and "device 'cuda'" in err and ("CPU-only" in err or "no CUDA" in err)
