"""Method registry and the ``name:key=value,...`` spec syntax used on the command line."""

from __future__ import annotations

import dataclasses
from typing import Any

from .base import Method
from .dense import Dense
from .flexprefill import FlexPrefill
from .oracle import Oracle
from .streaming import Streaming
from .vertical_slash import VerticalSlash
from .xattention import XAttention

__all__ = ["METHODS", "method_from_spec", "parse_spec", "split_method_specs"]

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (Dense, XAttention, Streaming, VerticalSlash, FlexPrefill, Oracle)}


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def method_from_spec(spec: str, **defaults: Any) -> Method:
    """Build a method from ``"name"`` or ``"name:key=value,key=value"`` (e.g. ``"xattention:threshold=0.9,stride=16"``).

    ``defaults`` fill parameters the spec leaves out (e.g. ``min_seq_len=0`` for accuracy studies). Unknown names or
    parameters raise ``ValueError`` listing what exists.
    """
    name, items = parse_spec(spec)
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    allowed = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {k: v for k, v in defaults.items() if k in allowed}
    for key, value in items:
        if key not in allowed:
            raise ValueError(f"{name} has no parameter {key!r}; it takes {', '.join(sorted(allowed))}")
        kwargs[key] = _parse_value(value)
    return cls(**kwargs)


def parse_spec(spec: str) -> tuple[str, list[tuple[str, str]]]:
    """``"name:key=value,key=value"`` -> ``("name", [("key", "value"), ...])``: the name lower-cased, everything
    stripped, values left as text. An item that is not ``key=value`` raises ``ValueError``."""
    name, _, rest = spec.strip().partition(":")
    items = []
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"method parameter {item!r} in {spec!r} is not of the form key=value")
        items.append((key.strip(), value.strip()))
    return name.strip().lower(), items


def split_method_specs(text: str) -> list[str]:
    """Split a command-line list such as ``"dense,xattention:stride=8,threshold=0.9,streaming"`` into specs.

    A comma starts a new spec unless what follows is a ``key=value`` of the current one (it has ``=`` and no ``:``).
    """
    specs: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if specs and "=" in part and ":" not in part and ":" in specs[-1]:
            specs[-1] += "," + part
        else:
            specs.append(part)
    if not specs:
        raise ValueError(f"no method given in {text!r}")
    return specs
