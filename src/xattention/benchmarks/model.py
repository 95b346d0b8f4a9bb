"""``xattention bench model``: time to first token (TTFT) and peak memory of a Hugging Face model, dense vs XAttention.

One prompt per length: the demo's passkey prompt (:func:`xattention.evaluation.prompts.needle_prompt`, RULER's needle in its noise
haystack) for real models, seeded random token ids for ``llama-8b-random``. Configurations (``--methods``):

* ``sdpa`` (alias ``dense``): the model as loaded, transformers' own SDPA attention, no xattention hook;
* ``dense-xa``: ``xa.apply(model, xa.Dense())``: every attention layer (global and sliding-window) through the library's
  dense dispatch, FlashAttention-4 where available (``record["fa4"]`` says whether it was usable);
* any method spec (``xattention:stride=8,threshold=0.9``, ...): ``xa.apply(model, method)``. ``min_seq_len`` defaults to
  0 here so the sparse path runs at every length; add ``min_seq_len=12288`` to measure the library's default.

Per (length, configuration), in this order (lengths outer, so short lengths finish first):

1. **answer**: greedy decode of ``--answer-tokens`` tokens with ``record_stats`` on (the block density per layer); the
   needle must be in the answer (or the answer must equal the first dense configuration's: the model's own miss), else
   the row is marked ``speed_valid: false`` and its speed is not printed (``sdpa``, the stock model, is the reference
   and always valid). It is also the first warm-up (kernels compile on first use).
2. ``--warmup`` untimed runs, then ``--repeats`` timed ones of :func:`time_to_first_token`: the prefill of the whole prompt
   (``logits_to_keep=1``) and its greedy token, then one decode step; CUDA events from the start of the prefill to the
   end of the decode step, one ``torch.cuda.synchronize`` after each repeat (``perf_counter`` on the CPU, where the work
   is synchronous). Best and median are reported; peak memory is ``torch.cuda.max_memory_allocated`` over the repeats.
3. one **profiled** run (:func:`profile_stages`) with CUDA events around every prefill attention call (the
   ``AttentionInterface`` function: after the q/k/v projections, RoPE and the cache update, before ``o_proj``) and
   every block selection (``Method.estimate``). Stages (ms, summing to the profiled TTFT): ``selection``,
   ``sparse_attention`` (the calls that ran a selection, minus it: sparse kernel plus the hook's own work),
   ``dense_attention`` (full-attention calls without a selection), ``local_attention`` (sliding-window layers),
   ``rest`` (prefill minus those four: embeddings, projections, MLPs, norms, LM head) and ``decode_step``. The event
   records slow that run a little, so its TTFT is reported apart (``row["profiled"]``), never as the row's TTFT.

``--rope-scale`` (``auto`` or a factor): beyond the model's trained context (SmolLM2: 8K) linear RoPE interpolation;
those rows are ``speed_only`` (the answer is recorded but the model was never trained there). ``llama-8b-random`` is a
Llama-3.1-8B-shaped model with random weights, built on the device: its answers are skipped and its attention is near
uniform, so beside the measured rows the record has **composed** rows: the measured non-attention time of the ``sdpa``
run plus 32 layers x the per-layer attention time the kernel benchmark measured at the same shape
(``benchmarks/results/*-kernels.json``, the shape of record Hq=32, Hkv=8, D=128).

Writes ``<out>/<gpu>-<date>-model-<model>.json`` (after every row, so a killed run keeps what it measured) and ``.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as dt
import gc
import glob
import inspect
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._parsing import parse_lengths
from ..methods.base import Method
from ..methods.dense import Dense
from ..methods.registry import split_method_specs
from .records import device_stem, markdown_table, write_record

__all__ = [
    "DEFAULT_METHODS",
    "RANDOM_LLAMA",
    "STAGES",
    "TTFT",
    "BenchConfig",
    "Settings",
    "add_arguments",
    "composed_rows",
    "format_table",
    "llama_8b_config",
    "load_bench_model",
    "longest_prompt",
    "main",
    "parse_configs",
    "plot",
    "profile_stages",
    "random_llama",
    "run",
    "set_rope_factor",
    "time_to_first_token",
]

logger = logging.getLogger(__name__)

# Llama-3.1-8B's shape with random weights, built on the device. Run it LAST of the models (its own call): 16 GB of bf16
# weights, and at 128K another ~16 GB of KV cache plus ~15 GB of prefill activations (logits_to_keep=1 keeps the LM
# head at one position); a failure there then costs no other result.
RANDOM_LLAMA = "llama-8b-random"
SDPA_NAMES = ("sdpa", "dense")
DENSE_XA = "dense-xa"
DEFAULT_METHODS = ("sdpa", DENSE_XA, "xattention:stride=8,threshold=0.95")
# Stage names of the profiled run, in plotting order; they sum to its TTFT.
STAGES = ("selection", "sparse_attention", "dense_attention", "local_attention", "rest", "decode_step")
# Tokens kept free between the prompt and the nominal length: the answer and one haystack repetition of rounding.
PROMPT_SLACK = 32
KERNEL_RECORDS = "benchmarks/results/nvidia-h200-*-kernels.json"


# --------------------------------------------------------------------------------------------------------------------
# configurations
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    """One configuration: ``method`` None is the model's own SDPA attention (no xattention hook)."""

    spec: str
    label: str
    method: Method | None

    @property
    def dense(self) -> bool:
        return self.method is None or isinstance(self.method, Dense)


