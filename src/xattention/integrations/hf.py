"""Hugging Face transformers integration: sparse prefill through the ``AttentionInterface`` hook.

transformers (4.53+, 5.x) looks attention up by name: a model's attention modules call
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)`` with post-RoPE ``query [B, Hq, Lq, D]`` and
``key/value [B, Hkv, Lk, D]`` (after the KV cache update), and the model builds its mask through
``ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]``. :func:`register` adds one function under the name
``"xattention"`` to both; :func:`apply` switches a model to that name, so no model forward is copied or patched.

* Masks: the name uses transformers' own ``sdpa_mask`` (a 4-D boolean ``[B, 1, Lq, Lk]`` mask, or ``None`` for a plain
  causal batch without padding), so every dense step is exactly the SDPA path the model had before.
* Prefill (``Lq > 1``) of a full-attention causal layer runs :func:`xattention.sparse_attention` with the layer's method;
  decode (``Lq == 1``), sliding-window layers (``module.sliding_window``), non-causal modules, layers mapped to
  :class:`~xattention.Dense` and inputs shorter than ``method.min_seq_len`` run transformers' SDPA function unchanged.
* Padding: each sequence's contiguous run of real tokens is read from the mask and the sparse path runs on that run
  alone, so padding never enters block selection and a padded batch matches unpadded single runs on real tokens.
* Chunked prefill (``Lq < Lk`` with a KV cache): queries sit at the end of the keys, the kernels' bottom-right alignment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..attention import sparse_attention
from ..methods.base import Method
from ..methods.dense import Dense
from ..methods.xattention import XAttention
from ..metrics import attention_mass_kept

__all__ = [
    "ATTN_IMPLEMENTATION",
    "apply",
    "capture_qk",
    "capturing",
    "collected_stats",
    "is_applied",
    "layer_methods",
    "register",
    "remove",
    "reset_stats",
    "stats_seconds",
]

logger = logging.getLogger(__name__)

# The name registered in transformers' AttentionInterface and AttentionMaskInterface.
ATTN_IMPLEMENTATION = "xattention"
_STATE_ATTR = "_xattention_state"  # on the model: _ModelState
_LAYER_ATTR = "_xattention_layer"  # on each module with a `layer_idx`: _LayerState


@dataclass
class _ModelState:
    """What :func:`apply` set up on one model (kept on the model as ``model._xattention_state``)."""

    previous: list[tuple[Any, Any]]  # (config, its _attn_implementation_internal before apply)
    record_stats: bool = False
    record_mass: bool = False
    stats: list[dict[str, Any]] = field(default_factory=list)
    # set by capture_qk: layer index -> (q, k); None outside a capture
    capture: dict[int, tuple[Tensor, Tensor]] | None = None
    capture_layers: set[int] | None = None
    # seconds spent recording statistics (density, attention mass), so callers can leave them out of timings
    stats_seconds: float = 0.0


@dataclass
class _LayerState:
    method: Method
    model: _ModelState


_default_layer: _LayerState | None = None


def _default_layer_state() -> _LayerState:
    """Layers of a model loaded with ``attn_implementation="xattention"`` but never given to :func:`apply`."""
    global _default_layer
    if _default_layer is None:
        _default_layer = _LayerState(XAttention(), _ModelState(previous=[]))
    return _default_layer


# --------------------------------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------------------------------


def register() -> None:
    """Register ``"xattention"`` in transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (idempotent).

    Afterwards ``AutoModelForCausalLM.from_pretrained(..., attn_implementation="xattention")`` loads a model whose
    full-attention layers use :class:`~xattention.XAttention` with default settings; :func:`apply` registers by itself.
    Importing xattention registers nothing.
    """
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, xattention_attention_forward)
    try:  # transformers >= 4.53: masks are built through their own interface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # older versions build a float 4-D mask for unknown names, which the forward below also reads
        return
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


# --------------------------------------------------------------------------------------------------------------------
# the attention function
# --------------------------------------------------------------------------------------------------------------------


def _bool_mask(attention_mask: Tensor, q_len: int, k_len: int, layer: Any) -> Tensor:
    """``[B, Lq, Lk]`` bool (True = attend) from the model's 4-D mask (bool, or additive float with 0 = attend)."""
    if attention_mask.ndim != 4 or attention_mask.shape[1] != 1 or tuple(attention_mask.shape[-2:]) != (q_len, k_len):
        raise ValueError(
            f"xattention (layer {layer}): expected a [B, 1, {q_len}, {k_len}] attention mask, got "
            f"{tuple(attention_mask.shape)} (per-head or custom 4-D masks are not supported by the sparse prefill)"
        )
    mask = attention_mask[:, 0]
    if mask.dtype == torch.bool:
        return mask
    keep = mask > torch.finfo(mask.dtype).min / 2
    if bool((mask[keep] != 0).any()):
        raise ValueError(f"xattention (layer {layer}): additive attention biases are not supported by the sparse prefill")
    return keep


