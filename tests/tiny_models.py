"""Tiny random Hugging Face models for the integration tests (built in code: no download), one builder per family."""

from __future__ import annotations

import torch
import transformers

VOCAB = 128


def sharpen(model: torch.nn.Module) -> torch.nn.Module:
    """Scale q/k projections so random attention is peaked: block scores then differ clearly, and low-tau selection is
    not decided by last-bit ties (which would make padded-vs-single comparisons flaky)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(6.0)
    return model


def _common(layers: int, kv_heads: int, max_positions: int) -> dict:
    return {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": layers,
            "num_attention_heads": 4, "num_key_value_heads": kv_heads, "max_position_embeddings": max_positions}  # fmt: skip


def tiny_llama(layers: int = 3, max_positions: int = 1024) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**_common(layers, 2, max_positions), pad_token_id=0)
    return sharpen(transformers.LlamaForCausalLM(config).eval())


def tiny_mistral(sliding_window: int = 64, max_positions: int = 2048) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.MistralConfig(**_common(2, 2, max_positions), sliding_window=sliding_window, pad_token_id=0)
    return sharpen(transformers.MistralForCausalLM(config).eval())


def tiny_gemma3(layer_types: list[str], *, kv_heads: int, head_dim: int, sliding_window: int, max_positions: int):
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        **_common(len(layer_types), kv_heads, max_positions), head_dim=head_dim, query_pre_attn_scalar=head_dim,
        sliding_window=sliding_window, layer_types=layer_types,
    )  # fmt: skip
    return sharpen(transformers.Gemma3ForCausalLM(config).eval())


def random_ids(length: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)
