"""``xattention calibrate``: load the model, calibrate, save the thresholds file, print the comparison with one global
``tau`` (or, with ``--from``, choose again from an earlier file's tables without the model). The file loads with
:func:`xattention.load_thresholds`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .._parsing import parse_lengths
from .runner import PER, STATISTICS, calibrate, parse_target, rechoose
from .statistics import DEFAULT_CANDIDATES, check_candidates

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``xattention calibrate``."""
    parser.add_argument("--model", default="smollm2", help="model name or path for xattention.models.load_model")
    parser.add_argument("--lengths", default="4k", help="comma-separated prompt lengths in tokens, k = 1024 (default 4k)")
    parser.add_argument(
        "--target",
        required=True,
        help="mass=M (least density keeping >= M per head), density=D (most mass at mean density D) or density=tau:T "
        "(most mass at the mean density one global tau=T has on the calibration prompts)",
    )
    parser.add_argument("--out", required=True, help="thresholds JSON to write")
    parser.add_argument(
        "--statistic",
        choices=tuple(STATISTICS),
        default=None,
        help="the mass the target speaks of: mass (over every query row) or answer_mass (over the last block of query "
        "rows, the question the answer is produced from); density is the whole mask's either way (default: mass, or the "
        "--from file's)",
    )
    parser.add_argument(
        "--per", choices=PER, default="head", help="one threshold per (layer, head), or one per layer (default head)"
    )
    parser.add_argument(
        "--from",
        dest="from_file",
        default=None,
        metavar="FILE",
        help="choose again from the tables of this thresholds file (written by xattention calibrate): no model runs, "
        "and the prompt and model options are ignored",
    )
    parser.add_argument("--stride", type=int, default=8, help="antidiagonal stride S (default 8)")
    parser.add_argument("--block-size", type=int, default=128, help="block size b (default 128)")
    parser.add_argument(
        "--candidates",
        default=",".join(f"{c:g}" for c in DEFAULT_CANDIDATES),
        help="comma-separated candidate thresholds in (0, 1] (default: %(default)s)",
    )
    parser.add_argument("--samples", type=int, default=2, help="prompts per length (default 2)")
    parser.add_argument(
        "--tasks",
        default="auto",
        help="prompt source: auto (the evaluation harness's task generators where their data is installed, else the "
        "built-in passkey haystack), haystack, or task names/groups such as niah_single_2,vt or ruler (default auto)",
    )
    parser.add_argument("--text", default=None, help="calibrate on windows of this UTF-8 text file (overrides --tasks)")
    parser.add_argument("--seed", type=int, default=0, help="prompt seed (default 0)")
    parser.add_argument("--device", default=None, help="torch device (default: the model loader's choice)")
    parser.add_argument("--dtype", default=None, help="model dtype, e.g. bfloat16 (default: the model loader's choice)")
    parser.add_argument("--backend", default="auto", choices=("auto", "reference", "triton"), help="scoring backend")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _parse_candidates(text: str) -> list[float]:
    try:
        return check_candidates([float(s) for s in text.split(",") if s.strip()])
    except ValueError as exc:
        raise ValueError(f"--candidates: {exc}") from None


def main(args: argparse.Namespace) -> int:
    """Run ``xattention calibrate``: load the model, calibrate, save the thresholds, print the comparison."""
    from .._extras import require_model
    from .._parsing import parse_device, parse_dtype
    from ..methods import XAttention
    from ..models import load_model
    from ..thresholds import save_thresholds

    if args.from_file is not None:
        return _rechoose(args)
    # everything the model is not needed for, before it loads
    require_model(args.model)
    kind, value = parse_target(args.target)
    statistic = args.statistic or "mass"
    lengths = parse_lengths(args.lengths)
    candidates = _parse_candidates(args.candidates)
    XAttention(stride=args.stride, block_size=args.block_size)
    if args.samples < 1:
        raise ValueError(f"--samples must be positive, got {args.samples}")
    device = None if args.device is None else parse_device(args.device)  # None: the model loader's choice
    text = None
    if args.text is not None:
        try:
            text = Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--text {args.text}: cannot read it as UTF-8 text ({exc})") from None
    dtype = None if args.dtype is None else parse_dtype(args.dtype, option="--dtype")
    model, tokenizer = load_model(args.model, device=device, dtype=dtype)
    model.eval()
    thresholds, report = calibrate(
        model, tokenizer, lengths=lengths, target=(kind, value), statistic=statistic, per=args.per, stride=args.stride,
        candidates=candidates, samples=args.samples, block_size=args.block_size, text=text, tasks=args.tasks,
        seed=args.seed, backend=args.backend, progress=not args.no_progress,
    )  # fmt: skip
    if args.text is not None:
        report["text_file"] = str(args.text)
    report["seed"], report["tasks"] = args.seed, args.tasks
    save_thresholds(args.out, thresholds, model_name=args.model, metadata=report)
    _print_report(report, args.out)
    return 0


def _rechoose(args: argparse.Namespace) -> int:
    """``--from FILE``: the same statistic's tables, another target or ``--per``; the file's model name is kept."""
    from ..thresholds import save_thresholds

    try:
        doc = json.loads(Path(args.from_file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--from {args.from_file}: cannot read it as a JSON thresholds file ({exc})") from None
    report = doc.get("metadata") if isinstance(doc, dict) else None
    if not isinstance(report, dict) or "tables" not in report:
        raise ValueError(f"--from {args.from_file}: no calibration tables in its metadata (not written by xattention calibrate)")
    found = report.get("statistic", "mass")
    if args.statistic is not None and args.statistic != found:
        raise ValueError(f"--statistic {args.statistic}: the tables of {args.from_file} are of statistic {found}")
    thresholds, out = rechoose(report, target=args.target, per=args.per)
    keep = {key: report[key] for key in ("text_file", "seed", "tasks") if key in report}
    out = {**out, **keep, "from": str(args.from_file)}
    save_thresholds(args.out, thresholds, model_name=str(doc.get("model", args.model)), metadata=out)
    _print_report(out, args.out)
    return 0


def _print_report(report: dict[str, Any], out: str) -> None:
    cal, glob, at_target = report["calibrated"], report["global"], report.get("global_at_target")
    name = f"per-{report.get('per', 'head')} ({report.get('statistic', 'mass')})"
    rows = [(name, cal), (f"global tau={glob['tau']:g} (nearest density)", glob)]
    if at_target is not None and at_target["tau"] != glob["tau"]:
        rows.append((f"global tau={at_target['tau']:g} (same target)", at_target))
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is an optional extra
        for name, r in rows:
            print(f"{name:36s} density {r['density']:.4f}  mass {r['mass']:.4f}  min head mass {r['min_head_mass']:.4f}")
    else:
        table = Table(title=f"calibration over lengths {report['lengths']} ({report.get('samples')} prompts each)")
        for col in ("thresholds", "mean density", "mean mass", "min head mass"):
            table.add_column(col)
        for name, r in rows:
            table.add_row(name, f"{r['density']:.4f}", f"{r['mass']:.4f}", f"{r['min_head_mass']:.4f}")
        Console().print(table)
    interp = report.get("global_mass_at_equal_density")
    if interp is not None:
        print(f"global tau interpolated to the calibrated density {cal['density']:.4f}: mass {interp:.4f}")
    if report["dense_layers"]:
        print(f"layers without full attention (threshold 1.0): {report['dense_layers']}")
    print(f"wrote {out} ({report['seconds']:.1f} s)")
