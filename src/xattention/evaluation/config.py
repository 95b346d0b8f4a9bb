"""What one ``xattention eval`` run is: :class:`EvalConfig`, and the method list it reads."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from .._parsing import parse_device, parse_lengths, torch_dtype
from ..methods import Method, method_from_spec
from ..methods.registry import single_method_from_spec, split_method_specs, split_thresholds
from .tasks import TASKS, resolve_tasks

__all__ = ["EvalConfig", "method_thresholds", "parse_methods"]


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
    methods: str | Sequence[str] = "dense,xattention:threshold=0.95"
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
