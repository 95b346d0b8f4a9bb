"""Context parallelism on CPU (gloo): every rank's ring result equals its rows of single-process ``sparse_attention``.

Process groups of 2 and 4 ranks are spawned once per module (spawning is the slow part); each rank runs every case in
:data:`CASES` and records ``"ok"`` or the traceback, and one test per (world size, case) reads the records. The
single-process side uses ``backend="reference"`` and ``min_seq_len=0``: dense attention through SDPA, XAttention through
:func:`~xattention.kernels.reference.antidiagonal_block_scores` and ``select_blocks`` — none of which the ring calls.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import xattention as xa
from xattention.distributed import (
    RingStats,
    SequenceLayout,
    ShardBlockMask,
    ring_estimate,
    ring_sparse_attention,
    shard_sequence,
    unshard_sequence,
)
from xattention.kernels import reference as ref
from xattention.methods.flexprefill import FlexPrefill
from xattention.methods.oracle import Oracle
from xattention.methods.streaming import Streaming

# ------------------------------------------------------------------------------------------------ single-process tests


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize(("length", "world", "block"), [(203, 2, 16), (203, 4, 16), (64, 4, 16), (1000, 3, 32), (17, 1, 16)])
def test_layout_covers_sequence_in_whole_blocks(layout: str, length: int, world: int, block: int) -> None:
    lay = SequenceLayout(length, world, block, layout)  # type: ignore[arg-type]
    positions = torch.cat([lay.positions(r) for r in range(world)])
    assert torch.equal(positions.sort().values, torch.arange(length))  # a partition of the tokens
    for r in range(world):
        assert lay.local_len(r) > 0
        for s, e in lay.token_runs(r):
            assert s % block == 0 and (e % block == 0 or e == length)
        assert torch.equal(lay.blocks(r), torch.unique(lay.positions(r) // block))
    x = torch.randn(2, 3, length, 5)
    shards = [shard_sequence(x, r, world, layout, block_size=block) for r in range(world)]  # type: ignore[arg-type]
    assert torch.equal(unshard_sequence(shards, layout, block_size=block), x)  # type: ignore[arg-type]
    if layout == "zigzag" and world > 1 and lay.num_blocks % (2 * world) == 0:
        # balanced causal work: every rank's queries see the same number of (query block, key block) pairs
        work = [int((lay.blocks(r) + 1).sum()) for r in range(world)]
        assert len(set(work)) == 1


def test_layout_rejects_empty_ranks() -> None:
    with pytest.raises(ValueError, match="at least one"):
        SequenceLayout(40, 4, 16, "contiguous")  # 3 blocks for 4 ranks
    with pytest.raises(ValueError, match="layout"):
        SequenceLayout(40, 2, 16, "striped")  # type: ignore[arg-type]


@pytest.mark.parametrize("causal", [True, False])
def test_partial_antidiagonal_scores_merge_to_single_device(causal: bool) -> None:
    b, s, length = 32, 8, 200
    q, k = torch.randn(2, 4, length, 16), torch.randn(2, 2, length, 16)
    expected = ref.antidiagonal_block_scores(q, k, stride=s, block_size=b, causal=causal)
    cuts, qcuts = [0, 64, 160, length], [0, 96, length]
    for qa, qe in itertools.pairwise(qcuts):
        parts = [
            ref.antidiagonal_partial_scores(
                q[:, :, qa:qe], k[:, :, a:e], stride=s, block_size=b, q_start=qa, k_start=a, q_len=length,
                k_len=length, causal=causal,
            )
            for a, e in itertools.pairwise(cuts)
        ]  # fmt: skip
        total_max, total_sum = ref.merge_partial_row_stats([m for m, _ in parts], [x.sum(-1) for _, x in parts])
        got = torch.cat([ref.partial_block_scores(x, m, total_max, total_sum, rows_per_block=b // s) for m, x in parts], -1)
        torch.testing.assert_close(got, expected[:, :, qa // b : -(-qe // b)], atol=1e-6, rtol=1e-5)


def test_select_blocks_masked_equals_select_blocks_on_any_rows() -> None:
    length, b = 300, 32
    scores = torch.rand(2, 3, -(-length // b), -(-length // b))
    thr = torch.tensor([0.5, 0.8, 0.95])
    full = ref.select_blocks(scores, thr, q_len=length, k_len=length, block_size=b)
    rows = torch.tensor([0, 3, 4, 9])
    forced, visible = ref.block_rows_geometry(length, length, b, rows)
    got = ref.select_blocks_masked(scores[:, :, rows], thr, forced=forced, visible=visible)
    assert torch.equal(got, full[:, :, rows])


@pytest.mark.parametrize("causal", [True, False])
def test_reference_return_lse_matches_explicit_logsumexp(causal: bool) -> None:
    bsz, hq, hkv, lq, lk, d, b = 2, 4, 2, 37, 70, 8, 16
    q, k, v = torch.randn(bsz, hq, lq, d), torch.randn(bsz, hkv, lk, d), torch.randn(bsz, hkv, lk, d)
    mask = torch.rand(bsz, hq, -(-lq // b), -(-lk // b)) < 0.5
    mask[0, 0, 0] = False  # a row that sees nothing: zeros and -inf
    out, lse = ref.block_sparse_attention(q, k, v, mask, block_size=b, causal=causal, return_lse=True)
    tok = xa.BlockMask(mask, b, lq, lk, causal).to_token_mask()
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(hq // hkv, 1)) / math.sqrt(d)
    expected_lse = torch.logsumexp(scores.masked_fill(~tok, float("-inf")), dim=-1)
    torch.testing.assert_close(lse, expected_lse)
    torch.testing.assert_close(out, ref.block_sparse_attention(q, k, v, mask, block_size=b, causal=causal))
    assert bool((lse[0, 0, :b] == float("-inf")).all()) and bool((out[0, 0, :b] == 0).all())


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [True, False])
def test_shard_block_mask_is_its_rows_of_the_full_mask(layout: str, causal: bool) -> None:
    """A ShardBlockMask of some ranks' rows: visibility, density, token mask and index lists are the full mask's rows."""
    length, b, world = 203, 16, 3
    full = xa.BlockMask(torch.rand(2, 3, -(-length // b), -(-length // b)) < 0.5, b, length, length, causal)
    lay = SequenceLayout(length, world, b, layout)  # type: ignore[arg-type]
    for rank in range(world):
        rows = lay.blocks(rank)
        shard = ShardBlockMask(full.mask[:, :, rows], b, lay.local_len(rank), length, causal, rows=rows)
        assert torch.equal(shard.visible(), full.visible()[rows])
        vis = full.visible()[rows]
        want = ((full.mask[:, :, rows] & vis).sum(dim=(-1, -2)).double() / vis.sum()).float()
        torch.testing.assert_close(shard.density_per_head(), want)
        assert torch.equal(shard.to_token_mask(), full.to_token_mask()[:, :, lay.positions(rank)])
        assert torch.equal(shard.to_indices()[1], full.to_indices()[1][:, :, rows])
        assert torch.equal(shard.to("cpu").rows, rows) and "rows=" in repr(shard)
    with pytest.raises(ValueError, match="rows"):
        ShardBlockMask(full.mask[:, :, :2], b, 2 * b, length, causal, rows=torch.tensor([0]))


def test_ring_needs_an_initialised_process_group() -> None:
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    q = torch.randn(1, 2, 32, 8)
    with pytest.raises(ValueError, match="init_process_group"):
        ring_sparse_attention(q, q, q, xa.Dense(block_size=16))


def test_benchmark_runs_at_world_size_1(tmp_path: Path) -> None:
    """Outside torchrun the benchmark makes its own one-rank gloo group (and removes it again)."""
    from xattention.benchmarks import context_parallel as bench

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "w1.json"
    args = parser.parse_args(
        ["--device", "cpu", "--lengths", "100", "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--dtype", "fp32",
         "--block-size", "16", "--methods", "xattention:stride=4", "--layouts", "zigzag", "--warmup", "0", "--iters", "1",
         "--check", "--out", str(out)]
    )  # fmt: skip
    assert bench.main(args) == 0
    assert not dist.is_initialized()
    (row,) = json.loads(out.read_text())["rows"]
    assert row["estimate_path"] == "local" and row["masks_equal"] and row["max_abs_err"] < 1e-5
    assert row["attention_bytes_sent_max"] == 0 and row["ring_over_single"] > 0


def test_parse_method_specs_keeps_parameters_together() -> None:
    from xattention.methods.registry import split_method_specs as parse_method_specs

    assert parse_method_specs("dense,xattention:threshold=0.9,stride=16, streaming") == [
        "dense",
        "xattention:threshold=0.9,stride=16",
        "streaming",
    ]


# ------------------------------------------------------------------------------------------------------ spawned cases
# One spawned world of 4 ranks (spawning and importing torch is most of the time on 2 cores). Each case runs twice: on
# the 4-rank default group, then on two concurrent 2-rank subgroups {0, 2} and {1, 3} (non-adjacent global ranks, so the
# group-rank -> global-rank mapping of the point-to-point ops is exercised too).
SPAWNED_WORLD = 4


@dataclass
class Ctx:
    rank: int  # in `group`
    world: int  # size of `group`
    group: dist.ProcessGroup | None
    tmp: Path


def _inputs(bsz: int, hq: int, hkv: int, length: int, d: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(1234 + length)  # the same full sequence on every rank
    return tuple(torch.randn(bsz, h, length, d, generator=gen).to(dtype) for h in (hq, hkv, hkv))


def _compare(
    ctx: Ctx,
    method: xa.Method,
    *,
    length: int,
    layout: str,
    bsz: int = 2,
    hq: int = 4,
    hkv: int = 2,
    d: int = 16,
    causal: bool = True,
    dtype: torch.dtype = torch.float32,
    passes: int | None = None,
    atol: float = 2e-5,
    memory_budget: int = ref.DEFAULT_CHUNK_ELEMENTS,
) -> RingStats:
    """Ring output and mask rows of this rank vs the single-process result on the full sequence."""
    q, k, v = _inputs(bsz, hq, hkv, length, d, dtype)
    expected, expected_mask = xa.sparse_attention(q, k, v, method, causal=causal, backend="reference", return_mask=True)
    b = method.block_size
    shard = [shard_sequence(x, ctx.rank, ctx.world, layout, block_size=b) for x in (q, k, v)]  # type: ignore[arg-type]
    stats = RingStats()
    out, mask = ring_sparse_attention(
        *shard, method, group=ctx.group, causal=causal, layout=layout, passes=passes, stats=stats, return_mask=True,
        memory_budget=memory_budget,
    )  # fmt: skip
    rows = SequenceLayout(length, ctx.world, b, layout).blocks(ctx.rank)  # type: ignore[arg-type]
    if expected_mask is None:  # dense path: every causally visible block
        expected_mask = xa.BlockMask.full(bsz, hq, block_size=b, q_len=length, k_len=length, causal=causal)
    assert mask.mask.shape == (bsz, hq, rows.numel(), -(-length // b))
    assert torch.equal(mask.mask, expected_mask.mask[:, :, rows]), "mask rows differ from the single-device mask"
    mine = shard_sequence(expected, ctx.rank, ctx.world, layout, block_size=b)  # type: ignore[arg-type]
    assert out.dtype == q.dtype and out.shape == mine.shape
    torch.testing.assert_close(out.float(), mine.float(), atol=atol, rtol=1e-3)
    return stats


def _gather_int(ctx: Ctx, x: int) -> list[int]:
    t = torch.tensor([x])
    out = [torch.zeros_like(t) for _ in range(ctx.world)]
    dist.all_gather(out, t, group=ctx.group)
    return [int(o) for o in out]


def case_dense(ctx: Ctx) -> None:
    w = ctx.world
    for layout in ("contiguous", "zigzag"):
        stats = _compare(ctx, xa.Dense(block_size=16), length=203, layout=layout)  # 203 = 12 blocks + 11
        sent = sum(_gather_int(ctx, stats.attention.messages_sent))
        # contiguous + causal: shard j only travels to the ranks after it, W(W-1)/2 transfers instead of W(W-1)
        assert sent == (w * (w - 1) // 2 if layout == "contiguous" else w * (w - 1)), sent


def case_xattention(ctx: Ctx) -> None:
    method = xa.XAttention(block_size=16, stride=4, threshold=0.8, min_seq_len=0)
    for layout in ("contiguous", "zigzag"):
        stats = _compare(ctx, method, length=203, layout=layout)
        assert stats.estimate_path == "ring-1pass"


def case_xattention_two_pass_batch3(ctx: Ctx) -> None:
    method = xa.XAttention(block_size=32, stride=8, threshold=0.9, min_seq_len=0)
    stats = _compare(ctx, method, length=333, layout="zigzag", bsz=3, passes=2)
    assert stats.estimate_path == "ring-2pass"
    # GQA 6:1, and the automatic choice takes two passes when the per-shard block sums exceed the memory budget
    stats = _compare(ctx, method, length=333, layout="contiguous", hq=6, hkv=1, memory_budget=100)
    assert stats.estimate_path == "ring-2pass"


def case_xattention_non_causal(ctx: Ctx) -> None:
    method = xa.XAttention(block_size=16, stride=8, threshold=0.7, min_seq_len=0)
    _compare(ctx, method, length=150, layout="zigzag", causal=False)
    _compare(ctx, xa.Dense(block_size=16), length=150, layout="contiguous", causal=False)


def case_xattention_per_head_threshold_shared_mask(ctx: Ctx) -> None:
    thr = torch.tensor([0.5, 0.7, 0.9, 0.95, 0.6, 0.8])
    method = xa.XAttention(block_size=16, stride=8, threshold=thr, shared_kv_mask=True, min_seq_len=0)
    _compare(ctx, method, length=190, layout="contiguous", hq=6, hkv=2)


def case_xattention_bf16(ctx: Ctx) -> None:
    method = xa.XAttention(block_size=16, stride=4, threshold=0.9, min_seq_len=0)
    _compare(ctx, method, length=180, layout="zigzag", dtype=torch.bfloat16, atol=2e-2)


def case_short_input_runs_dense(ctx: Ctx) -> None:
    # below min_seq_len, sparse_attention runs dense attention: so must the ring (mask = every visible block)
    stats = _compare(ctx, xa.XAttention(block_size=16, min_seq_len=10_000), length=130, layout="contiguous")
    assert stats.estimate_path == "dense"


def case_ring_estimate_direct(ctx: Ctx) -> None:
    method = xa.XAttention(block_size=16, stride=4, threshold=0.85, min_seq_len=0)
    q, k, _ = _inputs(1, 2, 1, 170, 8)
    expected = method.estimate(q, k, backend="reference")
    lay = SequenceLayout(170, ctx.world, 16, "zigzag")
    shards = [shard_sequence(x, ctx.rank, ctx.world, "zigzag", block_size=16) for x in (q, k)]
    got = ring_estimate(*shards, method, ctx.group, layout="zigzag")
    assert torch.equal(got.mask, expected.mask[:, :, lay.blocks(ctx.rank)])
    assert (got.q_len, got.k_len) == (lay.local_len(ctx.rank), 170)


def _rows_density(full: xa.BlockMask, rows: torch.Tensor) -> torch.Tensor:
    """[B, Hq]: kept visible blocks over visible blocks of the full mask's ``rows``."""
    vis = full.visible()[rows]
    return ((full.mask[:, :, rows] & vis).sum(dim=(-1, -2)).double() / vis.sum()).float()