def parse_configs(specs: Sequence[str], *, min_seq_len: int = 0) -> list[BenchConfig]:
    """``["sdpa", "dense-xa", "xattention:stride=8"]`` -> configurations (``sdpa``/``dense``: transformers' SDPA;
    ``dense-xa``: ``xa.Dense()`` through the hook; anything else: :func:`xattention.method_from_spec` with
    ``min_seq_len`` as default). Unknown methods and duplicates raise ``ValueError``."""
    from .. import method_from_spec

    configs: list[BenchConfig] = []
    for spec in specs:
        key = spec.strip().lower()
        if key in SDPA_NAMES:
            configs.append(BenchConfig("sdpa", "dense (transformers sdpa)", None))
        elif key == DENSE_XA:
            configs.append(BenchConfig(DENSE_XA, "dense-xa (FA4 dense where available)", Dense()))
        else:
            configs.append(BenchConfig(spec.strip(), spec.strip(), method_from_spec(spec, min_seq_len=min_seq_len)))
    names = [c.spec for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"--methods lists a configuration twice: {names}")
    return configs


@contextlib.contextmanager
def applied(model: Any, method: Method | None, *, record_stats: bool = False) -> Iterator[Any]:
    """``xa.apply(model, method)`` for the block (nothing for ``None``: the model's own attention), then ``xa.remove``."""
    from ..integrations import hf

    hf.remove(model)
    if method is None:
        yield model
        return
    hf.apply(model, method, record_stats=record_stats)
    try:
        yield model
    finally:
        hf.remove(model)


# --------------------------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------------------------


class _Clock:
    """Marks on the device's timeline: CUDA events on a CUDA device, ``perf_counter`` (synchronous work) on the CPU.

    ``ms(a, b)`` is valid after :meth:`sync`."""

    def __init__(self, device: torch.device) -> None:
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"bench model runs on cuda or cpu devices, got {device}")
        self.device = device
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def ms(self, start: Any, end: Any) -> float:
        return float(start.elapsed_time(end)) if self.cuda else (end - start) * 1e3


def _cache_kwargs(model: Any, out: Any) -> dict[str, Any]:
    """The KV cache of ``out`` (a model output, or :func:`xattention.prefill`'s result) under the name ``model.forward``
    takes (``cache`` in transformers >= 5.2x)."""
    params = inspect.signature(model.forward).parameters
    cache = getattr(out, "cache", None)
    cache = out.past_key_values if cache is None else cache
    return {"cache" if "cache" in params else "past_key_values": cache}


def _prefill_kwargs(model: Any, input_ids: Tensor) -> dict[str, Any]:
    """A cached prefill that computes the logits of the last position only (where the model supports it)."""
    kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    return kwargs


def _prefill_and_step(model: Any, input_ids: Tensor, clock: _Clock, chunk_size: int | None = None) -> tuple[Any, Any, Any]:
    """Prefill ``input_ids [1, L]`` (``logits_to_keep=1``; ``chunk_size`` tokens per forward through the KV cache with
    :func:`xattention.prefill`), pick the greedy token, run one decode step with the cache.

    Returns three clock marks: before the prefill, after the first token, after the decode step's token. Nothing is
    read back to the host, so the marks time the device's work (plus any host sync the model itself makes)."""
    from ..integrations.prefill import prefill

    kwargs = _prefill_kwargs(model, input_ids) if chunk_size is None else {}
    start = clock.mark()
    out = model(**kwargs) if chunk_size is None else prefill(model, input_ids, chunk_size=chunk_size)
    logits = out.logits[:, -1:] if chunk_size is None else out.logits[:, None]  # prefill returns the last position's
    token = logits.argmax(dim=-1)
    first = clock.mark()
    step = model(input_ids=token, use_cache=True, **_cache_kwargs(model, out))
    step.logits[:, -1:].argmax(dim=-1)
    second = clock.mark()
    return start, first, second


@dataclass(frozen=True)
class TTFT:
    """Timed repeats of :func:`time_to_first_token` (ms; one entry per repeat) and memory (bytes; ``None`` on CPU)."""

    ttft_ms: tuple[float, ...]
    prefill_ms: tuple[float, ...]
    decode_ms: tuple[float, ...]
    peak_memory_bytes: int | None
    start_memory_bytes: int | None

    @property
    def best_ms(self) -> float:
        return min(self.ttft_ms)

    @property
    def median_ms(self) -> float:
        return float(statistics.median(self.ttft_ms))

    def summary(self) -> dict[str, Any]:
        """``{"ttft_ms": {"best", "median", "all"}, "prefill_ms": ..., "decode_ms": ..., memory}`` for records."""

        def stats(values: tuple[float, ...]) -> dict[str, Any]:
            return {"best": min(values), "median": float(statistics.median(values)), "all": list(values)}

        return {
            "ttft_ms": stats(self.ttft_ms),
            "prefill_ms": stats(self.prefill_ms),
            "decode_ms": stats(self.decode_ms),
            "peak_memory_bytes": self.peak_memory_bytes,
            "start_memory_bytes": self.start_memory_bytes,
        }


