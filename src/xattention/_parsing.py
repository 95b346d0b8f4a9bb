"""Command-line value parsing shared by every subcommand (one grammar for lengths, devices and dtypes everywhere)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

__all__ = ["parse_device", "parse_dtype", "parse_lengths", "torch_dtype"]

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


def parse_device(text: str | None) -> Any:
    """``None``/``"auto"`` -> the first CUDA GPU when there is one, else the CPU; otherwise a ``torch.device`` that can
    run here. ``ValueError`` for a name torch does not know, a CUDA device on a CPU-only build or without a GPU, or a
    GPU index beyond the ones visible: checked before any model loads."""
    import torch

    if text is None or str(text).strip().lower() in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(text).strip())
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {text!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise ValueError(f"device {text!r}: this torch {torch.__version__} is a CPU-only build; use cpu")
        if not torch.cuda.is_available():
            raise ValueError(f"device {text!r}: no CUDA GPU is visible; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {text!r}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    elif device.type == "meta":
        raise ValueError(f"device {text!r}: the meta device holds no values, so nothing can run on it")
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None) or getattr(torch.backends, device.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise ValueError(f"device {text!r}: this torch cannot run on {device.type}; use cpu")
    return device


def parse_dtype(text: str, *, option: str | None = None) -> Any:
    """A torch dtype by its name in ``torch`` (``"float32"``, ``"bfloat16"``, ``"half"``, ...). ``ValueError``
    otherwise, naming the command-line ``option`` (e.g. ``"--dtype"``) when given."""
    import torch

    dtype = getattr(torch, text, None)
    if not isinstance(dtype, torch.dtype):
        if option is not None:
            raise ValueError(f"{option} {text!r} is not a torch dtype; use e.g. float32 or bfloat16")
        raise ValueError(f"unknown dtype {text!r}; use e.g. 'float32' or 'bfloat16'")
    return dtype


def torch_dtype(name: str) -> Any:
    """The short grammar of ``xattention eval`` and ``check``: ``"bf16"`` / ``"bfloat16"`` / ``"fp16"`` / ``"float16"`` /
    ``"fp32"`` / ``"float32"`` (any case) -> the torch dtype; ``ValueError`` naming the accepted spellings otherwise."""
    import torch

    dtypes = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
              "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}  # fmt: skip
    if name.lower() not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(dtypes)}")
    return dtypes[name.lower()]
