"""Every bad input raises ValueError with a message that names the problem; nothing is silently clamped."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import pytest
import torch

import xattention as xa

T = torch.Tensor


def _t(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> T:
    return torch.randn(*shape, dtype=dtype, device=device) if device == "cpu" else torch.empty(*shape, dtype=dtype, device=device)


def _good(b: int = 1, hq: int = 4, hkv: int = 2, lq: int = 40, lk: int = 64, d: int = 16) -> tuple[T, T, T]:
    return _t(b, hq, lq, d), _t(b, hkv, lk, d), _t(b, hkv, lk, d)


def _mask_for(q: T, k: T, block: int = 16) -> xa.BlockMask:
    return xa.BlockMask.full(q.shape[0], q.shape[1], block_size=block, q_len=q.shape[2], k_len=k.shape[2])


def _fitting_mask() -> xa.BlockMask:
    """A mask that fits ``_good()``'s q/k, so that in the tests below the q/k/v check is what trips."""
    return xa.BlockMask(torch.ones(1, 4, 3, 4, dtype=torch.bool), 16, 40, 64)


# Every entry point that takes q/k (and v): each must reject the same bad inputs with the same wording.
ENTRY_POINTS: dict[str, Callable[[T, T, T], object]] = {
    "XAttention.estimate": lambda q, k, v: xa.XAttention(block_size=16, stride=4).estimate(q, k),
    "Dense.estimate": lambda q, k, v: xa.Dense(block_size=16).estimate(q, k),
    "block_sparse_attention": lambda q, k, v: xa.block_sparse_attention(q, k, v, _fitting_mask()),
    "sparse_attention": lambda q, k, v: xa.sparse_attention(q, k, v, xa.XAttention(block_size=16, stride=4, min_seq_len=0)),
    "sparse_attention-dense": lambda q, k, v: xa.sparse_attention(q, k, v, xa.Dense()),
    "dense_attention": lambda q, k, v: xa.dense_attention(q, k, v),
    "attention_mass_kept": lambda q, k, v: xa.attention_mass_kept(q, k, _fitting_mask()),
}

# name -> (q, k, v builder, expected message fragment)
BAD_INPUTS: dict[str, tuple[Callable[[], tuple[T, T, T]], str]] = {
    "q-rank-3": (lambda: (_t(4, 40, 16), *_good()[1:]), "must be 4-D"),
    "k-rank-5": (lambda: (_good()[0], _t(1, 2, 64, 16, 1), _good()[2]), "must be 4-D"),
    "hq-not-multiple": (lambda: (_t(1, 3, 40, 16), *_good()[1:]), "multiple of key/value heads"),
    "head-dim-mismatch": (lambda: (_t(1, 4, 40, 32), *_good()[1:]), "head-dim mismatch"),
    "batch-mismatch": (lambda: (_t(2, 4, 40, 16), *_good()[1:]), "batch mismatch"),
    "lq-gt-lk": (lambda: _good(lq=65, lk=64), "must not exceed"),
    "zero-length": (lambda: _good(lq=0), "must be positive"),
    "integer-q": (lambda: (torch.ones(1, 4, 40, 16, dtype=torch.int64), *_good()[1:]), "floating-point"),
    "mixed-dtypes": (lambda: (_good()[0].bfloat16(), *_good()[1:]), "share one dtype"),
    "mixed-devices": (lambda: (_good()[0], _t(1, 2, 64, 16, device="meta"), _good()[2]), "one device"),
    "not-a-tensor": (lambda: (_good()[0].tolist(), *_good()[1:]), "must be a torch.Tensor"),
}
V_ONLY: dict[str, tuple[Callable[[], tuple[T, T, T]], str]] = {
    "v-shape": (lambda: (*_good()[:2], _t(1, 2, 64, 32)), "v must have k's shape"),
    "v-dtype": (lambda: (*_good()[:2], _good()[2].half()), "share one dtype"),
    "v-device": (lambda: (*_good()[:2], _t(1, 2, 64, 16, device="meta")), "one device"),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("bad", list(BAD_INPUTS))
def test_bad_qk_raise(entry: str, bad: str) -> None:
    build, message = BAD_INPUTS[bad]
    q, k, v = build()
    with pytest.raises(ValueError, match=message):
        ENTRY_POINTS[entry](q, k, v)


def test_good_inputs_pass_every_entry_point() -> None:
    for call in ENTRY_POINTS.values():
        call(*_good())


@pytest.mark.parametrize("entry", ["block_sparse_attention", "sparse_attention", "dense_attention"])
@pytest.mark.parametrize("bad", list(V_ONLY))
def test_bad_v_raise(entry: str, bad: str) -> None:
    build, message = V_ONLY[bad]
    q, k, v = build()
    with pytest.raises(ValueError, match=message):
        ENTRY_POINTS[entry](q, k, v)


@pytest.mark.parametrize("threshold", [0, 0.0, -0.1, 1.5, math.nan, math.inf, True, False, "0.9", None])
def test_threshold_outside_range_or_wrong_type(threshold: object) -> None:
    with pytest.raises(ValueError, match="threshold"):
        xa.XAttention(threshold=threshold)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "threshold",
    [
        torch.tensor([0.5, 0.0, 0.9, 0.9]),
        torch.tensor([0.5, 1.01, 0.9, 0.9]),
        torch.tensor([0.5, math.nan, 0.9, 0.9]),
        torch.tensor([-0.5, 0.5, 0.9, 0.9]),
    ],
)
def test_per_head_threshold_values_checked(threshold: T) -> None:
    with pytest.raises(ValueError, match=r"threshold values must lie in \(0, 1\]"):
        xa.XAttention(threshold=threshold)


