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
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .._common import device_of, synchronize, text_config
from .._parsing import parse_device, parse_lengths, torch_dtype
from ..methods import Method, method_from_spec
from ..methods.registry import single_method_from_spec, split_method_specs, split_thresholds
from .scoring import score
from .tasks import TASKS, Sample, SampleGenerator, resolve_tasks, sample_seed

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
    "run_eval",
    "torch_dtype",
]

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"


class TimeBudgetExceeded(Exception):
    """``time_budget`` ran out; every finished result is in ``results.jsonl`` and a rerun resumes from there."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__(f"time budget used up after {done} of {total} results; rerun the same command to resume")
        self.done, self.total = done, total


def parse_methods(specs: str | Sequence[str]) -> list[tuple[str, Method]]:
    """Method specs (comma-separated names with ``:key=value`` parameters, or a list) -> ``[(label, Method)]``.

    A comma followed by ``key=value`` continues the previous method's parameters, so
    ``"dense,xattention:threshold=0.9,stride=16"`` is two methods. Labels are the specs with whitespace removed.
    Unknown methods or parameters raise ``ValueError`` (from :func:`~xattention.methods.method_from_spec`).
    A ``thresholds=PATH`` parameter (per-head thresholds from ``xattention calibrate``) is checked here and kept in
    the label (:func:`method_thresholds` returns it); the method is the one without it, and the run passes the file to
    ``apply(..., thresholds=PATH)``, which checks its shape against the model.
    """
    if isinstance(specs, str):
        specs = split_method_specs(specs)
    out: list[tuple[str, Method]] = []
    for spec in specs:
        label = "".join(str(spec).split())
        if not label:
            continue
        rest, path = split_thresholds(label)
        method = single_method_from_spec(rest, where="xattention eval", min_seq_len=0)
        if path is not None:
            method_from_spec(label)  # the file and the method's threshold are checked here, before any model loads
        if label not in [lbl for lbl, _ in out]:
            out.append((label, method))
    if not out:
        raise ValueError("no methods given")
    return out


def method_thresholds(label: str) -> str | None:
    """The ``thresholds=PATH`` of a method label, or ``None``."""
    return split_thresholds(label)[1]


@dataclass
class EvalConfig:
    """Everything one ``xattention eval`` run needs. :meth:`validate` checks it without touching any model.

    Attributes:
        model: a name :func:`xattention.models.load_model` knows (default ``"smollm2"``) or a local ``.gguf`` / HF folder.
        tasks: task names or groups (``"ruler"``: RULER's 11 synthetic tasks; ``"all"``: plus passkey).
        lengths: target lengths in tokens (prompt + answer budget), e.g. ``"1k,2k,4k"``.
        methods: method specs, e.g. ``"dense,xattention:threshold=0.9"``.
        samples: samples per (task, length).
        out: output folder (``results.jsonl``, ``summary.md``, ``summary.json``, ``score_vs_density.png``).
        seed: base seed mixed into every sample's seed (default 42, RULER's).
        device: passed to ``load_model``; ``None``/``"auto"``: CUDA when available, else the CPU.
        dtype: passed to ``load_model`` (``None``: its default, float32 for GGUF files).
        batch_size: prompts per ``generate`` call (left padding when > 1).
        max_new_tokens: overrides every task's answer budget (default: RULER's per task).
        mass: also record the attention mass kept (one extra dense attention per layer and prefill).
        chat_template: ``None`` uses the tokenizer's chat template when it has one; ``False`` never.
        progress: show a progress bar with ETA.
        time_budget: seconds after which no new batch starts (:class:`TimeBudgetExceeded` is raised once the batch in
            flight is written), e.g. to stay inside a job time limit and resume in the next job. ``None``: no limit.
    """

    model: str = "smollm2"
    tasks: str | Sequence[str] = "ruler"
    lengths: str | Sequence[int | str] = "1k,2k,4k"
    methods: str | Sequence[str] = "dense,xattention:threshold=0.9"
    samples: int = 10
    out: str | os.PathLike = "eval-results"
    seed: int = 42
    device: str | None = None
    dtype: str | None = None
    batch_size: int = 1
    max_new_tokens: int | None = None
    mass: bool = False
    chat_template: bool | None = None
    progress: bool = True
    time_budget: float | None = None
    # resolved by validate()
    task_names: list[str] = field(default_factory=list, init=False, repr=False)
    length_values: list[int] = field(default_factory=list, init=False, repr=False)
    method_list: list[tuple[str, Method]] = field(default_factory=list, init=False, repr=False)

    def validate(self) -> EvalConfig:
        """Resolve tasks, lengths and methods; ``ValueError`` on anything unknown or out of range. Loads no model."""
        self.task_names = resolve_tasks(self.tasks)
        self.length_values = parse_lengths(self.lengths)
        self.method_list = parse_methods(self.methods)
        parse_device(self.device)  # an unknown name or a GPU this torch cannot use fails here, not in load_model
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples must be a positive integer, got {self.samples!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch size must be a positive integer, got {self.batch_size!r}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max new tokens must be positive, got {self.max_new_tokens}")
        if self.dtype is not None:
            torch_dtype(self.dtype)
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"time budget must be positive seconds, got {self.time_budget}")
        for length in self.length_values:
            for task in self.task_names:
                need = self.max_new_tokens or TASKS[task].max_new_tokens
                if length <= need + 64:
                    raise ValueError(f"length {length} is too short for {task}: it must exceed {need + 64} tokens")
        return self


# ---------------------------------------------------------------------------------------------------------------------
# results file


def _key(model: str, task: str, length: int, sample: int, seed: int, method: str) -> tuple[str, str, int, int, int, str]:
    return (model, task, int(length), int(sample), int(seed), method)


def _record_key(rec: dict[str, Any]) -> tuple[str, str, int, int, int, str]:
    return _key(rec["model"], rec["task"], rec["length"], rec["sample"], rec["seed"], rec["method"])


def read_results(path: str | os.PathLike, *, repair: bool = False) -> list[dict[str, Any]]:
    """Parse ``results.jsonl``, skipping lines that are not complete JSON records.

    With ``repair=True`` an unterminated last line (a write cut short by an interrupt) is cut off the file, so the next
    append starts on a fresh line.
    """
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    if repair and raw and not raw.endswith(b"\n"):
        cut = raw.rfind(b"\n") + 1
        logger.warning("%s: dropping an unfinished last line (%d bytes)", path, len(raw) - cut)
        with path.open("r+b") as fh:
            fh.truncate(cut)
        raw = raw[:cut]
    records = []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            _record_key(rec)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            logger.warning("%s:%d: skipping a malformed line", path, number)
            continue
        records.append(rec)
    return records


def _append(path: Path, records: Iterable[dict[str, Any]]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


# ---------------------------------------------------------------------------------------------------------------------
# model helpers


def context_limit_from_files(model: str) -> int | None:
    """The context length of a model without loading weights: a GGUF's ``<arch>.context_length`` or an HF folder's
    ``max_position_embeddings``, for a local path or a known model already in :mod:`xattention.models`' cache.

    ``None`` when no file is at hand (the check then runs after loading, still before any generation).
    """
    path = Path(model).expanduser()
    if not path.exists():
        try:
            models = importlib.import_module("xattention.models")
        except ImportError:
            return None
        spec = getattr(models, "MODELS", {}).get(model)
        if spec is None or not hasattr(models, "default_cache_dir"):
            return None
        path = Path(models.default_cache_dir()) / spec.filename
    if path.is_file() and path.suffix == ".gguf":
        from gguf import GGUFReader

        fields = GGUFReader(str(path)).fields

        def value(key: str) -> Any:
            f = fields.get(key)
            return None if f is None else f.contents()

        arch = value("general.architecture")
        ctx = value(f"{arch}.context_length") if arch else None
        return int(ctx) if ctx else None
    if path.is_dir() and (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        for cfg in (config, config.get("text_config") or {}):
            if cfg.get("max_position_embeddings"):
                return int(cfg["max_position_embeddings"])
    return None


def model_context_limit(model: Any) -> int | None:
    """``max_position_embeddings`` of a loaded model's (text) config, ``None`` if it has none."""
    if getattr(model, "config", None) is None:
        return None
    value = getattr(text_config(model), "max_position_embeddings", None)
    return int(value) if value else None


