"""Hugging Face transformers integration: sparse prefill through the ``AttentionInterface`` hook.

transformers (4.53+, 5.x) looks attention up by name: a model's attention modules call
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)`` with post-RoPE ``query [B, Hq, Lq, D]`` and
``key/value [B, Hkv, Lk, D]`` (after the KV cache update), and the model builds its mask through
``ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]``. :func:`register` adds one function under the name
``"xattention"`` to both; :func:`apply` switches a model to that name, so no model forward is copied or patched.

* Masks: the name uses transformers' own ``sdpa_mask`` (a 4-D boolean ``[B, 1, Lq, Lk]`` mask, or ``None`` for a plain
  causal batch without padding), so every dense step is exactly the SDPA path the model had before.
* Prefill (``Lq > 1``) of a full-attention causal layer runs :func:`xattention.sparse_attention` with the layer's method;
  decode (``Lq == 1``) and non-causal modules run transformers' SDPA function unchanged; layers mapped to
  :class:`~xattention.Dense` and inputs shorter than ``method.min_seq_len`` run FlashAttention-4 dense where FA4 runs
  on the device, else that same SDPA function.
* Sliding-window layers (gemma-2/3 ``sliding_attention``, Mistral's ``sliding_window`` on every layer; transformers
  passes ``sliding_window`` to the attention function) prefill through :func:`xattention.sliding_window_attention`:
  exact, O(L·w), whatever method the layer was given; padded too. With any other custom mask they run SDPA with it.
* Calls the sparse and windowed paths cannot serve exactly run transformers' own attention: logit soft-capping and
  attention sinks (the modeling file's eager attention, as SDPA has neither), position biases and packed-sequence
  arguments (SDPA).
* Padding: each sequence's contiguous run of real tokens is read from the mask; the batch is right-aligned with one
  gather (:class:`.padding.RightAligned`) and each layer runs once over it with per-sequence ``lengths``, so padding
  never enters block selection and a padded batch matches unpadded single runs on real tokens. Batches whose
  sequences have cache offsets of their own run sequence by sequence.
* Host synchronisation: a forward whose mask is ``None`` (one sequence, or a batch without padding, with no cache
  offset) never reads the device. A materialised mask (padding, a chunk after the first, a sliding-window layer with
  more keys than its window) is read once per forward (once per mask tensor, see :mod:`.masks`), never once per layer.
  ``record_stats=True`` synchronises in every layer.
* ``torch.compile``: the sparse and windowed paths trace without graph breaks where the mask is ``None``; a materialised
  mask cannot be read inside a graph, so while compiling those layers run transformers' SDPA with it (dense, exact).
* Chunked prefill (``Lq < Lk`` with a KV cache): queries sit at the end of the keys, the kernels' bottom-right alignment
  (see :func:`xattention.prefill`).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .._common import all_configs, attention_modules, text_config
from ..attention import block_sparse_attention, dense_attention, sparse_attention
from ..block_mask import BlockMask
from ..kernels import fa4_usable
from ..methods.base import Method
from ..methods.dense import Dense
from ..window import sliding_window_attention
from .masks import Span, real_spans
from .padding import RightAligned
from .state import (
    LAYER_ATTR,
    STATE_ATTR,
    LayerState,
    ModelState,
    capturing,
    collected_stats,
    default_layer_state,
    finish_record,
    is_applied,
    record_capture,
    record_rows,
    reset_stats,
    stats_seconds,
)

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

# Call arguments that change the attention itself. transformers' SDPA cannot do the first group, so those calls run the
# model's own eager attention; the second group SDPA handles, so those calls run SDPA. Neither reaches our paths.
_EAGER_ONLY = ("softcap", "s_aux", "sinks")
_DENSE_ONLY = ("position_bias", "cu_seq_lens_q", "cu_seq_lens_k")

_logged: set[str] = set()


def _log_once(message: str) -> None:
    """Warn once per process; silent while dynamo traces (logging would break the graph)."""
    if torch.compiler.is_compiling() or message in _logged:
        return
    _logged.add(message)
    logger.warning(message)


def _eager_mask(attention_mask: Tensor | None, query: Tensor, key: Tensor) -> Tensor | None:
    """The additive float mask eager attention adds to its scores, from the boolean (or ``None``) mask ``sdpa_mask``
    built. ``None`` means plain causal with upper-left alignment (SDPA's ``is_causal``): Lq == Lk, or an empty static
    cache whose slots past the queries must stay unseen."""
    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is None:
        if q_len == 1:
            return None
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril()[None, None]
    if attention_mask.dtype != torch.bool:
        return attention_mask
    zeros = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
    return zeros.masked_fill(~attention_mask, torch.finfo(query.dtype).min)


def _transformers_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float,
    scaling: float | None,
    kwargs: dict[str, Any],
) -> tuple[Tensor, Tensor | None]:
    """transformers' own attention for this call: SDPA with the model's mask, or, for soft-capping or attention sinks
    (which SDPA lacks), the ``eager_attention_forward`` of the module's modeling file. Returns ``([B, Lq, Hq, D], _)``."""
    eager_only = [name for name in _EAGER_ONLY if kwargs.get(name) is not None]
    if not eager_only:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise ValueError(
            f"xattention: {type(module).__name__} passes {eager_only}, which transformers' SDPA cannot do, and its modeling "
            "file has no eager_attention_forward to fall back to"
        )
    mask = _eager_mask(attention_mask, query, key)
    return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def _is_causal(module: Any, kwargs: dict[str, Any]) -> bool:
    is_causal = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)