@pytest.mark.parametrize(
    "threshold",
    [torch.tensor([1, 1, 1, 1]), torch.tensor([True, True]), torch.full((2, 2), 0.9), torch.tensor(0.9), torch.tensor([])],
    ids=["int", "bool", "2-D", "0-D", "empty"],
)
def test_per_head_threshold_wrong_dtype_or_shape(threshold: T) -> None:
    with pytest.raises(ValueError, match="1-D float tensor"):
        xa.XAttention(threshold=threshold)


@pytest.mark.parametrize(("hq", "hkv"), [(6, 2), (5, 5), (2, 1)])
def test_per_head_threshold_wrong_length_raises_at_estimate(hq: int, hkv: int) -> None:
    method = xa.XAttention(block_size=16, stride=4, threshold=torch.full((4,), 0.9))
    q, k, _ = _good(hq=hq, hkv=hkv)
    with pytest.raises(ValueError, match="per-head threshold has 4 entries but q has"):
        method.estimate(q, k)


def test_per_head_threshold_right_length_works() -> None:
    q, k, _ = _good()
    mask = xa.XAttention(block_size=16, stride=4, threshold=torch.tensor([0.5, 0.6, 0.7, 1.0])).estimate(q, k)
    assert mask.shape == (1, 4, 3, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block_size": 100, "stride": 8}, "multiple of stride"),
        ({"block_size": 16, "stride": 32}, "multiple of stride"),
        ({"stride": 0}, "stride must be a positive int"),
        ({"stride": 8.0}, "stride must be an int, got 8.0"),
        ({"stride": True}, "stride must be an int, got True"),  # a bool passed isinstance(int): ran as stride 1
        ({"block_size": True, "stride": 1}, "block_size must be an int, got True"),
        ({"min_seq_len": False}, "min_seq_len must be an int, got False"),
        ({"shared_kv_mask": "no"}, "shared_kv_mask must be a bool, got 'no'"),  # any truthy string switched it on
        ({"shared_kv_mask": 1}, "shared_kv_mask must be a bool, got 1"),
        ({"threshold": torch.full((4,), 0.9, device="meta")}, "must hold values, got a tensor on the meta device"),
        ({"block_size": 0}, "block_size must be a positive int"),
        ({"block_size": -128}, "block_size must be a positive int"),
        ({"min_seq_len": -1}, "min_seq_len"),
    ],
)
def test_xattention_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        xa.XAttention(**kwargs)


def test_a_subclass_field_of_another_type_is_checked_too() -> None:
    """The base reads every subclass annotation: str and list fields are checked, ``Any``/``Literal`` left to the class."""

    @dataclass(kw_only=True, eq=False)
    class Tagged(xa.Dense):
        name: ClassVar[str] = "tagged"
        tag: str = "x"
        sizes: list[int] | None = None
        mode: Literal["a", "b"] = "a"
        extra: Any = None

    m = Tagged(tag="y", sizes=[1], mode="b", extra=object())
    assert (m.tag, m.sizes, m.mode) == ("y", [1], "b")
    with pytest.raises(ValueError, match="tag must be a str, got 3"):
        Tagged(tag=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"sizes must be a list or None, got \(1,\)"):
        Tagged(sizes=(1,))  # type: ignore[arg-type]

    class Local:  # a type only this function knows: the annotations do not resolve, the base's fields are still checked
        pass

    @dataclass(kw_only=True, eq=False)
    class WithLocal(xa.Dense):
        name: ClassVar[str] = "with_local"
        thing: Local | None = None

    assert WithLocal(thing=Local()).thing is not None
    with pytest.raises(ValueError, match="block_size must be an int, got True"):
        WithLocal(block_size=True)


