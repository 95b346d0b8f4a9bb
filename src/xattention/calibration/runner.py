"""``calibrate``: prompts through the model, statistics averaged over prompts, thresholds chosen, and the report that
compares them with one global ``tau`` at the same mean density; ``rechoose``: other thresholds from a report's tables,
without the model."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .._common import attention_scales, text_config
from .._parsing import parse_lengths
from ..evaluation.prompts import PromptSource
from .choose import choose_indices
from .statistics import DEFAULT_CANDIDATES, MASS_TOL, check_candidates, head_statistics

__all__ = ["PER", "STATISTICS", "calibrate", "parse_target", "rechoose"]

logger = logging.getLogger(__name__)

Capture = Callable[..., Mapping[int, tuple[Tensor, Tensor]]]

# The mass a threshold choice maximises (or must reach), by the query rows head_statistics averages it over: "mass"
# every query row, "answer_mass" the last block of rows (the question the answer is produced from).
STATISTICS: dict[str, str] = {"mass": "all", "answer_mass": "last"}
# One threshold per (layer, head), or one per layer shared by its heads (chosen on the head-averaged tables).
PER: tuple[str, ...] = ("head", "layer")
# target kind of "density=tau:0.9": the mean density one global tau has on the calibration prompts (resolved later)
DENSITY_OF_TAU = "density_of_tau"


def parse_target(target: str | Mapping[str, Any] | tuple[str, Any]) -> tuple[str, float]:
    """``"mass=0.9"`` / ``"density=0.15"`` (or ``{"mass": 0.9}``, ``("mass", 0.9)``) -> ``(kind, value)``.

    ``"density=tau:0.9"`` -> ``("density_of_tau", 0.9)``: a density budget equal to the mean density that one global
    ``tau = 0.9`` has on the calibration prompts (the equal-density comparison, whatever the model and length).
    """
    if isinstance(target, Mapping):
        if len(target) != 1:
            raise ValueError(f"target must name exactly one of mass / density, got {dict(target)}")
        kind, value = next(iter(target.items()))
    elif isinstance(target, tuple):
        kind, value = target
    elif isinstance(target, str):
        kind, eq, value = target.partition("=")
        if not eq:
            raise ValueError(f"target {target!r} is not of the form mass=0.9, density=0.15 or density=tau:0.9")
    else:
        raise ValueError(f"target must be a string like 'mass=0.9', got {type(target).__name__}")
    kind = str(kind).strip().lower()
    if kind not in ("mass", "density", DENSITY_OF_TAU):
        raise ValueError(f"target kind must be 'mass' or 'density', got {kind!r}")
    if kind == "density" and isinstance(value, str) and value.strip().lower().startswith("tau:"):
        kind, value = DENSITY_OF_TAU, value.strip()[4:]
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"target value {value!r} is not a number") from None
    if not 0.0 < number <= 1.0:
        raise ValueError(f"target {kind} must lie in (0, 1], got {number}")
    return kind, number


def _check_choice(statistic: str, per: str) -> None:
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
    if per not in PER:
        raise ValueError(f"per must be one of {', '.join(PER)}, got {per!r}")


def _summary(density: Tensor, mass: Tensor, idx: Tensor) -> dict[str, float]:
    d = density.gather(-1, idx[..., None])[..., 0]
    m = mass.gather(-1, idx[..., None])[..., 0]
    return {"density": float(d.mean()), "mass": float(m.mean()), "min_head_mass": float(m.min())}


def calibrate(
    model: Any,
    tokenizer: Any,
    *,
    lengths: Sequence[int] | str = (4096,),
    target: str | Mapping[str, Any] | tuple[str, Any] = "mass=0.9",
    statistic: str = "mass",
    per: str = "head",
    stride: int = 8,
    candidates: Sequence[float] = DEFAULT_CANDIDATES,
    samples: int = 2,
    block_size: int = 128,
    text: str | None = None,
    tasks: str | Sequence[str] | None = "auto",
    seed: int = 0,
    backend: str = "auto",
    progress: bool = True,
    capture: Capture | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Calibrate per-(layer, head) XAttention thresholds for ``model``.

    For every length, ``samples`` prompts (the evaluation harness's task generators, the built-in passkey haystack, or
    windows of ``text``) run through ``capture``; :func:`head_statistics` tables are
    averaged over all prompts (each prompt weighs the same) and :func:`choose_thresholds` picks the thresholds (with
    ``per="layer"``, on the tables averaged over each layer's heads, so a layer's heads share one). Layers
    ``capture`` does not return (not full attention, e.g. Gemma-3's sliding-window layers) get threshold 1.0 and are
    listed in the report.

    Args:
        model: a Hugging Face causal LM (eval mode; its device is used). tokenizer: its tokenizer.
        lengths: prompt lengths in tokens (or ``"4k,8k"``). target: ``"mass=0.9"`` (least density keeping at least
            that mass in every head, or every layer's head mean with ``per="layer"``), ``"density=0.15"`` (most mass
            at that mean density) or ``"density=tau:0.9"`` (most mass at the mean density of one global ``tau=0.9``
            on these prompts; ``0.9`` must be a candidate).
        statistic: the mass that the target and the report speak of: ``"mass"`` (default) averaged over every query
            row, or ``"answer_mass"`` over the last ``block_size`` query rows only (:func:`head_statistics`'s
            ``rows="last"``: the question and answer prefix that the answer is produced from). Density is the whole
            mask's either way.
        per: ``"head"`` (default) one threshold per (layer, head); ``"layer"`` one per layer (fewer free choices:
            less overfitting to a few calibration prompts).
        stride, block_size: XAttention's ``S`` and ``b`` the thresholds are for. candidates: the ``tau`` grid.
        samples: prompts per length.
        text: calibration text, cut into ``samples`` windows per length (overrides ``tasks``).
        tasks: ``"auto"`` (default): the evaluation harness's generators (:data:`AUTO_TASKS`, those whose data is
            installed; its own seed space, so no evaluation prompt is repeated), else the built-in passkey haystack;
            ``"haystack"`` or ``None``: the built-in haystack; task names or groups (``"niah_single_2,vt"``,
            ``"ruler"``): those generators. Sample ``i`` of the ``j``-th length uses task ``(j x samples + i) mod n``.
        seed: prompt seed. backend: scoring backend (see :func:`head_statistics`). progress: show a progress bar.
        capture: ``(model, input_ids) -> {layer: (q, k)}``, post-RoPE per full-attention layer; default
            :func:`xattention.integrations.hf.capture_qk`.
    Returns:
        ``(thresholds, report)``: float64 ``[num_layers, num_heads]`` and a JSON-ready dict with the per-layer and
        overall mean density/mass at the chosen thresholds, the single global ``tau`` whose mean density is closest to
        the calibrated one with its mass (the equal-density comparison), the global ``tau`` that meets the same target
        on its own (``global_at_target``: every head at ``min_mass``, or the most mass within the density budget),
        per-length figures and the raw ``[L, Hq, C]`` tables (to re-choose thresholds for another target offline:
        :func:`rechoose`).
    """
    kind, value = parse_target(target)
    _check_choice(statistic, per)
    cands = check_candidates(candidates)
    if kind == DENSITY_OF_TAU:
        _candidate_index(cands, value)  # before the model runs
    lens = parse_lengths(lengths) if isinstance(lengths, str) else parse_lengths([int(n) for n in lengths])
    if not isinstance(samples, int) or samples <= 0:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    sizes = _model_sizes(model, max(lens))
    if capture is None:
        from ..integrations.hf import capture_qk as capture

    start = time.perf_counter()
    source = PromptSource(tokenizer, text=text, tasks=tasks, seed=seed)
    statistics = {"candidates": cands, "stride": stride, "block_size": block_size, "backend": backend,
                  "rows": STATISTICS[statistic]}  # fmt: skip
    per_length, layers, used = _collect_tables(model, capture, source, lens, samples, sizes, statistics, progress)
    density = sum(d for d, _ in per_length.values()) / len(per_length)
    mass = sum(m for _, m in per_length.values()) / len(per_length)
    run = {"lengths": lens, "samples": samples, "stride": stride, "block_size": block_size, "candidates": cands,
           "prompts": {str(n): p for n, p in used.items()}}  # fmt: skip
    return _choose(run, density, mass, (kind, value), statistic, per, sizes, layers, per_length, start)