def _sliding_window(module: Any, kwargs: dict[str, Any]) -> Any:
    """The layer's window, ``None`` on a full-attention layer. transformers 5.x passes ``sliding_window`` to the attention
    function: gemma-2/3 and qwen2 the layer's own (``None`` on their full-attention layers), Mistral
    ``config.sliding_window`` on every layer; older versions set ``module.sliding_window`` only."""
    return kwargs["sliding_window"] if "sliding_window" in kwargs else getattr(module, "sliding_window", None)


def _sparse(
    q: Tensor, k: Tensor, v: Tensor, method: Method, scale: float | None, lengths: tuple[int, ...] | None
) -> tuple[Tensor, BlockMask | None]:
    """:func:`xattention.sparse_attention` with its mask (``lengths``: a right-aligned padded batch, never while
    compiling). While dynamo traces, the same two steps without its debug log: dynamo cannot trace
    ``Logger.isEnabledFor``, and a graph break inside every layer's attention makes dynamo compile each layer's frames
    apart, which exhausts the recompile limit of a compiled model."""
    if not torch.compiler.is_compiling():
        return sparse_attention(q, k, v, method, scale=scale, lengths=lengths, return_mask=True)
    if isinstance(method, Dense) or k.shape[2] < method.min_seq_len:
        return dense_attention(q, k, v, scale=scale), None
    mask = method.estimate(q, k, causal=True, scale=scale)
    return block_sparse_attention(q, k, v, mask, scale=scale), mask


def _spans(state: ModelState, attention_mask: Tensor | None, query: Tensor, key: Tensor, layer_idx: Any) -> list[Span | None]:
    """Each batch element's run of real tokens (see :func:`real_spans`)."""
    bsz, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
    if attention_mask is None:
        # transformers only omits the mask for Lq < Lk when prefilling an empty static cache: the queries are the first
        # Lq positions and the rest of the cache is empty (SDPA's path slices it off the same way)
        return [(0, q_len - 1, 0, min(k_len, q_len) - 1)] * bsz
    return state.masks.get(attention_mask, ("spans", q_len, k_len), lambda: real_spans(attention_mask, q_len, k_len, layer_idx))


def _fa4_runs(query: Tensor) -> bool:
    """Whether dense attention of this call can run through FlashAttention-4 (on its device, without gradients)."""
    return fa4_usable(query.device) and not (torch.is_grad_enabled() and query.requires_grad)