def time_to_first_token(
    model: Any, input_ids: Tensor, *, warmup: int = 1, repeats: int = 3, chunk_size: int | None = None
) -> TTFT:
    """TTFT of ``model`` on ``input_ids [1, L]`` (on the model's device) as it is configured now.

    One repeat = prefill (``logits_to_keep=1``, in ``chunk_size`` chunks if given) + greedy first token + one decode
    step, timed with CUDA events and a ``torch.cuda.synchronize`` after it (``perf_counter`` on the CPU). ``warmup``
    untimed repeats come first; peak memory is measured over the timed ones (``torch.cuda.max_memory_allocated``, reset
    after the warm-up).
    """
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    clock = _Clock(input_ids.device)
    marks = []
    with torch.no_grad():
        for _ in range(warmup):
            _prefill_and_step(model, input_ids, clock, chunk_size)
        clock.sync()
        start_memory = None
        if clock.cuda:
            torch.cuda.reset_peak_memory_stats(clock.device)
            start_memory = int(torch.cuda.memory_allocated(clock.device))
        for _ in range(repeats):
            marks.append(_prefill_and_step(model, input_ids, clock, chunk_size))
            clock.sync()  # one repeat's tail never overlaps the next one's start
        peak = int(torch.cuda.max_memory_allocated(clock.device)) if clock.cuda else None
    prefill = tuple(clock.ms(a, b) for a, b, _ in marks)
    decode = tuple(clock.ms(b, c) for _, b, c in marks)
    return TTFT(tuple(p + d for p, d in zip(prefill, decode, strict=True)), prefill, decode, peak, start_memory)


# --------------------------------------------------------------------------------------------------------------------
# the profiled run: events around attention calls and selections
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _StageLog:
    clock: _Clock
    selections: list[tuple[Any, Any]] = field(default_factory=list)
    # (kind, start mark, end mark, index range of the selections made inside the call)
    calls: list[tuple[str, Any, Any, int, int]] = field(default_factory=list)


def _timed_attention(original: Callable[..., Any], log: _StageLog) -> Callable[..., Any]:
    """Wrap an ``AttentionInterface`` function: prefill calls (``Lq > 1``) are bracketed by clock marks and classed as
    ``local`` (the module has a ``sliding_window``), ``sparse`` (a selection ran inside) or ``dense``."""

    def forward(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, *args: Any, **kwargs: Any) -> Any:
        if query.shape[2] == 1:  # decode steps are timed as a whole
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        first = len(log.selections)
        start = log.clock.mark()
        out = original(module, query, key, value, attention_mask, *args, **kwargs)
        end = log.clock.mark()
        last = len(log.selections)
        kind = "local" if getattr(module, "sliding_window", None) is not None else ("sparse" if last > first else "dense")
        log.calls.append((kind, start, end, first, last))
        return out

    return forward


def _timed_estimate(original: Callable[..., Any], log: _StageLog) -> Callable[..., Any]:
    def estimate(self: Method, *args: Any, **kwargs: Any) -> Any:
        start = log.clock.mark()
        mask = original(self, *args, **kwargs)
        log.selections.append((start, log.clock.mark()))
        return mask

    return estimate


@contextlib.contextmanager
def _profiling(model: Any, method: Method | None, log: _StageLog) -> Iterator[None]:
    """While active, the model's attention function (looked up by name in transformers' ``AttentionInterface`` on every
    call) and ``type(method).estimate`` record into ``log``; both are restored afterwards."""
    from transformers.modeling_utils import AttentionInterface

    from .._common import all_configs

    names = {c._attn_implementation for c in all_configs(model)} & set(AttentionInterface._global_mapping)
    if not names:
        logger.warning("attention implementation %s is not in the AttentionInterface: attention counts as 'rest'",
                       model.config._attn_implementation)  # fmt: skip
    originals = {name: AttentionInterface._global_mapping[name] for name in names}
    cls = type(method) if method is not None and not isinstance(method, Dense) else None
    own_estimate = cls.__dict__.get("estimate") if cls is not None else None
    try:
        for name, fn in originals.items():
            AttentionInterface.register(name, _timed_attention(fn, log))
        if cls is not None:
            cls.estimate = _timed_estimate(cls.estimate, log)  # type: ignore[method-assign]
        yield
    finally:
        for name, fn in originals.items():
            AttentionInterface.register(name, fn)
        if cls is not None:
            if own_estimate is None:
                del cls.estimate
            else:
                cls.estimate = own_estimate  # type: ignore[method-assign]


def profile_stages(model: Any, input_ids: Tensor, method: Method | None = None, chunk_size: int | None = None) -> dict[str, Any]:
    """One TTFT run (as :func:`time_to_first_token`, no warm-up) split into :data:`STAGES` (ms).

    Args:
        model: configured as it will be timed (``method`` applied, or the plain model for ``None``).
        input_ids: ``[1, L]`` on the model's device.
        method: the applied method, whose ``estimate`` is timed as ``selection``.
    Returns:
        ``{"ttft_ms", "prefill_ms", "decode_step_ms", "stages_ms": {stage: ms}, "attention_calls": {kind: n}}``; the
        stages are non-negative and sum to ``ttft_ms`` (``rest`` absorbs rounding, clamped at 0).
    """
    clock = _Clock(input_ids.device)
    log = _StageLog(clock)
    with torch.no_grad(), _profiling(model, method, log):
        clock.sync()
        start, first, second = _prefill_and_step(model, input_ids, clock, chunk_size)
        clock.sync()
    stages = dict.fromkeys(STAGES, 0.0)
    calls = {"sparse": 0, "dense": 0, "local": 0}
    for kind, a, b, i0, i1 in log.calls:
        total = clock.ms(a, b)
        selection = sum(clock.ms(*log.selections[i]) for i in range(i0, i1))
        calls[kind] += 1
        if kind == "sparse":
            stages["selection"] += selection
            stages["sparse_attention"] += max(0.0, total - selection)
        else:
            stages["local_attention" if kind == "local" else "dense_attention"] += total
    prefill, decode = clock.ms(start, first), clock.ms(first, second)
    attention = sum(stages[s] for s in ("selection", "sparse_attention", "dense_attention", "local_attention"))
    stages["rest"] = max(0.0, prefill - attention)
    stages["decode_step"] = decode
    return {
        "ttft_ms": sum(stages.values()),
        "prefill_ms": prefill,
        "decode_step_ms": decode,
        "stages_ms": stages,
        "attention_calls": calls,
    }


