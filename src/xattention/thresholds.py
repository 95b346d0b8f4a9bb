"""Per-head XAttention thresholds on disk: one JSON file per model, ``[num_layers, num_q_heads]`` values in ``(0, 1]``.

File format (``"xattention-thresholds/1"``)::

    {"format": "xattention-thresholds/1", "model": "smollm2", "num_layers": L, "num_heads": Hq,
     "thresholds": [[tau_0_0, ..., tau_0_{Hq-1}], ..., [tau_{L-1}_0, ...]], "metadata": {...}}

Row ``i`` holds the thresholds of layer ``i``'s query heads; :func:`xattention.apply` gives layer ``i`` the method
``dataclasses.replace(method, threshold=thresholds[i])``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["FORMAT", "load_thresholds", "save_thresholds"]

FORMAT = "xattention-thresholds/1"


def _check_values(values: Tensor, where: str) -> None:
    bad = ~((values > 0) & (values <= 1))  # also catches NaN
    if bool(bad.any()):
        idx = [int(i) for i in bad.nonzero()[0]]
        raise ValueError(f"{where}: thresholds must lie in (0, 1], got {float(values[tuple(idx)])} at [layer, head] = {idx}")


def save_thresholds(
    path: str | os.PathLike,
    thresholds: Tensor,
    *,
    model_name: str,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write ``thresholds`` (``[num_layers, num_q_heads]``, values in ``(0, 1]``) to ``path`` as JSON.

    Args:
        path: destination file (parent folders are created).
        thresholds: float tensor ``[L, Hq]``.
        model_name: the model the thresholds were calibrated on (e.g. ``"smollm2"``).
        metadata: any JSON-serialisable extra information (calibration settings, date, ...).
    """
    if not isinstance(thresholds, Tensor) or thresholds.ndim != 2 or thresholds.numel() == 0:
        shape = tuple(thresholds.shape) if isinstance(thresholds, Tensor) else type(thresholds).__name__
        raise ValueError(f"thresholds must be a non-empty [num_layers, num_heads] tensor, got {shape}")
    if not thresholds.is_floating_point():
        raise ValueError(f"thresholds must be a float tensor, got {thresholds.dtype}")
    if thresholds.is_meta:
        raise ValueError("thresholds must hold values, got a tensor on the meta device")
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be a non-empty string, got {model_name!r}")
    values = thresholds.detach().to("cpu", torch.float64)
    _check_values(values, "save_thresholds")
    doc = {
        "format": FORMAT,
        "model": model_name,
        "num_layers": int(values.shape[0]),
        "num_heads": int(values.shape[1]),
        "thresholds": values.tolist(),
        "metadata": dict(metadata or {}),
    }
    text = json.dumps(doc, indent=1)  # raises TypeError for metadata that is not JSON-serialisable
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")


def load_thresholds(path: str | os.PathLike, *, num_layers: int | None = None, num_heads: int | None = None) -> Tensor:
    """Read a thresholds file written by :func:`save_thresholds`.

    Args:
        path: the JSON file.
        num_layers, num_heads: when given, the file's shape must be ``[num_layers, num_heads]``.
    Returns:
        float64 ``[L, Hq]``.
    Raises:
        ValueError: unreadable or malformed file, values outside ``(0, 1]``, or a shape mismatch (naming both shapes).
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read thresholds file {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"thresholds file {path} is not UTF-8 text (a JSON file from save_thresholds): {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"thresholds file {path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"thresholds file {path} has format {found!r}, expected {FORMAT!r}")
    missing = [key for key in ("model", "num_layers", "num_heads", "thresholds") if key not in doc]
    if missing:
        raise ValueError(f"thresholds file {path} lacks {', '.join(missing)}")
    rows = doc["thresholds"]
    ok = (
        isinstance(rows, list)
        and len(rows) > 0
        and all(isinstance(row, list) and len(row) == len(rows[0]) > 0 for row in rows)
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for row in rows for x in row)
    )
    if not ok:
        raise ValueError(f"thresholds file {path}: 'thresholds' must be a non-empty rectangular list of lists of numbers")
    if any(not math.isfinite(float(x)) for row in rows for x in row):
        raise ValueError(f"thresholds file {path}: thresholds must be finite numbers")
    values = torch.tensor(rows, dtype=torch.float64)
    declared = (doc["num_layers"], doc["num_heads"])
    if declared != tuple(values.shape):
        raise ValueError(
            f"thresholds file {path} declares [num_layers, num_heads] = {list(declared)} but holds {list(values.shape)}"
        )
    _check_values(values, f"thresholds file {path}")
    expected = (
        values.shape[0] if num_layers is None else num_layers,
        values.shape[1] if num_heads is None else num_heads,
    )
    if tuple(values.shape) != expected:
        raise ValueError(
            f"thresholds file {path} has shape [num_layers, num_heads] = {list(values.shape)} but the model needs "
            f"{list(expected)}"
        )
    return values