def rechoose(
    report: Mapping[str, Any],
    *,
    target: str | Mapping[str, Any] | tuple[str, Any],
    per: str = "head",
) -> tuple[Tensor, dict[str, Any]]:
    """Thresholds for another target (or ``per``) from the tables of an earlier :func:`calibrate` report (the
    ``metadata`` of its thresholds file), without running the model: the same choice on the same statistic.

    The tables are stored rounded to 5 decimals, so a threshold can differ from a fresh :func:`calibrate` where two
    candidates' masses agree to that precision. The report has ``per_length`` figures only for a single-length report
    (per-length tables are not stored).

    Returns:
        ``(thresholds, report)`` as :func:`calibrate` returns them; the report says ``rechosen: true``.
    """
    missing = [key for key in ("tables", "candidates", "num_layers", "num_heads", "calibrated_layers", "lengths")
               if key not in report]  # fmt: skip
    if missing:
        raise ValueError(f"the report lacks {', '.join(missing)}: not a report of xattention calibrate")
    kind, value = parse_target(target)
    statistic = str(report.get("statistic", "mass"))  # files from before the statistic was recorded: mean mass
    _check_choice(statistic, per)
    check_candidates(report["candidates"])
    density = torch.tensor(report["tables"]["density"], dtype=torch.float64)
    mass = torch.tensor(report["tables"]["mass"], dtype=torch.float64)
    layers = [int(i) for i in report["calibrated_layers"]]
    if density.ndim != 3 or density.shape != mass.shape or density.shape[:2] != (len(layers), int(report["num_heads"])):
        raise ValueError(f"the report's tables have shape {tuple(density.shape)}, not [calibrated layers, heads, C]")
    lens = [int(n) for n in report["lengths"]]
    run = {key: report[key] for key in ("lengths", "samples", "stride", "block_size", "candidates", "prompts") if key in report}
    per_length = {lens[0]: (density, mass)} if len(lens) == 1 else {}
    sizes = (int(report["num_layers"]), int(report["num_heads"]))
    thresholds, out = _choose(run, density, mass, (kind, value), statistic, per, sizes, layers, per_length, time.perf_counter())
    return thresholds, {**out, "rechosen": True}


