"""The evaluation runner: (task x length x sample x method) -> one JSON line each in ``results.jsonl``, resumable.

For each length, each task and each sample the prompt is generated once (with the model's tokenizer) and reused for
every method. Each method is applied to the model through :func:`xattention.integrations.hf.apply` (dense included, so
every method runs through the same code path), prompts are decoded greedily with ``model.generate`` (left-padded batches
when ``batch_size > 1``), and each finished sample is appended to ``results.jsonl`` at once. A restart skips the keys
already there, so an interrupted run loses at most the batch in flight.

Methods are built with ``method_from_spec(spec, min_seq_len=0)``: the sparse path runs at every length (the library's
default ``min_seq_len`` would fall back to dense below 12K keys, which would make short-context accuracy meaningless).

A batch holds up to ``batch_size`` prompts of one length and one method, mixed across tasks (a sample keeps only its
own task's answer budget of the batch's decoding). Work goes in rounds of ``max(1, batch_size // tasks)`` sample indices
over every (length, method), so a run stopped early (Ctrl-C, ``time_budget``, a job limit) leaves all cells with about
the same number of samples.

Methods may carry ``thresholds=PATH`` (a file from ``xattention calibrate``), e.g.
``xattention:stride=8,thresholds=calib.json``: the model then runs with per-head thresholds
(``apply(..., thresholds=PATH)``).

A results line: ``task``, ``length`` (target), ``tokens`` (actual prompt tokens), ``sample``, ``seed``, ``method`` (the
spec), ``method_params``, ``prediction``, ``references``, ``score`` (RULER string match in [0, 1]), ``density`` (kept
fraction of causal blocks, mean over the full-attention layers of this sample's prefill; 1.0 for dense), ``mass_kept``
(with ``mass``), ``prefill_ms`` (generate start to first logits; includes the mass measurement when ``mass`` is on),
``model``, ``depth`` (first needle's relative depth), ``max_new_tokens``, ``batch_size``, ``layer_density`` and
``layer_mass_kept`` (per layer), ``thresholds`` (the per-head thresholds file or ``None``). Density and mass are the
sample's own (the integration records them per batch row); ``prefill_ms`` is the batch's.

The pieces: :mod:`.config` (:class:`EvalConfig`, the method list), :mod:`.results` (the JSONL file), :mod:`.context`
(context lengths from GGUF metadata or ``config.json``), :mod:`.generation` (batched greedy decoding). This module runs
the loop and re-exports their public names.
"""

from __future__ import annotations

import importlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .._common import device_of
from .._parsing import parse_device, parse_lengths, torch_dtype
from ..methods import Method
from .config import EvalConfig, method_thresholds, parse_methods
from .context import check_context, context_limit_from_files, model_context_limit
from .generation import Answers, generate_answers
from .results import RESULTS_FILE, append_results, read_results, record_key, result_key
from .scoring import score
from .tasks import Sample, SampleGenerator, sample_seed

__all__ = [
    "RESULTS_FILE",
    "Answers",
    "EvalConfig",
    "TimeBudgetExceeded",
    "check_context",
    "context_limit_from_files",
    "device_of",
    "generate_answers",
    "method_thresholds",
    "model_context_limit",
    "parse_lengths",
    "parse_methods",
    "read_results",
    "resolve_device",
    "run_batch",
    "run_eval",
    "torch_dtype",
]

logger = logging.getLogger(__name__)

# (length, task, sample index, method label): one result to compute
Item = tuple[int, str, int, str]


