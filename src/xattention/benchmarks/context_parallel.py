"""Context-parallel benchmark: ring sparse prefill over N ranks against single-device ``sparse_attention``.

Launch with torchrun (one process per GPU)::

    torchrun --nproc-per-node N -m xattention.benchmarks.context_parallel --lengths 131072,262144 \\
        --methods dense,xattention --out benchmarks/results/cp.json

or ``xattention bench context-parallel ...`` (one process: world size 1). ``--device cpu`` runs it on CPU with gloo at
tiny sizes (a smoke test). For every length, method and layout it times :func:`xattention.distributed.ring_sparse_attention`
(median over ``--iters`` iterations after ``--warmup``, each started after a barrier; CUDA events on GPU) and, on rank 0,
single-device :func:`xattention.sparse_attention` on the full sequence (``--no-single`` skips it when it does not fit).
At N = 1 the ratio ring / single is the ring code path's overhead; at N > 1 single / ring is the speed-up. It reports
each rank's bytes sent and received per phase, skipped transfers and skipped compute, the mask density and, with
``--check``, the largest difference from the single-device output and whether the masks agree. Rank 0 writes JSON.

Fixed iteration counts, not ``triton.testing.do_bench``: do_bench picks its repetition count from a first timing, which
differs between ranks, and a rank that runs the collective one time fewer leaves the others waiting forever.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import logging
import math
import os
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._common import synchronize
from .._parsing import parse_lengths, torch_dtype
from ..methods.registry import split_method_specs
from .records import device_stem, markdown_table

__all__ = ["add_arguments", "main", "run"]

logger = logging.getLogger(__name__)

# NVLink multicast (NVLS / NVLink SHARP, and the multicast objects of symmetric memory and NVSHMEM) stays off: on the
# shared multi-GPU machines multicast objects are a scarce fabric-wide resource that other jobs hold, and a process that
# creates them can fail to initialise or leave them behind. Plain NVLink P2P is all the ring needs.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

DTYPES = {name: torch_dtype(name) for name in ("bf16", "fp16", "fp32")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _init_distributed(device_kind: str) -> tuple[torch.device, bool]:
    """Join (or, outside torchrun, create a one-rank) process group; returns the device and whether we created it."""
    import torch.distributed as dist

    for key, value in NO_MULTICAST_ENV.items():
        os.environ[key] = value
    if device_kind == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if dist.is_initialized():
        return device, False
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, **kwargs)
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, **kwargs)
    return device, True


def _time_ms(fn: Callable[[], Any], device: torch.device, *, warmup: int, iters: int, barrier: bool) -> float:
    """Median milliseconds of ``fn`` over ``iters`` runs (CUDA events on GPU; the CPU clock only for CPU work)."""
    import torch.distributed as dist

    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        if barrier:
            dist.barrier()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(float(start.elapsed_time(end)))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _inputs(
    batch: int, heads: int, kv_heads: int, length: int, head_dim: int, dtype: torch.dtype, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The full sequence, identical on every rank (same seed): structured attention where the head dim allows it."""
    if head_dim >= 32:
        from .synthetic import structured_qkv

        return structured_qkv(batch, heads, kv_heads, length, head_dim, dtype=dtype, device=device, seed=seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, heads, length, head_dim, generator=gen, device=device, dtype=dtype)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=gen, device=device, dtype=dtype)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=gen, device=device, dtype=dtype)
    return q, k, v


def _kept_and_visible(mask: Any) -> tuple[int, int]:
    """Kept visible blocks and visible blocks of this rank's mask rows (summed over batch and heads)."""
    visible = mask.visible()
    return int((mask.mask & visible).sum()), int(visible.sum()) * mask.mask.shape[0] * mask.mask.shape[1]