def _real_spans(mask: Tensor, layer: Any) -> list[tuple[int, int, int, int] | None]:
    """Per batch element, ``(i0, i1, s, e)``: query rows ``i0..i1`` are the real tokens and attend causally to keys
    ``s..e``, query ``i`` sitting at key position ``e - (i1 - i)`` (``None`` for an element with no real token).

    ``mask`` is bool ``[B, Lq, Lk]``, True = attend, as transformers builds it for a causal layer: causal AND a 2-D
    padding mask. A real query sees its own key and every earlier real key, so its last visible key is its own position
    and all real rows share their first visible key. Right-padding rows come after the row that sees key ``e`` and are
    left out; left-padding rows see nothing. Anything else (packed sequences, holes in the padding mask, sliding windows)
    raises ``ValueError``.
    """
    k_len = mask.shape[-1]
    spans: list[tuple[int, int, int, int] | None] = []
    for b in range(mask.shape[0]):  # one element at a time: temporaries stay at [Lq, Lk], not [B, Lq, Lk] int64
        as_bytes = mask[b].to(torch.uint8)
        count = as_bytes.sum(dim=-1, dtype=torch.int32)  # [Lq]
        first = as_bytes.argmax(dim=-1)
        last = k_len - 1 - as_bytes.flip(-1).argmax(dim=-1)
        del as_bytes
        rows = (count > 0).nonzero().flatten()
        if rows.numel() == 0:
            spans.append(None)
            continue
        i0 = int(rows[0])
        e = int(last[rows].max())
        i1 = int((last[i0:] == e).nonzero()[0]) + i0
        s = int(first[i1])
        n = i1 - i0 + 1
        real_first, real_last, real_count = first[i0 : i1 + 1], last[i0 : i1 + 1], count[i0 : i1 + 1]
        expected_last = torch.arange(e - n + 1, e + 1, device=mask.device)
        ok = (
            e - n + 1 >= s
            and bool((real_first == s).all())
            and bool((real_last == expected_last).all())
            and bool((real_count == real_last - real_first + 1).all())
        )
        if not ok:
            raise ValueError(
                f"xattention (layer {layer}): the attention mask of batch element {b} is not causal attention over one "
                "contiguous run of real tokens (packed sequences, a padding mask with holes, or a custom mask?); the "
                "sparse prefill supports left or right padding only"
            )
        spans.append((i0, i1, s, e))
    return spans


