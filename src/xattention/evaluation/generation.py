"""Greedy decoding of a batch of samples with ``model.generate`` (left padding), timing the prefill."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from .._common import synchronize
from .tasks import Sample

__all__ = ["Answers", "generate_answers"]


def _pad_id(tokenizer: Any) -> int:
    """The pad id for left padding (the attention mask hides it, so any id works when the tokenizer has none)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


class _Timer:
    """Called by ``generate`` after every forward; the first call marks the end of the prefill."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.first: float | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.first is None:
            synchronize(self.device)
            self.first = time.perf_counter()
        return scores


def _logits_processors(timer: _Timer) -> Any:
    from transformers import LogitsProcessor, LogitsProcessorList

    class PrefillTimer(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            return timer(input_ids, scores)

    return LogitsProcessorList([PrefillTimer()])


class Answers(NamedTuple):
    """What :func:`generate_answers` returns for a batch of ``B`` samples."""

    texts: list[str]  # the decoded continuation of each sample, cut to its own answer budget
    prefill_ms: float  # generate start to the first logits (the batch's prefill)
    logits: Any = None  # float32 [B, V] on the CPU: raw next-token logits at the last prompt position, if asked for


def generate_answers(
    model: Any, tokenizer: Any, samples: Sequence[Sample], device: Any, *, return_logits: bool = False
) -> Answers:
    """Greedy-decode a batch of samples (left-padded to the longest) with ``model.generate``.

    Args:
        model: a transformers causal LM; tokenizer: the samples' tokenizer (``decode``; its pad or EOS id pads).
        samples: prompts, each decoded up to its own ``max_new_tokens`` (the batch decodes to the largest).
        device: where the input ids go (see :func:`device_of`).
        return_logits: also return the raw logits of the first generated token (before any logits processor), i.e.
            the model's next-token distribution at each prompt's last position.
    """
    import torch

    width = max(s.tokens for s in samples)
    pad = _pad_id(tokenizer)
    ids = torch.full((len(samples), width), pad, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        ids[row, width - s.tokens :] = torch.tensor(s.input_ids, dtype=torch.long)
        mask[row, width - s.tokens :] = 1
    timer = _Timer(device)
    extra = {"output_logits": True, "return_dict_in_generate": True} if return_logits else {}
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max(s.max_new_tokens for s in samples),
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
            logits_processor=_logits_processors(timer),
            **extra,
        )
    synchronize(device)
    end = time.perf_counter()
    prefill_ms = 1000.0 * ((timer.first or end) - start)
    logits = None
    if return_logits:
        logits = out.logits[0].detach().float().cpu()
        out = out.sequences
    # a batch decodes to its longest answer budget; each sample keeps only its own (greedy decoding is per row, so this
    # is what a batch of its own task would have produced)
    new = [row[: s.max_new_tokens] for row, s in zip(out[:, width:].tolist(), samples, strict=True)]
    return Answers([tokenizer.decode(row, skip_special_tokens=True) for row in new], prefill_ms, logits)
