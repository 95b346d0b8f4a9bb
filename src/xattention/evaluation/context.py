"""A model's context length, read before loading it (a GGUF file's metadata, an HF folder's ``config.json``) or from
the loaded model, so lengths beyond it fail before any generation."""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._common import text_config

__all__ = ["check_context", "context_limit_from_files", "model_context_limit"]


def context_limit_from_files(model: str) -> int | None:
    """The context length of a model without loading weights: a GGUF's ``<arch>.context_length`` or an HF folder's
    ``max_position_embeddings``, for a local path or a known model already in :mod:`xattention.models`' cache.

    ``None`` when no file is at hand (the check then runs after loading, still before any generation).
    """
    path = Path(model).expanduser()
    if not path.exists():
        try:
            models = importlib.import_module("xattention.models")
        except ImportError:
            return None
        spec = getattr(models, "MODELS", {}).get(model)
        if spec is None or not hasattr(models, "default_cache_dir"):
            return None
        path = Path(models.default_cache_dir()) / spec.filename
    if path.is_file() and path.suffix == ".gguf":
        from gguf import GGUFReader

        fields = GGUFReader(str(path)).fields

        def value(key: str) -> Any:
            f = fields.get(key)
            return None if f is None else f.contents()

        arch = value("general.architecture")
        ctx = value(f"{arch}.context_length") if arch else None
        return int(ctx) if ctx else None
    if path.is_dir() and (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        for cfg in (config, config.get("text_config") or {}):
            if cfg.get("max_position_embeddings"):
                return int(cfg["max_position_embeddings"])
    return None


def model_context_limit(model: Any) -> int | None:
    """``max_position_embeddings`` of a loaded model's (text) config, ``None`` if it has none."""
    if getattr(model, "config", None) is None:
        return None
    value = getattr(text_config(model), "max_position_embeddings", None)
    return int(value) if value else None


def check_context(lengths: Sequence[int], limit: int | None, model: str) -> None:
    """``ValueError`` naming the lengths beyond ``limit`` tokens (the model's context); ``limit=None`` checks nothing."""
    if limit is not None and max(lengths) > limit:
        too_long = ", ".join(str(n) for n in lengths if n > limit)
        raise ValueError(f"length {too_long} exceeds {model}'s context of {limit} tokens")
