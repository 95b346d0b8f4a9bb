"""Optional dependencies: which extra brings a module, one check a command runs before any slow work, and the one-line
message the command line prints when a module is missing (a base ``pip install xattention`` has only torch, numpy and
tqdm; ``demo``, ``eval``, ``calibrate`` and ``bench quality`` need the ``hf`` extra)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = ["EXTRAS", "missing_module_message", "require", "require_model"]

# import name -> the extra of pyproject.toml that installs it
EXTRAS: dict[str, str] = {
    "transformers": "hf",
    "tokenizers": "hf",
    "accelerate": "hf",
    "gguf": "hf",
    "matplotlib": "hf",
    "rich": "hf",
    "wonderwords": "eval",
    "triton": "triton",
}


def require(*modules: str) -> None:
    """Raise ``ModuleNotFoundError`` (with ``name`` set) for the first of ``modules`` that is not installed, without
    importing any of them."""
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package that fails, or a module whose __spec__ is None
            found = False
        if not found:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)


def require_model(model: str | os.PathLike, *more: str) -> None:
    """:func:`require` what ``load_model(model)`` imports (transformers; gguf unless ``model`` is a Hugging Face folder)
    and ``more`` (e.g. ``"matplotlib"`` for a plot at the end of the command)."""
    require("transformers", *(() if Path(model).is_dir() else ("gguf",)), *more)


def missing_module_message(exc: ModuleNotFoundError) -> str | None:
    """One line for a missing third-party module: what to install. ``None`` for xattention's own modules (a bug)."""
    top = (exc.name or "").partition(".")[0]
    if not top or top == "xattention":
        return None
    if top in EXTRAS:
        return f'{top} is not installed; it comes with the {EXTRAS[top]} extra: pip install "xattention[{EXTRAS[top]}]"'
    message = str(exc)
    if not message.startswith("No module named"):  # raised with an install hint already (e.g. the eval data packages)
        return message
    return f"{top} is not installed (pip install {top})"
