"""Reading transformers' 4-D attention masks for the sparse and windowed prefill: each check reads the device once.

A model builds one mask per layer type and passes the same tensor to every layer of that type, so :class:`MaskMemo`
remembers each answer per mask object: a forward with a materialised mask synchronises with the device once per mask
(twice for gemma-3: one full, one sliding mask), not once per layer. A forward whose mask is ``None`` (one sequence, or
an unpadded batch, without a cache offset) never reads it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["MaskMemo", "Span", "bool_mask", "real_spans"]

T = TypeVar("T")

# (i0, i1, s, e): query rows i0..i1 are the real tokens and attend causally to keys s..e
Span = tuple[int, int, int, int]


class MaskMemo:
    """Answers about recent mask tensors, keyed by the tensor's identity (held weakly) and a hashable question."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.entries: list[tuple[weakref.ReferenceType[Tensor], Hashable, Any]] = []

    def get(self, mask: Tensor, key: Hashable, compute: Callable[[], T]) -> T:
        """``compute()`` the first time ``(mask, key)`` is asked, the remembered answer afterwards."""
        for ref, known, value in self.entries:
            if known == key and ref() is mask:
                return value
        value = compute()
        alive = [e for e in self.entries if e[0]() is not None]
        self.entries = [*alive[-(self.size - 1) :], (weakref.ref(mask), key, value)]
        return value


def bool_mask(attention_mask: Tensor, q_len: int, k_len: int, layer: Any) -> tuple[Tensor, Tensor | None]:
    """``keep [B, Lq, Lk]`` bool (True = attend) from the model's ``[B, 1, Lq, Lk]`` mask (bool, or additive float with
    0 = attend), and for a float mask a device bool scalar that is True when it carries a bias other than 0 / -inf."""
    if attention_mask.ndim != 4 or attention_mask.shape[1] != 1 or tuple(attention_mask.shape[-2:]) != (q_len, k_len):
        raise ValueError(
            f"xattention (layer {layer}): expected a [B, 1, {q_len}, {k_len}] attention mask, got "
            f"{tuple(attention_mask.shape)} (per-head or custom 4-D masks are not supported by the sparse prefill)"
        )
    mask = attention_mask[:, 0]
    if mask.dtype == torch.bool:
        return mask, None
    keep = mask > torch.finfo(mask.dtype).min / 2
    return keep, ((mask != 0) & keep).any()


# Mask bytes read at once per row chunk: the temporaries of a [Lq, Lk] mask stay small (a chunked prefill's mask is
# 2 GiB at 16K x 128K; reading it whole made copies several times its size).
ROW_CHUNK_BYTES = 1 << 26


def _row_extents(keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of ``keep`` ``[Lq, Lk]``: the number of visible keys and the first and last visible key (int64 ``[Lq]``
    each; 0 / 0 / ``Lk - 1`` for a row that sees none), a chunk of rows at a time."""
    lq, k_len = keep.shape
    step = max(1, ROW_CHUNK_BYTES // max(1, k_len))
    counts, firsts, lasts = [], [], []
    for r0 in range(0, lq, step):
        as_bytes = keep[r0 : r0 + step].to(torch.uint8)
        counts.append(as_bytes.sum(dim=-1, dtype=torch.int64))
        firsts.append(as_bytes.argmax(dim=-1))
        lasts.append(k_len - 1 - as_bytes.flip(-1).argmax(dim=-1))
    return torch.cat(counts), torch.cat(firsts), torch.cat(lasts)


def _span_facts(keep: Tensor, window: int | None) -> Tensor:
    """int64 ``[B, 6]`` on the mask's device: ``(has_real, ok, i0, i1, s, e)`` per batch element (see :func:`real_spans`)."""
    lq = keep.shape[1]
    rows = torch.arange(lq, device=keep.device)
    facts = []
    for b in range(keep.shape[0]):  # one element at a time, rows in chunks (see _row_extents)
        count, first, last = _row_extents(keep[b])
        real = count > 0
        i0 = real.to(torch.uint8).argmax()  # the first real row
        e = torch.where(real, last, -1).max()  # the last key any real row sees
        i1 = (real & (last == e)).to(torch.uint8).argmax()  # the first row that sees it: the last real row
        s = first.gather(0, i0.view(1))[0]  # first[i0] with a 0-d device index would read it back (a sync)
        run = (rows >= i0) & (rows <= i1)
        lo = s if window is None else torch.clamp(last - window + 1, min=s)  # each real row's first key
        causal = (first == lo) & (last == e - (i1 - rows)) & (count == last - first + 1)
        ok = (~run | causal).all() & (e - (i1 - i0) >= s)
        facts.append(torch.stack([t.to(torch.int64) for t in (real.any(), ok, i0, i1, s, e)]))
    return torch.stack(facts)


def real_spans(attention_mask: Tensor, q_len: int, k_len: int, layer: Any, *, window: int | None = None) -> list[Span | None]:
    """Per batch element, ``(i0, i1, s, e)``: query rows ``i0..i1`` are the real tokens and attend causally to keys
    ``s..e``, query ``i`` sitting at key position ``e - (i1 - i)`` (``None`` for an element with no real token).

    ``attention_mask`` is the model's ``[B, 1, Lq, Lk]`` mask of a causal layer: causal AND a 2-D padding mask (AND a
    sliding window of ``window`` keys). A real query sees its own key and every earlier real key (within the window),
    so its last visible key is its own position and the first real row's first key is ``s``. Right-padding rows come
    after the row that sees key ``e`` and are left out; left-padding rows see nothing. Anything else (packed sequences,
    holes in the padding mask, another window, additive biases) raises ``ValueError``. Reads the device once.
    """
    keep, has_bias = bool_mask(attention_mask, q_len, k_len, layer)
    facts = _span_facts(keep, window)
    if has_bias is not None:
        facts = torch.cat([facts, has_bias.to(torch.int64).expand(facts.shape[0], 1)], dim=1)
    spans: list[Span | None] = []
    for b, (has_real, ok, i0, i1, s, e, *bias) in enumerate(facts.tolist()):  # the one host synchronisation
        if bias and bias[0]:
            raise ValueError(f"xattention (layer {layer}): additive attention biases are not supported by the sparse prefill")
        if not ok and has_real:
            raise ValueError(
                f"xattention (layer {layer}): the attention mask of batch element {b} is not causal attention over one "
                "contiguous run of real tokens (packed sequences, a padding mask with holes, or a custom mask?); the "
                "sparse prefill supports left or right padding only"
            )
        spans.append((i0, i1, s, e) if has_real else None)
    return spans
