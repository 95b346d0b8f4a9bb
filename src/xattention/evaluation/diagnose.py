"""Why does a sparse method lose accuracy? Per layer and head: does its block mask drop the needle's key blocks?

For each sample that dense attention answers and the method gets wrong ("lost"), and for each sample both answer
("kept", the control group), the prompt is rebuilt exactly as the evaluation generated it, the model runs once densely
and, in every full-attention layer, the last prompt token's query (the one that produces the first answer token) is
looked at head by head:

* ``needle_mass``: its dense attention probability on the answer tokens (the references' occurrences in the context);
* ``needle_kept``: the part of that mass whose key blocks the method's mask keeps for the last query-block row;
* ``mass_kept``: its total dense probability inside kept blocks;
* ``needle_blocks_dropped``: the key blocks holding answer tokens that the mask drops.

"Needle heads" are heads whose dense needle mass is at least :data:`NEEDLE_HEAD_MIN_MASS`. If the lost group's needle
heads lose much more needle mass than the kept group's, the block selection is what loses the answer.

Every layer's mask is estimated from the dense forward's queries and keys. In the sparse run itself, layers after the
first see hidden states already changed by sparse attention below them; this tool isolates each layer's selection on the
same (dense) inputs and does not follow those errors through the depth of the model.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._common import attention_scales, device_of, text_config
from .tasks import (
    CWE_TEMPLATE,
    FWE_TEMPLATE,
    NIAH_TEMPLATE,
    PASSKEY_TEMPLATE,
    TASKS,
    VT_TEMPLATE,
    Sample,
    _singular,
)

__all__ = [
    "NEEDLE_HEAD_MIN_MASS",
    "TOP_HEADS",
    "answer_positions",
    "diagnose",
    "format_diagnosis",
    "needle_attention",
]

logger = logging.getLogger(__name__)

# A head whose last query puts at least this much dense probability on the answer tokens counts as a needle head.
NEEDLE_HEAD_MIN_MASS = 0.05
# How many (layer, head) pairs the "heads" list of :func:`diagnose` keeps.
TOP_HEADS = 20

_GROUPS = ("lost", "kept")

# Task kind -> the templates its body may have been formatted with (niah: plural, or singular for one value).
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "niah": (NIAH_TEMPLATE, _singular(NIAH_TEMPLATE)),
    "vt": (VT_TEMPLATE,),
    "cwe": (CWE_TEMPLATE,),
    "fwe": (FWE_TEMPLATE,),
    "passkey": (PASSKEY_TEMPLATE,),
}


# ---------------------------------------------------------------------------------------------------------------------
# answer positions


def _context_markers(template: str) -> tuple[str, str]:
    """The literal text right before and right after ``{context}`` in a task template."""
    head, tail = template.split("{context}")
    before = head[head.rfind("}") + 1 :]
    after = tail[: tail.find("{")] if "{" in tail else tail
    return before, after


def _context_span(sample: Sample) -> tuple[int, int]:
    """Character span ``[start, end)`` of the task's context (haystack) in ``sample.prompt``.

    The last occurrence of the template's text around ``{context}`` is used, so an in-context example before the real
    body (vt, cwe) and the final question and answer prefix after it are left out.
    """
    kind = TASKS[sample.task].kind
    for template in _TEMPLATES[kind]:
        before, after = _context_markers(template)
        end = sample.prompt.rfind(after)
        if end < 0:
            continue
        start = sample.prompt.rfind(before, 0, end)
        if start >= 0:
            return start + len(before), end
    raise ValueError(f"{sample.task} sample {sample.index}: the prompt does not follow the task's template")


def _occurrences(text: str, needle: str, start: int, end: int) -> list[tuple[int, int]]:
    """Spans of ``needle`` inside ``text[start:end]`` not glued to a letter or digit (so "art" is not found in "start")."""
    spans: list[tuple[int, int]] = []
    if not needle:
        return spans
    at = text.find(needle, start, end)
    while at >= 0:
        stop = at + len(needle)
        if not (at > 0 and text[at - 1].isalnum()) and not (stop < len(text) and text[stop].isalnum()):
            spans.append((at, stop))
        at = text.find(needle, at + 1, end)
    return spans


def _offsets_by_decoding(tokenizer: Any, text: str, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character span of each token, for tokenizers without ``return_offsets_mapping``: each token is decoded alone and
    found in ``text`` after the previous one, skipping only whitespace. Special tokens absent from the text (BOS) get an
    empty span."""
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", None) or ()}
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i in ids:
        piece = tokenizer.decode([int(i)]).strip()
        at = text.find(piece, cursor) if piece else -1
        if at >= 0 and not text[cursor:at].strip():
            spans.append((at, at + len(piece)))
            cursor = at + len(piece)
            continue
        if piece and int(i) not in special and tokenizer.decode([int(i)], skip_special_tokens=True).strip():
            raise ValueError(
                f"cannot place token {int(i)} ({piece!r}) in the prompt at character {cursor}; a fast tokenizer "
                "(return_offsets_mapping) is needed for this vocabulary"
            )
        spans.append((cursor, cursor))
    return spans