def _clock(device: torch.device) -> float:
    """Wall-clock seconds after the device's queued work is done (so the time of statistics is measured alone)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _is_full_causal(module: Any, kwargs: dict[str, Any]) -> bool:
    if getattr(module, "sliding_window", None) is not None:  # e.g. gemma-3 sliding_attention layers: keep the window
        return False
    is_causal = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)


def xattention_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The function registered as ``"xattention"``: the AttentionInterface signature.

    Args:
        module: the calling attention module (``layer_idx``, ``scaling``, optional ``sliding_window``, ``is_causal``).
        query: ``[B, Hq, Lq, D]`` post-RoPE; key, value: ``[B, Hkv, Lk, D]`` including the cache.
        attention_mask: ``None`` or the ``[B, 1, Lq, Lk]`` mask from ``sdpa_mask``.
    Returns:
        ``(attn_output [B, Lq, Hq, D], None)``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def dense() -> tuple[Tensor, None]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    layer: _LayerState = getattr(module, _LAYER_ATTR, None) or _default_layer_state()
    state = layer.model
    layer_idx = getattr(module, "layer_idx", None)
    bsz, _, q_len, _ = query.shape
    k_len = key.shape[2]
    if q_len == 1 or not _is_full_causal(module, kwargs):
        return dense()

    if state.capture is not None:  # capture_qk: record post-RoPE q/k, attend densely
        if layer_idx is not None and (state.capture_layers is None or layer_idx in state.capture_layers):
            state.capture[layer_idx] = (query.detach(), key.detach())
        return dense()

    method = layer.method
    scale = scaling if scaling is not None else getattr(module, "scaling", None)
    record = {"layer": layer_idx, "q_len": q_len, "k_len": k_len, "density": None, "mass_kept": None}
    if isinstance(method, Dense):
        if state.record_stats:
            state.stats.append(record)
        return dense()
    if dropout:
        raise ValueError("xattention does not support attention dropout; put the model in eval mode (model.eval())")
    if kwargs.get("softcap") is not None:
        raise ValueError(f"xattention (layer {layer_idx}): attention logit soft-capping is not supported")

    if attention_mask is None:
        if k_len > q_len:
            # transformers only omits the mask for Lq < Lk when prefilling an empty static cache: the queries are the
            # first Lq positions and the rest of the cache is empty (SDPA's path slices it off the same way)
            key, value, k_len = key[:, :, :q_len], value[:, :, :q_len], q_len
        spans: list[tuple[int, int, int, int] | None] = [(0, q_len - 1, 0, k_len - 1)] * bsz
    else:
        spans = _real_spans(_bool_mask(attention_mask, q_len, k_len, layer_idx), layer_idx)

    if all(span is None or span[3] - span[2] + 1 < method.min_seq_len for span in spans):
        if state.record_stats:
            state.stats.append(record)
        return dense()

    # per batch row (None for a row of padding only): a statistic is a mean over the row's heads
    densities: list[float | None] = [None] * bsz
    masses: list[float | None] = [None] * bsz

    def run(q: Tensor, k: Tensor, v: Tensor, rows: range) -> Tensor:
        out, block_mask = sparse_attention(q, k, v, method, scale=scale, return_mask=True)
        if state.record_stats:
            start = _clock(q.device)
            per_row = [1.0] * len(rows) if block_mask is None else block_mask.density_per_head().mean(dim=1).tolist()
            densities[rows.start : rows.stop] = per_row
            if state.record_mass:
                kept = (
                    [1.0] * len(rows)
                    if block_mask is None
                    else attention_mass_kept(q, k, block_mask, scale=scale).mean(dim=1).tolist()
                )
                masses[rows.start : rows.stop] = kept
            state.stats_seconds += _clock(q.device) - start
        return out

    if spans[0] is not None and all(span == spans[0] for span in spans):  # one span for all: a single batched call
        i0, i1, s, e = spans[0]
        out = run(query[:, :, i0 : i1 + 1], key[:, :, s : e + 1], value[:, :, s : e + 1], range(bsz))
        if (i0, i1) != (0, q_len - 1):
            full = query.new_zeros(query.shape[:3] + value.shape[-1:])
            full[:, :, i0 : i1 + 1] = out
            out = full
    else:  # padding differs per sequence: run each sequence's real tokens alone; padding rows get zeros
        out = query.new_zeros(query.shape[:3] + value.shape[-1:])
        for b, span in enumerate(spans):
            if span is None:
                continue
            i0, i1, s, e = span
            out[b : b + 1, :, i0 : i1 + 1] = run(
                query[b : b + 1, :, i0 : i1 + 1], key[b : b + 1, :, s : e + 1], value[b : b + 1, :, s : e + 1], range(b, b + 1)
            )
    if state.record_stats:
        real = [d for d in densities if d is not None]
        record["density"] = sum(real) / len(real)
        record["row_density"] = densities
        if state.record_mass:
            kept = [m for m in masses if m is not None]
            record["mass_kept"] = sum(kept) / len(kept)
            record["row_mass_kept"] = masses
        state.stats.append(record)
    return out.transpose(1, 2).contiguous(), None


# --------------------------------------------------------------------------------------------------------------------
# apply / remove
# --------------------------------------------------------------------------------------------------------------------


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _all_configs(model: torch.nn.Module) -> list[Any]:
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


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules carrying an integer ``layer_idx`` (attention modules, and in some models their decoder layers)."""
    return [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]


