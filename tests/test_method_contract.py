"""The contract every entry of ``xa.METHODS`` keeps (kvpress ``tests/default_presses.py`` style): a new method is tested
here by being registered. Shapes and geometry of the mask, causality, Dense at full budget, device and dtype, spec
round trip. Method-specific behaviour is tested in ``test_methods_baselines.py`` and ``test_reference_selection.py``."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import pytest
import torch

import xattention as xa
from xattention.methods.base import Geometry

BLOCK = 16
# (B, Hq, Hkv, Lq, Lk, D): one block, ragged ends, GQA, chunked prefill whose offset is not a multiple of the block
SHAPES = [(1, 1, 1, 1, 1, 8), (2, 4, 2, 45, 100, 16), (1, 3, 1, 100, 100, 8), (2, 2, 2, 37, 203, 8)]

# Each method's settings at which it keeps every block with attention mass: Dense's pattern. A method registered
# without an entry here fails test_every_method_declares_its_full_budget.
FULL_BUDGET: dict[str, dict[str, object]] = {
    "dense": {},
    "xattention": {"threshold": 1.0, "stride": 4},
    "streaming": {"sink_blocks": 1, "local_blocks": 10**6},
    "vertical_slash": {"threshold": 1.0},
    "flexprefill": {"gamma": 1.0},
    "oracle": {"threshold": 1.0},
}


def _method(name: str, **kwargs: object) -> xa.Method:
    return xa.METHODS[name](block_size=BLOCK, min_seq_len=0, **kwargs)


def _qkv(bsz: int, hq: int, hkv: int, lq: int, lk: int, d: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(lq * 1000 + lk)
    q, k, v = (torch.randn(bsz, h, n, d, generator=gen) for h, n in ((hq, lq), (hkv, lk), (hkv, lk)))
    k[:, :, : max(1, lk // 40)] *= 3  # a sink, so rows are not uniform
    return q.to(dtype), k.to(dtype), v.to(dtype)


def test_every_method_declares_its_full_budget() -> None:
    assert set(FULL_BUDGET) == set(xa.METHODS)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", sorted(xa.METHODS))
def test_mask_shape_geometry_and_causality(name: str, shape: tuple[int, ...], causal: bool) -> None:
    """Every method: a BlockMask of q/k's geometry that keeps the sink and diagonal blocks and, under causal masking,
    nothing above the diagonal; its shared_heads promise holds."""
    bsz, hq, _, lq, lk, _ = shape
    q, k, _ = _qkv(*shape)
    mask = _method(name).estimate(q, k, causal=causal)
    assert isinstance(mask, xa.BlockMask) and mask.mask.dtype == torch.bool
    assert mask.shape == (bsz, hq, -(-lq // BLOCK), -(-lk // BLOCK))
    assert (mask.q_len, mask.k_len, mask.block_size, mask.causal) == (lq, lk, BLOCK, causal)
    assert not bool((mask.mask & ~mask.visible()).any()), "a block with no visible pair is kept"
    forced = xa.block_mask.forced_blocks(lq, lk, BLOCK)
    assert not bool((forced & ~mask.mask).any()), "a sink or diagonal block is dropped"
    g = mask.shared_heads
    grouped = mask.mask.view(bsz, hq // g, g, *mask.shape[2:])
    assert bool((grouped == grouped[:, :, :1]).all()), "shared_heads promises equal masks within a group"
    assert 0.0 < mask.density() <= 1.0


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
@pytest.mark.parametrize("name", sorted(xa.METHODS))
def test_full_budget_is_dense(name: str, shape: tuple[int, ...], causal: bool) -> None:
    """At full budget every method keeps exactly the visible blocks, and sparse_attention equals dense attention."""
    if name == "streaming" and not causal:
        pytest.skip("Streaming keeps its window ending at the diagonal without causal masking too (its docstring)")
    bsz, hq, _, lq, lk, _ = shape
    q, k, v = _qkv(*shape)
    method = _method(name, **FULL_BUDGET[name])
    mask = method.estimate(q, k, causal=causal)
    full = xa.BlockMask.full(bsz, hq, block_size=BLOCK, q_len=lq, k_len=lk, causal=causal)
    assert torch.equal(mask.mask, full.mask)
    out = xa.sparse_attention(q, k, v, method, causal=causal, backend="reference")
    torch.testing.assert_close(out, xa.dense_attention(q, k, v, causal=causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(xa.METHODS))
def test_half_precision_inputs_on_their_device(name: str, dtype: torch.dtype) -> None:
    """Half-precision q/k give a mask on q's device that agrees with the float32 estimate on almost every block."""
    q, k, _ = _qkv(2, 4, 2, 45, 100, 16)
    method = _method(name)
    want = method.estimate(q, k).mask
    got = method.estimate(q.to(dtype), k.to(dtype))
    assert got.mask.device == q.device and got.shape == want.shape
    assert float((got.mask != want).float().mean()) < 0.1