def test_dense_config_errors() -> None:
    with pytest.raises(ValueError, match="block_size"):
        xa.Dense(block_size=0)


@pytest.mark.parametrize(
    "mask",
    [
        lambda: xa.BlockMask(torch.zeros(1, 4, 3, 5, dtype=torch.bool), 16, 40, 80),  # other k_len
        lambda: xa.BlockMask(torch.zeros(1, 4, 2, 4, dtype=torch.bool), 16, 32, 64),  # other q_len
        lambda: xa.BlockMask(torch.zeros(2, 4, 3, 4, dtype=torch.bool), 16, 40, 64),  # other batch
        lambda: xa.BlockMask(torch.zeros(1, 2, 3, 4, dtype=torch.bool), 16, 40, 64),  # one mask per KV head, not per Q head
    ],
    ids=["k_len", "q_len", "batch", "heads"],
)
def test_block_mask_that_does_not_fit_qk(mask: Callable[[], xa.BlockMask]) -> None:
    q, k, v = _good()
    m = mask()
    with pytest.raises(ValueError, match="does not fit"):
        xa.block_sparse_attention(q, k, v, m)
    with pytest.raises(ValueError, match="does not fit"):
        xa.attention_mass_kept(q, k, m)


def test_block_mask_at_another_block_size_fits() -> None:
    q, k, v = _good()
    out = xa.block_sparse_attention(q, k, v, xa.BlockMask(torch.ones(1, 4, 5, 8, dtype=torch.bool), 8, 40, 64))
    assert out.shape == q.shape


def test_mask_must_be_block_mask_of_bools() -> None:
    q, k, v = _good()
    with pytest.raises(ValueError, match=r"must be an xattention\.BlockMask"):
        xa.block_sparse_attention(q, k, v, torch.ones(1, 4, 3, 4, dtype=torch.bool))  # type: ignore[arg-type]
    for dtype in (torch.float32, torch.int8, torch.uint8):
        with pytest.raises(ValueError, match="must be a bool tensor"):
            xa.BlockMask(torch.ones(1, 4, 3, 4, dtype=dtype), 16, 40, 64)


def test_mask_on_another_device() -> None:
    q, k, v = _good()
    mask = xa.BlockMask(torch.zeros(1, 4, 3, 4, dtype=torch.bool, device="meta"), 16, 40, 64)
    with pytest.raises(ValueError, match="BlockMask is on meta"):
        xa.block_sparse_attention(q, k, v, mask)
    with pytest.raises(ValueError, match="BlockMask is on meta"):
        xa.attention_mass_kept(q, k, mask)


@pytest.mark.parametrize("backend", ["cuda", "Triton", "", "torch"])
def test_unknown_backend(backend: str) -> None:
    q, k, v = _good()
    with pytest.raises(ValueError, match="unknown backend"):
        xa.block_sparse_attention(q, k, v, _mask_for(q, k), backend=backend)
    with pytest.raises(ValueError, match="unknown backend"):
        xa.XAttention(block_size=16, stride=4).estimate(q, k, backend=backend)
    with pytest.raises(ValueError, match="unknown backend"):
        xa.sparse_attention(q, k, v, xa.XAttention(block_size=16, stride=4, min_seq_len=0), backend=backend)


def test_backend_that_cannot_run_here() -> None:
    q, k, v = _good()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="flex"):
            xa.block_sparse_attention(q, k, v, _mask_for(q, k), backend="flex")
    with pytest.raises(ValueError, match="not available"):
        xa.XAttention(block_size=16, stride=4).estimate(q, k, backend="flex")


def test_sparse_attention_needs_a_method() -> None:
    q, k, v = _good()
    with pytest.raises(ValueError, match="method must be an xattention method"):
        xa.sparse_attention(q, k, v, "xattention")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------------
# method_from_spec


