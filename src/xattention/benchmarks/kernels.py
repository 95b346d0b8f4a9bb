"""Kernel benchmark: dense baselines, sparse kernel vs FlexAttention per density, selection, end to end.

``xattention bench kernels`` (or ``python -m xattention.benchmarks.kernels``) on a CUDA GPU. Every ratio compares
timings taken in the same run on the same GPU with ``triton.testing.do_bench`` medians (CUDA events, warmed up).
Writes ``<out>/<gpu>-<date>.json`` and a PNG plot.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._parsing import parse_lengths
from .records import device_stem, markdown_table, write_record

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
    from ..block_mask import BlockMask, forced_blocks

    full = BlockMask.full(batch, heads, block_size=block, q_len=length, k_len=length, device=device)
    if density >= 1.0:
        return full
    forced = forced_blocks(length, length, block, device)
    vis = full.mask[0, 0]
    n_vis, n_forced = int(vis.sum()), int((forced & vis).sum())
    p = max(0.0, (density * n_vis - n_forced) / max(1, n_vis - n_forced))
    keep = (torch.rand(batch, heads, *vis.shape, device=device) < p) | forced
    return BlockMask(keep & vis, block, length, length)


def bench_ms(fn: Callable[[], Any], rep_ms: int) -> float:
    """``triton.testing.do_bench`` median of ``fn`` in milliseconds, warmed up for a quarter of ``rep_ms`` (25 at least)."""
    import triton

    return float(triton.testing.do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms, return_mode="median"))


def dense_baselines(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rep_ms: int) -> dict[str, Any]:
    """Dense causal attention timed through FlashAttention-4 (where present), cuDNN and flash SDPA, with TFLOP/s;
    ``dense_best_ms`` is the fastest of them: the baseline every speed-up is quoted against."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ..kernels import fa4, fa4_usable

    heads, length, head_dim = q.shape[1], q.shape[2], q.shape[3]
    flops = causal_attention_flops(1, heads, length, length, head_dim)
    row: dict[str, Any] = {"dense_fa4_ms": None}
    if fa4_usable(q.device):
        row["dense_fa4_ms"] = bench_ms(lambda: fa4.dense_attention(q, k, v), rep_ms)
        row["dense_fa4_tflops"] = flops / row["dense_fa4_ms"] / 1e9

    def sdpa() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                ms = bench_ms(sdpa, rep_ms)
            row[f"dense_{name}_ms"] = ms
            row[f"dense_{name}_tflops"] = flops / ms / 1e9
        except RuntimeError as exc:  # a backend may be unavailable for this shape/build
            logger.warning("SDPA %s failed at L=%d: %s", name, length, exc)
            row[f"dense_{name}_ms"] = None
    timed = [row[key] for key in ("dense_fa4_ms", "dense_cudnn_ms", "dense_flash_ms") if row[key] is not None]
    row["dense_best_ms"] = min(timed)
    row["dense_best"] = next(n for n in ("fa4", "cudnn", "flash") if row[f"dense_{n}_ms"] == row["dense_best_ms"])
    return row


