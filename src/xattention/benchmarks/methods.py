"""Per-method benchmark: selection time, density, attention mass kept and end-to-end time against FA4 dense and cuDNN.

``xattention bench methods --lengths 32k,128k`` on a CUDA GPU, on the structured inputs of the kernel benchmark
(:func:`~xattention.benchmarks.synthetic.structured_qkv`). Every method runs its ``estimate`` on the GPU and attends
with the same attention kernel (the default path: FA4 where present), so differences are the methods' own. Timings
are ``triton.testing.do_bench`` medians.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
from typing import Any

import torch

from .._parsing import parse_lengths
from ..methods.registry import split_method_specs
from .kernels import bench_ms, cell, dense_baselines
from .records import device_stem, markdown_table, write_record

__all__ = ["DEFAULT_METHODS", "add_arguments", "main", "run"]

logger = logging.getLogger(__name__)

DEFAULT_METHODS = (
    "xattention:stride=8,threshold=0.9",
    "xattention:stride=16,threshold=0.9",
    "xattention:stride=8,threshold=0.9,shared_kv_mask=true",
    "xattention:stride=16,threshold=0.9,shared_kv_mask=true",
    "streaming:sink_blocks=1,local_blocks=31",
    "vertical_slash:threshold=0.9",
    "flexprefill:gamma=0.9",
    "oracle:threshold=0.9",
)


def _measure_length(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, methods: list[tuple[str, Any]], rep_ms: int
) -> list[dict[str, Any]]:
    """Time and score every method on one set of inputs."""
    from .. import block_sparse_attention
    from ..kernels.reference import true_block_scores

    length = q.shape[2]
    dense = dense_baselines(q, k, v, rep_ms)
    true = true_block_scores(q, k, block_size=128)  # exact block mass, for "mass kept"
    rows = []
    for spec, method in methods:
        mask = method.estimate(q, k)
        entry = {
            "length": length,
            "method": spec,
            "density": mask.density(),
            "mass_kept": float((true * mask.mask).sum(dim=(-1, -2)).mean() / length),
            **{key: dense[key] for key in ("dense_fa4_ms", "dense_cudnn_ms", "dense_best_ms", "dense_best")},
            "estimate_ms": bench_ms(lambda m=method: m.estimate(q, k), rep_ms),
            "attend_ms": bench_ms(lambda m=mask: block_sparse_attention(q, k, v, m), rep_ms),
        }
        entry["end_to_end_ms"] = entry["estimate_ms"] + entry["attend_ms"]
        for name in ("fa4", "cudnn"):
            base = dense[f"dense_{name}_ms"]
            entry[f"speedup_vs_{name}"] = base / entry["end_to_end_ms"] if base else None
        rows.append(entry)
        logger.info("%s", entry)
    return rows


def run(lengths: list[int], specs: list[str], *, heads: int, kv_heads: int, head_dim: int, rep_ms: int) -> dict[str, Any]:
    import triton

    from ..methods.registry import single_method_from_spec
    from .synthetic import structured_qkv

    # fail before any GPU work
    methods = [(spec, single_method_from_spec(spec, where="bench methods", min_seq_len=0)) for spec in specs]
    device = torch.device("cuda")
    record: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(device),
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "params": {"batch": 1, "q_heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": "bfloat16",
                   "inputs": "benchmarks.synthetic.structured_qkv(seed=0)", "timer": "do_bench median"},
        "rows": [],
    }  # fmt: skip
    for length in lengths:
        q, k, v = structured_qkv(1, heads, kv_heads, length, head_dim, dtype=torch.bfloat16, device=device)
        record["rows"] += _measure_length(q, k, v, methods, rep_ms)
        del q, k, v
        torch.cuda.empty_cache()
    return record


def format_table(record: dict[str, Any]) -> str:
    return "\n".join(
        markdown_table(
            ["L", "method", "density", "mass kept", "estimate ms", "attend ms", "select+attend ms", "vs FA4 dense", "vs cuDNN"],
            ([r["length"], r["method"], f"{r['density']:.3f}", f"{r['mass_kept']:.3f}", f"{r['estimate_ms']:.2f}",
              f"{r['attend_ms']:.2f}", f"{r['end_to_end_ms']:.2f}", f"{cell(r['speedup_vs_fa4'])}x",
              f"{cell(r['speedup_vs_cudnn'])}x"] for r in record["rows"]),
        )
    )  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", default="32k,128k")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="method specs, e.g. dense,xattention:stride=16")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rep-ms", type=int, default=100)
    p.add_argument("--out", default="benchmarks/results")


def main(args: argparse.Namespace) -> int:
    specs = split_method_specs(args.methods)
    if not torch.cuda.is_available():
        raise ValueError("the method benchmark needs a CUDA GPU")
    record = run(
        parse_lengths(args.lengths), specs, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
        rep_ms=args.rep_ms,
    )  # fmt: skip
    path = write_record(record, args.out, device_stem(record, "methods"))
    print(format_table(record))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from .cli import run_script

    run_script(__doc__, add_arguments, main)
