"""What the periphery (integration, evaluation, calibration, demo, benchmarks) reads off a loaded model, and device
timing: one definition each, so every entry point sees a model the same way.

Nothing here imports torch or transformers at import time.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = [
    "all_configs",
    "attention_layers",
    "attention_modules",
    "attention_scales",
    "clock",
    "device_of",
    "eos_ids",
    "synchronize",
    "text_config",
]


def text_config(model: Any) -> Any:
    """The config holding the language model's sizes (``num_hidden_layers``, ``num_attention_heads``, ...): the text
    sub-config of a multimodal model (``config.get_text_config()``), else ``model.config`` itself."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attention_modules(model: Any) -> list[Any]:
    """Modules carrying an integer ``layer_idx`` (attention modules, and in some models their decoder layers)."""
    return [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]


def all_configs(model: Any) -> list[Any]:
    """Every config object in the model: the top config, its sub-configs (recursively) and every sub-model's config."""
    seen: dict[int, Any] = {}
    stack = [model.config] + [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "to_dict")]
    while stack:
        config = stack.pop()
        if id(config) in seen:
            continue
        seen[id(config)] = config
        for key in getattr(config, "sub_configs", {}) or {}:
            sub = getattr(config, key, None)
            if sub is not None:
                stack.append(sub)
    return list(seen.values())


def attention_layers(model: Any) -> list[Any]:
    """The model's attention modules proper (those whose class name says attention), in layer order."""
    return [m for m in attention_modules(model) if "attention" in type(m).__name__.lower()]


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every end-of-sequence token id the tokenizer or the model's generation config names."""
    ids: set[int] = set()
    for value in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def attention_scales(model: Any) -> dict[int, float]:
    """``{layer index: softmax scale}`` read from the attention modules (``scaling``, as Hugging Face models name it),
    so models whose scale is not ``1/sqrt(D)`` (e.g. Gemma's query_pre_attn_scalar) are scored as they run."""
    scales: dict[int, float] = {}
    for module in model.modules():
        layer, scaling = getattr(module, "layer_idx", None), getattr(module, "scaling", None)
        if isinstance(layer, int) and isinstance(scaling, (int, float)) and not isinstance(scaling, bool):
            scales.setdefault(layer, float(scaling))
    return scales


def device_of(model: Any) -> Any:
    """The ``torch.device`` a model's inputs go to: ``model.device``, else its first parameter's, else the CPU."""
    import torch

    device = getattr(model, "device", None)
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def synchronize(device: Any) -> None:
    """Wait for the work queued on a CUDA ``device`` (a ``torch.device`` or its name); nothing elsewhere. Timing and
    statistics need the queued kernels finished."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: Any) -> float:
    """:func:`time.perf_counter` after ``device``'s queued work is done."""
    synchronize(device)
    return time.perf_counter()
