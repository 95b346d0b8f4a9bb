"""The kernel benchmark's CPU-side pieces: argument parsing, FLOP count, random masks, table and plot."""

from __future__ import annotations

import json
import math

import pytest
import torch

from xattention.benchmarks import kernels as bench


def test_parse_lengths() -> None:
    assert bench.parse_lengths("8k, 1000,128K") == [1000, 8192, 131072]
    with pytest.raises(ValueError, match="lengths"):
        bench.parse_lengths("")


def test_causal_flops_counts_visible_pairs() -> None:
    # 3 queries over 5 keys, bottom-right: query i sees 2 + i + 1 keys -> 3 + 4 + 5 = 12 pairs
    assert bench.causal_attention_flops(1, 1, 3, 5, 2) == 4 * 12 * 2


@pytest.mark.parametrize("density", [1.0, 0.3])
def test_random_block_mask_density_and_rules(density: float) -> None:
    mask = bench.random_block_mask(1, 4, 4096, 128, density, torch.device("cpu"))
    assert mask.mask[..., 0].all()  # sink
    assert torch.diagonal(mask.mask, dim1=-2, dim2=-1).all()  # diagonal
    assert not torch.triu(mask.mask, diagonal=1).any()
    assert math.isclose(mask.density(), density, abs_tol=0.05)


def test_table_and_plot(tmp_path) -> None:
    sparse = [
        {"target_density": d, "density": d, "auto_ms": 9 * d, "triton_ms": 10 * d, "triton_pointer_loads_ms": 11 * d,
         "fa4_prebuilt_ms": 8.8 * d, "auto_vs_fa4_prebuilt": 8.8 / 9, "flex_ms": 12 * d}
        for d in (1.0, 0.1)
    ]  # fmt: skip
    selection = [
        {"stride": s, "shared_kv_mask": sh, "score_ms": 1.0, "score_tflops": 500.0, "select_ms": 0.1,
         "estimate_ms": 1.2, "density": 0.1, "attend_ms": 1.0, "end_to_end_ms": 2.3, "speedup_vs_fa4": 3.5,
         "speedup_vs_cudnn": 4.0, "speedup_vs_best": 3.5}
        for s in (8, 16) for sh in (False, True)
    ]  # fmt: skip
    rows = [
        {"length": n, "dense_fa4_ms": 8.0, "dense_cudnn_ms": 9.0, "dense_flash_ms": 15.0, "dense_best_ms": 8.0,
         "dense_best": "fa4", "sparse": sparse, "selection": selection, "default_method_ms": 8.1,
         "speedup_vs_fa4": 0.99, "speedup_vs_cudnn": 1.11}
        for n in (8192, 16384)
    ]  # fmt: skip
    record = {"gpu": "Test GPU", "torch": "x", "triton": "y", "params": {"strides": [8, 16], "threshold": 0.9}}
    record["rows"] = rows
    table = bench.format_table(record)
    assert "| 16384 | 8.00 | 9.00 | 15.00 | 0.100 | 0.90 | 1.00 | 0.88 | 0.98 | 1.20 |" in table
    assert "| 8192 | 8 | True | 1.00 | 500 |" in table
    assert "| 16384 | 8.100 | 0.99 | 1.11 |" in table
    bench.plot(record, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    rows[0]["dense_fa4_ms"] = None  # no FA4 on the machine: a dash, not a crash
    assert "| 8192 | — | 9.00 |" in bench.format_table(record)


def test_split_method_specs() -> None:
    from xattention.methods.registry import split_method_specs

    assert split_method_specs("dense, xattention:stride=8,threshold=0.9,streaming,oracle:threshold=0.8") == [
        "dense",
        "xattention:stride=8,threshold=0.9",
        "streaming",
        "oracle:threshold=0.8",
    ]
    with pytest.raises(ValueError, match="no method"):
        split_method_specs(" , ")


def test_methods_table() -> None:
    from xattention.benchmarks.methods import format_table

    row = {"length": 32768, "method": "streaming", "density": 0.1, "mass_kept": 0.8, "estimate_ms": 0.1,
           "attend_ms": 1.0, "end_to_end_ms": 1.1, "speedup_vs_fa4": 8.0, "speedup_vs_cudnn": 9.0}  # fmt: skip
    assert "| 32768 | streaming | 0.100 | 0.800 | 0.10 | 1.00 | 1.10 | 8.00x | 9.00x |" in format_table({"rows": [row]})


def test_records_are_written_by_device_and_date(tmp_path) -> None:
    from xattention.benchmarks.records import device_stem, write_record

    record = {"gpu": "NVIDIA H200", "device": "cpu", "date": "2026-11-29", "rows": [1, 2]}
    assert device_stem(record, "kernels") == "nvidia-h200-2026-11-29-kernels"
    assert device_stem(record, "cp-w2", device_key="device") == "cpu-2026-11-29-cp-w2"
    plotted = []
    path = write_record(record, tmp_path / "a" / "b", "x", lambda rec, png: plotted.append((rec, png)))
    assert path == tmp_path / "a" / "b" / "x.json" and json.loads(path.read_text()) == record
    assert plotted == [(record, tmp_path / "a" / "b" / "x.png")]
    assert write_record(record, tmp_path, "y") == tmp_path / "y.json" and not (tmp_path / "y.png").exists()