def _token_offsets(tokenizer: Any, sample: Sample) -> list[tuple[int, int]]:
    """Character span of each token of ``sample.input_ids`` in ``sample.prompt``; ``ValueError`` if re-tokenizing the
    prompt does not give ``sample.input_ids`` (with or without the tokenizer's special tokens: chat prompts are encoded
    without, raw prompts with)."""
    want = [int(t) for t in sample.input_ids]
    fast = bool(getattr(tokenizer, "is_fast", False))
    seen: list[int] = []
    for special in (False, True):
        if fast:
            enc = tokenizer(sample.prompt, add_special_tokens=special, return_offsets_mapping=True)
            ids = [int(t) for t in enc["input_ids"]]
            if ids == want:
                return [(int(s), int(e)) for s, e in enc["offset_mapping"]]
        else:
            ids = [int(t) for t in tokenizer.encode(sample.prompt, add_special_tokens=special)]
            if ids == want:
                return _offsets_by_decoding(tokenizer, sample.prompt, ids)
        seen.append(len(ids))
    raise ValueError(
        f"{sample.task} sample {sample.index}: tokenizing the prompt again gives {seen[0]} (or {seen[1]} with special "
        f"tokens) tokens that differ from the sample's {len(want)} input_ids; is this the tokenizer it was made with?"
    )


def answer_positions(tokenizer: Any, sample: Sample) -> list[int]:
    """Token positions of ``sample.input_ids`` whose characters overlap an occurrence of a reference in the context.

    Occurrences are searched in the task's context only (between the template text around ``{context}``), so an
    in-context example (vt, cwe) and the final question and answer prefix are left out, and must not be glued to a
    letter or digit on either side. Token spans come from the fast tokenizer's offsets mapping, or, for a tokenizer
    without one, from decoding the tokens one by one.

    Raises:
        ValueError: the prompt does not re-tokenize to ``sample.input_ids``, or does not follow the task's template.
    """
    offsets = _token_offsets(tokenizer, sample)
    start, end = _context_span(sample)
    spans = sorted({span for ref in sample.references for span in _occurrences(sample.prompt, str(ref), start, end)})
    out: list[int] = []
    for pos, (s, e) in enumerate(offsets):
        if e > s and any(s < b and a < e for a, b in spans):
            out.append(pos)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# attention on the needle


