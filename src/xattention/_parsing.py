"""Command-line value parsing shared by every subcommand (one grammar for lengths everywhere)."""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["parse_lengths"]

_LENGTH = re.compile(r"^(\d+(?:\.\d+)?)([km]?)$")


def parse_lengths(text: str | Sequence[int | str]) -> list[int]:
    """``"1k,2k,4096"`` -> ``[1024, 2048, 4096]`` (k = 1024, m = 1024**2, as RULER's 4K = 4096). Sorted, deduplicated."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: set[int] = set()
    for item in items:
        raw = str(item).strip().lower()
        if not raw:
            continue
        m = _LENGTH.match(raw)
        if m is None:
            raise ValueError(f"bad length {str(item).strip()!r}: use a token count like 4096, 4k or 1.5k")
        value = float(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[m.group(2)]
        if value != int(value) or value < 1:
            raise ValueError(f"bad length {str(item).strip()!r}: it must be a positive whole number of tokens")
        out.add(int(value))
    if not out:
        raise ValueError("no lengths given")
    return sorted(out)