def _candidate_index(cands: list[float], tau: float) -> int:
    try:
        return cands.index(tau)
    except ValueError:
        raise ValueError(f"target density=tau:{tau:g} needs {tau:g} among the candidate thresholds {cands}") from None


def _choose(
    run: dict[str, Any],
    density: Tensor,
    mass: Tensor,
    target: tuple[str, float],
    statistic: str,
    per: str,
    sizes: tuple[int, int],
    layers: list[int],
    per_length: dict[int, tuple[Tensor, Tensor]],
    start: float,
) -> tuple[Tensor, dict[str, Any]]:
    """Thresholds ``[num_layers, num_heads]`` and the report, from ``[len(layers), Hq, C]`` tables."""
    (kind, value), cands = target, run["candidates"]
    extra: dict[str, Any] = {}
    if kind == DENSITY_OF_TAU:  # the budget is what one global tau spends on these prompts
        extra["density_of_tau"] = value
        kind, value = "density", float(density[..., _candidate_index(cands, value)].mean())
    if per == "head":
        idx = choose_indices(density, mass, cands, kind, value)
    else:  # every head of a layer the same: choose on [L, 1, C] head means (equal heads per layer: same mean density)
        idx = choose_indices(density.mean(dim=1, keepdim=True), mass.mean(dim=1, keepdim=True), cands, kind, value)
        idx = idx.repeat(1, density.shape[1])
    thresholds = torch.ones(*sizes, dtype=torch.float64)
    thresholds[layers] = torch.tensor(cands, dtype=torch.float64)[idx]
    run = {"target": {kind: value}, **extra, "statistic": statistic, "per": per, **run}
    return thresholds, _report(run, density, mass, idx, thresholds, layers, per_length, start)


def _model_sizes(model: Any, longest: int) -> tuple[int, int]:
    """``(num_layers, num_heads)`` of the model's text config; warns when ``longest`` exceeds its position embeddings."""
    config = text_config(model)
    num_layers, num_heads = int(config.num_hidden_layers), int(config.num_attention_heads)
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and longest > int(max_pos):
        logger.warning("calibration length %d exceeds the model's max_position_embeddings (%d)", longest, max_pos)
    return num_layers, num_heads