def _check_supported(model: Any) -> None:
    name = type(model).__name__
    if not hasattr(model, "config") or not isinstance(model, torch.nn.Module):
        raise ValueError(f"xattention.apply needs a transformers PreTrainedModel, got {name}")
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{name} does not route its attention through transformers' AttentionInterface "
            f"({name}._supports_attention_backend is False), so xattention cannot replace its attention"
        )


def _resolve_thresholds(thresholds: Tensor | str | os.PathLike, num_layers: int, num_heads: int) -> Tensor:
    from ..thresholds import load_thresholds

    if isinstance(thresholds, Tensor):
        if thresholds.ndim != 2 or tuple(thresholds.shape) != (num_layers, num_heads):
            raise ValueError(
                f"thresholds has shape {list(thresholds.shape)} but the model needs [num_layers, num_heads] = "
                f"{[num_layers, num_heads]}"
            )
        return thresholds.detach().to("cpu", torch.float64)
    return load_thresholds(thresholds, num_layers=num_layers, num_heads=num_heads)


def layer_methods(
    method: Method | Mapping[int, Method], num_layers: int, num_heads: int, thresholds: Tensor | str | os.PathLike | None
) -> dict[int, Method]:
    """The method each layer runs: ``method`` for every layer (or the mapping, checked), with ``threshold`` replaced by
    row ``i`` of ``thresholds`` (``[num_layers, num_heads]``, a tensor or a thresholds file) in layer ``i``."""
    if isinstance(method, Method):
        methods = dict.fromkeys(range(num_layers), method)
    elif isinstance(method, Mapping):
        methods = {}
        for idx, m in method.items():
            if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < num_layers:
                raise ValueError(f"layer index {idx!r} in the method mapping is not in [0, {num_layers})")
            if not isinstance(m, Method):
                raise ValueError(f"layer {idx}: expected an xattention method, got {type(m).__name__}")
            methods[idx] = m
    else:
        raise ValueError(f"method must be an xattention method or a mapping layer index -> method, got {type(method).__name__}")
    if thresholds is not None:
        table = _resolve_thresholds(thresholds, num_layers, num_heads)
        for idx, m in methods.items():
            if "threshold" not in {f.name for f in dataclasses.fields(m)}:
                raise ValueError(f"layer {idx}: {type(m).__name__} has no threshold, so per-head thresholds cannot apply")
            methods[idx] = dataclasses.replace(m, threshold=table[idx].clone())
    return methods


def apply(
    model: Any,
    method: Method | Mapping[int, Method],
    *,
    thresholds: Tensor | str | os.PathLike | None = None,
    record_stats: bool = False,
    record_mass: bool = False,
) -> Any:
    """Switch ``model``'s attention to xattention in place and return it.

    Args:
        model: a transformers ``PreTrainedModel`` whose attention goes through the AttentionInterface.
        method: one method for every full-attention layer, or a mapping ``layer_idx -> method`` (layers left out stay
            dense).
        thresholds: per-head thresholds ``[num_layers, num_q_heads]`` (a tensor, or a file from
            :func:`xattention.save_thresholds`); layer ``i`` then uses ``dataclasses.replace(method_i,
            threshold=thresholds[i])``.
        record_stats: record one dict per (prefill call, full-attention layer), see :func:`collected_stats`.
        record_mass: also record the exact attention mass inside the kept blocks (costs one dense attention per layer).
    Returns:
        ``model`` (same object). Calling ``apply`` again replaces the methods; :func:`remove` restores the attention
        implementation the model had before the first ``apply``.
    """
    _check_supported(model)
    text = _text_config(model)
    num_layers, num_heads = int(text.num_hidden_layers), int(text.num_attention_heads)
    methods = layer_methods(method, num_layers, num_heads, thresholds)

    if record_mass and not record_stats:
        raise ValueError("record_mass=True needs record_stats=True")

    register()
    old: _ModelState | None = getattr(model, _STATE_ATTR, None)
    previous = old.previous if old is not None else [(c, c._attn_implementation) for c in _all_configs(model)]
    state = _ModelState(previous=previous, record_stats=record_stats, record_mass=record_mass)
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention module with a layer_idx, so layers cannot be told apart")
    dense = Dense()
    for module in modules:
        setattr(module, _LAYER_ATTR, _LayerState(methods.get(module.layer_idx, dense), state))
    setattr(model, _STATE_ATTR, state)

    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:  # transformers < 4.54
        model.config._attn_implementation = ATTN_IMPLEMENTATION
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        remove(model)
        raise ValueError(f"{type(model).__name__} refused attn_implementation={ATTN_IMPLEMENTATION!r}")
    logger.debug("xattention applied to %s: %s", type(model).__name__, method)
    return model