def case_mask_density_is_the_rows_own(ctx: Ctx) -> None:
    """Each rank's mask reports the density of its own rows of the full mask (it used to treat them as the sequence's
    last rows, wrong on every rank but the last of a contiguous layout)."""
    method = xa.XAttention(block_size=16, stride=4, threshold=0.8, min_seq_len=0)
    q, k, v = _inputs(1, 2, 1, 170, 8)
    full = method.estimate(q, k, backend="reference")
    for layout in ("contiguous", "zigzag"):
        rows = SequenceLayout(170, ctx.world, 16, layout).blocks(ctx.rank)  # type: ignore[arg-type]
        shards = [shard_sequence(x, ctx.rank, ctx.world, layout, block_size=16) for x in (q, k, v)]  # type: ignore[arg-type]
        got = ring_estimate(shards[0], shards[1], method, ctx.group, layout=layout)
        _, from_attention = ring_sparse_attention(*shards, method, group=ctx.group, layout=layout, return_mask=True)
        for mask in (got, from_attention):
            torch.testing.assert_close(mask.density_per_head(), _rows_density(full, rows))
            assert torch.equal(mask.visible(), full.visible()[rows])
            positions = SequenceLayout(170, ctx.world, 16, layout).positions(ctx.rank)  # type: ignore[arg-type]
            assert torch.equal(mask.to_token_mask(), full.to_token_mask()[:, :, positions])


