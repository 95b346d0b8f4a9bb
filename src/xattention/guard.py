"""Accuracy guard: does a sparse method keep a model's retrieval answers and next-token logits close to dense?

Before deploying a method on their own model, users run :func:`check_accuracy` (or ``xattention check``): at each
length, seeded retrieval probes from the evaluation harness's generators (passkey and needle-in-a-haystack, see
:data:`GUARD_TASKS`) run twice through greedy decoding, once on the untouched model (dense) and once with
:func:`xattention.apply` (the method; removed again afterwards, also on error). Per length the report gives

* **answers**: how many probes dense answers correctly (RULER string match = 1), how many the method scores the same as
  dense ("kept"), below dense ("lost") and above ("gained");
* **logits**: ``KL(dense || sparse)`` in nats of the next-token distribution at the prompt's last position (the one
  that predicts the answer's first token), and whether the two agree on its top-1 token;
* **density**: the fraction of causally visible key blocks the method computed (mean over the prefill's full-attention
  layers; 1.0 where it ran dense);

and a PASS/FAIL verdict against a :class:`Tolerance`. ``xattention check --model smollm2 --lengths 4k --method
xattention:threshold=0.9`` runs it from the command line (:mod:`xattention.guard_cli`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from ._parsing import parse_lengths
from .methods.base import Method

__all__ = [
    "DEFAULT_MAX_MEAN_KL",
    "GUARD_TASKS",
    "AccuracyCheck",
    "LengthCheck",
    "ProbeResult",
    "Tolerance",
    "build_probes",
    "check_accuracy",
    "check_arguments",
    "logit_agreement",
]

logger = logging.getLogger(__name__)

# Mean KL(dense || sparse) of the next-token distribution allowed by default, in nats. Why 0.05: by Pinsker's inequality
# (and Jensen over probes) the mean total-variation distance between the two distributions is then at most
# sqrt(0.05 / 2) ~= 0.16, and it is about the drift that 4-bit weight quantization is commonly measured to cause
# (llama.cpp's KL-divergence statistics put 4-bit formats at a few hundredths of a nat), a change users already accept
# for deployment. Exact dense attention scores 0; a method that drops the needle's blocks scores far above it.
DEFAULT_MAX_MEAN_KL = 0.05

# Retrieval probes, in the order a length's probes cycle through them: passkey over repeated filler (no data package
# needed), a keyed number in RULER's noise haystack, one in the Paul Graham essays, and one among three distractor keys.
GUARD_TASKS: tuple[str, ...] = ("passkey", "niah_single_1", "niah_single_2", "niah_multikey_1")

# Answers are single keys or numbers: 32 new tokens hold them with room to spare (RULER's NIAH budget of 128 is for
# multi-value answers) and keep the check fast; a task whose own budget is smaller keeps its own.
DEFAULT_MAX_NEW_TOKENS = 32

# Probe seeds live in their own space: disjoint from evaluation's (base 42) and calibration's (1000 + seed) prompts, so a
# thresholds file is never checked on the prompts it was calibrated on.
_SEED_OFFSET = 2000


@dataclass(frozen=True)
class Tolerance:
    """What a method may lose against dense and still PASS, per length.

    Attributes:
        max_answers_lost: probes the method may score below dense (default 0). Counted per probe, not net of probes the
            method happens to score above dense: a gain on one prompt does not make a loss on another safe.
        max_mean_kl: the mean over probes of ``KL(dense || sparse)`` at the last prompt position, in nats (default
            :data:`DEFAULT_MAX_MEAN_KL`).
    """

    max_answers_lost: int = 0
    max_mean_kl: float = DEFAULT_MAX_MEAN_KL

    def __post_init__(self) -> None:
        lost = self.max_answers_lost
        if isinstance(lost, bool) or not isinstance(lost, int) or lost < 0:
            raise ValueError(f"max_answers_lost must be a non-negative int, got {lost!r}")
        kl = self.max_mean_kl
        if isinstance(kl, bool) or not isinstance(kl, (int, float)) or not kl >= 0 or math.isinf(kl):
            raise ValueError(f"max_mean_kl must be a finite number >= 0 (nats), got {kl!r}")


@dataclass
class ProbeResult:
    """One probe, run dense and with the method. Scores are RULER string match in ``[0, 1]``."""

    task: str
    index: int
    seed: int
    tokens: int
    depth: float | None
    references: list[str]
    dense_answer: str
    sparse_answer: str
    dense_score: float
    sparse_score: float
    kl: float  # KL(dense || sparse) of the next-token distribution at the last prompt position, nats
    top1_agree: bool
    density: float | None  # None when no full-attention layer ran through xattention

    @property
    def lost(self) -> bool:
        return self.sparse_score < self.dense_score

    @property
    def gained(self) -> bool:
        return self.sparse_score > self.dense_score


@dataclass
class LengthCheck:
    """All probes of one target length and the verdict on them."""

    length: int
    probes: list[ProbeResult]
    tolerance: Tolerance
    seconds: float = 0.0

    @property
    def dense_correct(self) -> int:
        return sum(p.dense_score == 1.0 for p in self.probes)

    @property
    def kept(self) -> int:
        return sum(p.sparse_score == p.dense_score for p in self.probes)

    @property
    def lost(self) -> int:
        return sum(p.lost for p in self.probes)

    @property
    def gained(self) -> int:
        return sum(p.gained for p in self.probes)

    @property
    def mean_kl(self) -> float:
        return sum(p.kl for p in self.probes) / len(self.probes)

    @property
    def max_kl(self) -> float:
        return max(p.kl for p in self.probes)

    @property
    def top1_agreement(self) -> float:
        return sum(p.top1_agree for p in self.probes) / len(self.probes)

    @property
    def density(self) -> float | None:
        values = [p.density for p in self.probes if p.density is not None]
        return sum(values) / len(values) if values else None

    def failures(self) -> list[str]:
        """Why this length fails (empty when it passes)."""
        out = []
        if self.lost > self.tolerance.max_answers_lost:
            out.append(f"{self.lost} of {len(self.probes)} answers lost (tolerance {self.tolerance.max_answers_lost})")
        if not self.mean_kl <= self.tolerance.max_mean_kl:  # NaN fails
            out.append(f"mean KL {self.mean_kl:.4g} nats > {self.tolerance.max_mean_kl:g}")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    def notes(self) -> list[str]:
        """Caveats that do not fail the check but limit what it says."""
        out = []
        if self.dense_correct == 0:
            out.append("dense answers none of the probes correctly, so the answer check says little at this length")
        if self.density == 1.0:
            out.append("the method computed every block (density 1.0): the sparse path did not change attention")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "length": self.length,
            "probes": len(self.probes),
            "tokens_mean": sum(p.tokens for p in self.probes) / len(self.probes),
            "dense_correct": self.dense_correct,
            "kept": self.kept,
            "lost": self.lost,
            "gained": self.gained,
            "mean_kl": self.mean_kl,
            "max_kl": self.max_kl,
            "top1_agreement": self.top1_agreement,
            "density": self.density,
            "passed": self.passed,
            "failures": self.failures(),
            "notes": self.notes(),
            "seconds": round(self.seconds, 2),
            "results": [asdict(p) for p in self.probes],
        }


@dataclass
class AccuracyCheck:
    """What :func:`check_accuracy` found: one :class:`LengthCheck` per length, ``passed`` when every length passes."""

    method: str
    method_params: dict[str, Any]
    thresholds: str | None
    tasks: list[str]
    samples: int
    tolerance: Tolerance
    lengths: list[LengthCheck]
    seconds: float = 0.0
    model: str | None = None  # a name for the report (the CLI sets the --model it loaded)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.lengths)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the configuration, the verdict and every length's figures and probes."""
        return {
            "passed": self.passed,
            "verdict": "PASS" if self.passed else "FAIL",
            "model": self.model,
            "method": self.method,
            "method_params": self.method_params,
            "thresholds": self.thresholds,
            "tasks": self.tasks,
            "samples": self.samples,
            "tolerance": asdict(self.tolerance),
            "lengths": [c.to_dict() for c in self.lengths],
            "seconds": round(self.seconds, 2),
            "versions": _versions(),
        }

    def format_table(self) -> str:
        """A plain-text table, one row per length."""
        head = ("length", "tokens", "dense right", "kept", "lost", "mean KL", "max KL", "top-1 agree", "density", "verdict")
        rows = [head]
        for c in self.lengths:
            n = len(c.probes)
            tokens = round(sum(p.tokens for p in c.probes) / n)
            density = "-" if c.density is None else f"{c.density:.3f}"
            rows.append((str(c.length), str(tokens), f"{c.dense_correct}/{n}", f"{c.kept}/{n}", str(c.lost),
                         f"{c.mean_kl:.4f}", f"{c.max_kl:.4f}", f"{c.top1_agreement:.0%}", density,
                         "PASS" if c.passed else "FAIL"))  # fmt: skip
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
        lines.extend(f"note ({c.length}): {note}" for c in self.lengths for note in c.notes())
        return "\n".join(lines)

    def summary(self) -> str:
        """The one-line verdict: ``PASS: ...`` or ``FAIL: ...`` with every failing length's reasons."""
        t = self.tolerance
        if self.passed:
            lost = sum(c.lost for c in self.lengths)
            right = sum(c.dense_correct for c in self.lengths)
            total = sum(len(c.probes) for c in self.lengths)
            worst = max(c.mean_kl for c in self.lengths)
            return (
                f"PASS: {self.method} at {', '.join(str(c.length) for c in self.lengths)} tokens: {lost} answers lost of "
                f"{total} probes, {right} right under dense (tolerance {t.max_answers_lost} per length); mean KL at most "
                f"{worst:.4f} nats (tolerance {t.max_mean_kl:g})"
            )
        reasons = "; ".join(f"{c.length}: {', '.join(c.failures())}" for c in self.lengths if not c.passed)
        return f"FAIL: {self.method}: {reasons}"