class TimeBudgetExceeded(Exception):
    """``time_budget`` ran out; every finished result is in ``results.jsonl`` and a rerun resumes from there."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__(f"time budget used up after {done} of {total} results; rerun the same command to resume")
        self.done, self.total = done, total


def resolve_device(device: str | None) -> str:
    """``None`` or ``"auto"``: the first CUDA GPU when there is one, else the CPU (see :func:`parse_device`)."""
    return str(parse_device(device))


def run_eval(
    config: EvalConfig,
    *,
    load_model: Callable[..., tuple[Any, Any]] | None = None,
    integration: Any = None,
) -> Path:
    """Run (or resume) an evaluation; returns the path of ``results.jsonl``.

    Args:
        config: the run; validated here before anything is loaded.
        load_model: ``(name, device=, dtype=) -> (model, tokenizer)``; default :func:`xattention.models.load_model`.
        integration: an object with ``apply``, ``remove``, ``collected_stats``, ``reset_stats``; default
            :mod:`xattention.integrations.hf`.
    """
    config.validate()
    start = time.monotonic()
    out = Path(config.out)
    check_context(config.length_values, context_limit_from_files(config.model), config.model)
    out.mkdir(parents=True, exist_ok=True)
    results = out / RESULTS_FILE
    todo = _todo(config, {record_key(r) for r in read_results(results, repair=True)})
    total = len(config.length_values) * len(config.task_names) * config.samples * len(config.method_list)
    if not todo:
        logger.info("all %d results already in %s", total, results)
        return results
    logger.info("%d of %d results to compute (%d already in %s)", len(todo), total, total - len(todo), results)

    if load_model is None:
        load_model = importlib.import_module("xattention.models").load_model
    if integration is None:
        integration = importlib.import_module("xattention.integrations.hf")
    model, tokenizer = load_model(
        config.model, device=resolve_device(config.device), dtype=None if config.dtype is None else torch_dtype(config.dtype)
    )
    check_context(config.length_values, model_context_limit(model), config.model)
    if hasattr(model, "eval"):
        model.eval()
    run = _Run(config, model, tokenizer, integration, results, start, total - len(todo), total)
    run.all_rounds(todo)
    return results


def _todo(config: EvalConfig, done: set[tuple[str, str, int, int, int, str]]) -> list[Item]:
    """Every (length, task, sample, method) of the run whose result is not in ``done``, in run order."""

    def key(task: str, length: int, index: int, label: str) -> tuple[str, str, int, int, int, str]:
        return result_key(config.model, task, length, index, sample_seed(config.seed, task, length, index), label)

    return [
        (length, task, index, label)
        for length in config.length_values
        for task in config.task_names
        for index in range(config.samples)
        for label, _ in config.method_list
        if key(task, length, index, label) not in done
    ]


class _Run:
    """The main loop of :func:`run_eval`: rounds of sample indices over every (length, method), batches mixed across
    the round's tasks, each finished batch appended to the results file at once."""

    def __init__(
        self, config: EvalConfig, model: Any, tokenizer: Any, integration: Any, results: Path, start: float,
        earlier: int, total: int,
    ) -> None:  # fmt: skip
        self.config, self.model, self.tokenizer, self.integration = config, model, tokenizer, integration
        self.results, self.start, self.earlier, self.total = results, start, earlier, total
        self.generator = SampleGenerator(
            tokenizer, chat_template=config.chat_template, base_seed=config.seed, max_new_tokens=config.max_new_tokens
        )
        self.finished = 0  # results written by this run

    def all_rounds(self, todo: list[Item]) -> None:
        from tqdm.auto import tqdm

        config = self.config
        pending = set(todo)
        bar = tqdm(total=len(todo), desc="eval", unit="sample", disable=not config.progress, dynamic_ncols=True)
        try:
            # rounds of sample indices over every (length, method); a batch mixes the round's tasks, so a run stopped
            # early leaves every cell with about the same number of samples
            per_round = max(1, config.batch_size // len(config.task_names))
            for first in range(0, config.samples, per_round):
                indices = range(first, min(first + per_round, config.samples))
                for length in config.length_values:
                    self.one_length(length, indices, pending, bar)
        finally:
            bar.close()

    def one_length(self, length: int, indices: range, pending: set[Item], bar: Any) -> None:
        """One round's samples ``indices`` at ``length`` for every method; prompts generated once, reused by all."""
        config = self.config
        prompts: dict[tuple[str, int], Sample] = {}
        for label, method in config.method_list:
            items = [(t, i) for t in config.task_names for i in indices if (length, t, i, label) in pending]
            for at in range(0, len(items), config.batch_size):
                batch = items[at : at + config.batch_size]
                # at least one batch per run, so that repeated runs always make progress
                if config.time_budget is not None and self.finished and time.monotonic() - self.start > config.time_budget:
                    raise TimeBudgetExceeded(self.finished + self.earlier, self.total)
                bar.set_postfix_str(f"{length} {label}")
                for item in batch:
                    if item not in prompts:
                        prompts[item] = self.generator.generate(item[0], length, item[1])
                samples = [prompts[item] for item in batch]
                predictions, prefill_ms, stats = run_batch(
                    self.model, self.tokenizer, self.integration, label, method, samples, config
                )
                records = [
                    _record(config, sample, label, method, prediction, prefill_ms, stats, len(samples), row)
                    for row, (sample, prediction) in enumerate(zip(samples, predictions, strict=True))
                ]
                append_results(self.results, records)
                self.finished += len(records)
                bar.update(len(records))


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(kept) / len(kept) if kept else None


def run_batch(
    model: Any,
    tokenizer: Any,
    integration: Any,
    label: str,
    method: Method,
    samples: Sequence[Sample],
    config: EvalConfig,
) -> tuple[list[str], float, list[dict[str, Any]]]:
    """One batch through the harness: apply ``method`` (labelled ``label``), decode ``samples`` greedily, read the
    prefill statistics (decode steps left out), remove the method. Returns ``(predictions, prefill_ms, stats)``."""
    thresholds = method_thresholds(label)
    extra = {} if thresholds is None else {"thresholds": thresholds}
    integration.apply(model, method, record_stats=True, record_mass=config.mass, **extra)
    try:
        integration.reset_stats(model)
        predictions, prefill_ms, _ = generate_answers(model, tokenizer, samples, device_of(model))
        stats = [st for st in integration.collected_stats(model) if int(st.get("q_len", 2)) > 1]
    finally:
        integration.remove(model)
    return predictions, prefill_ms, stats


def _record(
    config: EvalConfig,
    sample: Sample,
    label: str,
    method: Method,
    prediction: str,
    prefill_ms: float,
    stats: list[dict[str, Any]],
    batch_size: int,
    row: int,
) -> dict[str, Any]:
    # this row's statistic where the layer recorded one per row, else the layer's (batch) value; the dense path records
    # density None: every causally visible block was computed
    def of_row(st: dict[str, Any], key: str) -> float | None:
        rows = st.get(f"row_{key}")
        return rows[row] if rows is not None and row < len(rows) else st.get(key)

    layer_density = {str(st["layer"]): of_row(st, "density") for st in stats if st.get("layer") is not None}
    layer_mass = {str(st["layer"]): of_row(st, "mass_kept") for st in stats if st.get("layer") is not None}
    density = _mean(of_row(st, "density") for st in stats)
    mass = _mean(of_row(st, "mass_kept") for st in stats) if config.mass else None
    if stats and density is None:
        density = 1.0
    if config.mass and stats and mass is None:
        mass = 1.0
    return {
        "task": sample.task,
        "length": sample.length,
        "tokens": sample.tokens,
        "sample": sample.index,
        "seed": sample.seed,
        "method": label,
        "method_params": method.params(),
        "thresholds": method_thresholds(label),
        "prediction": prediction,
        "references": sample.references,
        "score": score(prediction, sample.references, sample.metric),
        "density": density,
        "mass_kept": mass,
        "prefill_ms": prefill_ms,
        "model": config.model,
        "depth": sample.depth,
        "max_new_tokens": sample.max_new_tokens,
        "batch_size": batch_size,
        # per full-attention layer, for finding where a method loses accuracy: {layer index: value}
        "layer_density": layer_density,
        "layer_mass_kept": layer_mass if config.mass else None,
    }