def check_context(lengths: Sequence[int], limit: int | None, model: str) -> None:
    """``ValueError`` naming the lengths beyond ``limit`` tokens (the model's context); ``limit=None`` checks nothing."""
    if limit is not None and max(lengths) > limit:
        too_long = ", ".join(str(n) for n in lengths if n > limit)
        raise ValueError(f"length {too_long} exceeds {model}'s context of {limit} tokens")


def resolve_device(device: str | None) -> str:
    """``None`` or ``"auto"``: the first CUDA GPU when there is one, else the CPU (see :func:`parse_device`)."""
    return str(parse_device(device))


def _pad_id(tokenizer: Any) -> int:
    """The pad id for left padding (the attention mask hides it, so any id works when the tokenizer has none)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(kept) / len(kept) if kept else None


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


# ---------------------------------------------------------------------------------------------------------------------
# the run


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
    done = {_record_key(r) for r in read_results(results, repair=True)}

    def key(task: str, length: int, index: int, label: str) -> tuple[str, str, int, int, int, str]:
        return _key(config.model, task, length, index, sample_seed(config.seed, task, length, index), label)

    todo = [
        (length, task, index, label)
        for length in config.length_values
        for task in config.task_names
        for index in range(config.samples)
        for label, _ in config.method_list
        if key(task, length, index, label) not in done
    ]
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
    generator = SampleGenerator(
        tokenizer, chat_template=config.chat_template, base_seed=config.seed, max_new_tokens=config.max_new_tokens
    )
    pending = {(length, task, index, label) for length, task, index, label in todo}

    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="eval", unit="sample", disable=not config.progress, dynamic_ncols=True)
    finished = 0  # results written by this run
    try:
        # rounds of sample indices over every (length, method); a batch mixes the round's tasks, so a run stopped early
        # leaves every cell with about the same number of samples
        per_round = max(1, config.batch_size // len(config.task_names))
        for first in range(0, config.samples, per_round):
            indices = range(first, min(first + per_round, config.samples))
            for length in config.length_values:
                prompts: dict[tuple[str, int], Sample] = {}  # generated once, reused by every method
                for label, method in config.method_list:
                    items = [(t, i) for t in config.task_names for i in indices if (length, t, i, label) in pending]
                    for at in range(0, len(items), config.batch_size):
                        batch = items[at : at + config.batch_size]
                        # at least one batch per run, so that repeated runs always make progress
                        if config.time_budget is not None and finished and time.monotonic() - start > config.time_budget:
                            raise TimeBudgetExceeded(finished + total - len(todo), total)
                        bar.set_postfix_str(f"{length} {label}")
                        for item in batch:
                            if item not in prompts:
                                prompts[item] = generator.generate(item[0], length, item[1])
                        samples = [prompts[item] for item in batch]
                        predictions, prefill_ms, stats = _run_batch(model, tokenizer, integration, label, method, samples, config)
                        records = [
                            _record(config, sample, label, method, prediction, prefill_ms, stats, len(samples), row)
                            for row, (sample, prediction) in enumerate(zip(samples, predictions, strict=True))
                        ]
                        _append(results, records)
                        finished += len(records)
                        bar.update(len(records))
    finally:
        bar.close()
    return results


def _run_batch(
    model: Any,
    tokenizer: Any,
    integration: Any,
    label: str,
    method: Method,
    samples: Sequence[Sample],
    config: EvalConfig,
) -> tuple[list[str], float, list[dict[str, Any]]]:
    """Apply ``method``, decode the batch, read the prefill statistics (decode steps left out), remove the method."""
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