# --------------------------------------------------------------------------------------------------------------------
# answers, prompts and RoPE
# --------------------------------------------------------------------------------------------------------------------


def greedy_answer(model: Any, input_ids: Tensor, *, max_new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy decoding of ``input_ids [1, L]`` with a KV cache: up to ``max_new_tokens`` new ids, stopping at ``eos``."""
    tokens: list[int] = []
    with torch.no_grad():
        out = model(**_prefill_kwargs(model, input_ids))
        for _ in range(max_new_tokens):
            nxt = out.logits[:, -1:].argmax(dim=-1)
            tokens.append(int(nxt))
            if tokens[-1] in eos or len(tokens) == max_new_tokens:
                break
            out = model(input_ids=nxt, use_cache=True, **_cache_kwargs(model, out))
    return tokens


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def trained_context(model: Any) -> int | None:
    """The model's ``max_position_embeddings`` (its trained context), ``None`` if the config has none."""
    value = getattr(_text_config(model), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


def longest_prompt(model: Any, answer_tokens: int) -> int | None:
    """The longest prompt (tokens) whose answer of ``answer_tokens`` still fits the trained context (``None``: unknown)."""
    context = trained_context(model)
    return None if context is None else context - answer_tokens - PROMPT_SLACK


def make_prompt(
    tokenizer: Any, length: int, *, answer_tokens: int, depth: float, seed: int, vocab_size: int
) -> tuple[Tensor, str | None]:
    """``(input_ids [1, ~length - answer_tokens - 32], passkey)`` from the demo's passkey prompt, so prompt and answer fit
    in ``length`` positions; without a tokenizer (random weights) ``length`` seeded random ids and passkey ``None``."""
    if tokenizer is None:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (1, length), generator=generator), None
    from ..evaluation.prompts import needle_prompt

    prompt = needle_prompt(tokenizer, length - answer_tokens - PROMPT_SLACK, depth=depth, seed=seed)
    return prompt.input_ids, prompt.passkey


def rope_factor(rope_scale: str | float, length: int, context: int | None) -> float:
    """The linear RoPE factor for ``length``: a fixed factor, or for ``"auto"`` 1 within ``context`` and otherwise
    ``length / context`` rounded up to a quarter (SmolLM2 at 16K/32K: 2 / 4)."""
    if not isinstance(rope_scale, str):
        return float(rope_scale)
    if context is None or length <= context:
        return 1.0
    return math.ceil(length / context * 4) / 4


def set_rope_factor(model: Any, factor: float, original: Any) -> None:
    """Linear RoPE interpolation by ``factor`` (1: back to ``original``, the config's rope settings before the first call,
    from :func:`_rope_settings`), on the config and in every rotary-embedding module (their ``inv_freq`` is computed at
    construction). transformers 5.x keeps the settings in ``config.rope_parameters``, 4.x in ``config.rope_scaling``."""
    config = _text_config(model)
    key, value = original
    if factor == 1.0:
        new = copy.deepcopy(value)
    elif key == "rope_parameters":
        if not isinstance(value, dict) or "rope_type" not in value:
            raise ValueError(f"--rope-scale needs a model with one RoPE (Llama family); {type(model).__name__} has {value}")
        new = {**value, "rope_type": "linear", "factor": float(factor)}
    else:
        new = {"rope_type": "linear", "type": "linear", "factor": float(factor)}
    setattr(config, key, new)
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "rope_type") and hasattr(module, "config"):
            if module.config is not config:
                setattr(module.config, key, copy.deepcopy(new))
            fresh = type(module)(module.config)
            module.rope_type = fresh.rope_type
            module.attention_scaling = fresh.attention_scaling
            module.inv_freq = fresh.inv_freq.to(module.inv_freq.device)
            if hasattr(module, "original_inv_freq"):
                module.original_inv_freq = fresh.original_inv_freq.to(module.inv_freq.device)


def _rope_settings(model: Any) -> tuple[str, Any]:
    config = _text_config(model)
    key = "rope_parameters" if hasattr(config, "rope_parameters") else "rope_scaling"
    return key, copy.deepcopy(getattr(config, key, None))


# --------------------------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------------------------


def llama_8b_config() -> Any:
    """``LlamaConfig`` of Llama-3.1-8B's shape: hidden 4096, 32 layers, 32 query / 8 KV heads of 128, MLP 14336,
    vocabulary 128256, RoPE theta 500000 (no llama3 frequency scaling: it changes nothing in the cost), SDPA attention."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001, attn_implementation="sdpa",
    )  # fmt: skip


def random_llama(config: Any, *, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> Any:
    """A ``LlamaForCausalLM`` with transformers' random initialisation, built directly on ``device`` in ``dtype`` (no
    float32 copy: an 8B model is 16 GB in bf16). Eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def load_bench_model(name: str, *, device: torch.device, dtype: str) -> tuple[Any, Any]:
    """``(model, tokenizer)``: ``llama-8b-random`` built on the device (tokenizer ``None``), else :func:`load_model`."""
    if name == RANDOM_LLAMA:
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32' or 'bfloat16'")
        return random_llama(llama_8b_config(), device=device, dtype=torch_dtype), None
    from ..models import load_model

    return load_model(name, device=device, dtype=dtype)


