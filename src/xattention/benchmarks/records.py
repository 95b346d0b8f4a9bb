"""Where benchmark records go: ``OUT/STEM.json`` (and a plot beside it), named by GPU and date; their Markdown tables."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["device_stem", "markdown_table", "write_record"]


def device_stem(record: dict[str, Any], kind: str, *, device_key: str = "gpu") -> str:
    """``"nvidia-h200-2026-11-29-kernels"``: the record's device (lower case, dashes) and date, then ``kind``."""
    return f"{str(record[device_key]).replace(' ', '-').lower()}-{record['date']}-{kind}"


def write_record(
    record: dict[str, Any],
    out_dir: str | os.PathLike,
    stem: str,
    plot: Callable[[dict[str, Any], Path], Any] | None = None,
) -> Path:
    """Write ``record`` to ``out_dir/stem.json`` (folders created) and, with ``plot``, ``plot(record, out_dir/stem.png)``;
    returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(record, indent=1))
    if plot is not None:
        plot(record, out / f"{stem}.png")
    return path


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """The lines of a Markdown table: ``| a | b |`` for ``header``, its ``|---|---|`` rule, then one line per row of
    cells (each written with ``str``)."""

    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"

    return [line(header), "|---" * len(header) + "|", *(line(r) for r in rows)]