def run(
    lengths: list[int],
    method_specs: list[str],
    layouts: list[str],
    *,
    device: torch.device,
    batch: int = 1,
    heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    block_size: int = 128,
    warmup: int = 2,
    iters: int = 5,
    single: bool = True,
    check: bool = False,
    passes: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the sweep on every rank of the default group; returns the record (complete on rank 0)."""
    import torch.distributed as dist

    from ..attention import sparse_attention
    from ..methods.registry import single_method_from_spec

    rank = dist.get_rank()
    record = _header(device, batch, heads, kv_heads, head_dim, dtype, block_size, warmup, iters, passes, seed)
    timing = {"warmup": warmup, "iters": iters}
    for length in lengths:
        q_full, k_full, v_full = _inputs(batch, heads, kv_heads, length, head_dim, dtype, device, seed)
        for spec in method_specs:
            method = single_method_from_spec(spec, where="bench context-parallel", block_size=block_size, min_seq_len=0)
            single_ms: float | None = None
            single_out = single_mask = None
            if rank == 0 and (single or check):
                single_out, single_mask = sparse_attention(q_full, k_full, v_full, method, return_mask=True)
                if single:
                    single_call = functools.partial(sparse_attention, q_full, k_full, v_full, method)
                    single_ms = _time_ms(single_call, device, barrier=False, **timing)
            dist.barrier()
            for layout in layouts:
                row, out, mask = _ring_row((q_full, k_full, v_full), method, spec, layout, passes, device, timing, single_ms)
                if check:
                    _check_row(row, out, mask, method.block_size, layout, single_out, single_mask)
                del out, mask
                record["rows"].append(row)
                if rank == 0:
                    logger.info("L=%d %s %s: ring %.3f ms, single %s ms", length, spec, layout, row["ring_ms"], single_ms)
            del single_out, single_mask
        del q_full, k_full, v_full
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return record


def _header(
    device: torch.device, batch: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, block_size: int,
    warmup: int, iters: int, passes: int | None, seed: int,
) -> dict[str, Any]:  # fmt: skip
    """The record without rows: where and how the sweep runs."""
    import torch.distributed as dist

    record: dict[str, Any] = {
        "benchmark": "context-parallel",
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "env": {k: os.environ.get(k) for k in NO_MULTICAST_ENV},
        "params": {
            "batch": batch, "q_heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": str(dtype).split(".")[-1],
            "block_size": block_size, "warmup": warmup, "iters": iters, "passes": passes, "seed": seed,
            "timer": "median of per-iteration CUDA events after a barrier" if device.type == "cuda" else "perf_counter",
        },
        "rows": [],
    }  # fmt: skip
    if device.type == "cuda":
        import triton

        record["triton"] = triton.__version__
    return record


def _shards(full: tuple[torch.Tensor, ...], layout: str, block_size: int) -> list[torch.Tensor]:
    """This rank's shard of each full-sequence tensor."""
    import torch.distributed as dist

    from ..distributed import shard_sequence

    rank, world = dist.get_rank(), dist.get_world_size()
    return [shard_sequence(x, rank, world, layout, block_size=block_size) for x in full]  # type: ignore[arg-type]


def _ring_row(
    full: tuple[torch.Tensor, ...], method: Any, spec: str, layout: str, passes: int | None, device: torch.device,
    timing: dict[str, int], single_ms: float | None,
) -> tuple[dict[str, Any], torch.Tensor, Any]:  # fmt: skip
    """Time the ring on this rank's shards and gather every rank's counts into one row (identical on every rank);
    returns the row and this rank's output and mask rows."""
    import torch.distributed as dist

    from ..distributed import RingStats, ring_sparse_attention

    rank, world = dist.get_rank(), dist.get_world_size()
    q, k, v = _shards(full, layout, method.block_size)
    stats = RingStats()
    out, mask = ring_sparse_attention(q, k, v, method, layout=layout, passes=passes, stats=stats, return_mask=True)
    ring_call = functools.partial(ring_sparse_attention, q, k, v, method, layout=layout, passes=passes)
    ring_ms = _time_ms(ring_call, device, barrier=True, **timing)
    kept, visible = _kept_and_visible(mask)
    mine = {"rank": rank, "tokens": q.shape[2], "ring_ms": ring_ms, "kept": kept, "visible": visible, **stats.as_dict()}
    per_rank: list[Any] = [None] * world
    dist.all_gather_object(per_rank, mine)
    row: dict[str, Any] = {
        "length": full[0].shape[2], "method": spec, "method_params": method.params(), "layout": layout,
        "ring_ms": max(r["ring_ms"] for r in per_rank), "single_ms": single_ms,
        "density": sum(r["kept"] for r in per_rank) / max(1, sum(r["visible"] for r in per_rank)),
        "estimate_path": per_rank[0]["estimate_path"], "per_rank": per_rank,
    }  # fmt: skip
    for phase in ("estimate", "attention"):
        row[f"{phase}_bytes_sent_max"] = max(r[phase]["bytes_sent"] for r in per_rank)
        row[f"{phase}_messages_skipped"] = sum(r[phase]["messages_skipped"] for r in per_rank)
    row["attention_computes_skipped"] = sum(r["attention"]["computes_skipped"] for r in per_rank)
    if single_ms is not None:
        row["ring_over_single"] = row["ring_ms"] / single_ms
    return row, out, mask


def _check_row(
    row: dict[str, Any], out: torch.Tensor, mask: Any, block_size: int, layout: str, single_out: torch.Tensor | None,
    single_mask: Any,
) -> None:  # fmt: skip
    """With ``--check``: gather every rank's output and mask rows; rank 0 compares them with the single device."""
    import torch.distributed as dist

    from ..distributed import unshard_sequence

    world = dist.get_world_size()
    outs: list[Any] = [None] * world
    masks: list[Any] = [None] * world
    dist.all_gather_object(outs, out.cpu())
    dist.all_gather_object(masks, mask.mask.cpu())
    if dist.get_rank() == 0:
        whole = unshard_sequence(outs, layout, block_size=block_size)  # type: ignore[arg-type]
        assert single_out is not None
        row["max_abs_err"] = float((whole.float() - single_out.float().cpu()).abs().max())
        if single_mask is not None:
            got = unshard_sequence(masks, layout, block_size=1)  # type: ignore[arg-type]
            row["masks_equal"] = bool(torch.equal(got, single_mask.mask.cpu()))


def format_table(record: dict[str, Any]) -> str:
    table = markdown_table(
        ["L", "method", "layout", "density", "ring ms", "single ms", "ring/single", "est. MiB sent (max rank)",
         "attn MiB sent (max rank)", "skipped transfers", "skipped computes", "max err", "masks equal"],
        ([r["length"], r["method"], r["layout"], f"{r['density']:.3f}", f"{r['ring_ms']:.3f}",
          None if r["single_ms"] is None else f"{r['single_ms']:.3f}", f"{r.get('ring_over_single', math.nan):.3f}",
          f"{r['estimate_bytes_sent_max'] / 2**20:.3f}", f"{r['attention_bytes_sent_max'] / 2**20:.3f}",
          r["attention_messages_skipped"], r["attention_computes_skipped"], r.get("max_abs_err", "-"),
          r.get("masks_equal", "-")] for r in record["rows"]),
    )  # fmt: skip
    return "\n".join([f"world size {record['world_size']} on {record['device']} ({record['backend']})", "", *table])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", default="128k,256k", help="comma list, e.g. 131072,262144 or 128k")
    p.add_argument("--methods", default="dense,xattention", help="method specs, e.g. dense,xattention:threshold=0.9,stride=16")
    p.add_argument("--layouts", default="contiguous,zigzag", help="comma list of contiguous, zigzag")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--block-size", type=int, default=128, help="block size given to every method spec lacking one")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda when available")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5, help="timed iterations (median)")
    p.add_argument("--passes", type=int, choices=(1, 2), default=None, help="XAttention selection passes (default: auto)")
    p.add_argument("--no-single", action="store_true", help="skip the single-device baseline (too large for one GPU)")
    p.add_argument("--check", action="store_true", help="gather outputs and masks, compare with the single device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>-<date>-context-parallel-wN.json)")


def main(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from ..distributed import LAYOUTS

    kind = args.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available")
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    bad = [x for x in layouts if x not in LAYOUTS]
    if bad or not layouts:
        raise ValueError(f"--layouts takes {', '.join(LAYOUTS)}, got {args.layouts!r}")
    lengths, specs = parse_lengths(args.lengths), split_method_specs(args.methods)
    device, created = _init_distributed(kind)
    try:
        record = run(
            lengths, specs, layouts, device=device, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads,
            head_dim=args.head_dim, dtype=DTYPES[args.dtype], block_size=args.block_size, warmup=args.warmup,
            iters=args.iters, single=not args.no_single, check=args.check, passes=args.passes, seed=args.seed,
        )  # fmt: skip
        if dist.get_rank() == 0:
            name = device_stem(record, f"context-parallel-w{record['world_size']}", device_key="device")
            out = Path(args.out) if args.out else Path("benchmarks/results") / f"{name}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(record, indent=1))
            print(format_table(record))
            print(f"wrote {out}")
    finally:
        if created:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from .cli import run_script

    run_script(__doc__, add_arguments, main, prog="python -m xattention.benchmarks.context_parallel")