def _global_attention(
    layer: LayerState,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scale: float | None,
    layer_idx: Any,
) -> Tensor | None:
    """The sparse prefill of a causal full-attention layer, ``[B, Hq, Lq, D]``. A :class:`Dense` layer, or every
    sequence shorter than ``min_seq_len``, runs dense: through FlashAttention-4 where FA4 runs here, else ``None``
    (transformers' SDPA with its mask), as for a materialised mask under compile."""
    state, method = layer.model, layer.method
    q_len, k_len = query.shape[2], key.shape[2]
    record: dict[str, Any] = {"layer": layer_idx, "q_len": q_len, "k_len": k_len, "density": None, "mass_kept": None}
    dense_only = isinstance(method, Dense)
    if (attention_mask is not None and torch.compiler.is_compiling()) or (dense_only and not _fa4_runs(query)):
        finish_record(state, record, None)  # reading the mask would break the graph; or SDPA is the dense path here
        return None
    spans = _spans(state, attention_mask, query, key, layer_idx)
    if dense_only or all(span is None or span[3] - span[2] + 1 < method.min_seq_len for span in spans):
        finish_record(state, record, None)
        if not _fa4_runs(query):
            return None

        def dense(q: Tensor, k: Tensor, v: Tensor, rows: range, lengths: tuple[int, ...] | None) -> Tensor:
            return dense_attention(q, k, v, scale=scale, backend="fa4")

        return _run_spans(state, attention_mask, dense, query, key, value, spans)
    per_row: dict[str, list] = {"density": [None] * len(spans), "mass_kept": [None] * len(spans)}

    def run(q: Tensor, k: Tensor, v: Tensor, rows: range, lengths: tuple[int, ...] | None) -> Tensor:
        out, block_mask = _sparse(q, k, v, method, scale, lengths)
        if state.record_stats:
            record_rows(state, q, k, block_mask, scale, rows, per_row)
        return out

    out = _run_spans(state, attention_mask, run, query, key, value, spans)
    for b, span in enumerate(spans):
        if span is None:  # an element without real tokens has no statistics
            per_row["density"][b] = per_row["mass_kept"][b] = None
    finish_record(state, record, per_row)
    return out


SpanRun = Callable[[Tensor, Tensor, Tensor, range, "tuple[int, ...] | None"], Tensor]


def _run_spans(
    state: ModelState,
    attention_mask: Tensor | None,
    run: SpanRun,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    spans: list[Span | None],
) -> Tensor:
    """``run(q, k, v, rows, lengths)`` over each batch element's real tokens, ``[B, Hq, Lq, D]`` with zeros on padding
    rows: one call on the shared span when all elements have the same; one call on the right-aligned batch (see
    :class:`.padding.RightAligned`, ``lengths`` given) when each has as many real queries as keys; else one call per
    element."""
    bsz, q_len = query.shape[0], query.shape[2]
    if spans[0] is not None and all(span == spans[0] for span in spans):
        i0, i1, s, e = spans[0]
        out = run(query[:, :, i0 : i1 + 1], key[:, :, s : e + 1], value[:, :, s : e + 1], range(bsz), None)
        if (i0, i1) == (0, q_len - 1):
            return out
        full = query.new_zeros(query.shape[:3] + value.shape[-1:])
        full[:, :, i0 : i1 + 1] = out
        return full
    aligned = None
    if attention_mask is not None:  # a padded batch: one alignment per mask tensor, shared by its layers
        aligned = state.masks.get(
            attention_mask, ("aligned", q_len, key.shape[2]), lambda: RightAligned.from_spans(spans, q_len, query.device)
        )
    if aligned is not None:
        return aligned.scatter(run(*aligned.gather(query, key, value), range(bsz), aligned.lengths))
    out = query.new_zeros(query.shape[:3] + value.shape[-1:])
    for b, span in enumerate(spans):
        if span is None:
            continue
        i0, i1, s, e = span
        rows = range(b, b + 1)
        out[b : b + 1, :, i0 : i1 + 1] = run(
            query[b : b + 1, :, i0 : i1 + 1], key[b : b + 1, :, s : e + 1], value[b : b + 1, :, s : e + 1], rows, None
        )
    return out


def _local_attention(
    state: ModelState,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    window: int,
    scale: float | None,
    layer_idx: Any,
) -> Tensor | None:
    """Exact windowed attention of a sliding-window layer, ``[B, Hq, Lq, D]``, when the model's mask is the window
    with left or right padding at most; ``None`` otherwise, and transformers' SDPA runs with that mask."""
    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is None:
        # transformers leaves the mask out only where the window cannot bind (Lk <= window), or for an empty static
        # cache (keys past the queries are empty slots)
        key, value, k_len = key[:, :, :q_len], value[:, :, :q_len], min(k_len, q_len)
        if k_len > window:  # the model built a full causal mask for this layer: do what SDPA with it would
            _log_once("xattention: a sliding-window layer got no mask over more keys than its window; SDPA runs")
            return None
        return sliding_window_attention(query, key, value, window=window, scale=scale)
    if torch.compiler.is_compiling():  # reading the mask would break the graph
        return None
    try:
        spans = state.masks.get(
            attention_mask,
            ("window spans", q_len, k_len, window),
            lambda: real_spans(attention_mask, q_len, k_len, layer_idx, window=window),
        )
    except ValueError:
        _log_once("xattention: a sliding-window layer got a custom mask; transformers' SDPA runs with it")
        return None
    if all(span is None for span in spans):
        return None

    def windowed(q: Tensor, k: Tensor, v: Tensor, rows: range, lengths: tuple[int, ...] | None) -> Tensor:
        return sliding_window_attention(q, k, v, window=window, scale=scale)

    return _run_spans(state, attention_mask, windowed, query, key, value, spans)


