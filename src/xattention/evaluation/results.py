"""``results.jsonl``: one JSON record per (model, task, length, sample, seed, method), appended as each finishes and
read back with a damaged last line tolerated, so an interrupted evaluation resumes."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["RESULTS_FILE", "append_results", "read_results", "record_key", "result_key"]

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"


def result_key(model: str, task: str, length: int, sample: int, seed: int, method: str) -> tuple[str, str, int, int, int, str]:
    """What identifies a result: a rerun skips the keys already in the file."""
    return (model, task, int(length), int(sample), int(seed), method)


def record_key(rec: dict[str, Any]) -> tuple[str, str, int, int, int, str]:
    """:func:`result_key` of a record read back (``KeyError`` / ``TypeError`` / ``ValueError`` if it is not one)."""
    return result_key(rec["model"], rec["task"], rec["length"], rec["sample"], rec["seed"], rec["method"])


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
            record_key(rec)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            logger.warning("%s:%d: skipping a malformed line", path, number)
            continue
        records.append(rec)
    return records


def append_results(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append one JSON line per record and flush it to disk (a crash loses at most the batch being written)."""
    with path.open("a", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
