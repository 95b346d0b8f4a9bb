"""Paired differences of an eval folder's methods against any one of them, not only dense (issue 19, item 2).

    python3 benchmarks/experiments/paired.py DIR --baseline SPEC [--only TEXT] [--samples N]

Reads ``DIR/results.jsonl`` (``xattention eval``'s output) and prints a Markdown table: for every method whose label
contains ``TEXT`` (all by default) and every length, its block density, the baseline's, and the paired difference
method - baseline (same task, sample and seed; points ×100 ± standard error, averaged over tasks as the report does).
``--samples N`` keeps samples 0..N-1 only (e.g. the first 16 of a run extended to 32).

The held-out calibration comparison (calibrated files matched to the global tau's density, file names ending in
``-tau0.9.json`` / ``-tau0.95.json``):

    python3 benchmarks/experiments/paired.py benchmarks/results/calibration-heldout-smollm2 \
        --baseline xattention:stride=8,threshold=0.9 --only tau0.9.json
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from xattention.evaluation.report import paired_differences
from xattention.evaluation.results import read_results


def densities(records: list[dict]) -> dict[tuple[int, str], float]:
    """Mean block density per (length, method) over the records that report one."""
    sums: dict[tuple[int, str], list[float]] = defaultdict(list)
    for r in records:
        if r.get("density") is not None:
            sums[(int(r["length"]), str(r["method"]))].append(float(r["density"]))
    return {key: sum(v) / len(v) for key, v in sums.items()}


def table(records: list[dict], baseline: str, only: str) -> str:
    """The Markdown table of every method containing ``only`` against ``baseline``."""
    dens = densities(records)
    rows = ["| method | length | density | baseline density | method − baseline |", "|---|---|---|---|---|"]
    for d in paired_differences(records, baseline=baseline):
        if only not in d["method"]:
            continue
        length = int(d["length"])
        se = "" if d["stderr"] is None else f" ± {d['stderr']:.1f}"
        rows.append(
            f"| {Path(d['method']).name} | {length} | {dens.get((length, d['method']), float('nan')):.2f} | "
            f"{dens.get((length, baseline), float('nan')):.2f} | {d['difference']:+.1f}{se} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--baseline", required=True, help="the method label to subtract, as in results.jsonl")
    parser.add_argument("--only", default="", help="keep methods whose label contains this text")
    parser.add_argument("--samples", type=int, default=None, help="keep samples 0..N-1")
    args = parser.parse_args(argv)
    records = read_results(args.dir / "results.jsonl")
    if args.samples is not None:
        records = [r for r in records if int(r["sample"]) < args.samples]
    try:
        sys.stdout.write(table(records, args.baseline, args.only) + "\n")
    except ValueError as exc:
        parser.error(f"{exc} in {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