def case_generic_methods_all_gather(ctx: Ctx) -> None:
    for method in (Oracle(block_size=16, threshold=0.8, min_seq_len=0), FlexPrefill(block_size=16, min_seq_len=0)):
        stats = _compare(ctx, method, length=170, layout="zigzag")
        assert stats.estimate_path == "all-gather"


def case_streaming_skips_transfers_and_compute(ctx: Ctx) -> None:
    w = ctx.world
    method = Streaming(block_size=16, sink_blocks=1, local_blocks=1, min_seq_len=0)
    length = 16 * 4 * w + 5
    stats = _compare(ctx, method, length=length, layout="contiguous")
    # each row keeps the sink and its own block: rank p skips the shards 1 .. p-1 it sees but kept nothing of
    skipped = sum(_gather_int(ctx, stats.attention.computes_skipped))
    assert skipped == sum(max(0, r - 1) for r in range(w)), skipped
    # ... and only shard 0 travels: W-1 transfers instead of W(W-1)/2
    sent = sum(_gather_int(ctx, stats.attention.messages_sent))
    assert sent == w - 1, sent


def case_mismatched_shards_raise_everywhere(ctx: Ctx) -> None:
    q = torch.randn(1, 2, 17, 8)  # 17 tokens each: not a block-aligned split of 17 * world tokens
    try:
        ring_sparse_attention(q, q, q, xa.Dense(block_size=16), group=ctx.group)
    except ValueError as exc:
        assert "tokens" in str(exc)
    else:
        raise AssertionError("no ValueError")


