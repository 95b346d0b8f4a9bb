"""Property tests over every field of every method in ``xa.METHODS``: a wrong type or value raises ``ValueError``;
whatever is accepted is exactly what was asked (no bool read as an int, no string read as a bool, no silent coercion)
and runs. The same for the spec grammar of ``method_from_spec``."""

from __future__ import annotations

import dataclasses
import math
import types
import typing

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xattention as xa

HQ, HKV, L, D = 4, 2, 40, 8
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

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

def field_types(cls: type) -> dict[str, tuple[type, ...]]:
    """Each field's annotated types, read here rather than from the library's own helper."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        out[f.name] = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return out


# texts a spec may give for any field
TEXTS = st.sampled_from(
    ["true", "false", "TRUE", "False", "yes", "no", "maybe", "1", "0", "-1", "8", "16", "128", "0.5", "1.0", "1e-3",
     "8.0", "nan", "inf", "-inf", "none", "None", "", "abc", "0x10", "1_0"]
)


def _fits(value: object, allowed: tuple[type, ...]) -> bool:
    """The contract, written independently of the library: bools only where bool is annotated, numbers never bools,
    per-head threshold tensors 1-D, floating, real and in (0, 1]."""
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int):
        return int in allowed or float in allowed
    if isinstance(value, float):
        return float in allowed
    if value is None:
        return type(None) in allowed
    if isinstance(value, torch.Tensor):
        return (
            torch.Tensor in allowed
            and value.ndim == 1
            and value.numel() > 0
            and value.is_floating_point()
            and not value.is_meta
            and bool(((value > 0) & (value <= 1)).all())
        )
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


@pytest.mark.parametrize("name", sorted(xa.METHODS))
@SETTINGS
@given(data=st.data())
def test_every_field_is_checked_exactly(name: str, data: st.DataObject) -> None:
    cls = xa.METHODS[name]
    types = field_types(cls)
    kwargs = data.draw(st.fixed_dictionaries({}, optional=dict.fromkeys(types, VALUES)), label="kwargs")
    try:
        method = cls(**kwargs)
    except ValueError:
        return
    defaults = cls()
    for f, allowed in types.items():
        value = getattr(method, f)
        if f in kwargs:
            assert value is kwargs[f], f"{name}.{f}: asked {kwargs[f]!r}, got {value!r}"
        else:
            assert value == getattr(defaults, f)
        assert _fits(value, allowed), f"{name} accepted {f}={value!r} ({type(value).__name__}), annotated {allowed}"
        if isinstance(value, float):
            assert not math.isnan(value), f"{name} accepted {f}=nan"
    _runs(method)


@pytest.mark.parametrize("name", sorted(xa.METHODS))
@SETTINGS
@given(data=st.data())
def test_every_spec_value_is_read_as_its_field_type(name: str, data: st.DataObject) -> None:
    cls = xa.METHODS[name]
    types = field_types(cls)
    items = data.draw(st.dictionaries(st.sampled_from(sorted(types)), TEXTS, max_size=3), label="items")
    spec = name + (":" + ",".join(f"{k}={v}" for k, v in items.items()) if items else "")
    try:
        method = xa.method_from_spec(spec)
    except ValueError:
        return
    assert type(method) is cls
    defaults = cls()
    for f, allowed in types.items():
        value = getattr(method, f)
        assert _fits(value, allowed), f"{spec!r} gave {f}={value!r}"
        if f not in items:
            assert value == getattr(defaults, f)
            continue
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