def remove(model: Any) -> Any:
    """Undo :func:`apply`: restore every config's previous attention implementation and drop the per-layer state.

    A model that was never given to :func:`apply` is returned unchanged.
    """
    state: _ModelState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    for config, implementation in state.previous:
        config._attn_implementation_internal = implementation
    for module in _attention_modules(model):
        if hasattr(module, _LAYER_ATTR):
            delattr(module, _LAYER_ATTR)
    delattr(model, _STATE_ATTR)
    return model


# --------------------------------------------------------------------------------------------------------------------
# statistics and q/k capture
# --------------------------------------------------------------------------------------------------------------------


def is_applied(model: Any) -> bool:
    """Whether ``model`` currently has xattention applied (by :func:`apply`, not yet undone by :func:`remove`)."""
    return getattr(model, _STATE_ATTR, None) is not None


def _state(model: Any) -> _ModelState:
    state = getattr(model, _STATE_ATTR, None)
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
    return list(_state(model).stats)


def reset_stats(model: Any) -> None:
    """Forget the statistics recorded so far."""
    state = _state(model)
    state.stats.clear()
    state.stats_seconds = 0.0


def stats_seconds(model: Any) -> float:
    """Seconds spent recording statistics since :func:`apply` or :func:`reset_stats` (subtract them from a timed
    forward to get the time the model alone took)."""
    return _state(model).stats_seconds


@contextlib.contextmanager
def capturing(model: Any, layers: Iterable[int] | None = None) -> Iterator[dict[int, tuple[Tensor, Tensor]]]:
    """While active, prefill calls (``Lq > 1``) of causal full-attention layers store their post-RoPE ``(q, k)`` in the
    yielded dict (the last call per layer wins) and run dense SDPA. The model must have xattention applied (use
    :func:`apply` with :class:`~xattention.Dense` for a plain model); see :func:`capture_qk` for the one-call form.
    """
    state = _state(model)
    captured: dict[int, tuple[Tensor, Tensor]] = {}
    state.capture, state.capture_layers = captured, (set(layers) if layers is not None else None)
    try:
        yield captured
    finally:
        state.capture, state.capture_layers = None, None


def capture_qk(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    layers: Iterable[int] | None = None,
) -> dict[int, tuple[Tensor, Tensor]]:
    """Post-RoPE queries and keys of each full-attention layer from one dense prefill forward (no cache).

    Args:
        input_ids: ``[B, L]``; attention_mask: optional ``[B, L]`` padding mask.
        layers: only these layer indices (default: every full-attention layer), to bound memory on long inputs.
    Returns:
        ``{layer_idx: (q [B, Hq, L, D], k [B, Hkv, L, D])}`` for causal full-attention layers (sliding-window layers are
        left out). The forward runs dense attention whatever method is applied.
    """
    applied = getattr(model, _STATE_ATTR, None) is not None
    if not applied:
        apply(model, Dense())
    try:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            kwargs["logits_to_keep"] = 1  # the logits are not needed
        with capturing(model, layers) as captured, torch.no_grad():
            model(**kwargs)
        return dict(sorted(captured.items()))
    finally:
        if not applied:
            remove(model)