def _versions() -> dict[str, str | None]:
    from ._version import __version__

    try:
        import transformers
    except ImportError:  # the report of a check never needs it; only running one does
        version = None
    else:
        version = transformers.__version__
    return {"xattention": __version__, "torch": torch.__version__, "transformers": version}


# ---------------------------------------------------------------------------------------------------------------------
# probes
# ---------------------------------------------------------------------------------------------------------------------


def check_arguments(
    lengths: Sequence[int] | str | int,
    *,
    samples: int = 8,
    tasks: str | Sequence[str] = "auto",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> tuple[list[int], list[str] | None]:
    """Validate the probe settings without any model: ``(lengths, task names or None for "auto")``.

    ``ValueError`` (one line) for a bad length, a non-positive ``samples`` or ``max_new_tokens``, an unknown task, or a
    length too short for a task's prompt plus its answer budget (RULER's rule: more than budget + 64 tokens).
    """
    from .evaluation.tasks import TASKS, resolve_tasks

    values = parse_lengths([lengths] if isinstance(lengths, int) else lengths)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    names = None if tasks == "auto" else resolve_tasks(tasks)
    for task in names or GUARD_TASKS:
        need = min(TASKS[task].max_new_tokens, max_new_tokens) + 64
        if min(values) <= need:
            raise ValueError(f"length {min(values)} is too short for {task}: it must exceed {need} tokens")
    return values, names


def build_probes(
    tokenizer: Any,
    lengths: Sequence[int],
    *,
    samples: int = 8,
    tasks: Sequence[str] | None = None,
    seed: int = 0,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    chat_template: bool | None = None,
) -> dict[int, list[Any]]:
    """``{length: [Sample, ...]}``: ``samples`` probes per length, cycling through the tasks.

    Probe ``i`` of a length is sample ``i // n`` of task ``i mod n`` (``n`` tasks), so each task's needles move through
    the context in the harness's depth order (0, 1/2, 1/4, ...). Deterministic in all arguments. ``tasks=None`` uses the
    :data:`GUARD_TASKS` whose data packages are installed (passkey always is). Each task decodes at most
    ``max_new_tokens`` (its own RULER budget if smaller); prompts fill the rest of the length.
    """
    from .evaluation.tasks import TASKS, SampleGenerator

    generators: dict[int, Any] = {}
    auto = tasks is None

    def make(task: str, length: int, index: int) -> Any:
        budget = min(TASKS[task].max_new_tokens, max_new_tokens)
        if budget not in generators:
            generators[budget] = SampleGenerator(
                tokenizer, chat_template=chat_template, base_seed=_SEED_OFFSET + seed, max_new_tokens=budget
            )
        try:
            return generators[budget].generate(task, length, index)
        except ModuleNotFoundError as exc:  # a task's data package (essays, word lists) is missing
            if auto:
                raise
            raise ValueError(f"probe task {task} cannot be generated: {exc}") from exc

    first: dict[str, Any] = {}
    if auto:
        for task in GUARD_TASKS:  # each task's data is probed once, on the first probe it gives anyway
            try:
                first[task] = make(task, lengths[0], 0)
            except ModuleNotFoundError as exc:
                logger.info("probe task %s skipped: %s", task, exc)
            if len(first) == samples:  # fewer probes than tasks: the first ones that can be made
                break
        tasks = list(first)
    out: dict[int, list[Any]] = {}
    for j, length in enumerate(lengths):
        probes = []
        for i in range(samples):
            task, index = tasks[i % len(tasks)], i // len(tasks)
            if j == 0 and index == 0 and task in first:
                probes.append(first[task])
            else:
                probes.append(make(task, length, index))
        out[length] = probes
    return out


# ---------------------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------------------


def logit_agreement(dense: Tensor, sparse: Tensor) -> tuple[Tensor, Tensor]:
    """``KL(dense || sparse)`` in nats and top-1 agreement of next-token logits ``[..., V]``.

    Computed in float64 from log-softmax; vocabulary entries dense gives probability 0 (``-inf`` logits) add nothing.
    Returns float64 ``[...]`` KL (``>= 0``) and bool ``[...]`` (same argmax).
    """
    if dense.shape != sparse.shape:
        raise ValueError(f"logits have different shapes: {tuple(dense.shape)} and {tuple(sparse.shape)}")
    log_p = torch.log_softmax(dense.double(), dim=-1)
    log_q = torch.log_softmax(sparse.double(), dim=-1)
    terms = torch.where(log_p > -math.inf, log_p.exp() * (log_p - log_q), torch.zeros_like(log_p))
    return terms.sum(dim=-1).clamp_min(0.0), dense.argmax(dim=-1) == sparse.argmax(dim=-1)


def _resolve_method(method: Method | str, thresholds: Any) -> tuple[str, Method, Any]:
    """``(label, method, thresholds)`` from a method or a spec (``min_seq_len=0`` unless given, ``thresholds=PATH``)."""
    if isinstance(method, Method):
        return method.name, method, thresholds
    if not isinstance(method, str):
        raise ValueError(f"method must be an xattention method or a spec string, got {type(method).__name__}")
    from .evaluation.runner import method_thresholds, parse_methods

    parsed = parse_methods(method)
    if len(parsed) != 1:
        raise ValueError(f"the accuracy check takes one method, got {len(parsed)}: {', '.join(lbl for lbl, _ in parsed)}")
    ((label, resolved),) = parsed
    path = method_thresholds(label)
    if path is not None and thresholds is not None:
        raise ValueError(f"{label!r} names a thresholds file and thresholds= was given too; give one")
    return label, resolved, path if path is not None else thresholds


def _check_device(model: Any, device: Any) -> torch.device:
    """The device probes run on: the model's; an explicit ``device`` must be where the model already is."""
    from ._common import device_of

    here = torch.device(device_of(model))
    if device is None:
        return here
    try:
        wanted = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"bad device {device!r}: {exc}") from None
    if wanted.type != here.type or (wanted.index is not None and here.index is not None and wanted.index != here.index):
        raise ValueError(f"device {wanted} was asked for but the model is on {here}; move it with model.to(...) first")
    return here


