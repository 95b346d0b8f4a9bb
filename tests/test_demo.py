"""``xattention demo``: prompt construction, the whole pipeline on a tiny random model (fast), the real model (slow)."""

from __future__ import annotations

import re

import pytest
import torch

from xattention import demo
from xattention.cli import build_parser

transformers = pytest.importorskip("transformers")
pytest.importorskip("rich")
pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_tokenizer():
    """A word-level tokenizer (digits split one by one) over the demo's vocabulary, with a ChatML-like template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    texts = [demo.HAYSTACK, demo.INSTRUCTION, demo.NEEDLE, demo.QUESTION, demo.ANSWER_PREFIX, "user assistant"]
    words = sorted({w for t in texts for w in re.findall(r"[A-Za-z]+|[^\w\s]", t)})
    specials = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]
    vocab = {w: i for i, w in enumerate(specials + [str(d) for d in range(10)] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<pad>", bos_token="<|im_start|>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def tiny_llama(vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=2,
        pad_token_id=3,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("length", [300, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_build_prompt_length_and_depth(length: int, depth: float) -> None:
    tok = tiny_tokenizer()
    prompt = demo.build_prompt(tok, length, depth=depth, seed=3)
    per_repeat = len(tok(demo.HAYSTACK, add_special_tokens=False)["input_ids"])
    assert prompt.input_ids.shape[0] == 1
    assert abs(prompt.input_ids.shape[1] - length) <= per_repeat
    assert re.fullmatch(r"\d{7}", prompt.passkey)
    needle = demo.NEEDLE.format(passkey=prompt.passkey)
    assert prompt.text.count(needle) == 1
    # the needle sits between whole haystack repetitions, at the requested fraction of them
    before, after = prompt.text.split(needle)
    n_before, n_after = before.count(demo.HAYSTACK), after.count(demo.HAYSTACK)
    assert n_before == round((n_before + n_after) * depth)
    assert prompt.text.startswith("<|im_start|>user\n" + demo.INSTRUCTION)
    assert prompt.text.endswith("<|im_start|>assistant\n" + demo.ANSWER_PREFIX)


def test_build_prompt_is_seeded_and_checks_arguments() -> None:
    tok = tiny_tokenizer()
    assert demo.build_prompt(tok, 300, seed=1).passkey == demo.build_prompt(tok, 300, seed=1).passkey
    assert demo.build_prompt(tok, 300, seed=1).passkey != demo.build_prompt(tok, 300, seed=2).passkey
    with pytest.raises(ValueError, match="depth"):
        demo.build_prompt(tok, 300, depth=1.5)
    with pytest.raises(ValueError, match="too short"):
        demo.build_prompt(tok, 10)


def test_run_demo_on_a_tiny_model(tmp_path) -> None:
    from rich.console import Console

    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    console = Console(record=True, width=120)
    out = tmp_path / "demo.png"
    result = demo.run_demo(
        model, tok, length=600, threshold=0.3, stride=8, block_size=64, layer=2, head=1, out=out, console=console
    )
    dense, sparse = result["results"]
    assert (dense.method, sparse.method) == ("dense", "XAttention")
    assert dense.density == 1.0 and dense.mass_kept == 1.0
    assert 0.0 < sparse.density < 1.0 and 0.0 < sparse.mass_kept < 1.0
    assert dense.prefill_s > 0 and sparse.prefill_s > 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    heat = result["heatmap"]
    assert (heat["layer"], heat["head"]) == (2, 1) and 0.0 < heat["density"] <= 1.0
    text = console.export_text()
    assert "XAttention" in text and "mass kept" in text and "prefill" in text
    assert model.config._attn_implementation == "sdpa"  # the demo leaves the model as it found it


def test_cli_parses_demo_arguments() -> None:
    args = build_parser().parse_args(["demo", "--length", "1024", "--threshold", "0.8", "--out", "x.png"])
    assert (args.length, args.threshold, args.stride, args.depth, args.out) == (1024, 0.8, 8, 0.5, "x.png")


@pytest.mark.slow
def test_demo_on_the_default_model(tmp_path, capsys) -> None:
    out = tmp_path / "demo.png"
    args = build_parser().parse_args(["demo", "--length", "1024", "--out", str(out), "--device", "cpu"])
    assert args._main(args) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert "XAttention" in printed and "dense" in printed