def xattention_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """The function registered as ``"xattention"``: the AttentionInterface signature.

    Args:
        module: the calling attention module (``layer_idx``, ``scaling``, optional ``sliding_window``, ``is_causal``).
        query: ``[B, Hq, Lq, D]`` post-RoPE; key, value: ``[B, Hkv, Lk, D]`` including the cache.
        attention_mask: ``None`` or the ``[B, 1, Lq, Lk]`` mask from ``sdpa_mask``.
    Returns:
        ``(attn_output [B, Lq, Hq, D], None)``.
    """

    def dense() -> tuple[Tensor, Tensor | None]:
        return _transformers_attention(module, query, key, value, attention_mask, dropout, scaling, kwargs)

    layer: LayerState = getattr(module, LAYER_ATTR, None) or default_layer_state()
    layer_idx = getattr(module, "layer_idx", None)
    window = _sliding_window(module, kwargs)
    if query.shape[2] == 1 or not _is_causal(module, kwargs):
        return dense()
    unsupported = [name for name in (*_EAGER_ONLY, *_DENSE_ONLY) if kwargs.get(name) is not None]
    if unsupported:
        _log_once(f"xattention: attention calls with {unsupported} run transformers' own attention (dense)")
        return dense()
    scale = scaling if scaling is not None else getattr(module, "scaling", None)
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1 or dropout:
            return dense()
        out = _local_attention(layer.model, query, key, value, attention_mask, window, scale, layer_idx)
        return dense() if out is None else (out.transpose(1, 2).contiguous(), None)
    if layer.model.capture is not None:  # capture_qk: record post-RoPE q/k, attend densely
        record_capture(layer.model, layer_idx, query, key)
        return dense()
    if dropout and not isinstance(layer.method, Dense):
        raise ValueError("xattention does not support attention dropout; put the model in eval mode (model.eval())")
    out = _global_attention(layer, query, key, value, attention_mask, scale, layer_idx)
    return dense() if out is None else (out.transpose(1, 2).contiguous(), None)


# --------------------------------------------------------------------------------------------------------------------
# apply / remove
# --------------------------------------------------------------------------------------------------------------------


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
            dense). Sliding-window layers run exact windowed attention whatever their method.
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
    text = text_config(model)
    num_layers, num_heads = int(text.num_hidden_layers), int(text.num_attention_heads)
    methods = layer_methods(method, num_layers, num_heads, thresholds)

    if record_mass and not record_stats:
        raise ValueError("record_mass=True needs record_stats=True")

    register()
    old: ModelState | None = getattr(model, STATE_ATTR, None)
    previous = old.previous if old is not None else [(c, c._attn_implementation) for c in all_configs(model)]
    state = ModelState(previous=previous, record_stats=record_stats, record_mass=record_mass)
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention module with a layer_idx, so layers cannot be told apart")
    dense = Dense()
    for module in modules:
        setattr(module, LAYER_ATTR, LayerState(methods.get(module.layer_idx, dense), state))
    setattr(model, STATE_ATTR, state)

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
    state: ModelState | None = getattr(model, STATE_ATTR, None)
    if state is None:
        return model
    for config, implementation in state.previous:
        config._attn_implementation_internal = implementation
    for module in attention_modules(model):
        if hasattr(module, LAYER_ATTR):
            delattr(module, LAYER_ATTR)
    delattr(model, STATE_ATTR)
    return model


# --------------------------------------------------------------------------------------------------------------------
# q/k capture (statistics and the capture state: .state)
# --------------------------------------------------------------------------------------------------------------------


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
    applied = getattr(model, STATE_ATTR, None) is not None
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