def _model_info(model: Any) -> dict[str, Any]:
    from .._common import attention_layers

    text = _text_config(model)
    heads = int(text.num_attention_heads)
    return {
        "class": type(model).__name__,
        "layers": int(text.num_hidden_layers),
        "q_heads": heads,
        "kv_heads": int(getattr(text, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(text, "head_dim", None) or text.hidden_size // heads),
        "hidden_size": int(text.hidden_size),
        "sliding_window_layers": sum(getattr(m, "sliding_window", None) is not None for m in attention_layers(model)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trained_context": trained_context(model),
        "attn_implementation": model.config._attn_implementation,
    }


def fa4_status(device: torch.device) -> dict[str, Any]:
    """Whether FlashAttention-4 runs on ``device`` (the backend ``auto`` then picks for attention)."""
    from ..kernels import fa4_usable

    return {"module": True, "usable": fa4_usable(device)}


# --------------------------------------------------------------------------------------------------------------------
# one (length, configuration)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Every parameter of a run (recorded as ``record["params"]``)."""

    lengths: tuple[int, ...]
    specs: tuple[str, ...] = DEFAULT_METHODS
    warmup: int = 1
    repeats: int = 3
    rope_scale: str | float = "auto"
    answer_tokens: int = 12
    depth: float = 0.5
    seed: int = 0
    min_seq_len: int = 0
    time_budget_s: float | None = None
    chunk_size: int | None = None


def _answer_status(answer: str, passkey: str | None, reference: str | None) -> str:
    if passkey is None:
        return "skipped (random weights)"
    if passkey in answer:
        return "pass"
    if reference is not None and answer == reference:
        return "same as dense"  # the model's own miss, not the method's
    return "fail"


def _answer_and_density(
    model: Any, tokenizer: Any, ids: Tensor, passkey: str | None, config: BenchConfig, settings: Settings
) -> tuple[str | None, list[float | None]]:
    """Greedy answer (``None`` without a passkey) and per-layer block density of one prefill with ``record_stats``."""
    from .._common import eos_ids
    from ..integrations import hf

    sparse = config.method is not None and not isinstance(config.method, Dense)
    if passkey is None and not sparse:
        return None, []  # nothing to check and density 1 by construction
    with applied(model, config.method, record_stats=sparse):
        tokens = greedy_answer(model, ids, max_new_tokens=settings.answer_tokens if passkey else 1,
                               eos=eos_ids(model, tokenizer) if tokenizer is not None else set())  # fmt: skip
        stats = hf.collected_stats(model) if sparse else []
    answer = tokenizer.decode(tokens, skip_special_tokens=True).strip() if passkey is not None else None
    return answer, [s["density"] for s in stats if s["q_len"] > 1]


def measure_config(
    model: Any,
    tokenizer: Any,
    ids: Tensor,
    passkey: str | None,
    config: BenchConfig,
    settings: Settings,
    reference: str | None,
) -> dict[str, Any]:
    """Answer + density, TTFT repeats, the profiled run: one result row (without the length fields)."""
    answer, layer_density = _answer_and_density(model, tokenizer, ids, passkey, config, settings)
    with applied(model, config.method):
        ttft = time_to_first_token(model, ids, warmup=settings.warmup, repeats=settings.repeats, chunk_size=settings.chunk_size)
        profiled = profile_stages(model, ids, config.method, settings.chunk_size)
    profiled["source"] = "one extra run with CUDA events around every prefill attention call and every selection"
    real = [1.0 if d is None else d for d in layer_density]  # None: that layer ran dense (below min_seq_len)
    status = _answer_status(answer or "", passkey, reference)
    row: dict[str, Any] = {
        "config": config.spec,
        "label": config.label,
        "method": None if config.method is None else {"name": config.method.name, **config.method.params()},
        "composed": False,
        **ttft.summary(),
        "density": sum(real) / len(real) if real else 1.0,
        "layer_density": layer_density,
        "answer": {"text": answer, "expected": passkey, "status": status},
        "profiled": profiled,
    }
    _release(ids.device)
    return row


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------------
# composed rows (random weights): measured non-attention time + the kernel benchmark's attention
# --------------------------------------------------------------------------------------------------------------------


def latest_kernel_record(pattern: str = KERNEL_RECORDS) -> Path | None:
    """The newest file matching ``pattern`` (names carry the date, so the last in sorted order), ``None`` if none."""
    paths = sorted(glob.glob(pattern))
    return Path(paths[-1]) if paths else None


def composed_rows(
    rows: Sequence[dict[str, Any]], kernel: dict[str, Any], source: str, configs: Sequence[BenchConfig], layers: int
) -> list[dict[str, Any]]:
    """Per length with a measured ``sdpa`` row and a kernel-benchmark row: TTFT composed as the measured non-attention
    time (profiled ``rest`` + ``decode_step`` of the ``sdpa`` run) plus ``layers`` x the kernel benchmark's per-layer
    attention: the fastest dense kernel (FA4 where measured, else cuDNN) for ``dense (composed)``, ``estimate_ms``
    (selection) and ``end_to_end_ms - estimate_ms``
    (sparse attention) of the matching stride for each XAttention configuration."""
    by_length = {int(r["length"]): r for r in kernel.get("rows", [])}
    out = []
    for base in (r for r in rows if r["config"] == "sdpa" and not r["composed"]):
        krow = by_length.get(int(base["length"]))
        if krow is None:
            continue
        stages = base["profiled"]["stages_ms"]
        other = stages["rest"] + stages["decode_step"]
        common = {"length": base["length"], "tokens": base["tokens"], "composed": True, "speed_valid": True,
                  "answer": {"text": None, "expected": None, "status": "skipped (random weights)"},
                  "peak_memory_bytes": None, "rope_factor": base["rope_factor"], "speed_only": False}  # fmt: skip
        dense_ms = krow.get("dense_best_ms") or krow["dense_cudnn_ms"]  # the fastest dense kernel of that run
        parts = [("dense (composed)", None, {"dense_attention": layers * dense_ms}, 1.0)]
        for c in configs:
            sel = _matching_selection(krow, c.method)
            if sel is not None:
                split = {"selection": layers * sel["estimate_ms"],
                         "sparse_attention": layers * (sel["end_to_end_ms"] - sel["estimate_ms"])}  # fmt: skip
                parts.append((f"{c.spec} (composed)", c, split, sel["density"]))
        for label, c, split, density in parts:
            split_stages = {**dict.fromkeys(STAGES, 0.0), **split, "rest": stages["rest"], "decode_step": stages["decode_step"]}
            total = sum(split_stages.values())
            out.append({**common, "config": label, "label": label, "density": density, "layer_density": [],
                        "method": None if c is None else {"name": c.method.name, **c.method.params()},
                        "ttft_ms": {"best": total, "median": total, "all": [total]},
                        "profiled": {"ttft_ms": total, "stages_ms": split_stages, "source": "composed"},
                        "composition": {"non_attention_ms": other, "from": "profiled sdpa row at this length",
                                        "kernel_record": source, "kernel_gpu": kernel.get("gpu"),
                                        "kernel_date": kernel.get("date"), "layers": layers,
                                        "kernel_threshold": kernel.get("params", {}).get("threshold"),
                                        "kernel_inputs": "benchmarks.synthetic.structured_qkv"}})  # fmt: skip
    return out


def _matching_selection(krow: dict[str, Any], method: Method | None) -> dict[str, Any] | None:
    if method is None or method.name != "xattention":
        return None
    for sel in krow.get("selection", []):
        if sel["stride"] == method.stride and sel["shared_kv_mask"] == method.shared_kv_mask:  # type: ignore[attr-defined]
            return sel
    return None


def _compose(record: dict[str, Any], configs: Sequence[BenchConfig], kernel_path: Path | None) -> None:
    """Append composed rows to a random-weights record (or a note saying why there are none)."""
    info = record["model_info"]
    shape = (info["q_heads"], info["kv_heads"], info["head_dim"])
    if kernel_path is None or not kernel_path.is_file():
        record["notes"].append(f"no kernel record ({KERNEL_RECORDS}): no composed rows; the sdpa rows give the measured "
                               "non-attention time (profiled rest) and dense attention time only")  # fmt: skip
        return
    kernel = json.loads(kernel_path.read_text())
    p = kernel.get("params", {})
    if (p.get("q_heads"), p.get("kv_heads"), p.get("head_dim")) != shape:
        record["notes"].append(f"kernel record {kernel_path} is not at the model's attention shape {shape}: not composed")
        return
    rows = composed_rows(record["rows"], kernel, str(kernel_path), configs, info["layers"])
    record["rows"] += rows
    record["notes"].append(f"composed rows ({len(rows)}): measured non-attention time + {info['layers']} layers x the "
                           f"per-layer attention of {kernel_path} (random weights give near-uniform attention)")  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------------------------


def _header(model: Any, name: str, settings: Settings, random_weights: bool) -> dict[str, Any]:
    import transformers

    device = next(model.parameters()).device
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    timer = "CUDA events, torch.cuda.synchronize after each repeat" if device.type == "cuda" else "time.perf_counter (CPU)"
    return {
        "benchmark": "model",
        "model": name,
        "random_weights": random_weights,
        "model_info": _model_info(model),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device": str(device),
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "fa4": fa4_status(device),
        "params": {
            **dataclasses.asdict(settings),
            "lengths": list(settings.lengths),
            "specs": list(settings.specs),
            "ttft": "prefill (logits_to_keep=1) + greedy first token + one decode step",
            "timer": timer,
        },
        "rows": [],
        "notes": [],
        "stopped": None,
    }


def _backend(config: BenchConfig, device: torch.device, fa4: dict[str, Any]) -> str:
    from ..kernels import resolve_backend

    dense = "FA4" if fa4.get("usable") else "SDPA (FA4 not usable)"
    if config.method is None:
        return "transformers sdpa"
    if isinstance(config.method, Dense):
        return f"xattention dense dispatch: {dense}"
    return f"xattention sparse ({resolve_backend('auto', device)} selection), dense dispatch {dense} for the rest"


def _measure_length(
    model: Any, tokenizer: Any, length: int, configs: Sequence[BenchConfig], settings: Settings, ctx: dict[str, Any]
) -> bool:
    """Every configuration at one length; rows go to ``ctx["record"]``. False when the time budget stopped the run."""
    record, device = ctx["record"], ctx["device"]
    factor = rope_factor(settings.rope_scale, length, ctx["context"])
    if factor != ctx["factor"]:  # rebuild the rotary embeddings only when the factor changes
        set_rope_factor(model, factor, ctx["rope"])
        ctx["factor"] = factor
    ids, passkey = make_prompt(tokenizer, length, answer_tokens=settings.answer_tokens, depth=settings.depth,
                               seed=settings.seed, vocab_size=int(_text_config(model).vocab_size))  # fmt: skip
    ids = ids.to(device)
    speed_only = factor != 1.0 or (ctx["context"] is not None and length > ctx["context"])
    reference = None
    for config in configs:
        elapsed = time.perf_counter() - ctx["start"]
        if settings.time_budget_s is not None and elapsed > settings.time_budget_s:
            record["stopped"] = f"time budget {settings.time_budget_s:.0f} s reached before L={length} {config.spec}"
            return False
        ctx["bar"].set_description(f"L={length} {config.spec}")
        row = measure_config(model, tokenizer, ids, passkey, config, settings, reference)
        if config.dense and reference is None:
            reference = row["answer"]["text"]
        # the stock model (sdpa) cannot be broken by us: its miss is the model's, and its answer is the reference
        valid = row["answer"]["status"] != "fail" or speed_only or config.method is None
        row.update(length=length, tokens=int(ids.shape[1]), rope_factor=factor, speed_only=speed_only,
                   backend=_backend(config, device, record["fa4"]), speed_valid=valid)  # fmt: skip
        record["rows"].append(row)
        row["ttft_vs_sdpa"] = _speedup(record, row)
        logger.info("L=%d %s: TTFT best %.2f ms, median %.2f ms, density %.3f, answer %s", length, config.spec,
                    row["ttft_ms"]["best"], row["ttft_ms"]["median"], row["density"], row["answer"]["status"])  # fmt: skip
        if ctx["on_row"] is not None:
            ctx["on_row"](record)
        ctx["bar"].update()
    return True


def run(
    model: Any,
    tokenizer: Any,
    name: str,
    settings: Settings,
    *,
    random_weights: bool = False,
    kernel_record: str | os.PathLike | None = None,
    on_row: Callable[[dict[str, Any]], Any] | None = None,
) -> dict[str, Any]:
    """Measure every configuration of ``settings.specs`` at every length on ``model`` (on its device) and return the
    record (schema: ``docs/bench-model.md``). ``tokenizer`` ``None`` means random token prompts (no answer check);
    ``random_weights`` adds the composed rows from ``kernel_record`` (default: the newest H200 kernel record).
    ``on_row(record)`` runs after every row (to checkpoint it). The model is left as it was found (no hook, its RoPE)."""
    from tqdm.auto import tqdm

    configs = parse_configs(settings.specs, min_seq_len=settings.min_seq_len)  # fail before any model work
    if any(n < 1 for n in settings.lengths):
        raise ValueError(f"lengths must be positive, got {settings.lengths}")
    record = _header(model, name, settings, random_weights)
    device = next(model.parameters()).device
    total = len(settings.lengths) * len(configs)
    bar = tqdm(total=total, unit="run", mininterval=1.0 if sys.stderr.isatty() else 30.0)
    ctx = {"record": record, "device": device, "context": None if random_weights else trained_context(model),
           "rope": _rope_settings(model), "factor": 1.0, "start": time.perf_counter(), "bar": bar,
           "on_row": on_row}  # fmt: skip
    try:
        for length in settings.lengths:
            if not _measure_length(model, tokenizer, length, configs, settings, ctx):
                logger.warning("%s", record["stopped"])
                break
    finally:
        if ctx["factor"] != 1.0:
            set_rope_factor(model, 1.0, ctx["rope"])
        bar.close()
    if random_weights:
        path = Path(kernel_record) if kernel_record is not None else latest_kernel_record()
        _compose(record, configs, path)
    for row in record["rows"]:
        row["ttft_vs_sdpa"] = _speedup(record, row)
    if any(r["speed_only"] for r in record["rows"]):
        record["notes"].append("speed_only rows: beyond the trained context (linear RoPE interpolation): speed only")
    record["seconds"] = time.perf_counter() - ctx["start"]
    return record


# --------------------------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------------------------


def _speedup(record: dict[str, Any], row: dict[str, Any]) -> float | None:
    base = next((r for r in record["rows"] if r["length"] == row["length"] and r["config"] == "sdpa"
                 and not r["composed"]), None)  # fmt: skip
    return None if base is None else base["ttft_ms"]["best"] / row["ttft_ms"]["best"]


def format_table(record: dict[str, Any]) -> str:
    """Markdown table: one line per row; a row whose answer check failed shows no speed."""
    header = ["L", "config", "TTFT best ms", "median ms", "vs sdpa", "peak GiB", "density", "select", "sparse", "dense attn",
              "local", "rest", "decode", "answer"]  # fmt: skip
    cells = []
    for r in record["rows"]:
        s = r["profiled"]["stages_ms"]
        flags = " (composed)" if r["composed"] and "(composed)" not in r["config"] else ""
        flags += " (speed only)" if r["speed_only"] else ""
        if not r["speed_valid"]:
            speed = ["answer wrong", "—", "—"]
        else:
            sp = r.get("ttft_vs_sdpa")
            speed = [f"{r['ttft_ms']['best']:.2f}", f"{r['ttft_ms']['median']:.2f}", "—" if sp is None else f"{sp:.2f}x"]
        peak = "—" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f}"
        stages = [f"{s[k]:.2f}" for k in STAGES]
        cells.append([r["length"], f"{r['config']}{flags}", *speed, peak, f"{r['density']:.3f}", *stages, r["answer"]["status"]])
    lines = markdown_table(header, cells)
    for note in record["notes"] + ([record["stopped"]] if record["stopped"] else []):
        lines.append(f"\nnote: {note}")
    return "\n".join(lines)


def plot(record: dict[str, Any], path: Path) -> None:
    """Left: TTFT (best) against length per configuration (composed dashed, failed answers as crosses). Right: the
    profiled stage split, one stacked bar per (length, configuration)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["rows"]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [1, 1.6]})
    for c in configs:
        pts = sorted((r for r in rows if r["config"] == c), key=lambda r: r["length"])
        composed = pts[0]["composed"]
        ax1.plot([r["length"] for r in pts], [r["ttft_ms"]["best"] for r in pts], ls="--" if composed else "-",
                 marker="o", label=c + (" (speed only beyond context)" if any(r["speed_only"] for r in pts) else ""))  # fmt: skip
        bad = [r for r in pts if not r["speed_valid"]]
        ax1.scatter([r["length"] for r in bad], [r["ttft_ms"]["best"] for r in bad], marker="x", s=80, color="red", zorder=3)
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("prompt length (tokens, nominal)")
    ax1.set_ylabel("TTFT, best of repeats (ms)")
    ax1.set_title("Time to first token (red x: answer check failed)", fontsize=10)
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    colors = plt.get_cmap("tab10")
    x = list(range(len(rows)))
    bottom = [0.0] * len(rows)
    for i, stage in enumerate(STAGES):
        h = [r["profiled"]["stages_ms"][stage] for r in rows]
        ax2.bar(x, h, bottom=bottom, color=colors(i), label=stage.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, h, strict=True)]
    ax2.set_xticks(x, [f"{r['length'] / 1024:g}K {r['config'][:24]}" for r in rows], rotation=60, ha="right", fontsize=6)
    ax2.set_ylabel("ms (profiled run; composed rows: composed)")
    ax2.set_title("Where the TTFT goes", fontsize=10)
    ax2.legend(fontsize=7)
    fig.suptitle(f"{record['model']} on {record['gpu']} ({record['dtype']}), torch {record['torch']}, "
                 f"transformers {record['transformers']}", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------------------


def _rope_scale_arg(text: str) -> str | float:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rope-scale must be 'auto' or a factor >= 1, got {text!r}") from None
    if not value >= 1.0:
        raise argparse.ArgumentTypeError(f"--rope-scale factor must be >= 1, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help=f"smollm2, gemma3-270m, {RANDOM_LLAMA}, or a .gguf file / HF folder")
    p.add_argument("--lengths", default="8k,16k,32k", help="nominal lengths (prompt + answer fit in them), e.g. 8k,16k")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="configurations: sdpa (alias dense), dense-xa, and method specs (default %(default)s)")  # fmt: skip
    p.add_argument("--rope-scale", type=_rope_scale_arg, default="auto",
                   help="linear RoPE factor, or auto: 1 within the trained context, else length/context")  # fmt: skip
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the repeats (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; best and median reported (default %(default)s)")
    p.add_argument("--answer-tokens", type=int, default=12, help="greedy tokens of the answer check (default %(default)s)")
    p.add_argument("--min-seq-len", type=int, default=0, help="methods' min_seq_len unless the spec sets it (default 0)")
    p.add_argument("--depth", type=float, default=0.5, help="needle depth in the haystack (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--kernel-results", default=None, help=f"kernel record for {RANDOM_LLAMA}'s composed rows "
                   f"(default: the newest {KERNEL_RECORDS})")  # fmt: skip
    p.add_argument("--time-budget", type=float, default=None, help="seconds; start no new measurement after it")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="prefill in chunks of this many tokens through the KV cache (xattention.prefill); the record "
                   "is written as model-NAME-chunkN")  # fmt: skip
    p.add_argument("--out", default="benchmarks/results")


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = Settings(
        lengths=tuple(parse_lengths(args.lengths)), specs=tuple(split_method_specs(args.methods)), warmup=args.warmup,
        repeats=args.repeats, rope_scale=args.rope_scale, answer_tokens=args.answer_tokens, depth=args.depth,
        seed=args.seed, min_seq_len=args.min_seq_len, time_budget_s=args.time_budget, chunk_size=args.chunk_size,
    )  # fmt: skip
    if args.chunk_size is not None and args.chunk_size <= 0:
        raise ValueError(f"--chunk-size must be a positive number of tokens, got {args.chunk_size}")
    parse_configs(settings.specs, min_seq_len=settings.min_seq_len)  # bad specs fail before the model loads
    start = time.perf_counter()
    model, tokenizer = load_bench_model(args.model, device=device, dtype=args.dtype)
    logger.info("%s ready on %s in %.1f s", args.model, device, time.perf_counter() - start)
    slug = Path(str(args.model)).stem.lower() + ("" if args.chunk_size is None else f"-chunk{args.chunk_size}")

    def checkpoint(record: dict[str, Any]) -> None:
        write_record(record, args.out, device_stem(record, f"model-{slug}"))

    record = run(model, tokenizer, args.model, settings, random_weights=args.model == RANDOM_LLAMA,
                 kernel_record=args.kernel_results, on_row=checkpoint)  # fmt: skip
    path = write_record(record, args.out, device_stem(record, f"model-{slug}"), plot)
    print(format_table(record))
    print(f"wrote {path} and .png in {record['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