def needle_attention(
    model: Any,
    tokenizer: Any,
    sample: Sample,
    method: Any,
    *,
    positions: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Dense attention of the last prompt token on the answer tokens, and what ``method``'s mask keeps of it.

    Args:
        model: a transformers causal LM (its attention goes through the AttentionInterface).
        tokenizer: the tokenizer ``sample`` was made with.
        sample: a generated prompt.
        method: an xattention method, or a mapping ``layer_idx -> method`` (layers left out are dense).
        positions: the answer token positions (default: :func:`answer_positions`).
    Returns:
        One dict per full-attention layer and query head: ``layer``, ``head``, ``needle_mass``, ``needle_kept``,
        ``mass_kept``, ``needle_blocks_dropped``.
    """
    import torch

    from ..integrations.hf import capture_qk
    from ..kernels.reference import token_visibility
    from ..methods.dense import Dense

    if positions is None:
        positions = answer_positions(tokenizer, sample)
    device = device_of(model)
    length = len(sample.input_ids)
    if any(not 0 <= p < length for p in positions):
        raise ValueError(f"answer positions must lie in [0, {length})")
    scales = attention_scales(model)
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        input_ids = torch.tensor([sample.input_ids], dtype=torch.long, device=device)
        captured = capture_qk(model, input_ids)
        needle = torch.zeros(length, dtype=torch.bool, device=device)
        if positions:
            needle[torch.tensor(list(positions), dtype=torch.long, device=device)] = True
        for layer, (q, k) in captured.items():
            layer_method = (method.get(layer) or Dense()) if isinstance(method, Mapping) else method
            hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
            scale = scales.get(layer, 1.0 / math.sqrt(d))
            # dense probabilities of the last query over every key (query head h reads K/V head h // (Hq // Hkv))
            q_last = q[0, :, -1].to(torch.float64)  # [Hq, D]
            k_full = k[0].to(torch.float64).repeat_interleave(hq // hkv, dim=0)  # [Hq, L, D]
            probs = torch.softmax(torch.einsum("hd,hld->hl", q_last, k_full) * scale, dim=-1)  # [Hq, L]
            # the method's mask from the same q/k the sparse prefill would get; the last query sits in the last row
            mask = layer_method.estimate(q, k, causal=True, scale=scale)
            b = mask.block_size
            last_row = mask.mask[0, :, -1:, :]  # [Hq, 1, Kb]
            seen = token_visibility(
                last_row, length - 1, length, q_len=mask.q_len, k_len=mask.k_len, block_size=b, causal=mask.causal
            )[:, 0]  # [Hq, L]
            needle_mass = (probs * needle).sum(dim=-1)
            needle_kept = (probs * (needle & seen)).sum(dim=-1)
            mass_kept = (probs * seen).sum(dim=-1)
            needle_blocks = torch.unique(torch.tensor(sorted(positions), dtype=torch.long, device=device) // b)
            dropped = (~last_row[:, 0, needle_blocks]).sum(dim=-1)  # [Hq]
            for head in range(hq):
                rows.append(
                    {
                        "layer": int(layer),
                        "head": head,
                        "needle_mass": float(needle_mass[head]),
                        "needle_kept": float(needle_kept[head]),
                        "mass_kept": float(mass_kept[head]),
                        "needle_blocks_dropped": int(dropped[head]),
                    }
                )
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# the diagnosis over an evaluation's results


def _group_stats(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over the needle heads among ``rows`` (one row per sample, layer and head), and the mass kept over all."""
    needle = [r for r in rows if r["needle_mass"] >= NEEDLE_HEAD_MIN_MASS]
    n = len(needle)
    return {
        "heads": len(rows),
        "needle_heads": n,
        "needle_mass": sum(r["needle_mass"] for r in needle) / n if n else None,
        "needle_mass_lost": sum(1.0 - r["needle_kept"] / r["needle_mass"] for r in needle) / n if n else None,
        "needle_block_dropped": sum(r["needle_blocks_dropped"] > 0 for r in needle) / n if n else None,
        "mass_kept": sum(r["mass_kept"] for r in rows) / len(rows) if rows else None,
    }


def _top_heads(rows: Sequence[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The (layer, head) pairs of the lost group losing the most needle probability, mean over the lost samples."""
    by_head: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_head[(r["layer"], r["head"])].append(r)
    heads = []
    for (layer, head), rs in by_head.items():
        n = len(rs)
        mass = sum(r["needle_mass"] for r in rs) / n
        lost = sum(r["needle_mass"] - r["needle_kept"] for r in rs) / n
        if lost <= 0.0:
            continue
        heads.append(
            {
                "layer": layer,
                "head": head,
                "samples": n,
                "needle_mass": mass,
                "needle_mass_lost": lost,  # probability, not a fraction
                "fraction_lost": lost / mass if mass > 0 else None,
                "needle_block_dropped": sum(r["needle_blocks_dropped"] > 0 for r in rs) / n,
                "mass_kept": sum(r["mass_kept"] for r in rs) / n,
            }
        )
    heads.sort(key=lambda h: (-h["needle_mass_lost"], h["layer"], h["head"]))
    return heads[:count]


def _pairs(records: Sequence[dict[str, Any]], method_label: str, length: int) -> list[tuple[str, dict, dict]]:
    """``(group, dense record, method record)`` per (task, sample) with both, classified lost/kept (others left out)."""
    by_key: dict[str, dict[tuple[str, int], dict[str, Any]]] = {"dense": {}, method_label: {}}
    for rec in records:
        if int(rec["length"]) != length or rec["method"] not in by_key:
            continue
        key = (str(rec["task"]), int(rec["sample"]))
        if key in by_key[rec["method"]]:
            raise ValueError(f"results hold {rec['method']} {key[0]} sample {key[1]} at {length} twice (two models?)")
        by_key[rec["method"]][key] = rec
    out = []
    for key in sorted(by_key["dense"].keys() & by_key[method_label].keys()):
        dense, sparse = by_key["dense"][key], by_key[method_label][key]
        if int(dense["seed"]) != int(sparse["seed"]):
            raise ValueError(f"{key[0]} sample {key[1]}: dense and {method_label} records have different seeds")
        d, m = float(dense["score"]), float(sparse["score"])
        if d > m:
            out.append(("lost", dense, sparse))
        elif d == m and d > 0:
            out.append(("kept", dense, sparse))
    return out


def _layer_methods(model: Any, label: str, method: Any) -> Any:
    """The method, or per layer with its per-head thresholds when the label carries ``thresholds=PATH``."""
    from ..integrations.hf import layer_methods
    from .config import method_thresholds

    path = method_thresholds(label)
    if path is None:
        return method
    config = text_config(model)
    return layer_methods(method, int(config.num_hidden_layers), int(config.num_attention_heads), path)


def diagnose(
    results_path: str | os.PathLike,
    *,
    method_label: str,
    length: int,
    model: tuple[Any, Any] | None = None,
    max_samples: int | None = None,
    progress: bool = True,
    base_seed: int = 42,
    chat_template: bool | None = None,
) -> dict[str, Any]:
    """Compare, per layer, how much needle attention ``method_label``'s masks drop on lost vs kept samples.

    Args:
        results_path: an evaluation's ``results.jsonl`` (or the folder holding it).
        method_label: the method's label in the results (e.g. ``"xattention:threshold=0.9"``).
        length: the target length (tokens) to look at.
        model: ``(model, tokenizer)``; default: the results' model from :func:`xattention.models.load_model`, on the
            CPU in float32.
        max_samples: look at no more than this many samples, lost and kept alternating (spread over the tasks).
        progress: show a progress bar.
        base_seed, chat_template: as the evaluation ran (its defaults: 42, the tokenizer's chat template if any); each
            rebuilt sample is checked against the record's ``seed`` and ``tokens``.
    Returns:
        ``{"method", "length", "model", "groups": {"lost": n, "kept": n}, "layers": [...], "overall": {...},
        "heads": [...], "samples": [...]}``: per layer and overall, for each group, ``needle_heads`` (needle heads over
        samples), ``needle_mass`` (their mean dense needle mass), ``needle_mass_lost`` (their mean fraction of needle
        mass outside kept blocks), ``needle_block_dropped`` (their share with at least one needle block dropped),
        ``heads`` and ``mass_kept`` (over all heads); ``heads``: the :data:`TOP_HEADS` (layer, head) pairs losing the
        most needle probability on the lost samples.
    """
    from .config import parse_methods
    from .results import RESULTS_FILE, read_results

    path = Path(results_path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise ValueError(f"no results file {path}")
    methods = parse_methods(method_label)
    if len(methods) != 1:
        raise ValueError(f"diagnose takes exactly one method, got {len(methods)}: {', '.join(m for m, _ in methods)}")
    ((label, method),) = methods
    if label == "dense":
        raise ValueError("diagnose compares a sparse method with dense; give a method other than dense")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be positive, got {max_samples}")
    pairs, model_name = _chosen_pairs(read_results(path), path, label, length, max_samples)
    if model is None:
        import torch

        load_model = importlib.import_module("xattention.models").load_model
        lm, tokenizer = load_model(model_name, device="cpu", dtype=torch.float32)
    else:
        lm, tokenizer = model
    if hasattr(lm, "eval"):
        lm.eval()
    layer_method = _layer_methods(lm, label, method)
    rebuild = _Rebuilder(tokenizer, base_seed, chat_template, length)
    rows: dict[str, list[dict[str, Any]]] = {g: [] for g in _GROUPS}
    samples = []
    from tqdm.auto import tqdm

    for group, dense, sparse in tqdm(pairs, desc=f"diagnose {label}", unit="sample", disable=not progress):
        sample = rebuild(dense)
        positions = answer_positions(tokenizer, sample)
        if not positions:
            logger.warning("%s sample %d: no answer tokens found in the context", sample.task, sample.index)
        head_rows = needle_attention(lm, tokenizer, sample, layer_method, positions=positions)
        rows[group].extend(head_rows)
        samples.append(_sample_entry(sample, group, dense, sparse, positions, head_rows))
    return _diagnosis(label, length, model_name, rows, samples)


def _chosen_pairs(
    records: list[dict[str, Any]], path: Path, label: str, length: int, max_samples: int | None
) -> tuple[list[tuple[str, dict, dict]], str]:
    """The (group, dense, method) record pairs to look at, ordered lost first, and the one model they are of."""
    if not any(r["method"] == label and int(r["length"]) == length for r in records):
        labels = sorted({str(r["method"]) for r in records})
        lengths = sorted({int(r["length"]) for r in records})
        raise ValueError(f"{path} has no {label!r} results at length {length} (methods: {labels}, lengths: {lengths})")
    pairs = _pairs(records, label, length)
    models = sorted({str(rec["model"]) for _, dense, sparse in pairs for rec in (dense, sparse)})
    if len(models) > 1:
        raise ValueError(f"{path} mixes models {models} at length {length}; diagnose one model's results at a time")
    if not pairs:
        raise ValueError(f"no lost or kept (task, sample) pairs of dense and {label} at length {length} in {path}")
    if max_samples is not None:
        # a cap keeps both groups and every task represented: within a group by (sample, task), lost and kept alternating
        by_group = {
            g: sorted((p for p in pairs if p[0] == g), key=lambda p: (int(p[1]["sample"]), p[1]["task"])) for g in _GROUPS
        }
        merged = [by_group[g][i] for i in range(len(pairs)) for g in _GROUPS if i < len(by_group[g])]
        pairs = merged[:max_samples]
    pairs.sort(key=lambda p: (_GROUPS.index(p[0]), p[1]["task"], int(p[1]["sample"])))
    return pairs, models[0]


class _Rebuilder:
    """Rebuilds a record's sample exactly as the evaluation generated it, checking its seed and token count."""

    def __init__(self, tokenizer: Any, base_seed: int, chat_template: bool | None, length: int) -> None:
        self.tokenizer, self.base_seed, self.chat_template, self.length = tokenizer, base_seed, chat_template, length
        self.generators: dict[int, Any] = {}

    def __call__(self, dense: dict[str, Any]) -> Sample:
        from .tasks import SampleGenerator

        new_tokens = int(dense.get("max_new_tokens") or TASKS[dense["task"]].max_new_tokens)
        if new_tokens not in self.generators:  # the record's answer budget sized its prompt (--max-new-tokens overrides it)
            self.generators[new_tokens] = SampleGenerator(
                self.tokenizer, chat_template=self.chat_template, base_seed=self.base_seed, max_new_tokens=new_tokens
            )
        sample = self.generators[new_tokens].generate(str(dense["task"]), self.length, int(dense["sample"]))
        if sample.seed != int(dense["seed"]):
            raise ValueError(
                f"{sample.task} sample {sample.index}: rebuilt with seed {sample.seed}, but the results say "
                f"{dense['seed']}; was the evaluation run with another --seed than {self.base_seed}?"
            )
        if "tokens" in dense and sample.tokens != int(dense["tokens"]):
            raise ValueError(
                f"{sample.task} sample {sample.index}: rebuilt with {sample.tokens} tokens, but the results say "
                f"{dense['tokens']}; another tokenizer, or another chat-template setting?"
            )
        return sample


def _sample_entry(
    sample: Sample, group: str, dense: dict, sparse: dict, positions: list[int], head_rows: list[dict[str, Any]]
) -> dict[str, Any]:
    needle = [r for r in head_rows if r["needle_mass"] >= NEEDLE_HEAD_MIN_MASS]
    return {
        "task": sample.task,
        "sample": sample.index,
        "group": group,
        "depth": sample.depth,
        "tokens": sample.tokens,
        "answer_tokens": len(positions),
        "dense_score": float(dense["score"]),
        "method_score": float(sparse["score"]),
        "needle_heads": len(needle),
        "needle_mass_lost": _group_stats(head_rows)["needle_mass_lost"],
    }


def _diagnosis(
    label: str, length: int, model_name: str, rows: dict[str, list[dict[str, Any]]], samples: list[dict[str, Any]]
) -> dict[str, Any]:
    layer_ids = sorted({r["layer"] for g in _GROUPS for r in rows[g]})
    layers = [
        {"layer": layer, **{g: _group_stats([r for r in rows[g] if r["layer"] == layer]) for g in _GROUPS}} for layer in layer_ids
    ]
    return {
        "method": label,
        "length": length,
        "model": model_name,
        "needle_head_min_mass": NEEDLE_HEAD_MIN_MASS,
        "groups": {g: sum(s["group"] == g for s in samples) for g in _GROUPS},
        "layers": layers,
        "overall": {g: _group_stats(rows[g]) for g in _GROUPS},
        "heads": _top_heads(rows["lost"], TOP_HEADS),
        "samples": samples,
    }


# ---------------------------------------------------------------------------------------------------------------------
# markdown


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.1f}%"


def _cells(stats: Mapping[str, Any]) -> list[str]:
    return [
        str(stats["needle_heads"]),
        "-" if stats["needle_mass"] is None else f"{stats['needle_mass']:.3f}",
        _pct(stats["needle_mass_lost"]),
        _pct(stats["needle_block_dropped"]),
    ]


def format_diagnosis(d: Mapping[str, Any]) -> str:
    """A markdown report of :func:`diagnose`'s result: one row per layer and overall, lost vs kept; then the top heads."""
    groups = d["groups"]
    lines = [
        f"## Needle attention: {d['method']} vs dense, {d['model']} at {d['length']} tokens",
        "",
        f"Samples: {groups['lost']} lost (dense right, {d['method']} wrong), {groups['kept']} kept (both right). "
        f"Needle heads: heads whose last prompt token puts >= {d.get('needle_head_min_mass', NEEDLE_HEAD_MIN_MASS):g} "
        "of its dense attention on the answer tokens (counted once per sample). Needle mass: their mean dense "
        "probability on the answer tokens; lost: mean share of it in blocks the mask drops; dropped: share of needle "
        "heads with at least one answer block dropped.",
        "",
        "| layer | lost: needle heads | needle mass | needle mass lost | block dropped "
        "| kept: needle heads | needle mass | needle mass lost | block dropped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in d["layers"]:
        lines.append("| " + " | ".join([str(row["layer"]), *_cells(row["lost"]), *_cells(row["kept"])]) + " |")
    overall = d["overall"]
    lines.append("| **overall** | " + " | ".join([*_cells(overall["lost"]), *_cells(overall["kept"])]) + " |")
    lines += ["", "### Heads losing the most needle attention (lost samples)", ""]
    if not d["heads"]:
        lines.append("No head loses needle attention on the lost samples.")
    else:
        lines += [
            "| layer | head | needle mass | needle mass lost | fraction lost | block dropped | mass kept |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for h in d["heads"]:
            lines.append(
                f"| {h['layer']} | {h['head']} | {h['needle_mass']:.3f} | {h['needle_mass_lost']:.3f} | "
                f"{_pct(h['fraction_lost'])} | {_pct(h['needle_block_dropped'])} | {_pct(h['mass_kept'])} |"
            )
    return "\n".join(lines) + "\n"
