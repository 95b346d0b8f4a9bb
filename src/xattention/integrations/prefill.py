"""Chunked prefill: run a long prompt through a Hugging Face causal LM a chunk at a time, through its KV cache.

One forward over L tokens holds activations (and MLP intermediates, and the logits) for all L tokens at once; chunks of
N tokens bound them by N while the KV cache grows to L. Each chunk's queries are the last Lq of Lk keys: the sparse and
windowed paths of :func:`xattention.apply` align queries bottom-right, so a chunk attends exactly like the same rows of
the one-shot forward (a sparse method selects per chunk, so its blocks may differ; :class:`~xattention.Dense` is exact).
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["Prefilled", "prefill"]


class Prefilled(NamedTuple):
    """What :func:`prefill` returns: ``logits [B, V]`` of the last prompt position and the transformers ``Cache``."""

    logits: Tensor
    cache: Any


def _accepts(model: Any, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature
        return False


def _output_cache(output: Any) -> Any:
    """The cache of a model output: ``cache`` in transformers >= 5.2x, ``past_key_values`` before."""
    cache = getattr(output, "cache", None)
    return output.past_key_values if cache is None else cache


def _check(input_ids: Tensor, chunk_size: int | None, attention_mask: Tensor | None, past: int) -> None:
    if not isinstance(input_ids, Tensor) or input_ids.ndim != 2 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a [B, L] tensor with L >= 1, got {shape}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    expected = (input_ids.shape[0], past + input_ids.shape[1])
    if attention_mask is not None and tuple(attention_mask.shape) != expected:
        raise ValueError(f"attention_mask must have shape [B, cached + L] = {list(expected)}, got {list(attention_mask.shape)}")


@torch.no_grad()
def prefill(
    model: Any,
    input_ids: Tensor,
    *,
    chunk_size: int | None = None,
    attention_mask: Tensor | None = None,
    cache: Any = None,
) -> Prefilled:
    """Prefill ``input_ids`` through ``model``'s KV cache, ``chunk_size`` tokens per forward.

    Works on any transformers causal LM, with or without :func:`xattention.apply`; decode afterwards with
    ``model(input_ids=next_ids, cache=result.cache)`` (``past_key_values=`` in older transformers) or pass the cache to
    ``generate``. Only the last position's logits are computed (``logits_to_keep=1`` where the model takes it).

    Args:
        model: a transformers causal LM.
        input_ids: ``[B, L]`` prompt tokens.
        chunk_size: tokens per forward; ``None`` prefills all ``L`` in one forward.
        attention_mask: optional ``[B, cached + L]`` padding mask (1 = real token). Pad on the left: the last position
            of every row must be a real token. Positions are counted over real tokens, as ``generate`` does.
        cache: a transformers ``Cache`` to extend (default: the model makes a new one).
    Returns:
        :class:`Prefilled`: ``logits [B, V]`` at the last position, and the cache holding ``cached + L`` positions.
    """
    past = 0 if cache is None else int(cache.get_seq_length())
    _check(input_ids, chunk_size, attention_mask, past)
    length = input_ids.shape[1]
    step = length if chunk_size is None else chunk_size
    cache_arg = "cache" if _accepts(model, "cache") else "past_key_values"
    keep_last = _accepts(model, "logits_to_keep")
    positions = None if attention_mask is None else (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    output = None
    for start in range(0, length, step):
        end = min(start + step, length)
        kwargs: dict[str, Any] = {"input_ids": input_ids[:, start:end], "use_cache": True, cache_arg: cache}
        if attention_mask is not None and positions is not None:
            kwargs["attention_mask"] = attention_mask[:, : past + end]
            kwargs["position_ids"] = positions[:, past + start : past + end]
        if keep_last:
            kwargs["logits_to_keep"] = 1
        output = model(**kwargs)
        cache = _output_cache(output)
    assert output is not None  # length >= 1 was checked
    return Prefilled(output.logits[:, -1], cache)
