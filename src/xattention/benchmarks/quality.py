"""Selection quality on real attention: exact attention mass kept against block density, per method and knob.

``xattention bench quality --model smollm2 --length 2048 --prompts 2`` builds prompts with the evaluation harness's
task generators (:class:`xattention.evaluation.tasks.SampleGenerator`, default tasks ``niah_single_2`` and ``vt``, the
evaluation's seed 42), captures every layer's post-RoPE ``q``/``k`` in one dense prefill
(:func:`xattention.integrations.hf.capture_qk`), and sweeps each method over its knob:

* XAttention (Xu et al., 2025) with stride 8 and 16, threshold ``tau``;
* Vertical-Slash (MInference, Jiang et al., 2024) threshold; FlexPrefill (Lai et al., 2025) ``gamma``;
* StreamingLLM-style blocks (Xiao et al., 2024): one sink block and ``local_blocks`` recent blocks;
* the oracle (top blocks by exact mass until ``tau`` of each row), the ceiling of block selection.

Per point: density (:meth:`BlockMask.density`, fraction of causally visible blocks kept) and mass kept (exact softmax
probability inside kept blocks, ``(true_block_scores * mask).sum() / Lq``), averaged over batch, heads, layers and
prompts. Writes ``quality-<model>-<device>.json`` and ``.png`` (mass vs density, one curve per method).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .records import write_record

__all__ = ["DEFAULT_SWEEPS", "THRESHOLDS", "add_arguments", "format_table", "main", "plot", "run", "sweep"]

logger = logging.getLogger(__name__)

THRESHOLDS: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
LOCAL_BLOCKS: tuple[int, ...] = (1, 2, 3, 4, 6, 8)

# (curve label, spec with "{}" where the knob value goes, knob name, knob values). The oracle is the ceiling.
DEFAULT_SWEEPS: tuple[tuple[str, str, str, tuple[float, ...]], ...] = (
    ("xattention S=8", "xattention:stride=8,threshold={}", "threshold", THRESHOLDS),
    ("xattention S=16", "xattention:stride=16,threshold={}", "threshold", THRESHOLDS),
    ("vertical_slash", "vertical_slash:threshold={}", "threshold", THRESHOLDS),
    ("flexprefill", "flexprefill:gamma={}", "gamma", THRESHOLDS),
    ("streaming", "streaming:sink_blocks=1,local_blocks={}", "local_blocks", LOCAL_BLOCKS),
    ("oracle", "oracle:threshold={}", "threshold", THRESHOLDS),
)


def sweep(
    qk: Mapping[int, tuple[Tensor, Tensor]],
    sweeps: Sequence[tuple[str, str, str, Sequence[float]]] = DEFAULT_SWEEPS,
    *,
    block_size: int = 128,
    scale: float | Mapping[int, float] | None = None,
) -> list[dict[str, Any]]:
    """Density and exact mass kept of every (method, knob) on captured ``q``/``k`` of one prompt.

    Args:
        qk: ``{layer: (q [B, Hq, L, D], k [B, Hkv, L, D])}``, post-RoPE, causal, queries aligned to the end of the keys.
        sweeps: ``(curve, spec template, knob, values)`` (default :data:`DEFAULT_SWEEPS`); specs go through
            :func:`xattention.method_from_spec` with ``min_seq_len=0`` and ``block_size``.
        block_size: ``b`` (default 128).
        scale: softmax scale, one for all layers or ``{layer: scale}`` (default ``1/sqrt(D)``).
    Returns:
        One dict per point: ``curve``, ``spec``, ``knob``, ``value``, and per layer (in ``sorted(qk)`` order)
        ``layer_density`` and ``layer_mass`` (each averaged over batch and heads), plus their means ``density``/``mass``.
    """
    from ..kernels.reference import true_block_scores

    if not qk:
        raise ValueError("qk is empty: no attention layer was captured")
    points = _points(sweeps, block_size)  # fail before any work
    for layer, (q, k) in sorted(qk.items()):
        s = scale.get(layer) if isinstance(scale, Mapping) else scale
        lq = q.shape[2]
        # Exact block masses once per layer: every method's mask is scored against them (zero above the diagonal).
        true = true_block_scores(q, k, block_size=block_size, scale=s)
        for p in points:
            mask = p["method"].estimate(q, k, causal=True, scale=s)
            p["layer_density"].append(mask.density())
            p["layer_mass"].append(float((true * mask.mask).sum(dim=(-1, -2)).double().mean() / lq))
    for p in points:
        del p["method"]
        p["density"] = sum(p["layer_density"]) / len(p["layer_density"])
        p["mass"] = sum(p["layer_mass"]) / len(p["layer_mass"])
    return points


def _points(sweeps: Sequence[tuple[str, str, str, Sequence[float]]], block_size: int) -> list[dict[str, Any]]:
    """One dict per (curve, knob value) with its method built; ``ValueError`` for a spec or block size that cannot run."""
    from ..methods.registry import single_method_from_spec

    points = []
    for curve, template, knob, values in sweeps:
        for value in values:
            spec = template.format(value)
            method = single_method_from_spec(spec, where="bench quality", min_seq_len=0, block_size=block_size)
            points.append({"curve": curve, "spec": spec, "knob": knob, "value": value, "method": method,
                           "layer_density": [], "layer_mass": []})  # fmt: skip
    return points


def _average(per_prompt: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Average the points of several prompts (each prompt weighs the same)."""
    n = len(per_prompt)
    out = []
    for group in zip(*per_prompt, strict=True):
        first = group[0]
        layer_density = [sum(v) / n for v in zip(*(p["layer_density"] for p in group), strict=True)]
        layer_mass = [sum(v) / n for v in zip(*(p["layer_mass"] for p in group), strict=True)]
        out.append({
            "curve": first["curve"], "spec": first["spec"], "knob": first["knob"], "value": first["value"],
            "density": sum(p["density"] for p in group) / n, "mass": sum(p["mass"] for p in group) / n,
            "layer_density": layer_density, "layer_mass": layer_mass,
        })  # fmt: skip
    return out


