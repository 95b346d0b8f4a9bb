"""Summaries of ``results.jsonl``: a table (task x length x method) and a score-vs-density plot.

Scores are reported as RULER does, ×100 (points). Each cell is the mean over samples with its standard error
(sample standard deviation / sqrt(n)); the "average" rows average the task means with equal weight, and their standard
error combines the tasks' standard errors as independent: ``sqrt(sum se_t^2) / T``. The "difference" rows compare each
method with ``dense`` on the same prompts (paired per sample), averaged over tasks the same way. Density and attention
mass kept are means over samples of the per-sample means over full-attention layers.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["format_markdown", "method_family", "paired_differences", "plot_score_vs_density", "summarize", "write_report"]

SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
PLOT_PNG = "score_vs_density.png"


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _stderr(values: Sequence[float]) -> float | None:
    n = len(values)
    if n < 2:
        return None
    m = sum(values) / n
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def _present(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if v is not None]


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Group records by (model, task, length, method) and average them; add per-(model, length, method) averages.

    Returns ``{"cells": [...], "averages": [...], "differences": [...]}``; scores and standard errors in points (×100).
    """
    groups: dict[tuple[str, str, int, str], list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        groups[(str(rec["model"]), str(rec["task"]), int(rec["length"]), str(rec["method"]))].append(rec)

    cells = []
    for (model, task, length, method), recs in groups.items():
        scores = [100.0 * float(r["score"]) for r in recs]
        cells.append(
            {
                "model": model,
                "task": task,
                "length": length,
                "method": method,
                "n": len(recs),
                "score": _mean(scores),
                "stderr": _stderr(scores),
                "density": _mean(_present(r.get("density") for r in recs)),
                "mass_kept": _mean(_present(r.get("mass_kept") for r in recs)),
                "tokens": _mean(_present(r.get("tokens") for r in recs)),
                "prefill_ms": _mean(_present(r.get("prefill_ms") for r in recs)),
            }
        )
    cells.sort(key=lambda c: (c["model"], c["length"], _order(c["task"]), c["method"]))

    by_avg: dict[tuple[str, int, str], list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        by_avg[(c["model"], c["length"], c["method"])].append(c)
    averages = []
    for (model, length, method), cs in by_avg.items():
        ses = [c["stderr"] for c in cs]
        averages.append(
            {
                "model": model,
                "length": length,
                "method": method,
                "tasks": len(cs),
                "n": sum(c["n"] for c in cs),
                "score": _mean([c["score"] for c in cs]),
                "stderr": None if any(se is None for se in ses) else math.sqrt(sum(se**2 for se in ses)) / len(cs),
                "density": _mean(_present(c["density"] for c in cs)),
                "mass_kept": _mean(_present(c["mass_kept"] for c in cs)),
                "prefill_ms": _mean(_present(c["prefill_ms"] for c in cs)),
            }
        )
    averages.sort(key=lambda a: (a["model"], a["length"], a["method"]))
    return {"cells": cells, "averages": averages, "differences": _paired_differences(groups, "dense")}


def paired_differences(records: Iterable[dict[str, Any]], *, baseline: str = "dense") -> list[dict[str, Any]]:
    """Each method minus ``baseline`` on the same prompts (paired by task, sample and seed), averaged over tasks.

    Pairing removes the prompt-to-prompt variance both methods share, so the difference's standard error is much
    smaller than either score's: this is the number to hold against a "within 1 point of dense" target.

    Returns one row per (model, length, method other than ``baseline``) that shares prompts with it:
    ``{"model", "length", "method", "tasks", "difference", "stderr"}`` in points (×100); ``summarize`` reports the
    rows against ``dense``. Raises ``ValueError`` when no record is of method ``baseline``.
    """
    groups: dict[tuple[str, str, int, str], list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        groups[(str(rec["model"]), str(rec["task"]), int(rec["length"]), str(rec["method"]))].append(rec)
    if not any(method == baseline for *_, method in groups):
        raise ValueError(f"no results of the baseline method {baseline!r}")
    return _paired_differences(groups, baseline)


def _paired_differences(groups: dict[tuple[str, str, int, str], list[dict[str, Any]]], baseline: str) -> list[dict[str, Any]]:
    per_task: dict[tuple[str, int, str], list[tuple[float, float | None]]] = defaultdict(list)
    for (model, task, length, method), recs in groups.items():
        base = groups.get((model, task, length, baseline))
        if method == baseline or base is None:
            continue
        base_scores = {(r.get("sample"), r.get("seed")): float(r["score"]) for r in base}
        diffs = [
            100.0 * (float(r["score"]) - base_scores[(r.get("sample"), r.get("seed"))])
            for r in recs
            if (r.get("sample"), r.get("seed")) in base_scores
        ]
        if diffs:
            per_task[(model, length, method)].append((sum(diffs) / len(diffs), _stderr(diffs)))
    out = []
    for (model, length, method), items in sorted(per_task.items()):
        ses = [se for _, se in items]
        out.append(
            {
                "model": model,
                "length": length,
                "method": method,
                "tasks": len(items),
                "difference": sum(m for m, _ in items) / len(items),
                "stderr": None if any(se is None for se in ses) else math.sqrt(sum(se**2 for se in ses)) / len(items),
            }
        )
    return out


def _order(task: str) -> int:
    from .tasks import TASKS

    names = list(TASKS)
    return names.index(task) if task in names else len(names)


def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _cell_text(c: dict[str, Any] | None) -> str:
    if c is None:
        return ""
    se = "" if c["stderr"] is None else f" ± {c['stderr']:.1f}"
    extra = []
    if c.get("density") is not None:
        extra.append(f"d={c['density']:.2f}")
    if c.get("mass_kept") is not None:
        extra.append(f"m={c['mass_kept']:.2f}")
    return f"{c['score']:.1f}{se}" + (f" ({', '.join(extra)})" if extra else "")


def _methods_in(rows: Iterable[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.setdefault(r["method"], None)
    # dense first, then the others in first-seen order
    return sorted(seen, key=lambda m: (not m.startswith("dense"), list(seen).index(m)))


def format_markdown(summary: dict[str, Any]) -> str:
    """Markdown: per model, the task-averaged table (methods x lengths) and the full table (task, length) x method.

    Cells read ``score ± stderr (d=density, m=mass kept)``, scores in points (×100).
    """
    lines: list[str] = []
    models = sorted({c["model"] for c in summary["cells"]})
    for model in models:
        cells = [c for c in summary["cells"] if c["model"] == model]
        avgs = [a for a in summary["averages"] if a["model"] == model]
        methods = _methods_in(cells)
        lengths = sorted({c["length"] for c in cells})
        n = sorted({c["n"] for c in cells})
        n_text = str(n[0]) if len(n) == 1 else f"{n[0]}–{n[-1]}"
        lines += [f"## {model}", "", f"Samples per cell: {n_text}. Score: RULER string match ×100 ± standard error; "
                  "d: block density, m: attention mass kept (means over full-attention layers).", ""]  # fmt: skip
        lines.append("Average over tasks:")
        lines.append("")
        lines.append("| method | " + " | ".join(_length_label(n) for n in lengths) + " |")
        lines.append("|---|" + "---|" * len(lengths))
        most = {n: max(a["tasks"] for a in avgs if a["length"] == n) for n in lengths}
        for m in methods:
            row = {a["length"]: a for a in avgs if a["method"] == m}
            texts = []
            for n in lengths:
                a = row.get(n)
                partial = a is not None and a["tasks"] < most[n]  # averaged over fewer tasks: not comparable
                texts.append(_cell_text(a) + (f" [{a['tasks']}/{most[n]} tasks]" if partial else ""))
            lines.append(f"| {m} | " + " | ".join(texts) + " |")
        diffs = [d for d in summary.get("differences", []) if d["model"] == model]
        if diffs:
            lines += ["", "Difference from dense on the same prompts (paired), average over tasks:", ""]
            lines.append("| method | " + " | ".join(_length_label(n) for n in lengths) + " |")
            lines.append("|---|" + "---|" * len(lengths))
            for m in [m for m in methods if any(d["method"] == m for d in diffs)]:
                row = {d["length"]: d for d in diffs if d["method"] == m}
                texts = []
                for n in lengths:
                    d = row.get(n)
                    se = "" if d is None or d["stderr"] is None else f" ± {d['stderr']:.1f}"
                    texts.append("" if d is None else f"{d['difference']:+.1f}{se}")
                lines.append(f"| {m} | " + " | ".join(texts) + " |")
        lines += ["", "Per task:", ""]
        lines.append("| task | length | " + " | ".join(methods) + " |")
        lines.append("|---|---|" + "---|" * len(methods))
        index = {(c["task"], c["length"], c["method"]): c for c in cells}
        tasks = sorted({c["task"] for c in cells}, key=_order)
        for length in lengths:
            for task in tasks:
                if not any((task, length, m) in index for m in methods):
                    continue
                texts = [_cell_text(index.get((task, length, m))) for m in methods]
                lines.append(f"| {task} | {_length_label(length)} | " + " | ".join(texts) + " |")
        lines.append("")
    return "\n".join(lines)


# parameters a method's accuracy curve sweeps: methods that differ only in these form one curve in the plot
_SWEPT = ("threshold", "gamma", "local_blocks", "thresholds")


def method_family(label: str) -> tuple[str, str]:
    """``(curve, point)`` of a method label for the plot: the label without its swept parameter, and that parameter.

    ``"xattention:stride=8,threshold=0.9"`` -> ``("xattention:stride=8", "0.9")``;
    ``"xattention:stride=8,thresholds=runs/thresholds-m-4k-mass0.9.json"`` -> ``("xattention:stride=8 thresholds-m-4k",
    "mass0.9")`` (the file name before and after its last ``-``: files that differ only in that part form one curve);
    ``"dense"`` -> ``("dense", "")``.
    """
    from ..methods.registry import parse_spec

    name, params = parse_spec(label)
    fixed = [f"{k}={v}" for k, v in params if k not in _SWEPT]
    swept = {k: v for k, v in params if k in _SWEPT}
    family = name + (":" + ",".join(fixed) if fixed else "")
    if "thresholds" in swept:
        stem = Path(swept["thresholds"]).stem
        curve, _, point = stem.rpartition("-")
        return f"{family} {curve or 'thresholds'}", point
    return family, ",".join(swept.values())


def _legend_columns(labels: Sequence[str], width_inches: float) -> int:
    """How many legend columns of 8-point labels fit the figure's width (at most 4): long labels get fewer."""
    chars_per_inch = 15  # 8-point sans-serif, plus the marker and gap of each entry (~6 characters)
    widest = max(len(lbl) for lbl in labels) + 6
    return max(1, min(4, len(labels), int(width_inches * chars_per_inch) // widest))


def plot_score_vs_density(summary: dict[str, Any], path: str | os.PathLike) -> Path:
    """Score minus dense (paired, ±1 SE, averaged over tasks) vs block density: one panel per (model, length), one
    curve per method family (:func:`method_family`: e.g. XAttention's threshold sweep), points labelled by the swept
    value; the band is ±1 point around dense. A model without a dense run gets its raw task-averaged scores instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    density = {(a["model"], a["length"], a["method"]): a["density"] for a in summary["averages"]}
    panels = sorted({(a["model"], a["length"]) for a in summary["averages"]})
    paired = {(d["model"], d["length"], d["method"]): d for d in summary["differences"]}
    families = sorted({method_family(a["method"])[0] for a in summary["averages"] if a["method"] != "dense"})
    colours = {f: plt.get_cmap("tab10" if len(families) <= 10 else "tab20")(i) for i, f in enumerate(families)}
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.2 * max(len(panels), 1), 4.6), squeeze=False)
    for ax, (model, length) in zip(axes[0], panels, strict=True):
        relative = any(m == model and n == length for m, n, _ in paired)
        points: dict[str, list[tuple[float, float, float, str]]] = defaultdict(list)
        for a in summary["averages"]:
            if (a["model"], a["length"]) != (model, length) or a["method"] == "dense" or a["density"] is None:
                continue
            if relative:
                d = paired.get((model, length, a["method"]))
                if d is None:
                    continue
                y, err = d["difference"], d["stderr"] or 0.0
            else:
                y, err = a["score"], a["stderr"] or 0.0
            family, point = method_family(a["method"])
            points[family].append((density[(model, length, a["method"])], y, err, point))
        for family in families:
            pts = sorted(points.get(family, []))
            if not pts:
                continue
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                        color=colours[family], label=family)  # fmt: skip
            for x, y, _, point in pts:
                if point:
                    ax.annotate(point, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colours[family])
        if relative:
            ax.axhspan(-1.0, 1.0, color="grey", alpha=0.15, lw=0)
            ax.axhline(0.0, color="black", lw=0.8)
            ax.set_ylabel("score − dense (paired, RULER ×100)")
        else:
            ax.set_ylabel("score, RULER ×100 (mean over tasks)")
        ax.set_xlabel("block density (kept fraction of causal blocks)")
        ax.set_title(f"{model}, {_length_label(length)}")
        ax.set_xlim(0.0, 1.05)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, lbl in zip(*ax.get_legend_handles_labels(), strict=True):
            if lbl not in labels:
                handles.append(h)
                labels.append(lbl)
    if handles:
        ncol = _legend_columns(labels, fig.get_figwidth())
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(labels) - 1) // ncol), 1, 1))
    else:
        fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out_dir: str | os.PathLike, records: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Rebuild ``summary.md``, ``summary.json`` and ``score_vs_density.png`` in ``out_dir`` from ``results.jsonl``.

    Raises ``ValueError`` when there are no results to summarize.
    """
    from .runner import RESULTS_FILE, read_results

    out = Path(out_dir)
    if records is None:
        if not (out / RESULTS_FILE).is_file():
            raise ValueError(f"no {RESULTS_FILE} in {out}")
        records = read_results(out / RESULTS_FILE)
    if not records:
        raise ValueError(f"{out / RESULTS_FILE} holds no results")
    summary = summarize(records)
    (out / SUMMARY_MD).write_text(format_markdown(summary), encoding="utf-8")
    (out / SUMMARY_JSON).write_text(json.dumps(summary, indent=1), encoding="utf-8")
    plot_score_vs_density(summary, out / PLOT_PNG)
    return summary
