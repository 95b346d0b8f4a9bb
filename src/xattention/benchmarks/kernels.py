"""Kernel benchmark: dense baselines, sparse kernel vs FlexAttention per density, selection, end to end.

``xattention bench kernels`` (or ``python -m xattention.benchmarks.kernels``) on a CUDA GPU. Every ratio compares
timings taken in the same run on the same GPU with ``triton.testing.do_bench`` medians (CUDA events, warmed up).
Writes ``<out>/<gpu>-<date>.json`` and a PNG plot.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._parsing import parse_lengths
from .records import device_stem, write_record

__all__ = ["add_arguments", "main", "run"]

logger = logging.getLogger(__name__)


# cuDNN's causal kernel skips the upper triangle; count the FLOPs it must do (QK^T and PV, causal half).
def causal_attention_flops(batch: int, heads: int, q_len: int, k_len: int, head_dim: int) -> float:
    """Multiply-adds x2 of causal attention (bottom-right aligned), counting only visible (query, key) pairs."""
    visible = q_len * (k_len - q_len) + q_len * (q_len + 1) / 2
    return 4.0 * batch * heads * visible * head_dim


def random_block_mask(batch: int, heads: int, length: int, block: int, density: float, device: torch.device):
    """A causal BlockMask keeping sink + diagonal + random blocks, at ``density`` of the visible blocks (in expectation).

    Density 1.0 is exactly the dense causal pattern."""
    from ..block_mask import BlockMask
    from ..kernels.reference import forced_blocks

    full = BlockMask.full(batch, heads, block_size=block, q_len=length, k_len=length, device=device)
    if density >= 1.0:
        return full
    forced = forced_blocks(length, length, block, device)
    vis = full.mask[0, 0]
    n_vis, n_forced = int(vis.sum()), int((forced & vis).sum())
    p = max(0.0, (density * n_vis - n_forced) / max(1, n_vis - n_forced))
    keep = (torch.rand(batch, heads, *vis.shape, device=device) < p) | forced
    return BlockMask(keep & vis, block, length, length)


def _bench(fn: Callable[[], Any], rep_ms: int) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms, return_mode="median"))


def _measure_length(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    densities: list[float],
    strides: list[int],
    threshold: float,
    with_flex: bool,
    rep_ms: int,
) -> dict[str, Any]:
    """Every measurement at one sequence length, on one set of structured inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .. import XAttention, block_sparse_attention, sparse_attention
    from ..kernels.antidiagonal import antidiagonal_block_scores
    from ..kernels.block_sparse_attention import block_sparse_attention as triton_attention
    from ..kernels.select import select_blocks

    heads, length, head_dim = q.shape[1], q.shape[2], q.shape[3]
    block, device = 128, q.device
    row: dict[str, Any] = {"length": length}
    flops = causal_attention_flops(1, heads, length, length, head_dim)

    def sdpa() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                ms = _bench(sdpa, rep_ms)
            row[f"dense_{name}_ms"] = ms
            row[f"dense_{name}_tflops"] = flops / ms / 1e9
        except RuntimeError as exc:  # a backend may be unavailable for this shape/build
            logger.warning("SDPA %s failed at L=%d: %s", name, length, exc)
            row[f"dense_{name}_ms"] = None
    dense_ms = row["dense_cudnn_ms"] or row["dense_flash_ms"]

    row["sparse"] = []
    for density in densities:
        mask = random_block_mask(1, heads, length, block, density, device)
        real = mask.density()
        entry: dict[str, Any] = {"target_density": density, "density": real}
        entry["triton_ms"] = _bench(lambda m=mask: block_sparse_attention(q, k, v, m, backend="triton"), rep_ms)
        # the same kernel with plain pointer loads instead of bulk (TMA) copies, to show what the copy engine buys
        entry["triton_pointer_loads_ms"] = _bench(
            lambda m=mask: triton_attention(q, k, v, m.mask, block_size=block, use_tma=False), rep_ms
        )
        # throughput per active block relative to cuDNN dense: (dense time / dense blocks) / (ours / our blocks)
        entry["triton_vs_cudnn_per_block"] = dense_ms * real / entry["triton_ms"]
        if with_flex:
            entry["flex_ms"] = _bench(lambda m=mask: block_sparse_attention(q, k, v, m, backend="flex"), rep_ms)
            entry["flex_vs_cudnn_per_block"] = dense_ms * real / entry["flex_ms"]
        row["sparse"].append(entry)
        logger.info("L=%d density=%.3f triton=%.2fms flex=%s", length, real, entry["triton_ms"], entry.get("flex_ms"))

    row["selection"] = []
    thr = torch.full((heads,), threshold, device=device)
    for stride, shared in [(s, False) for s in strides] + [(strides[0], True)]:
        method = XAttention(stride=stride, threshold=threshold, min_seq_len=0, shared_kv_mask=shared)
        score_ms = _bench(lambda s=stride: antidiagonal_block_scores(q, k, stride=s, block_size=block), rep_ms)
        scores = antidiagonal_block_scores(q, k, stride=stride, block_size=block)
        select_ms = _bench(lambda a=scores: select_blocks(a, thr, q_len=length, k_len=length, block_size=block), rep_ms)
        mask = method.estimate(q, k, backend="triton")
        sel = {
            "stride": stride,
            "shared_kv_mask": shared,
            "score_ms": score_ms,
            "select_ms": select_ms,
            "estimate_ms": _bench(lambda m=method: m.estimate(q, k, backend="triton"), rep_ms),
            "density": mask.density(),
            "attend_ms": _bench(lambda m=mask: block_sparse_attention(q, k, v, m, backend="triton"), rep_ms),
            "end_to_end_ms": _bench(lambda m=method: sparse_attention(q, k, v, m, backend="triton"), rep_ms),
        }
        sel["speedup_vs_cudnn"] = dense_ms / sel["end_to_end_ms"]
        row["selection"].append(sel)
        logger.info("L=%d S=%d %s", length, stride, sel)

    # What a user gets with the defaults (dense below method.min_seq_len): the "never slower than dense" check.
    default = XAttention(threshold=threshold)
    row["default_method_ms"] = _bench(lambda: sparse_attention(q, k, v, default), rep_ms)
    row["default_vs_cudnn"] = dense_ms / row["default_method_ms"]
    return row