def _fa4_prebuilt(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> Callable[[], Any] | None:
    """FA4 block-sparse on ``mask`` with its index tensors built once, outside the timing: FA4 as its own users call
    it, the bar for our dispatch (which builds the tensors on every call)."""
    from ..kernels import fa4, fa4_usable

    if not fa4_usable(q.device) or fa4.refusal(q, k, block_size=mask.block_size) is not None:
        return None
    from flash_attn.cute import flash_attn_func

    tensors = fa4.block_sparse_tensors(mask.mask, q_len=mask.q_len, k_len=mask.k_len, block_size=mask.block_size,
                                       causal=mask.causal)  # fmt: skip
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    return lambda: flash_attn_func(qt, kt, vt, causal=mask.causal, block_sparse_tensors=tensors)


def _measure_sparse(q, k, v, density: float, dense: dict[str, Any], with_flex: bool, rep_ms: int) -> dict[str, Any]:
    """One random mask at ``density``: our default path, the Triton kernel, FA4 as-is and FlexAttention on it."""
    from .. import block_sparse_attention
    from ..kernels.block_sparse_attention import block_sparse_attention as triton_attention

    heads, length = q.shape[1], q.shape[2]
    mask = random_block_mask(1, heads, length, 128, density, q.device)
    real = mask.density()
    entry: dict[str, Any] = {"target_density": density, "density": real}
    entry["auto_ms"] = bench_ms(lambda: block_sparse_attention(q, k, v, mask), rep_ms)
    entry["triton_ms"] = bench_ms(lambda: block_sparse_attention(q, k, v, mask, backend="triton"), rep_ms)
    # the same kernel with plain pointer loads instead of bulk (TMA) copies, to show what the copy engine buys
    entry["triton_pointer_loads_ms"] = bench_ms(
        lambda: triton_attention(q, k, v, mask.mask, block_size=128, use_tma=False), rep_ms
    )
    prebuilt = _fa4_prebuilt(q, k, v, mask)
    if prebuilt is not None:
        entry["fa4_prebuilt_ms"] = bench_ms(prebuilt, rep_ms)
        entry["auto_vs_fa4_prebuilt"] = entry["fa4_prebuilt_ms"] / entry["auto_ms"]
    # throughput per active block relative to the best dense kernel: (dense time / dense blocks) / (ours / our blocks)
    for name in ("auto", "triton", "fa4_prebuilt"):
        if f"{name}_ms" in entry:
            entry[f"{name}_vs_dense_per_block"] = dense["dense_best_ms"] * real / entry[f"{name}_ms"]
    if with_flex:
        entry["flex_ms"] = bench_ms(lambda: block_sparse_attention(q, k, v, mask, backend="flex"), rep_ms)
        entry["flex_vs_dense_per_block"] = dense["dense_best_ms"] * real / entry["flex_ms"]
    logger.info("L=%d %s", length, entry)
    return entry


def _measure_selection(q, k, v, stride: int, shared: bool, threshold: float, rep_ms: int) -> dict[str, Any]:
    """XAttention at one stride: scoring GEMM, sort-select, estimate, attend and end to end on the default path."""
    from .. import XAttention, block_sparse_attention, sparse_attention
    from ..kernels.antidiagonal import antidiagonal_block_scores
    from ..kernels.select import select_blocks

    heads, length = q.shape[1], q.shape[2]
    method = XAttention(stride=stride, threshold=threshold, min_seq_len=0, shared_kv_mask=shared)
    thr = torch.full((heads,), threshold, device=q.device)
    scores = antidiagonal_block_scores(q, k, stride=stride, block_size=128)
    mask = method.estimate(q, k)
    sel = {
        "stride": stride,
        "shared_kv_mask": shared,
        "score_ms": bench_ms(lambda: antidiagonal_block_scores(q, k, stride=stride, block_size=128), rep_ms),
        "select_ms": bench_ms(lambda: select_blocks(scores, thr, q_len=length, k_len=length, block_size=128), rep_ms),
        "estimate_ms": bench_ms(lambda: method.estimate(q, k), rep_ms),
        "density": mask.density(),
        "attend_ms": bench_ms(lambda: block_sparse_attention(q, k, v, mask), rep_ms),
        "end_to_end_ms": bench_ms(lambda: sparse_attention(q, k, v, method), rep_ms),
    }
    # the scoring GEMM's useful work: (L/S)^2 rows x cols of S*D products, causal half
    sel["score_tflops"] = (length / stride) ** 2 * stride * q.shape[3] * 2 * heads / 2 / sel["score_ms"] / 1e9
    logger.info("L=%d S=%d %s", length, stride, sel)
    return sel


def _speedups(entry: dict[str, Any], dense: dict[str, Any], ms_key: str) -> None:
    for name in ("fa4", "cudnn", "flash", "best"):
        base = dense.get(f"dense_{name}_ms")
        entry[f"speedup_vs_{name}"] = base / entry[ms_key] if base else None


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
    from .. import XAttention, sparse_attention

    row: dict[str, Any] = {"length": q.shape[2], **dense_baselines(q, k, v, rep_ms)}
    row["sparse"] = [_measure_sparse(q, k, v, d, row, with_flex, rep_ms) for d in densities]
    row["selection"] = []
    for stride, shared in [(s, False) for s in strides] + [(s, True) for s in strides]:
        sel = _measure_selection(q, k, v, stride, shared, threshold, rep_ms)
        _speedups(sel, row, "end_to_end_ms")
        row["selection"].append(sel)
    # What a user gets with the defaults (dense below method.min_seq_len): the "never slower than dense" check.
    default = XAttention(threshold=threshold)
    row["default_method_ms"] = bench_ms(lambda: sparse_attention(q, k, v, default), rep_ms)
    _speedups(row, row, "default_method_ms")
    return row


def _fa4_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flash-attn-4")
    except PackageNotFoundError:
        return None


def matmul_ceiling_tflops(device: torch.device, n: int = 8192) -> float:
    """bf16 matmul rate of an ``n^3`` product on random data, measured now: the ceiling the scoring GEMM is held to."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / bench_ms(lambda: a @ b, 200) / 1e9


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
        "fa4": _fa4_version(),
        "matmul_ceiling_tflops": matmul_ceiling_tflops(device),
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
        for shared in (False, True):
            sp = [next(s["speedup_vs_best"] for s in r["selection"] if s["stride"] == stride
                       and s["shared_kv_mask"] == shared) for r in rows]  # fmt: skip
            label = f"XAttention S={stride}" + (", GQA-shared mask" if shared else "")
            ax1.plot(lengths, sp, marker="o", ls="--" if shared else "-", label=label)
    ax1.axhline(1.0, color="gray", ls=":", lw=1)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("sequence length")
    ax1.set_ylabel(f"speed-up vs fastest dense ({rows[-1]['dense_best']})")
    ax1.legend(fontsize=8)
    ax1.set_title(f"Select + attend vs dense causal, tau={record['params']['threshold']}")
    last = rows[-1]
    dens = [s["density"] for s in last["sparse"]]
    for key, label, marker in (("auto_ms", "xattention default (FA4 where present)", "o"),
                               ("triton_ms", "xattention Triton", "^"),
                               ("fa4_prebuilt_ms", "FA4 block-sparse, prebuilt lists", "x"),
                               ("flex_ms", "FlexAttention", "s")):  # fmt: skip
        if key in last["sparse"][0]:
            ax2.plot(dens, [s[key] for s in last["sparse"]], marker=marker, label=label)
    ax2.plot(dens, [last["dense_best_ms"] * d for d in dens], ls="--", color="gray", label="fastest dense x density")
    ax2.set_xlabel("block density")
    ax2.set_ylabel("attention time (ms)")
    ax2.set_title(f"Block-sparse attention on one random mask, L={last['length']}")
    ax2.legend(fontsize=8)
    fig.suptitle(f"{record['gpu']}, torch {record['torch']}, triton {record['triton']}, flash-attn-4 {record.get('fa4')}")
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


def cell(value: float | None) -> str:
    """A table cell: two decimals, or a dash for a value that was not measured."""
    return "—" if value is None else f"{value:.2f}"


def format_table(record: dict[str, Any]) -> str:
    rows = record["rows"]
    sparse = markdown_table(
        ["L", "FA4 dense ms", "cuDNN ms", "flash ms", "density", "default ms", "Triton ms", "FA4 prebuilt ms", "default/FA4",
         "flex ms"],
        ([r["length"], cell(r["dense_fa4_ms"]), cell(r["dense_cudnn_ms"]), cell(r["dense_flash_ms"]), f"{s['density']:.3f}",
          f"{s['auto_ms']:.2f}", f"{s['triton_ms']:.2f}", cell(s.get("fa4_prebuilt_ms")), cell(s.get("auto_vs_fa4_prebuilt")),
          cell(s.get("flex_ms"))] for r in rows for s in r["sparse"]),
    )  # fmt: skip
    default = markdown_table(
        ["L", "default XAttention() ms", "vs FA4 dense", "vs cuDNN"],
        ([r["length"], f"{r['default_method_ms']:.3f}", cell(r["speedup_vs_fa4"]), cell(r["speedup_vs_cudnn"])] for r in rows),
    )
    selection = markdown_table(
        ["L", "S", "shared", "score ms", "score TFLOP/s", "select ms", "estimate ms", "density", "attend ms", "e2e ms",
         "vs FA4 dense", "vs cuDNN"],
        ([r["length"], s["stride"], s["shared_kv_mask"], f"{s['score_ms']:.2f}", f"{s['score_tflops']:.0f}",
          f"{s['select_ms']:.2f}", f"{s['estimate_ms']:.2f}", f"{s['density']:.3f}", f"{s['attend_ms']:.2f}",
          f"{s['end_to_end_ms']:.2f}", cell(s["speedup_vs_fa4"]), cell(s["speedup_vs_cudnn"])]
         for r in rows for s in r["selection"]),
    )  # fmt: skip
    return "\n".join([*sparse, "", *default, "", *selection])


if __name__ == "__main__":
    from .cli import run_script

    run_script(__doc__, add_arguments, main)