def _collect_tables(
    model: Any,
    capture: Capture,
    source: PromptSource,
    lens: list[int],
    samples: int,
    sizes: tuple[int, int],
    statistics: dict[str, Any],
    progress: bool,
) -> tuple[dict[int, tuple[Tensor, Tensor]], list[int], dict[int, list[dict[str, Any]]]]:
    """Capture q/k of every prompt and average its :func:`head_statistics` tables per length.

    Returns ``({length: (density, mass) [L, Hq, C]}, the captured layers, {length: the prompts used})``.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    scales = attention_scales(model)
    layers: list[int] | None = None
    sums: dict[int, tuple[Tensor, Tensor, int]] = {}
    used: dict[int, list[dict[str, Any]]] = {}
    num_prompts = len(lens) * samples
    # one step per (prompt, layer): at long lengths on a CPU one prompt takes minutes
    bar = tqdm(total=num_prompts * sizes[0], desc="calibrate", unit="layer", disable=not progress)
    for j, length in enumerate(lens):
        for label, ids in source.prompts(length, samples, offset=j * samples):
            used.setdefault(length, []).append({"source": label, "tokens": len(ids)})
            bar.set_postfix_str(f"{label} {len(ids)} tokens")
            input_ids = torch.tensor([ids], dtype=torch.long, device=device)
            with torch.no_grad():
                qk = dict(capture(model, input_ids))
            if layers is None and qk:
                bar.total = num_prompts * len(qk)
                bar.refresh()
            layers = _check_captured(qk, layers, *sizes)
            rows = []
            for i in layers:
                rows.append(head_statistics({i: qk.pop(i)}, scale=scales.get(i), **statistics))
                bar.update(1)
            d, m = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
            old = sums.get(length)
            sums[length] = (d, m, 1) if old is None else (old[0] + d, old[1] + m, old[2] + 1)
    bar.close()
    assert layers is not None
    return {n: (d / c, m / c) for n, (d, m, c) in sums.items()}, layers, used


def _check_captured(
    qk: Mapping[int, tuple[Tensor, Tensor]], layers: list[int] | None, num_layers: int, num_heads: int
) -> list[int]:
    """The captured layers, sorted; ``ValueError`` if none, if they differ from an earlier prompt's ``layers``, or if
    they do not fit the model's config."""
    if not qk:
        raise ValueError("capture_qk returned no layer: the model has no full-attention layer to calibrate")
    if layers is not None and sorted(qk) != layers:
        raise ValueError(f"captured layers changed between prompts: {layers} vs {sorted(qk)}")
    layers = sorted(qk)
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"captured layer indices {bad} lie outside the model's {num_layers} layers")
    heads = {qk[i][0].shape[1] for i in layers}
    if heads != {num_heads}:
        raise ValueError(f"captured q has {sorted(heads)} heads but the model config says {num_heads}")
    return layers


def _report(
    run: dict[str, Any],
    density: Tensor,
    mass: Tensor,
    idx: Tensor,
    thresholds: Tensor,
    layers: list[int],
    per_length: dict[int, tuple[Tensor, Tensor]],
    start: float,
) -> dict[str, Any]:
    """The JSON-ready report of :func:`calibrate` (see its docstring)."""
    (kind, value), cands = next(iter(run["target"].items())), run["candidates"]
    num_layers, num_heads = thresholds.shape
    calibrated = _summary(density, mass, idx)
    global_density = density.mean(dim=(0, 1))  # [C]
    global_mass = mass.mean(dim=(0, 1))
    g = int(torch.argmin((global_density - calibrated["density"]).abs()))
    g_idx = torch.full_like(idx, g)
    below = int((mass.gather(-1, idx[..., None])[..., 0] < value - MASS_TOL).sum()) if kind == "mass" else None
    return {
        **run,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "calibrated_layers": layers,
        "dense_layers": [i for i in range(num_layers) if i not in set(layers)],
        "calibrated": calibrated,
        "global": {"tau": cands[g], **_summary(density, mass, g_idx)},
        "global_mass_at_equal_density": _interpolate(global_density, global_mass, calibrated["density"]),
        "global_at_target": _global_at_target(density, mass, cands, kind, value),
        "heads_below_target": below,
        "layers": [
            {"layer": i, "threshold_mean": float(thresholds[i].mean()), **_summary(density[j], mass[j], idx[j])}
            for j, i in enumerate(layers)
        ],
        "per_length": {
            str(n): {"calibrated": _summary(d, m, idx), "global": _summary(d, m, g_idx)} for n, (d, m) in per_length.items()
        },
        "tables": {
            "density": [[[round(x, 5) for x in row] for row in layer] for layer in density.tolist()],
            "mass": [[[round(x, 5) for x in row] for row in layer] for layer in mass.tolist()],
        },
        "seconds": round(time.perf_counter() - start, 2),
    }


def _global_at_target(density: Tensor, mass: Tensor, cands: list[float], kind: str, value: float) -> dict[str, float] | None:
    """The one global ``tau`` that meets the target by itself: the smallest whose every head keeps ``value`` of its
    mass, or the one with the most mean mass within the mean density budget ``value`` (``None`` if there is none)."""
    best = None
    for c in sorted(range(len(cands)), key=lambda i: cands[i]):
        stats = {"tau": cands[c], **_summary(density, mass, torch.full(density.shape[:2], c, dtype=torch.long))}
        if kind == "mass" and stats["min_head_mass"] >= value - MASS_TOL:
            return stats
        if kind == "density" and stats["density"] <= value + 1e-9 and (best is None or stats["mass"] > best["mass"]):
            best = stats
    return best


def _interpolate(xs: Tensor, ys: Tensor, x: float) -> float | None:
    """Linear interpolation of the global (density, mass) curve at density ``x`` (``None`` outside its range)."""
    pts = sorted(zip(xs.tolist(), ys.tolist(), strict=True))
    for (x0, y0), (x1, y1) in itertools.pairwise([pts[0], *pts]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None