def run(
    lengths: list[int],
    *,
    densities: list[float],
    strides: list[int],
    heads: int,
    kv_heads: int,
    head_dim: int,
    threshold: float,
    with_flex: bool,
    rep_ms: int,
) -> dict[str, Any]:
    """Run the sweep and return the result record (also logged row by row)."""
    import triton

    from .. import XAttention
    from .synthetic import structured_qkv

    device = torch.device("cuda")
    block = 128
    record: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(device),
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "params": {
            "batch": 1, "q_heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": "bfloat16",
            "block_size": block, "densities": densities, "strides": strides, "threshold": threshold,
            "timer": "triton.testing.do_bench median", "rep_ms": rep_ms,
        },
        "min_seq_len_default": XAttention().min_seq_len,
        "rows": [],
    }  # fmt: skip
    for length in lengths:
        q, k, v = structured_qkv(1, heads, kv_heads, length, head_dim, dtype=torch.bfloat16, device=device)
        record["rows"].append(
            _measure_length(q, k, v, densities=densities, strides=strides, threshold=threshold, with_flex=with_flex,
                            rep_ms=rep_ms)
        )  # fmt: skip
        del q, k, v
        torch.cuda.empty_cache()
    return record


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["rows"]
    lengths = [r["length"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for stride in record["params"]["strides"]:
        sp = [
            next(s["speedup_vs_cudnn"] for s in r["selection"] if s["stride"] == stride and not s["shared_kv_mask"]) for r in rows
        ]
        ax1.plot(lengths, sp, marker="o", label=f"XAttention S={stride}, tau={record['params']['threshold']}")
    ax1.axhline(1.0, color="gray", ls="--", lw=1)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("sequence length")
    ax1.set_ylabel("speed-up vs cuDNN causal SDPA (end to end)")
    ax1.legend()
    ax1.set_title("Select + attend vs dense (structured inputs)")
    last = rows[-1]
    dens = [s["density"] for s in last["sparse"]]
    ax2.plot(dens, [s["triton_ms"] for s in last["sparse"]], marker="o", label="xattention Triton")
    if "flex_ms" in last["sparse"][0]:
        ax2.plot(dens, [s["flex_ms"] for s in last["sparse"]], marker="s", label="FlexAttention, same mask")
    if last.get("dense_cudnn_ms"):
        ax2.plot(dens, [last["dense_cudnn_ms"] * d for d in dens], ls="--", label="cuDNN dense x density")
    ax2.set_xlabel("block density")
    ax2.set_ylabel("attention time (ms)")
    ax2.set_title(f"Block-sparse attention at L={last['length']}")
    ax2.legend()
    fig.suptitle(f"{record['gpu']}, torch {record['torch']}, triton {record['triton']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", default="8k,16k,32k,64k,128k,256k", help="comma list, e.g. 8k,32k,131072")
    p.add_argument("--densities", default="1.0,0.5,0.2,0.1,0.05")
    p.add_argument("--strides", default="8,16")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    p.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition budget per measurement")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and PNG")


def main(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise ValueError("the kernel benchmark needs a CUDA GPU")
    record = run(
        parse_lengths(args.lengths),
        densities=[float(x) for x in args.densities.split(",")],
        strides=[int(x) for x in args.strides.split(",")],
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        threshold=args.threshold,
        with_flex=not args.no_flex,
        rep_ms=args.rep_ms,
    )
    path = write_record(record, args.out, device_stem(record, "kernels"), plot)
    print(format_table(record))
    print(f"wrote {path} and .png")
    return 0


def format_table(record: dict[str, Any]) -> str:
    lines = [
        "| L | cuDNN ms | flash ms | density | triton ms | x cuDNN/blk | no-TMA ms | flex ms | x cuDNN/blk |",
        "|---" * 9 + "|",
    ]
    for r in record["rows"]:
        for s in r["sparse"]:
            lines.append(
                f"| {r['length']} | {r['dense_cudnn_ms'] or math.nan:.2f} | {r['dense_flash_ms'] or math.nan:.2f} | "
                f"{s['density']:.3f} | {s['triton_ms']:.2f} | {s['triton_vs_cudnn_per_block']:.2f} | "
                f"{s['triton_pointer_loads_ms']:.2f} | "
                f"{s.get('flex_ms', math.nan):.2f} | {s.get('flex_vs_cudnn_per_block', math.nan):.2f} |"
            )
    lines += ["", "| L | default XAttention() ms | speed-up vs cuDNN |", "|---|---|---|"]
    for r in record["rows"]:
        lines.append(f"| {r['length']} | {r['default_method_ms']:.3f} | {r['default_vs_cudnn']:.2f} |")
    lines += ["", "| L | S | shared | score ms | select ms | estimate ms | density | attend ms | e2e ms | speed-up vs cuDNN |"]
    lines.append("|---" * 10 + "|")
    for r in record["rows"]:
        for s in r["selection"]:
            lines.append(
                f"| {r['length']} | {s['stride']} | {s['shared_kv_mask']} | {s['score_ms']:.2f} | "
                f"{s['select_ms']:.2f} | {s['estimate_ms']:.2f} | {s['density']:.3f} | {s['attend_ms']:.2f} | "
                f"{s['end_to_end_ms']:.2f} | {s['speedup_vs_cudnn']:.2f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