def _run_probe(model: Any, tokenizer: Any, sample: Any, method: Method, thresholds: Any, device: torch.device) -> ProbeResult:
    """One probe: greedy decoding on the untouched model, then with ``method`` applied (removed even on error)."""
    from .evaluation.runner import generate_answers
    from .evaluation.scoring import score
    from .integrations.hf import apply, collected_stats, remove

    dense = generate_answers(model, tokenizer, [sample], device, return_logits=True)
    apply(model, method, thresholds=thresholds, record_stats=True)
    try:
        sparse = generate_answers(model, tokenizer, [sample], device, return_logits=True)
        stats = [st for st in collected_stats(model) if int(st.get("q_len", 2)) > 1]  # the prefill, not decode steps
    finally:
        remove(model)
    kl, agree = logit_agreement(dense.logits[0], sparse.logits[0])
    # a layer the integration ran densely records density None: it computed every block
    densities = [1.0 if st.get("density") is None else float(st["density"]) for st in stats]
    return ProbeResult(
        task=sample.task, index=sample.index, seed=sample.seed, tokens=sample.tokens, depth=sample.depth,
        references=list(sample.references), dense_answer=dense.texts[0], sparse_answer=sparse.texts[0],
        dense_score=score(dense.texts[0], sample.references, sample.metric),
        sparse_score=score(sparse.texts[0], sample.references, sample.metric),
        kl=float(kl), top1_agree=bool(agree), density=sum(densities) / len(densities) if densities else None,
    )  # fmt: skip


