"""``xattention eval diagnose``: answer token positions, needle attention per head, the lost/kept diagnosis, the CLI.

A tiny random LlamaForCausalLM (eager attention, so its attention probabilities can be read back) and small tokenizers
built here: a word tokenizer without offsets (the decoding fallback) and a byte-level BPE fast tokenizer trained on the
task templates (the offsets-mapping path). No model or tokenizer is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import types

import pytest
import torch

from test_eval_tasks import WordTokenizer
from xattention import Dense, Streaming, cli
from xattention.evaluation import cli as eval_cli
from xattention.evaluation import data, diagnose, tasks
from xattention.evaluation.diagnose import answer_positions, format_diagnosis, needle_attention
from xattention.evaluation.tasks import SampleGenerator, sample_seed

transformers = pytest.importorskip("transformers")

LENGTH = 512
STREAMING = "streaming:sink_blocks=0,local_blocks=1,block_size=16"  # the last query sees its own 16-token block only


class VocabTokenizer(WordTokenizer):
    """WordTokenizer with ids given in order of first appearance: no hash collisions, so a token decodes to its word."""

    def __init__(self, vocab_size: int = 512) -> None:
        super().__init__(vocab_size)
        self.ids: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = []
        for tok in self._tokens(text):
            if tok not in self.ids:
                if 3 + len(self.ids) >= self.vocab_size:
                    raise ValueError("vocabulary full")
                self.ids[tok] = 3 + len(self.ids)
                self.pieces[self.ids[tok]] = tok
            ids.append(self.ids[tok])
        return ([1] if add_special_tokens else []) + ids


@pytest.fixture(scope="module")
def fast_tokenizer():
    """Byte-level BPE (400 tokens, BOS ``<s>``) trained on the templates, no digits: a number is one token per digit."""
    tokenizers = pytest.importorskip("tokenizers")
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<s>", "</s>"],
        show_progress=False,
    )
    corpus = [data.NOISE_SENTENCE, tasks.PASSKEY_TEMPLATE, tasks.NIAH_TEMPLATE, tasks.NIAH_NEEDLE, tasks.PASSKEY_NEEDLE]
    tk.train_from_iterator(corpus * 5, trainer)
    tk.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}<|assistant|>\n"
    return tok


@pytest.fixture(scope="module")
def tiny():
    """A 2-layer Llama with GQA (4 query heads, 2 KV heads) and a non-default softmax scale in every layer."""
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                   attn_implementation="eager")  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).eval()
    for layer in model.model.layers:
        layer.self_attn.scaling = 0.3  # not 1/sqrt(head_dim): the diagnosis must read it from the module
    return model


def runs(positions: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for p in positions:
        if out and p == out[-1][-1] + 1:
            out[-1].append(p)
        else:
            out.append([p])
    return out


# ---------------------------------------------------------------------------------------------------------------------
# answer positions


def test_answer_positions_without_offsets() -> None:
    tok = VocabTokenizer()
    gen = SampleGenerator(tok, max_new_tokens=None)
    passkey = gen.generate("passkey", LENGTH, 0)
    (key,) = passkey.references
    pos = answer_positions(tok, passkey)
    assert [tok.decode([passkey.input_ids[p]]) for p in pos] == [key, key]  # "The pass key is K. ... K is the pass key."
    assert passkey.input_ids[0] == 1 and 0 < pos[0] < pos[1] < passkey.tokens - 10

    niah = gen.generate("niah_single_1", LENGTH, 1)
    (value,) = niah.references
    pos = answer_positions(tok, niah)
    assert len(pos) == 1 and tok.decode([niah.input_ids[pos[0]]]) == value
    assert abs(pos[0] / niah.tokens - 0.5) < 0.1  # sample 1 puts its needle at depth 1/2

    with pytest.raises(ValueError, match="differ from the sample's"):
        answer_positions(tok, dataclasses.replace(passkey, input_ids=[*passkey.input_ids[:-1], 2]))


def test_answer_positions_leave_out_the_question() -> None:
    """A string that the question and answer prefix repeat is only found in the context (here: the niah key)."""
    tok = VocabTokenizer()
    sample = SampleGenerator(tok).generate("niah_single_1", LENGTH, 0)
    key = re.search(r"magic numbers for (\S+) is: ", sample.prompt).group(1)
    assert sample.prompt.count(key) == 3  # needle, question, answer prefix
    pos = answer_positions(tok, dataclasses.replace(sample, references=[key]))
    assert "".join(tok.decode([sample.input_ids[p]]) for p in pos) == key  # adjective - noun: one run of tokens
    assert len(runs(pos)) == 1 and pos[-1] < sample.tokens - 30


@pytest.mark.parametrize("chat", [True, False])
def test_answer_positions_with_offsets(fast_tokenizer, chat) -> None:
    tok = fast_tokenizer
    gen = SampleGenerator(tok, chat_template=chat)
    passkey = gen.generate("passkey", LENGTH, 0)
    assert (passkey.input_ids[0] == tok.bos_token_id) is not chat  # chat prompts are encoded without special tokens
    (key,) = passkey.references
    found = runs(answer_positions(tok, passkey))
    assert [tok.decode([passkey.input_ids[p] for p in run]) for run in found] == [key, key]

    niah = gen.generate("niah_single_1", LENGTH, 3)
    found = runs(answer_positions(tok, niah))
    assert [tok.decode([niah.input_ids[p] for p in run]) for run in found] == niah.references

    with pytest.raises(ValueError, match="differ from the sample's"):
        answer_positions(tok, dataclasses.replace(passkey, input_ids=[*passkey.input_ids[:-1], 5]))


# ---------------------------------------------------------------------------------------------------------------------
# needle attention


def test_needle_attention_dense_and_streaming(tiny) -> None:
    tok = VocabTokenizer()
    sample = SampleGenerator(tok).generate("passkey", LENGTH, 0)  # depth 0: the needle is near the start
    pos = answer_positions(tok, sample)
    dense = needle_attention(tiny, tok, sample, Dense(block_size=16))
    assert [(r["layer"], r["head"]) for r in dense] == [(layer, head) for layer in range(2) for head in range(4)]
    for r in dense:
        assert r["needle_mass"] > 0 and r["needle_kept"] == r["needle_mass"]
        assert r["mass_kept"] == pytest.approx(1.0, abs=1e-9)  # the last query's dense probabilities sum to 1
        assert r["needle_blocks_dropped"] == 0

    # the same numbers as the model's own (eager) attention probabilities: capture, GQA expansion and scale are right
    with torch.inference_mode():
        attentions = tiny(torch.tensor([sample.input_ids]), output_attentions=True).attentions
    expected = [float(a[0, h, -1, pos].sum()) for a in attentions for h in range(4)]
    assert [r["needle_mass"] for r in dense] == pytest.approx(expected, rel=1e-4)

    local = needle_attention(tiny, tok, sample, Streaming(sink_blocks=0, local_blocks=1, block_size=16, min_seq_len=0))
    for d, s in zip(dense, local, strict=True):
        assert s["needle_mass"] == d["needle_mass"]  # the dense probabilities do not depend on the mask
        assert s["needle_kept"] == 0.0 and s["needle_blocks_dropped"] == 1  # both key tokens share one block
        assert 0.0 < s["mass_kept"] < 0.1  # 16 (or fewer) of ~490 keys


# ---------------------------------------------------------------------------------------------------------------------
# diagnose


def write_results(path, tok, rows) -> None:
    """``rows``: (task, sample, dense score, method score); two records per sample, as the evaluation writes them."""
    gen = SampleGenerator(tok)
    with open(path, "w", encoding="utf-8") as fh:
        for task, index, dense_score, method_score in rows:
            sample = gen.generate(task, LENGTH, index)
            for method, score in (("dense", dense_score), (STREAMING, method_score)):
                rec = {"model": "tiny", "task": task, "length": LENGTH, "tokens": sample.tokens, "sample": index,
                       "seed": sample_seed(42, task, LENGTH, index), "method": method, "score": score,
                       "max_new_tokens": sample.max_new_tokens}  # fmt: skip
                fh.write(json.dumps(rec) + "\n")


def test_diagnose_groups_and_keys(tmp_path, tiny, monkeypatch) -> None:
    tok = VocabTokenizer()
    # lost, kept, ignored (both wrong), ignored (method better)
    write_results(tmp_path / "results.jsonl", tok, [("passkey", 0, 1.0, 0.0), ("passkey", 1, 1.0, 1.0),
                                                    ("passkey", 2, 0.0, 0.0), ("passkey", 3, 0.0, 1.0)])  # fmt: skip
    monkeypatch.setattr(diagnose, "NEEDLE_HEAD_MIN_MASS", 0.001)  # a random model spreads its attention thinly
    d = diagnose.diagnose(tmp_path, method_label=STREAMING, length=LENGTH, model=(tiny, tok), progress=False)
    assert set(d) >= {"method", "length", "model", "groups", "layers", "overall", "heads"}
    assert (d["method"], d["length"], d["model"], d["groups"]) == (STREAMING, LENGTH, "tiny", {"lost": 1, "kept": 1})
    assert [s["sample"] for s in d["samples"]] == [0, 1] and [s["group"] for s in d["samples"]] == ["lost", "kept"]
    assert [row["layer"] for row in d["layers"]] == [0, 1]
    for stats in [d["overall"]["lost"], d["overall"]["kept"], *(row[g] for row in d["layers"] for g in ("lost", "kept"))]:
        assert stats["needle_heads"] > 0 and stats["needle_mass"] > 0
        assert stats["needle_mass_lost"] == 1.0 and stats["needle_block_dropped"] == 1.0  # needles far from the window
    assert d["overall"]["lost"]["needle_heads"] == 8  # 2 layers x 4 heads of one sample
    assert len(d["heads"]) == 8 and all(h["samples"] == 1 and h["fraction_lost"] == 1.0 for h in d["heads"])
    lost = [h["needle_mass_lost"] for h in d["heads"]]
    assert lost == sorted(lost, reverse=True)
    json.dumps(d)  # JSON-able

    md = format_diagnosis(d)
    table, top = md.split("### Heads")
    assert table.count("\n| 0 |") == 1 and table.count("\n| 1 |") == 1 and "| **overall** | 8 |" in table
    assert top.count("| 100.0% | 100.0% |") == 8  # every head: all its needle mass lost, its needle block dropped

    limited = diagnose.diagnose(tmp_path, method_label=STREAMING, length=LENGTH, model=(tiny, tok), progress=False,
                                max_samples=1)  # fmt: skip
    assert limited["groups"] == {"lost": 1, "kept": 0}
    with pytest.raises(ValueError, match="another --seed"):
        diagnose.diagnose(tmp_path, method_label=STREAMING, length=LENGTH, model=(tiny, tok), progress=False, base_seed=7)
    with pytest.raises(ValueError, match="no 'xattention' results at length 512"):
        diagnose.diagnose(tmp_path, method_label="xattention", length=LENGTH, model=(tiny, tok), progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# command line


def fake_models(load_model) -> types.SimpleNamespace:
    return types.SimpleNamespace(load_model=load_model, add_arguments=lambda parser: None, main=lambda args: 0)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", f"dense,{STREAMING}", "--lengths", "512"], "exactly one method, got 2"),
        (["--methods", "xattention", "--methods", STREAMING, "--lengths", "512"], "exactly one method, got 2"),
        (["--lengths", "512"], "needs --methods"),
        (["--methods", "dense", "--lengths", "512"], "other than dense"),
        (["--methods", STREAMING, "--lengths", "512,1k"], "exactly one length, got 2"),
        (["--methods", STREAMING], "exactly one length, got 3"),  # the default 1k,2k,4k
    ],
)
def test_cli_rejects_before_loading(tmp_path, capsys, monkeypatch, extra, message) -> None:
    loads: list[str] = []
    monkeypatch.setitem(sys.modules, "xattention.models", fake_models(lambda name, **kw: loads.append(name)))
    write_results(tmp_path / "results.jsonl", VocabTokenizer(), [("passkey", 0, 1.0, 0.0)])
    with pytest.raises(ValueError, match=message):
        eval_cli.main(parse(["diagnose", str(tmp_path), *extra]))
    assert cli.main(["eval", "diagnose", str(tmp_path), *extra]) == 2
    assert message.split(",")[0] in capsys.readouterr().err and loads == []


def test_cli_writes_the_diagnosis(tmp_path, capsys, monkeypatch, tiny) -> None:
    tok = VocabTokenizer()
    write_results(tmp_path / "results.jsonl", tok, [("passkey", 0, 1.0, 0.0)])
    loads: list[tuple[str, dict]] = []

    def load_model(name, **kwargs):
        loads.append((name, kwargs))
        return tiny, tok

    monkeypatch.setitem(sys.modules, "xattention.models", fake_models(load_model))
    args = ["eval", "diagnose", str(tmp_path), "--methods", STREAMING, "--lengths", "512", "--max-samples", "1",
            "--no-progress"]  # fmt: skip
    assert cli.main(args) == 0
    assert loads == [("tiny", {"device": "cpu", "dtype": torch.float32})]
    stem = tmp_path / "diagnose-512-streaming_sink_blocks_0_local_blocks_1_block_size_16"
    d = json.loads(stem.with_name(stem.name + ".json").read_text())
    assert d["groups"] == {"lost": 1, "kept": 0} and d["method"] == STREAMING
    md = stem.with_name(stem.name + ".md").read_text()
    assert md == format_diagnosis(d) and md in capsys.readouterr().out
