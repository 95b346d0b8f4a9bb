"""Property tests over every field of every method in ``xa.METHODS``: a wrong type or value raises ``ValueError``;
whatever is accepted is exactly what was asked (no bool read as an int, no string read as a bool, no silent coercion)
and runs. The same for the spec grammar of ``method_from_spec``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xattention as xa

HQ, HKV, L, D = 4, 2, 40, 8
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# wrong types and edge values for any field (the right ones are among them: a method may accept those)
VALUES = st.one_of(
    st.booleans(),
    st.integers(-3, 300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1e-9, 0.5, 0.9, 1.0, 1.0000001, 8.0, 128.0]),
    st.text(max_size=3),
    st.sampled_from(["no", "false", "True", "1", "8", "0.9", ""]),
    st.none(),
    st.sampled_from([[0.9], (8,), b"8", {"threshold": 0.9}]),
    st.sampled_from([np.int64(8), np.float32(0.9), np.bool_(True), np.float64(0.5)]),
    st.sampled_from(
        [
            lambda: torch.tensor(0.9),
            lambda: torch.full((HQ,), 0.9),
            lambda: torch.tensor([0.5, 0.6, 0.7, 1.0], dtype=torch.float64),
            lambda: torch.tensor([1.5, 0.2, 0.2, 0.2]),
            lambda: torch.tensor([float("nan")] * HQ),
            lambda: torch.ones(HQ, dtype=torch.bool),
            lambda: torch.full((HQ,), 8),
            lambda: torch.full((2, 2), 0.5),
            lambda: torch.empty(0),
            lambda: torch.full((HQ,), 0.9, device="meta"),
        ]
    ).map(lambda make: make()),
)

_NAMES: dict[str, type] = {"bool": bool, "int": int, "float": float, "None": type(None), "Tensor": torch.Tensor}


def annotated(cls: type) -> dict[str, tuple[type, ...]]:
    """Each field's annotated types, read from the annotation's text (``"float | None"``), not with the library's own
    reader."""
    return {f.name: tuple(_NAMES[part.strip()] for part in str(f.type).split("|")) for f in dataclasses.fields(cls)}


# texts a spec may give for any field
TEXTS = st.sampled_from(
    ["true", "false", "TRUE", "False", "yes", "no", "maybe", "1", "0", "-1", "8", "16", "128", "0.5", "1.0", "1e-3",
     "8.0", "nan", "inf", "-inf", "none", "None", "", "abc", "0x10", "1_0"]
)  # fmt: skip


def _fits(value: object, allowed: tuple[type, ...]) -> bool:
    """The contract, written independently of the library: bools only where bool is annotated, numbers never bools,
    per-head threshold tensors 1-D, floating, real and in (0, 1]."""
    if isinstance(value, torch.Tensor):
        return (
            torch.Tensor in allowed
            and value.ndim == 1
            and value.numel() > 0
            and value.is_floating_point()
            and not value.is_meta
            and bool(((value > 0) & (value <= 1)).all())
        )
    # the annotations each kind of scalar may fill (checked in this order: a bool is also an int)
    for kind, fills in ((bool, {bool}), (int, {int, float}), (float, {float}), (type(None), {type(None)})):
        if isinstance(value, kind):
            return bool(fills & set(allowed))
    return False


def _runs(method: xa.Method) -> None:
    """An accepted method selects blocks (or refuses the inputs with a ValueError, e.g. a per-head threshold of
    another length)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, HQ, L, D, generator=gen)
    k = torch.randn(1, HKV, L, D, generator=gen)
    try:
        mask = method.estimate(q, k)
    except ValueError:
        return
    b = method.block_size
    assert mask.mask.shape == (1, HQ, -(-L // b), -(-L // b))


def _asked_fields(build: Callable[[], xa.Method], cls: type, asked: Iterable[str]) -> Iterator[tuple[str, object]]:
    """``(field, value)`` of the asked fields of the method ``build()`` makes, if it accepts them (nothing if it raises
    ``ValueError``), after checking that every field has its annotated type and every other field its default."""
    try:
        method = build()
    except ValueError:
        return
    assert type(method) is cls
    asked = set(asked)
    for f, allowed in annotated(cls).items():
        value = getattr(method, f)
        assert _fits(value, allowed), f"{cls.__name__} accepted {f}={value!r} ({type(value).__name__}), annotated {allowed}"
        assert not (isinstance(value, float) and math.isnan(value)), f"{cls.__name__} accepted {f}=nan"
        if f in asked:
            yield f, value
        else:
            assert value == getattr(cls(), f)
    _runs(method)


@pytest.mark.parametrize("name", sorted(xa.METHODS))
@SETTINGS
@given(data=st.data())
def test_every_field_is_checked_exactly(name: str, data: st.DataObject) -> None:
    cls = xa.METHODS[name]
    kwargs = data.draw(st.fixed_dictionaries({}, optional=dict.fromkeys(annotated(cls), VALUES)), label="kwargs")
    for f, value in _asked_fields(lambda: cls(**kwargs), cls, kwargs):
        assert value is kwargs[f], f"{name}.{f}: asked {kwargs[f]!r}, got {value!r}"


@pytest.mark.parametrize("name", sorted(xa.METHODS))
@SETTINGS
@given(data=st.data())
def test_every_spec_value_is_read_as_its_field_type(name: str, data: st.DataObject) -> None:
    cls = xa.METHODS[name]
    items = data.draw(st.dictionaries(st.sampled_from(sorted(annotated(cls))), TEXTS, max_size=3), label="items")
    spec = name + (":" + ",".join(f"{k}={v}" for k, v in items.items()) if items else "")
    for f, value in _asked_fields(lambda: xa.method_from_spec(spec), cls, items):
        text = items[f].strip().lower()
        if isinstance(value, bool):
            assert text == str(value).lower(), f"{spec!r} gave {f}={value!r}"
        elif value is None:
            assert text == "none"
        else:
            assert float(text) == value, f"{spec!r} gave {f}={value!r}"
            if isinstance(value, int):
                assert text.lstrip("+-").isdigit(), f"{spec!r} read {text!r} as the int {value}"


@pytest.mark.parametrize("name", sorted(xa.METHODS))
@SETTINGS
@given(data=st.data())
def test_a_spec_key_given_twice_is_refused(name: str, data: st.DataObject) -> None:
    cls = xa.METHODS[name]
    key = data.draw(st.sampled_from([f.name for f in dataclasses.fields(cls)]))
    first = str(getattr(cls(), key)).lower()  # a valid value, so that only the repetition can be refused
    second = data.draw(st.one_of(st.just(first), TEXTS))
    with pytest.raises(ValueError):
        xa.method_from_spec(f"{name}:{key}={first},{key}={second}")