def _check_length(
    model: Any,
    tokenizer: Any,
    label: str,
    method: Method,
    thresholds: Any,
    device: torch.device,
    length: int,
    probes: Sequence[Any],
    tolerance: Tolerance,
    bar: Any,
) -> LengthCheck:
    """Run every probe (a :class:`~xattention.evaluation.tasks.Sample`) of one length and judge them; ``bar`` (tqdm)
    advances one step per probe."""
    if method.name != "dense" and method.min_seq_len > min(s.tokens for s in probes):
        logger.warning("%s: min_seq_len=%d exceeds the %d-token probes, so it runs dense there; set min_seq_len=0 to "
                       "check its sparse path", label, method.min_seq_len, length)  # fmt: skip
    start, results = time.perf_counter(), []
    for sample in probes:
        bar.set_postfix_str(f"{length} {sample.task}")
        results.append(_run_probe(model, tokenizer, sample, method, thresholds, device))
        bar.update(1)
    check = LengthCheck(length, results, tolerance, seconds=time.perf_counter() - start)
    logger.info("%s at %d tokens: %s", label, length, "PASS" if check.passed else "FAIL: " + "; ".join(check.failures()))
    return check


def check_accuracy(
    model: Any,
    tokenizer: Any,
    method: Method | str,
    *,
    lengths: Sequence[int] | str | int = (4096,),
    samples: int = 8,
    tasks: str | Sequence[str] = "auto",
    tolerance: Tolerance | None = None,
    device: str | torch.device | None = None,
    thresholds: Tensor | str | os.PathLike | None = None,
    seed: int = 0,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    chat_template: bool | None = None,
    progress: bool = True,
) -> AccuracyCheck:
    """Check that ``method`` keeps ``model``'s retrieval answers and next-token logits within ``tolerance`` of dense.

    Every probe runs greedy decoding on the model as given (dense), then with ``xattention.apply(model, method)``; the
    method is removed after each probe, also when an error interrupts the run, and the model's train/eval mode is
    restored: the model is left as it was found. Probes are batch size 1, so padding plays no part.

    Args:
        model: a transformers causal LM without xattention applied (``ValueError`` otherwise: dense would not be dense).
        tokenizer: its tokenizer (``encode``/``decode``, chat template if any, as the evaluation harness needs).
        method: an xattention method, used as given (mind ``min_seq_len``: below it the "sparse" run is dense, which the
            report shows as density 1.0), or a spec such as ``"xattention:threshold=0.9"`` built like ``xattention eval``
            does (``min_seq_len=0`` unless the spec sets it; ``thresholds=PATH`` allowed).
        lengths: target lengths in tokens (prompt + answer budget), e.g. ``"4k,8k"`` or ``[4096]``.
        samples: probes per length (cycling through the tasks, see :func:`build_probes`).
        tasks: ``"auto"`` (the :data:`GUARD_TASKS` whose data is installed) or task names / groups of the harness.
        tolerance: the PASS rule (default :class:`Tolerance()`: no answer lost, mean KL <= 0.05 nats).
        device: where the probes run; default the model's device, which an explicit value must match.
        thresholds: per-head thresholds ``[num_layers, num_heads]`` (a tensor or a file) for ``apply``.
        seed: probe seed. max_new_tokens: answer budget cap. chat_template: as the harness (``None``: the tokenizer's).
        progress: show a progress bar over probes.
    Returns:
        An :class:`AccuracyCheck`; its ``passed`` is the verdict, ``to_dict()`` the JSON report.
    """
    from tqdm.auto import tqdm

    from .evaluation.runner import check_context, model_context_limit
    from .integrations.hf import is_applied

    tolerance = Tolerance() if tolerance is None else tolerance
    if not isinstance(tolerance, Tolerance):
        raise ValueError(f"tolerance must be a Tolerance, got {type(tolerance).__name__}")
    label, method, thresholds = _resolve_method(method, thresholds)
    values, names = check_arguments(lengths, samples=samples, tasks=tasks, max_new_tokens=max_new_tokens)
    if is_applied(model):
        raise ValueError("the model already has xattention applied; call xattention.remove(model) first")
    check_context(values, model_context_limit(model), type(model).__name__)
    run_on = _check_device(model, device)
    start = time.perf_counter()
    probes = build_probes(tokenizer, values, samples=samples, tasks=names, seed=seed, max_new_tokens=max_new_tokens,
                          chat_template=chat_template)  # fmt: skip
    was_training = bool(getattr(model, "training", False))
    model.eval()
    checks = []
    bar = tqdm(total=len(values) * samples, desc=f"check {label}", unit="probe", disable=not progress, dynamic_ncols=True)
    try:
        for length in values:
            checks.append(_check_length(model, tokenizer, label, method, thresholds, run_on, length, probes[length],
                                        tolerance, bar))  # fmt: skip
    finally:
        bar.close()
        model.train(was_training)
    path = None if thresholds is None else ("tensor" if isinstance(thresholds, Tensor) else str(thresholds))
    tasks_used = list(dict.fromkeys(p.task for ps in probes.values() for p in ps))
    return AccuracyCheck(label, method.params(), path, tasks_used, samples, tolerance, checks,
                         seconds=time.perf_counter() - start)  # fmt: skip
