"""Method registry and the one ``name:key=value,...`` spec grammar every entry point reads methods with."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from .base import Method, describe_types, field_types
from .dense import Dense
from .flexprefill import FlexPrefill
from .oracle import Oracle
from .streaming import Streaming
from .vertical_slash import VerticalSlash
from .xattention import XAttention

__all__ = ["METHODS", "method_from_spec", "parse_spec", "single_method_from_spec", "split_method_specs", "split_thresholds"]

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (Dense, XAttention, Streaming, VerticalSlash, FlexPrefill, Oracle)}

_INT = re.compile(r"[+-]?[0-9]+")


def _parse_value(key: str, text: str, allowed: tuple[type, ...]) -> Any:
    """A spec value as the field's annotated type: ``true``/``false`` for bools (nothing else), decimal integers for ints,
    numbers for floats (an int field's text is tried first), ``none`` for optional fields."""
    lowered = text.lower()
    if bool in allowed and lowered in ("true", "false"):
        return lowered == "true"
    if int in allowed and _INT.fullmatch(text):
        return int(text)
    if float in allowed:
        try:
            return float(text)
        except ValueError:
            pass
    if type(None) in allowed and lowered == "none":
        return None
    if str in allowed:
        return text
    spellable = tuple(t for t in allowed if t in (bool, int, float, type(None))) or allowed  # no Tensor in a spec
    hint = " (true or false)" if bool in spellable else ""
    raise ValueError(f"{key} must be {describe_types(spellable)}{hint}, got {text!r}")


def method_from_spec(spec: str, **defaults: Any) -> Method | dict[int, Method]:
    """Build a method from ``"name"`` or ``"name:key=value,key=value"`` (e.g. ``"xattention:threshold=0.9,stride=16"``).

    The one spec grammar of every entry point (the CLI's ``--methods``, ``xattention eval``, the benchmarks): the name
    and keys are case-insensitive and stripped; each value is read as its field's annotated type (bools only as
    ``true``/``false``, ints never from ``true`` or ``1.5``, ``none`` for optional fields); a key may appear once.
    ``thresholds=PATH`` (a file from ``xattention calibrate``, for a method with a ``threshold``) gives per-head
    thresholds per layer: the result is then ``{layer: method with threshold=file[layer]}``, which
    :func:`xattention.apply` takes as it is (``apply(model, method, thresholds=PATH)`` also checks the file's shape
    against the model).

    ``defaults`` fill parameters the spec leaves out (e.g. ``min_seq_len=0`` for accuracy studies); ones the method does
    not take are ignored. Unknown names or parameters, bad values and bad files raise ``ValueError``.
    """
    base, path = split_thresholds(spec)
    name, items = parse_spec(base)
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    names, types = {f.name for f in dataclasses.fields(cls)}, field_types(cls)
    kwargs: dict[str, Any] = {k: v for k, v in defaults.items() if k in names}
    for key, value in items:
        if key not in names:
            raise ValueError(f"{name} has no parameter {key!r}; it takes {', '.join(sorted(names))}")
        kwargs[key] = _parse_value(key, value, types[key]) if key in types else value  # unannotated: the class checks
    method = cls(**kwargs)
    if path is None:
        return method
    return _per_layer(spec, method, path)


def single_method_from_spec(spec: str, *, where: str, **defaults: Any) -> Method:
    """:func:`method_from_spec` for entry points that run one method on given q/k (``where`` names the entry point in
    the error): a per-layer ``thresholds=PATH`` spec raises ``ValueError``."""
    method = method_from_spec(spec, **defaults)
    if not isinstance(method, Method):
        raise ValueError(f"{spec!r}: thresholds=PATH sets thresholds per model layer, but {where} runs one method on q/k")
    return method


def split_thresholds(spec: str) -> tuple[str, str | None]:
    """``(the spec without thresholds=PATH, PATH or None)``; ``ValueError`` if it gives ``threshold=`` as well."""
    name, items = parse_spec(spec)
    path = next((value for key, value in items if key == "thresholds"), None)
    if path is None:
        return spec, None
    if any(key == "threshold" for key, _ in items):
        raise ValueError(f"{spec!r}: give threshold= (one for every head) or thresholds=PATH (per head), not both")
    kept = ",".join(f"{key}={value}" for key, value in items if key != "thresholds")
    return (f"{name}:{kept}" if kept else name), path


def _per_layer(spec: str, method: Method, path: str) -> dict[int, Method]:
    from ..thresholds import load_thresholds

    if "threshold" not in {f.name for f in dataclasses.fields(method)}:
        raise ValueError(f"{spec!r}: {type(method).__name__} has no threshold, so per-head thresholds cannot apply")
    if Tensor not in field_types(type(method)).get("threshold", (Tensor,)):
        raise ValueError(f"{spec!r}: {type(method).__name__}'s threshold is one number, so per-head thresholds cannot apply")
    if not Path(path).is_file():
        raise ValueError(f"{spec!r}: thresholds file {path} does not exist (make one with xattention calibrate)")
    table = load_thresholds(path)
    return {layer: dataclasses.replace(method, threshold=table[layer].clone()) for layer in range(table.shape[0])}


def parse_spec(spec: str) -> tuple[str, list[tuple[str, str]]]:
    """``"name:key=value,key=value"`` -> ``("name", [("key", "value"), ...])``: the name and keys lower-cased,
    everything stripped, values left as text. ``ValueError`` for a spec that is not a string, an item that is not
    ``key=value`` or a key given twice (the last one used to win silently)."""
    if not isinstance(spec, str):
        raise ValueError(f"a method spec must be a string like 'xattention:threshold=0.9', got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    items: list[tuple[str, str]] = []
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq or not key:
            raise ValueError(f"method parameter {item!r} in {spec!r} is not of the form key=value")
        if any(key == seen for seen, _ in items):
            raise ValueError(f"method parameter {key!r} is given more than once in {spec!r}")
        items.append((key, value.strip()))
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
