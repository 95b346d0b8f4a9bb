"""What :func:`xattention.apply` keeps on a model and its layers, and the statistics and q/k captures recorded there.

The attention function (:mod:`.hf`) reads a layer's :class:`LayerState` (its method and the model's
:class:`ModelState`); :func:`collected_stats`, :func:`capturing` and friends read and write the model's state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .._common import clock
from ..block_mask import BlockMask
from ..methods.base import Method
from ..methods.xattention import XAttention
from ..metrics import attention_mass_kept
from .masks import MaskMemo

__all__ = [
    "LAYER_ATTR",
    "STATE_ATTR",
    "LayerState",
    "ModelState",
    "capturing",
    "collected_stats",
    "default_layer_state",
    "finish_record",
    "is_applied",
    "model_state",
    "record_capture",
    "record_rows",
    "reset_stats",
    "stats_seconds",
]

STATE_ATTR = "_xattention_state"  # on the model: ModelState
LAYER_ATTR = "_xattention_layer"  # on each module with a `layer_idx`: LayerState


@dataclass
class ModelState:
    """What :func:`xattention.apply` set up on one model (kept on the model as ``model._xattention_state``)."""

    previous: list[tuple[Any, Any]]  # (config, its _attn_implementation_internal before apply)
    record_stats: bool = False
    record_mass: bool = False
    stats: list[dict[str, Any]] = field(default_factory=list)
    # set by capture_qk: layer index -> (q, k); None outside a capture
    capture: dict[int, tuple[Tensor, Tensor]] | None = None
    capture_layers: set[int] | None = None
    # seconds spent recording statistics (density, attention mass), so callers can leave them out of timings
    stats_seconds: float = 0.0
    # what the masks of the current forward said (one device read per mask tensor, not per layer)
    masks: MaskMemo = field(default_factory=MaskMemo)


@dataclass
class LayerState:
    method: Method
    model: ModelState


_default_layer: LayerState | None = None


def default_layer_state() -> LayerState:
    """Layers of a model loaded with ``attn_implementation="xattention"`` but never given to :func:`apply`."""
    global _default_layer
    if _default_layer is None:
        _default_layer = LayerState(XAttention(), ModelState(previous=[]))
    return _default_layer


def record_rows(
    state: ModelState, q: Tensor, k: Tensor, block_mask: BlockMask | None, scale: float | None, rows: range, per_row: dict
) -> None:
    """Density (and with ``record_mass`` the attention mass kept) of batch ``rows``, mean over heads. Synchronises."""
    start = clock(q.device)  # the statistics' time alone, not the attention queued before them
    ones = [1.0] * len(rows)
    per_row["density"][rows.start : rows.stop] = (
        ones if block_mask is None else block_mask.density_per_head().mean(dim=1).tolist()
    )
    if state.record_mass:
        if block_mask is None:
            kept = ones
        elif block_mask.lengths is None:
            kept = attention_mass_kept(q, k, block_mask, scale=scale).mean(dim=1).tolist()
        else:  # a right-aligned padded batch: each element on its real tokens
            kept = [_element_mass(q, k, block_mask, scale, b) for b in range(q.shape[0])]
        per_row["mass_kept"][rows.start : rows.stop] = kept
    state.stats_seconds += clock(q.device) - start


def _element_mass(q: Tensor, k: Tensor, block_mask: BlockMask, scale: float | None, b: int) -> float | None:
    """Mean over heads of the attention mass batch element ``b`` keeps on its real tokens (``None`` without any)."""
    assert block_mask.lengths is not None
    n = block_mask.lengths[b]
    if n == 0:
        return None
    mass = attention_mass_kept(q[b : b + 1, :, :n], k[b : b + 1, :, :n], block_mask.element(b), scale=scale)
    return float(mass.mean())


def finish_record(state: ModelState, record: dict[str, Any], per_row: dict[str, list] | None) -> None:
    if not state.record_stats:
        return
    if per_row is not None:
        real = [d for d in per_row["density"] if d is not None]
        record["density"], record["row_density"] = sum(real) / len(real), per_row["density"]
        if state.record_mass:
            kept = [m for m in per_row["mass_kept"] if m is not None]
            record["mass_kept"], record["row_mass_kept"] = sum(kept) / len(kept), per_row["mass_kept"]
    state.stats.append(record)


def record_capture(state: ModelState, layer_idx: Any, query: Tensor, key: Tensor) -> None:
    """Inside :func:`capturing`: keep this call's post-RoPE ``(query, key)`` for its layer, if the capture wants it."""
    assert state.capture is not None
    if layer_idx is not None and (state.capture_layers is None or layer_idx in state.capture_layers):
        state.capture[layer_idx] = (query.detach(), key.detach())


def is_applied(model: Any) -> bool:
    """Whether ``model`` currently has xattention applied (by :func:`apply`, not yet undone by :func:`remove`)."""
    return getattr(model, STATE_ATTR, None) is not None


def model_state(model: Any) -> ModelState:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError(f"{type(model).__name__} has no xattention applied; call xattention.apply(model, ...) first")
    return state


def collected_stats(model: Any) -> list[dict[str, Any]]:
    """Statistics recorded since :func:`apply` or :func:`reset_stats` (needs ``apply(..., record_stats=True)``).

    Returns:
        One dict per (prefill call, full-attention layer), in call order: ``{"layer", "q_len", "k_len", "density",
        "mass_kept"}``. ``density`` is the kept fraction of causally visible blocks (mean over batch and heads), ``None``
        when the dense path ran; ``mass_kept`` (only with ``record_mass``) is the exact attention mass inside the kept
        blocks, mean over heads and batch (:func:`xattention.attention_mass_kept`). When the sparse path ran, also
        ``row_density`` (and with ``record_mass`` ``row_mass_kept``): one value per batch row, mean over heads, ``None``
        for a row of padding only. Decode steps are not recorded.
    """
    return list(model_state(model).stats)


def reset_stats(model: Any) -> None:
    """Forget the statistics recorded so far."""
    state = model_state(model)
    state.stats.clear()
    state.stats_seconds = 0.0


def stats_seconds(model: Any) -> float:
    """Seconds spent recording statistics since :func:`apply` or :func:`reset_stats` (subtract them from a timed
    forward to get the time the model alone took)."""
    return model_state(model).stats_seconds


@contextlib.contextmanager
def capturing(model: Any, layers: Iterable[int] | None = None) -> Iterator[dict[int, tuple[Tensor, Tensor]]]:
    """While active, prefill calls (``Lq > 1``) of causal full-attention layers store their post-RoPE ``(q, k)`` in the
    yielded dict (the last call per layer wins) and run dense SDPA. The model must have xattention applied (use
    :func:`xattention.apply` with :class:`~xattention.Dense` for a plain model); see
    :func:`~xattention.integrations.hf.capture_qk` for the one-call form.
    """
    state = model_state(model)
    captured: dict[int, tuple[Tensor, Tensor]] = {}
    state.capture, state.capture_layers = captured, (set(layers) if layers is not None else None)
    try:
        yield captured
    finally:
        state.capture, state.capture_layers = None, None
