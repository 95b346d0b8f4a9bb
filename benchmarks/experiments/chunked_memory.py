"""Where the peak memory of a prefill goes, in one shot and chunked: CUDA memory history around one TTFT repeat.

    PYTHONPATH=src python3 benchmarks/experiments/chunked_memory.py 131072 16384 OUT.json \
        [xattention:stride=8,threshold=0.95] [sdpa]

On the Llama-3.1-8B-shaped model with random weights (``bench model --model llama-8b-random``), for each method
(``sdpa``: the model untouched): one TTFT repeat of ``bench model`` in one shot and with ``chunk_size`` tokens per
forward, each after an untimed warm-up. The allocator trace of the repeat is replayed to find its peak; the blocks
alive at the peak are grouped by their Python stack (the first four xattention / transformers / torch frames).
Needs CUDA.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from typing import Any

import torch

import xattention as xa
from xattention.benchmarks.model import load_bench_model, time_to_first_token
from xattention.methods.registry import method_from_spec

KEEP = ("xattention", "transformers", "torch/nn", "flash_attn", "chunked_memory")


def frame_key(frames: list[dict]) -> str:
    """The first four frames of an allocation's stack inside the libraries of interest, innermost first."""
    picked = []
    for f in frames:
        name = f.get("filename", "")
        if any(k in name for k in KEEP):
            short = name.split("site-packages/")[-1].split("/src/")[-1]
            picked.append(f"{short}:{f.get('line')}:{f.get('name')}")
        if len(picked) == 4:
            break
    return " < ".join(picked) or "?"


def peak_breakdown(snapshot: dict) -> dict:
    """Replay a ``torch.cuda.memory._snapshot()`` trace: the peak rise and the 20 largest groups alive at it."""
    trace = snapshot["device_traces"][0]
    live: dict[int, tuple[int, str]] = {}
    total, peak, peak_live = 0, 0, {}
    for entry in trace:
        action = entry["action"]
        if action == "alloc":
            live[entry["addr"]] = (entry["size"], frame_key(entry.get("frames", [])))
            total += entry["size"]
            if total > peak:
                peak, peak_live = total, dict(live)
        elif action == "free_completed" and entry["addr"] in live:
            total -= live.pop(entry["addr"])[0]
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, key in peak_live.values():
        groups[key][0] += size
        groups[key][1] += 1
    top = sorted(groups.items(), key=lambda kv: -kv[1][0])[:20]
    return {
        "trace_entries": len(trace),
        "peak_rise_gib": peak / 2**30,
        "top": [{"gib": round(s / 2**30, 3), "blocks": n, "where": k} for k, (s, n) in top],
    }


def main(argv: list[str]) -> None:
    length, chunk, out = int(argv[0]), int(argv[1]), argv[2]
    specs = argv[3:] or ["xattention:stride=8,threshold=0.95", "sdpa"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_bench_model("llama-8b-random", device=device, dtype="bfloat16")
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
    report = {"length": length, "chunk": chunk, "start_gib": torch.cuda.memory_allocated() / 2**30}
    for spec in specs:
        xa.remove(model)
        if spec != "sdpa":
            xa.apply(model, method_from_spec(spec, min_seq_len=0))
        report[spec] = run_spec(model, ids, chunk)
        with open(out, "w") as f:
            json.dump(report, f, indent=1)


def run_spec(model: Any, ids: torch.Tensor, chunk: int) -> dict:
    """One-shot and chunked peaks of ``model`` as configured now."""
    report = {}
    for name, size in (("one-shot", None), ("chunked", chunk)):
        time_to_first_token(model, ids, warmup=1, repeats=1, chunk_size=size)  # compile / autotune outside the trace
        torch.cuda.synchronize()
        torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")
        t0 = time.perf_counter()
        ttft = time_to_first_token(model, ids, warmup=0, repeats=1, chunk_size=size)
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        report[name] = {"peak_gib": ttft.peak_memory_bytes / 2**30, "seconds": time.perf_counter() - t0, **peak_breakdown(snap)}
        sys.stdout.write(f"{name} {json.dumps(report[name], indent=1)}\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