def run(model_name: str, length: int, prompts: int, *, tasks: Sequence[str], seed: int, device: str, block_size: int) -> dict:
    """Load the model, build ``prompts`` evaluation prompts of ``length`` tokens, capture q/k and :func:`sweep` them."""
    from .._common import attention_scales
    from ..evaluation.tasks import SampleGenerator, resolve_tasks
    from ..integrations.hf import capture_qk
    from ..models import load_model

    task_names = resolve_tasks(list(tasks))
    start = time.perf_counter()
    model, tokenizer = load_model(model_name, device=device)
    scales = attention_scales(model)
    generator = SampleGenerator(tokenizer, base_seed=seed)
    per_prompt, used = [], []
    for i in range(prompts):
        task = task_names[i % len(task_names)]
        sample = generator.generate(task, length, i // len(task_names))
        ids = torch.tensor([sample.input_ids], device=model.device)
        logger.info("prompt %d: %s, %d tokens", i, task, ids.shape[1])
        qk = capture_qk(model, ids)
        per_prompt.append(sweep(qk, block_size=block_size, scale=scales or None))
        used.append({"task": task, "index": sample.index, "seed": sample.seed, "tokens": ids.shape[1]})
        del qk
    return {
        "benchmark": "quality",
        "model": model_name,
        "length": length,
        "prompts": used,
        "device": str(torch.device(device)),
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "block_size": block_size,
        "seconds": time.perf_counter() - start,
        "points": _average(per_prompt),
    }


def format_table(record: dict[str, Any]) -> str:
    lines = ["| method | knob | density | mass kept |", "|---|---|---|---|"]
    for p in record["points"]:
        lines.append(f"| {p['curve']} | {p['knob']}={p['value']} | {p['density']:.3f} | {p['mass']:.4f} |")
    return "\n".join(lines)


def plot(record: dict[str, Any], path: Path) -> None:
    """Mass kept (y) against density (x), one curve per method; the oracle drawn as the ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    curves: dict[str, list[dict[str, Any]]] = {}
    for p in record["points"]:
        curves.setdefault(p["curve"], []).append(p)
    for curve, pts in curves.items():
        pts = sorted(pts, key=lambda p: p["density"])
        xs, ys = [p["density"] for p in pts], [p["mass"] for p in pts]
        if curve == "oracle":
            ax.plot(xs, ys, "k--", marker="*", linewidth=2, label="oracle (ceiling)", zorder=3)
        else:
            ax.plot(xs, ys, marker="o", markersize=4, label=curve)
    tokens = ", ".join(str(p["tokens"]) for p in record["prompts"])
    ax.set_title(f"Attention mass kept vs density: {record['model']}, L={record['length']} "
                 f"({len(record['prompts'])} prompts: {tokens} tokens)", fontsize=10)  # fmt: skip
    ax.set_xlabel("density (fraction of causal blocks kept)")
    ax.set_ylabel("attention mass kept")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="a known model name, a .gguf file or a HF model folder")
    p.add_argument("--length", type=int, default=2048, help="prompt length in tokens (default 2048)")
    p.add_argument("--prompts", type=int, default=2, help="number of prompts, cycling over --tasks (default 2)")
    p.add_argument("--tasks", default="niah_single_2,vt", help="evaluation tasks the prompts come from")
    p.add_argument("--seed", type=int, default=42, help="base seed of the task generators (default 42, the evaluation's)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default="benchmarks/results")


def main(args: argparse.Namespace) -> int:
    from .._extras import require_model
    from .._parsing import parse_device

    # everything the model is not needed for, before it loads
    if args.prompts < 1 or args.length < 1:
        raise ValueError(f"--prompts and --length must be positive, got {args.prompts} and {args.length}")
    require_model(args.model, "matplotlib")
    device = str(parse_device(args.device))
    _points(DEFAULT_SWEEPS, args.block_size)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    record = run(args.model, args.length, args.prompts, tasks=tasks, seed=args.seed, device=device,
                 block_size=args.block_size)  # fmt: skip
    stem = f"quality-{Path(str(args.model)).stem.lower()}-{torch.device(device).type}"
    path = write_record(record, args.out, stem, plot)
    print(format_table(record))
    print(f"wrote {path} and .png in {record['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    from .cli import run_script

    run_script(__doc__, add_arguments, main)
