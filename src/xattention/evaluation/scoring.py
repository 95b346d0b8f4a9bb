"""RULER's scoring (``scripts/eval/synthetic/constants.py`` and ``evaluate.py``), per sample, in ``[0, 1]``.

* ``string_match_all``: the fraction of the reference strings found, case-insensitively, in the prediction (every
  synthetic task: NIAH, vt, cwe, fwe; and passkey).
* ``string_match_part``: 1 if any reference string is found, else 0 (RULER uses it only for its QA tasks, kept for
  completeness).

RULER averages these over samples and reports ×100; the summary here does the same.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["METRICS", "postprocess", "score", "string_match_all", "string_match_part"]

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    """RULER's clean-up: control characters become newlines, surrounding whitespace is stripped."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of ``references`` contained in ``prediction`` (case-insensitive). ``ValueError`` if none are given."""
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    pred = prediction.lower()
    return sum(1.0 for r in references if r.lower() in pred) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 if any of ``references`` is contained in ``prediction`` (case-insensitive), else 0.0."""
    if not references:
        raise ValueError("string_match_part needs at least one reference")
    pred = prediction.lower()
    return 1.0 if any(r.lower() in pred for r in references) else 0.0


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def score(prediction: str, references: Sequence[str], metric: str = "string_match_all") -> float:
    """Score one prediction with the named metric after RULER's post-processing."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    return METRICS[metric](postprocess(prediction), references)