@pytest.mark.parametrize("name", sorted(xa.METHODS))
def test_spec_round_trip(name: str) -> None:
    """``method_from_spec`` of a method's own parameters gives the same method back."""
    method = _method(name, **FULL_BUDGET[name])
    params = {key: value for key, value in method.params().items() if not isinstance(value, list)}
    spec = name + ":" + ",".join(f"{key}={'none' if value is None else value}" for key, value in params.items())
    again = xa.method_from_spec(spec)
    assert type(again) is type(method) and again.params() == method.params()


@pytest.mark.parametrize("name", sorted(xa.METHODS))
def test_estimate_refuses_bad_inputs(name: str) -> None:
    q, k, _ = _qkv(1, 3, 2, 20, 40, 8)  # 3 query heads over 2 key/value heads
    with pytest.raises(ValueError, match="multiple"):
        _method(name).estimate(q, k)
    q, k, _ = _qkv(1, 2, 1, 40, 20, 8)  # more queries than keys
    with pytest.raises(ValueError, match="Lq"):
        _method(name).estimate(q, k)
    q, k, _ = _qkv(1, 2, 1, 20, 20, 8)
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):  # Dense once accepted any name
        _method(name).estimate(q, k, backend="bogus")
    assert math.isfinite(_method(name).min_seq_len)


def test_xattention_defaults_are_the_evidence_backed_ones() -> None:
    """S = 8, tau = 0.95: within 1 point of dense on every complete harness cell of both models (README, "The default
    threshold"); tau = 0.9 lost 3.1 / 4.8 points on gemma-3 at 8K / 16K. The CLI defaults follow the library's."""
    from xattention.benchmarks.model import DEFAULT_METHODS
    from xattention.evaluation.config import EvalConfig

    method = xa.XAttention()
    assert (method.stride, method.threshold, method.block_size) == (8, 0.95, 128)
    assert "xattention:stride=8,threshold=0.95" in DEFAULT_METHODS
    assert EvalConfig().methods == "dense,xattention:threshold=0.95"


def test_a_new_method_writes_choose_blocks_only() -> None:
    """The base's estimate checks the inputs and hands the subclass their geometry; forced blocks are added for it."""

    @dataclasses.dataclass(kw_only=True, eq=False)
    class ForcedOnly(xa.Method):
        name: ClassVar[str] = "forced_only"

        def choose_blocks(self, q: torch.Tensor, k: torch.Tensor, geo: Geometry, *, scale: float | None) -> xa.BlockMask:
            return geo.block_mask(torch.zeros(geo.batch, geo.heads, 1, 1, dtype=torch.bool, device=geo.device))

    q, k, _ = _qkv(2, 4, 2, 45, 100, 16)
    mask = ForcedOnly(block_size=BLOCK).estimate(q, k)
    assert torch.equal(mask.mask, xa.block_mask.forced_blocks(45, 100, BLOCK).expand(2, 4, -1, -1))
    with pytest.raises(ValueError, match="unknown backend"):
        ForcedOnly(block_size=BLOCK).estimate(q, k, backend="bogus")
    with pytest.raises(TypeError, match="abstract"):
        dataclasses.dataclass(kw_only=True, eq=False)(type("NoChoice", (xa.Method,), {}))()