def test_method_from_spec_builds_the_right_object() -> None:
    m = xa.method_from_spec("xattention:threshold=0.8,stride=16")
    assert type(m) is xa.XAttention
    assert (m.threshold, m.stride, m.block_size, m.shared_kv_mask) == (0.8, 16, 128, False)
    m = xa.method_from_spec(" XAttention : threshold = 0.5 , shared_kv_mask=true , block_size=64,stride=8 ", min_seq_len=0)
    assert (m.threshold, m.stride, m.block_size, m.shared_kv_mask, m.min_seq_len) == (0.5, 8, 64, True, 0)
    d = xa.method_from_spec("dense", min_seq_len=0, stride=4)  # defaults a method does not take are ignored
    assert type(d) is xa.Dense and d.min_seq_len == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope", "unknown method 'nope'"),
        ("", "unknown method"),
        ("xattention:alpha=1", "has no parameter 'alpha'"),
        ("xattention:threshold", "not of the form key=value"),
        ("xattention:=0.5", "not of the form key=value"),
        ("xattention:threshold=1.5", r"threshold must lie in \(0, 1\]"),
        ("xattention:threshold=abc", "threshold must be a float"),
        ("xattention:stride=3", "multiple of stride"),
        # each value is read as its field's type: these used to build a method with other settings than asked
        ("xattention:shared_kv_mask=maybe", r"shared_kv_mask must be a bool \(true or false\), got 'maybe'"),
        ("xattention:shared_kv_mask=1", "shared_kv_mask must be a bool"),
        ("xattention:stride=true", "stride must be an int, got 'true'"),
        ("xattention:stride=8.0", "stride must be an int, got '8.0'"),
        ("xattention:threshold=0.5,threshold=0.9", "'threshold' is given more than once"),
        ("xattention:threshold=0.5,THRESHOLD=0.9", "'threshold' is given more than once"),
        ("vertical_slash:last_q=none", "last_q must be an int, got 'none'"),
        (None, "a method spec must be a string"),
        (3, "a method spec must be a string"),
    ],
)
def test_method_from_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        xa.method_from_spec(spec)


def test_method_from_spec_reads_values_as_their_field_types() -> None:
    m = xa.method_from_spec("xattention:shared_kv_mask=FALSE,threshold=1,stride=16")
    assert m.shared_kv_mask is False and type(m.threshold) is float and m.threshold == 1.0 and m.stride == 16
    v = xa.method_from_spec("vertical_slash:vertical_size=0.5,slash_size=7,threshold=none")
    assert (v.vertical_size, v.slash_size, v.threshold) == (0.5, 7, None)
    assert type(v.slash_size) is int and type(v.vertical_size) is float  # a count and a fraction


def test_method_from_spec_takes_a_thresholds_file(tmp_path) -> None:
    """``thresholds=FILE`` is part of the one spec grammar: ``xattention eval`` took it, ``method_from_spec`` did not."""
    path = tmp_path / "t.json"
    xa.save_thresholds(path, torch.tensor([[0.5, 0.6], [0.7, 1.0], [0.8, 0.9]]), model_name="tiny")
    layers = xa.method_from_spec(f"xattention:stride=4,block_size=16,thresholds={path}", min_seq_len=0)
    assert isinstance(layers, dict) and sorted(layers) == [0, 1, 2]
    for i, m in layers.items():
        assert type(m) is xa.XAttention and (m.stride, m.block_size, m.min_seq_len) == (4, 16, 0)
        assert torch.equal(m.threshold, xa.load_thresholds(path)[i])
    from xattention.methods.registry import single_method_from_spec

    for spec, message in [
        (f"xattention:threshold=0.9,thresholds={path}", "not both"),
        (f"xattention:thresholds={tmp_path / 'missing.json'}", "does not exist"),
        (f"streaming:thresholds={path}", "has no threshold"),
        (f"oracle:thresholds={path}", "threshold is one number"),
        (f"xattention:thresholds={path},thresholds={path}", "more than once"),
    ]:
        with pytest.raises(ValueError, match=message):
            xa.method_from_spec(spec)
    with pytest.raises(ValueError, match="bench methods runs one method"):
        single_method_from_spec(f"xattention:thresholds={path}", where="bench methods")


def test_parse_spec_splits_name_and_items() -> None:
    from xattention.methods.registry import parse_spec

    assert parse_spec(" XAttention : threshold = 0.5 ,stride=8, ") == ("xattention", [("threshold", "0.5"), ("stride", "8")])
    assert parse_spec("dense") == ("dense", [])
    assert parse_spec("xattention:thresholds=runs/t-a=b.json") == ("xattention", [("thresholds", "runs/t-a=b.json")])
    for bad in ("xattention:threshold", "xattention:=0.5"):
        with pytest.raises(ValueError, match="not of the form key=value"):
            parse_spec(bad)