def case_benchmark_smoke(ctx: Ctx) -> str | None:
    if ctx.group is not None:
        return "skip: the benchmark runs on the default group"  # not parametrized below
    from xattention.benchmarks import context_parallel as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = ctx.tmp / "bench.json"
    args = parser.parse_args(
        ["--device", "cpu", "--lengths", "200", "--heads", "4", "--kv-heads", "2", "--head-dim", "32", "--dtype", "fp32",
         "--block-size", "32", "--methods", "dense,xattention:stride=8,threshold=0.8", "--warmup", "0", "--iters", "1",
         "--check", "--out", str(out)]
    )  # fmt: skip
    assert bench.main(args) == 0
    dist.barrier()
    record = json.loads(out.read_text())
    assert record["world_size"] == ctx.world and len(record["rows"]) == 4
    for row in record["rows"]:
        assert row["max_abs_err"] < 1e-4 and row.get("masks_equal", True), row
        assert row["ring_ms"] > 0 and row["single_ms"] > 0 and len(row["per_rank"]) == ctx.world
    return None


CASES: dict[str, Callable[[Ctx], str | None]] = {
    name.removeprefix("case_"): fn for name, fn in globals().items() if name.startswith("case_") and callable(fn)
}


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=60)  # a rank stuck after another's failure errors out instead of hanging
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timeout)
    pairs = [dist.new_group([0, 2]), dist.new_group([1, 3])]  # every rank creates every group, in the same order
    pair = pairs[rank % 2]
    contexts = {4: Ctx(rank, world, None, Path(tmp)), 2: Ctx(dist.get_rank(pair), 2, pair, Path(tmp))}
    results: dict[str, dict[str, str]] = {"2": {}, "4": {}}
    try:
        for name, case in CASES.items():
            for size, ctx in contexts.items():
                results[str(size)][name] = "running"
                results[str(size)][name] = case(ctx) or "ok"
    except Exception:  # record and stop: the other ranks may now be waiting in a collective
        results[str(size)][name] = traceback.format_exc()
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ring_results() -> list[dict[str, dict[str, str]]]:
    """Per global rank: {group size: {case: "ok" | "skip: ..." | traceback}}."""
    world, limit = SPAWNED_WORLD, 240.0
    with tempfile.TemporaryDirectory() as tmp:
        old = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"  # 4 ranks on a few cores: no thread oversubscription
        try:
            start = time.perf_counter()
            procs = mp.start_processes(_worker, args=(world, _free_port(), tmp), nprocs=world, join=False, start_method="spawn")
            while not procs.join(timeout=5.0):
                if time.perf_counter() - start > limit:
                    for proc in procs.processes:
                        proc.kill()
                    pytest.fail(f"the {world}-rank group did not finish in {limit:.0f} s")
        finally:
            if old is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = old
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize(
    ("case", "size"), [(c, n) for c in sorted(CASES) for n in (2, 4) if (c, n) != ("benchmark_smoke", 2)], ids=str
)
def test_ring_matches_single_process(ring_results: list[dict[str, dict[str, str]]], case: str, size: int) -> None:
    failures = {}
    for r, res in enumerate(ring_results):
        msg = res[str(size)].get(case, "not run: an earlier case failed (see its test)")
        if msg.startswith("skip"):
            pytest.skip(msg)
        if msg != "ok":
            failures[r] = msg
    assert not failures, "\n".join(f"--- global rank {r}, group of {size}:\n{msg}" for r, msg in failures.items())
