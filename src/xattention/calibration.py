"""Per-head threshold calibration for XAttention (the paper's "threshold prediction", Xu et al., 2025, Sec. 2.3).

XAttention keeps, per query-block row, the fewest blocks whose antidiagonal scores reach ``tau x`` the row total. One
global ``tau`` over-spends on heads whose attention is concentrated (local, sink or vertical heads reach almost all of
their mass with a few blocks) and under-spends on diffuse heads. The paper credits per-head thresholds found by dynamic
programming for part of its accuracy/sparsity balance but did not release the search. This module is that search:

1. :func:`head_statistics` — on captured post-RoPE ``q``/``k`` of one prompt, for every (layer, head, candidate ``tau``)
   the block density XAttention would use and the exact softmax attention mass its mask keeps.
2. :func:`choose_thresholds` — per head thresholds that either reach a minimum mass per head at the least density, or
   maximise the total mass under a mean-density budget (hull greedy; see its docstring for why that is right).
3. :func:`calibrate` — prompts of the requested lengths, :func:`xattention.integrations.hf.capture_qk` per prompt,
   statistics averaged over prompts, thresholds chosen, and a report comparing them with one global ``tau`` at the same
   mean density.

``xattention calibrate --model smollm2 --lengths 4k,8k --target mass=0.9 --out thresholds.json`` runs it from the
command line (:func:`add_arguments` / :func:`main`); the file loads with :func:`xattention.thresholds.load_thresholds`.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._common import attention_scales, text_config
from ._parsing import parse_lengths
from ._validation import check_qkv
from .block_mask import BlockMask
from .kernels import resolve_backend

__all__ = [
    "DEFAULT_CANDIDATES",
    "add_arguments",
    "attention_scales",
    "calibrate",
    "choose_thresholds",
    "haystack_prompt",
    "head_statistics",
    "main",
    "parse_target",
    "text_prompts",
]

logger = logging.getLogger(__name__)

# Dense where XAttention's density changes fast (tau >= 0.9), coarse below; 1.0 keeps every block with a non-zero score
# and is the fallback for heads that no smaller tau serves.
DEFAULT_CANDIDATES: tuple[float, ...] = (
    0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.875, 0.9, 0.925, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 1.0,
)  # fmt: skip

# Masses equal up to float64 rounding of a float32 sum count as reaching the target (tau = 1 keeps mass 0.99999994).
_MASS_TOL = 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------------------


def _check_candidates(candidates: Sequence[float]) -> list[float]:
    values = [float(c) for c in candidates]
    if not values:
        raise ValueError("candidates must hold at least one threshold")
    bad = [c for c in values if not 0.0 < c <= 1.0 or math.isnan(c)]
    if bad:
        raise ValueError(f"candidate thresholds must lie in (0, 1], got {bad}")
    if len(set(values)) != len(values):
        raise ValueError(f"candidate thresholds must be distinct, got {values}")
    return values


def _layer_statistics(
    q: Tensor,
    k: Tensor,
    candidates: Sequence[float],
    *,
    stride: int,
    block_size: int,
    backend: str,
    scale: float | None,
) -> tuple[Tensor, Tensor]:
    """float64 ``(density [Hq, C], mass [Hq, C])`` for one layer, averaged over the batch."""
    from .kernels import reference

    _, _, _, lq, lk, _ = check_qkv(q, k)
    if resolve_backend(backend, q.device) == "triton":
        from .kernels import antidiagonal as scoring
        from .kernels import select as selection
    else:
        scoring = selection = reference
    # Scores once per layer; only the cheap selection runs per candidate.
    scores = scoring.antidiagonal_block_scores(q, k, stride=stride, block_size=block_size, causal=True, scale=scale)
    true = reference.true_block_scores(q, k, block_size=block_size, causal=True, scale=scale)
    density, mass = [], []
    for tau in candidates:
        keep = selection.select_blocks(scores, tau, q_len=lq, k_len=lk, block_size=block_size, causal=True)
        mask = BlockMask(keep, block_size, lq, lk, causal=True)
        density.append(mask.density_per_head().double().mean(dim=0))
        # true_block_scores is zero above the causal diagonal, so no visibility mask is needed here
        mass.append(((true * keep).sum(dim=(-1, -2)).double() / lq).mean(dim=0))
    return torch.stack(density, dim=-1), torch.stack(mass, dim=-1)


def head_statistics(
    qk: Mapping[int, tuple[Tensor, Tensor]],
    *,
    candidates: Sequence[float],
    stride: int = 8,
    block_size: int = 128,
    backend: str = "auto",
    scale: float | Mapping[int, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """Density and exact attention mass of XAttention's mask per (layer, head, candidate threshold).

    For each layer the antidiagonal block scores (:func:`xattention.kernels.reference.antidiagonal_block_scores`, or its
    Triton twin) and the exact block masses (:func:`~xattention.kernels.reference.true_block_scores`) are computed once;
    then, per candidate ``tau``, :func:`~xattention.kernels.reference.select_blocks` gives the mask, whose

    * density is the fraction of causally visible blocks kept (:meth:`BlockMask.density_per_head`), and
    * mass is the exact softmax probability inside kept blocks, averaged over queries (1.0 for the dense mask).

    Both are averaged over the batch. Attention is causal with queries aligned to the end of the keys.

    Args:
        qk: ``{layer index: (q [B, Hq, Lq, D], k [B, Hkv, Lk, D])}``, post-RoPE (as
            :func:`xattention.integrations.hf.capture_qk` returns); every layer must have the same ``Hq``.
        candidates: thresholds ``tau`` in ``(0, 1]``, length ``C``.
        stride: antidiagonal stride ``S`` (default 8); block_size: ``b`` (default 128), ``b % S == 0``.
        backend: ``"auto"`` (Triton on a capable GPU, else the PyTorch reference), ``"reference"`` or ``"triton"``.
        scale: softmax scale, one for all layers or ``{layer: scale}`` (default ``1/sqrt(D)``).
    Returns:
        ``(density, mass)``, float64 ``[L, Hq, C]`` on the CPU, where row ``i`` is the ``i``-th layer of ``sorted(qk)``.
    """
    cands = _check_candidates(candidates)
    if not qk:
        raise ValueError("qk is empty: no attention layer was captured")
    if not isinstance(stride, int) or stride <= 0 or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"stride and block_size must be positive ints, got stride={stride!r}, block_size={block_size!r}")
    if block_size % stride != 0:
        raise ValueError(f"block_size ({block_size}) must be a multiple of stride ({stride})")
    densities, masses = [], []
    num_heads: int | None = None
    for layer in sorted(qk):
        q, k = qk[layer]
        _, hq, _, _, _, _ = check_qkv(q, k)
        if q.is_meta:  # statistics are values: a meta tensor has none (it failed copying the tables to the CPU)
            raise ValueError(f"layer {layer}: q and k are on the meta device; calibration needs their values")
        if num_heads is not None and hq != num_heads:
            raise ValueError(f"layer {layer} has {hq} query heads but earlier layers have {num_heads}")
        num_heads = hq
        layer_scale = scale.get(layer) if isinstance(scale, Mapping) else scale
        d, m = _layer_statistics(q, k, cands, stride=stride, block_size=block_size, backend=backend, scale=layer_scale)
        densities.append(d.cpu())
        masses.append(m.cpu())
    return torch.stack(densities), torch.stack(masses)


# ---------------------------------------------------------------------------------------------------------------------
# choosing thresholds
# ---------------------------------------------------------------------------------------------------------------------


def _check_tables(density: Tensor, mass: Tensor, candidates: Sequence[float]) -> list[float]:
    cands = _check_candidates(candidates)
    if density.ndim != 3 or density.shape != mass.shape:
        raise ValueError(f"density and mass must both be [L, Hq, C], got {tuple(density.shape)} and {tuple(mass.shape)}")
    if density.shape[-1] != len(cands):
        raise ValueError(f"tables have {density.shape[-1]} candidates but {len(cands)} thresholds were given")
    if density.numel() == 0:
        raise ValueError(f"tables are empty: shape {tuple(density.shape)}")
    if density.is_meta or mass.is_meta:
        raise ValueError("density and mass are on the meta device; choosing thresholds needs their values")
    if bool(density.isnan().any() | mass.isnan().any()):
        raise ValueError("density and mass must not hold NaN")
    return cands


def _upper_hull(density: list[float], mass: list[float], candidates: list[float]) -> list[int]:
    """Candidate indices on one head's upper concave hull of (density, mass), by increasing density.

    First the Pareto front: sorted by (density, -mass, tau), a point stays only if its mass beats every point of lower
    or equal density (so ties go to the smallest tau). Then Andrew's monotone chain drops points strictly below the
    chord of their neighbours; collinear points stay (they are finer steps of the same slope).
    """
    order = sorted(range(len(candidates)), key=lambda c: (density[c], -mass[c], candidates[c]))
    front: list[int] = []
    for c in order:
        if not front or mass[c] > mass[front[-1]]:
            front.append(c)
    hull: list[int] = []
    for c in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies strictly below the chord a -> c: slope(a, b) < slope(a, c)
            if (mass[b] - mass[a]) * (density[c] - density[a]) < (mass[c] - mass[a]) * (density[b] - density[a]):
                hull.pop()
            else:
                break
        hull.append(c)
    return hull


def _indices_min_mass(density: Tensor, mass: Tensor, cands: list[float], min_mass: float) -> Tensor:
    d, m = density.tolist(), mass.tolist()
    best = []
    for h in range(len(d)):
        ok = [c for c in range(len(cands)) if m[h][c] >= min_mass - _MASS_TOL]
        # least density; ties: more mass, then smaller tau
        best.append(min(ok, key=lambda c, h=h: (d[h][c], -m[h][c], cands[c])) if ok else -1)
    idx = torch.tensor(best, dtype=torch.long)
    missing = idx < 0
    if bool(missing.any()):
        largest = max(range(len(cands)), key=lambda c: cands[c])
        logger.warning(
            "%d of %d heads keep less than %.4f of the attention mass at every candidate; they get the largest "
            "candidate tau=%g",
            int(missing.sum()), len(d), min_mass, cands[largest],
        )  # fmt: skip
        idx[missing] = largest
    return idx


def _indices_budget(density: Tensor, mass: Tensor, cands: list[float], budget: float) -> Tensor:
    n = density.shape[0]
    d, m = density.tolist(), mass.tolist()
    hulls = [_upper_hull(d[h], m[h], cands) for h in range(n)]
    choice = [hull[0] for hull in hulls]  # each head's least-density point (with the most mass among ties)
    capacity = budget * n
    used = sum(d[h][choice[h]] for h in range(n))
    tol = 1e-9 * max(1.0, capacity)
    if used > capacity + tol:
        raise ValueError(
            f"density budget {budget:.4f} is below the least mean density the candidates allow ({used / n:.4f}); "
            f"add smaller candidate thresholds or raise the budget"
        )

    # Hull segments in one global order of decreasing slope: a heap holding each head's next segment (within a head
    # slopes do not increase along the hull, so this is the global order, and a head's segments come in hull order).
    def segment(h: int, step: int) -> tuple[float, int, int]:
        a, b = hulls[h][step - 1], hulls[h][step]
        return (-(m[h][b] - m[h][a]) / (d[h][b] - d[h][a]), h, step)

    heap = [segment(h, 1) for h in range(n) if len(hulls[h]) > 1]
    heapq.heapify(heap)
    while heap:
        _, h, step = heapq.heappop(heap)
        b = hulls[h][step]
        dd = d[h][b] - d[h][choice[h]]
        if used + dd <= capacity + tol:
            used += dd
            choice[h] = b
            if step + 1 < len(hulls[h]):
                heapq.heappush(heap, segment(h, step + 1))
        # else: the head stays where it is (its later segments need this one first); the other heads go on
    # Spend what is left on the single best upgrade (any candidate, hull or not) until none fits: never loses mass.
    dt, mt = torch.tensor(d, dtype=torch.float64), torch.tensor(m, dtype=torch.float64)
    idx = torch.tensor(choice, dtype=torch.long)
    for _ in range(n * len(cands)):
        cur_d = dt.gather(1, idx[:, None])
        cur_m = mt.gather(1, idx[:, None])
        gain = torch.where(dt - cur_d <= capacity + tol - used, mt - cur_m, torch.zeros_like(mt))
        best = int(torch.argmax(gain))
        h, c = divmod(best, len(cands))
        if float(gain[h, c]) <= 0:
            break
        used += float(dt[h, c] - cur_d[h, 0])
        idx[h] = c
    return idx


def _choose_indices(
    density: Tensor,
    mass: Tensor,
    candidates: Sequence[float],
    *,
    min_mass: float | None = None,
    density_budget: float | None = None,
) -> Tensor:
    """Like :func:`choose_thresholds` but returns candidate indices, long ``[L, Hq]``."""
    cands = _check_tables(density, mass, candidates)
    if (min_mass is None) == (density_budget is None):
        raise ValueError("give exactly one of min_mass and density_budget")
    shape = density.shape[:2]
    d = density.detach().to("cpu", torch.float64).reshape(-1, len(cands))
    m = mass.detach().to("cpu", torch.float64).reshape(-1, len(cands))
    if min_mass is not None:
        if not 0.0 < float(min_mass) <= 1.0:
            raise ValueError(f"min_mass must lie in (0, 1], got {min_mass}")
        idx = _indices_min_mass(d, m, cands, float(min_mass))
    else:
        assert density_budget is not None
        if not 0.0 < float(density_budget) <= 1.0:
            raise ValueError(f"density_budget must lie in (0, 1], got {density_budget}")
        idx = _indices_budget(d, m, cands, float(density_budget))
    return idx.view(shape)


def choose_thresholds(
    density: Tensor,
    mass: Tensor,
    candidates: Sequence[float],
    *,
    min_mass: float | None = None,
    density_budget: float | None = None,
) -> Tensor:
    """Per-(layer, head) thresholds from :func:`head_statistics` tables; give exactly one of the two targets.

    **min_mass** (minimise total density s.t. every head keeps at least ``min_mass`` of its attention): the problem is
    separable, so per head the answer is the candidate of least density whose mass reaches ``min_mass`` (ties: more
    mass, then smaller ``tau``); heads that no candidate serves get the largest candidate (1.0 if in the grid) and a
    logged warning. ``O(N C)`` for ``N = L x Hq`` heads and ``C`` candidates.

    **density_budget** (maximise the total mass, i.e. the mean mass, s.t. the mean density is ``<= density_budget``):
    a multiple-choice knapsack. Algorithm:

    1. Per head, the upper concave hull of its points ``(density, mass)``: dominated points (more density, no more
       mass) and points strictly below a chord are dropped; consecutive hull vertices are segments of decreasing slope
       (marginal mass per unit density).
    2. Start every head at its least-density vertex (``ValueError`` if even that exceeds the budget), then take hull
       segments whole in one global order of decreasing slope while they fit; a segment that does not fit freezes its
       head (the head's later segments need it first) and the scan goes on with the other heads.
    3. Spend any budget left on the single upgrade (any candidate of any head) with the largest mass gain that fits,
       repeatedly, until none fits.

    Why it is right: replacing each head's points by its concave hull turns the problem into maximising a sum of
    concave piecewise-linear functions under one linear budget; that relaxation's optimum ``P*`` bounds the integer
    optimum ``OPT`` from above (the hull lies on or above every point) and is reached by filling segments in
    decreasing slope, the first segment that does not fit (mass gain ``dm_k``) taken for the fraction ``theta < 1``
    of it that the budget still allows (KKT with one multiplier, that segment's slope). Steps 2-3 take every segment
    before that one whole and never lose mass afterwards, so ``OPT - theta x dm_k <= P* - theta x dm_k <= result <=
    OPT``: exactly optimal when the budget falls on hull vertices (``theta = 0``, or every segment fits), and otherwise
    short of the optimum by less than one hull step of one head (``dm_k``, against a total of ``N x`` the mean mass).
    The budget always holds: the mean density of the result is ``<= density_budget`` (up to ``1e-9`` relative
    rounding). Cost ``O(N C log C)`` for the hulls, ``O(N C log N)`` for the heap of segments, plus ``O(N C)`` per
    upgrade in step 3 (a handful: the leftover is less than one segment).

    Args:
        density, mass: ``[L, Hq, C]`` tables (any float dtype; :func:`head_statistics` gives float64).
        candidates: the ``C`` thresholds the tables were computed for.
        min_mass: target mass per head in ``(0, 1]``; density_budget: mean density budget in ``(0, 1]``.
    Returns:
        float64 ``[L, Hq]`` thresholds, each exactly one of ``candidates`` (float64 because selection compares
        float64 running sums with ``tau x total``: a float32 ``0.9`` would move the cut-off).
    """
    idx = _choose_indices(density, mass, candidates, min_mass=min_mass, density_budget=density_budget)
    cands = torch.tensor([float(c) for c in candidates], dtype=torch.float64)
    return cands[idx]


# ---------------------------------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------------------------------

_SUBJECTS = (
    "The old lighthouse keeper", "A small research team", "The river", "Our neighbour's cat", "The committee",
    "A travelling musician", "The morning train", "The city library", "An experienced pilot", "The garden",
    "A quiet student", "The weather station", "The harbour master", "A young baker", "The mountain village",
)  # fmt: skip
_VERBS = (
    "carefully examined", "slowly painted", "quietly described", "often visited", "eagerly repaired", "once measured",
    "happily collected", "patiently studied", "briefly mentioned", "secretly admired", "finally replaced",
)  # fmt: skip
_OBJECTS = (
    "the wooden bridge", "a collection of maps", "the northern coast", "an unusual recipe", "the broken clock",
    "three blue bicycles", "the annual report", "a forgotten song", "the stone wall", "a box of letters",
    "the evening sky", "a field of sunflowers", "the narrow staircase", "an ancient coin",
)  # fmt: skip
_TAILS = (
    "before the rain started", "during the long winter", "after the market closed", "while everyone else slept",
    "on a bright Tuesday morning", "without telling anyone", "for the third time that year", "near the old harbour",
    "as the bells rang at noon", "with surprising patience",
)  # fmt: skip


def _filler_sentences(rng: random.Random, count: int) -> list[str]:
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}." for _ in range(count)]


def _encode(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=special))


def haystack_prompt(tokenizer: Any, length: int, *, seed: int = 0) -> list[int]:
    """A passkey retrieval prompt of exactly ``length`` tokens: seeded filler sentences, one passkey sentence at a
    seeded depth, and a question about it at the end (the built-in calibration prompt when no text is given).

    Args:
        tokenizer: anything with ``encode(text, add_special_tokens=bool) -> list[int]`` (a Hugging Face tokenizer).
        length: tokens, including the special tokens the tokenizer puts in front (e.g. BOS).
    Returns:
        token ids, ``len == length``.
    """
    rng = random.Random(seed)
    key = rng.randint(10000, 99999)
    prefix = _encode(tokenizer, "", special=True)  # what the tokenizer prepends (BOS), if anything
    question = _encode(tokenizer, "\nWhat is the pass key? The pass key is")
    body_len = length - len(prefix) - len(question)
    if body_len < 16:
        raise ValueError(f"calibration length {length} is too short for a prompt (needs > {length - body_len + 15} tokens)")
    needle = f" The pass key is {key}. Remember it. {key} is the pass key."
    sample = _filler_sentences(random.Random(seed + 1), 64)
    per_sentence = max(1.0, len(_encode(tokenizer, " ".join(sample))) / len(sample))
    count = int(body_len / per_sentence * 1.2) + 8
    while True:
        sentences = _filler_sentences(rng, count)
        sentences.insert(int(len(sentences) * rng.uniform(0.1, 0.7)), needle)
        body = _encode(tokenizer, " ".join(sentences))
        if len(body) >= body_len:
            break
        count *= 2
    return prefix + body[:body_len] + question


def text_prompts(tokenizer: Any, text: str, length: int, samples: int) -> list[list[int]]:
    """``samples`` windows of ``length`` tokens from ``text``, evenly spaced over it (each with the tokenizer's special
    prefix, e.g. BOS). Raises ``ValueError`` when the text is shorter than one window."""
    prefix = _encode(tokenizer, "", special=True)
    ids = _encode(tokenizer, text)
    body_len = length - len(prefix)
    if body_len <= 0:
        raise ValueError(f"calibration length {length} is too short")
    if len(ids) < body_len:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than the {body_len} one prompt of {length} needs")
    spare = len(ids) - body_len
    starts = [spare * i // max(1, samples - 1) for i in range(samples)] if samples > 1 else [0]
    return [prefix + ids[s : s + body_len] for s in starts]


# The evaluation harness's tasks used by tasks="auto": retrieval over essays, multi-key retrieval, variable tracking
# (chains of references), word counting over lists, and passkey over repeated filler: varied attention patterns.
AUTO_TASKS: tuple[str, ...] = ("niah_single_2", "vt", "cwe", "niah_multikey_1", "fwe", "passkey")
# Calibration samples use their own seed space so they never repeat the evaluation's prompts (its default seed is 42).
_TASK_SEED_OFFSET = 1000


class _PromptSource:
    """Calibration prompts: windows of ``text``, the evaluation harness's task generators, or the built-in haystack."""

    def __init__(self, tokenizer: Any, *, text: str | None, tasks: str | Sequence[str] | None, seed: int) -> None:
        self.tokenizer, self.text, self.seed = tokenizer, text, seed
        self.tasks: list[str] = []
        self.generator: Any = None
        if text is not None:
            self.kind = "text"
            return
        if tasks is None or tasks == "haystack":
            self.kind = "haystack"
            return
        auto = tasks == "auto"
        self.kind = "tasks"
        try:
            from .evaluation.tasks import SampleGenerator, resolve_tasks
        except ImportError as exc:  # the evaluation harness is optional
            if not auto:
                raise ValueError(f"calibration tasks {tasks!r} need xattention.evaluation: {exc}") from exc
            logger.info("evaluation task generators unavailable (%s); using the built-in haystack", exc)
            self.kind = "haystack"
            return
        self.generator = SampleGenerator(tokenizer, base_seed=_TASK_SEED_OFFSET + seed)
        if not auto:
            self.tasks = resolve_tasks(tasks)
            return
        # "auto": keep the tasks whose data packages (essays, word lists) are installed; probed on a short prompt
        for task in AUTO_TASKS:
            try:
                self.generator.generate(task, 1024, 0)
            except ImportError as exc:
                logger.info("calibration task %s skipped: %s", task, exc)
                continue
            except ValueError:  # too short for this tokenizer at 1024 tokens: the real lengths decide
                pass
            self.tasks.append(task)
        if not self.tasks:
            logger.info("no evaluation task can be generated here; using the built-in haystack")
            self.kind = "haystack"

    def prompts(self, length: int, samples: int, offset: int) -> list[tuple[str, list[int]]]:
        """``samples`` ``(label, token ids)`` of about ``length`` tokens; ``offset`` rotates the task mix per length."""
        if self.kind == "text":
            assert self.text is not None
            return [("text", ids) for ids in text_prompts(self.tokenizer, self.text, length, samples)]
        if self.kind == "tasks":
            out = []
            for i in range(samples):
                task = self.tasks[(offset + i) % len(self.tasks)]
                try:
                    sample = self.generator.generate(task, length, i)
                except ModuleNotFoundError as exc:  # a task's data package (essays, word lists) is missing
                    raise ValueError(f"calibration task {task} cannot be generated: {exc}") from exc
                out.append((task, list(sample.input_ids)))
            return out
        return [("haystack", haystack_prompt(self.tokenizer, length, seed=self.seed + 1000 * i + length)) for i in range(samples)]


# ---------------------------------------------------------------------------------------------------------------------
# calibrate
# ---------------------------------------------------------------------------------------------------------------------


def parse_target(target: str | Mapping[str, float] | tuple[str, float]) -> tuple[str, float]:
    """``"mass=0.9"`` / ``"density=0.15"`` (or ``{"mass": 0.9}``, ``("mass", 0.9)``) -> ``(kind, value)``."""
    if isinstance(target, Mapping):
        if len(target) != 1:
            raise ValueError(f"target must name exactly one of mass / density, got {dict(target)}")
        kind, value = next(iter(target.items()))
    elif isinstance(target, tuple):
        kind, value = target
    elif isinstance(target, str):
        kind, eq, value = target.partition("=")
        if not eq:
            raise ValueError(f"target {target!r} is not of the form mass=0.9 or density=0.15")
    else:
        raise ValueError(f"target must be a string like 'mass=0.9', got {type(target).__name__}")
    kind = str(kind).strip().lower()
    if kind not in ("mass", "density"):
        raise ValueError(f"target kind must be 'mass' or 'density', got {kind!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"target value {value!r} is not a number") from None
    if not 0.0 < number <= 1.0:
        raise ValueError(f"target {kind} must lie in (0, 1], got {number}")
    return kind, number


def _capture_fn():
    """The q/k capture hook (kept behind a function so tests can substitute it)."""
    from .integrations.hf import capture_qk

    return capture_qk


def _summary(density: Tensor, mass: Tensor, idx: Tensor) -> dict[str, float]:
    d = density.gather(-1, idx[..., None])[..., 0]
    m = mass.gather(-1, idx[..., None])[..., 0]
    return {"density": float(d.mean()), "mass": float(m.mean()), "min_head_mass": float(m.min())}


def calibrate(
    model: Any,
    tokenizer: Any,
    *,
    lengths: Sequence[int] | str = (4096,),
    target: str | Mapping[str, float] | tuple[str, float] = "mass=0.9",
    stride: int = 8,
    candidates: Sequence[float] = DEFAULT_CANDIDATES,
    samples: int = 2,
    block_size: int = 128,
    text: str | None = None,
    tasks: str | Sequence[str] | None = "auto",
    seed: int = 0,
    backend: str = "auto",
    progress: bool = True,
) -> tuple[Tensor, dict[str, Any]]:
    """Calibrate per-(layer, head) XAttention thresholds for ``model``.

    For every length, ``samples`` prompts (the evaluation harness's task generators, the built-in passkey haystack, or
    windows of ``text``) run through :func:`xattention.integrations.hf.capture_qk`; :func:`head_statistics` tables are
    averaged over all prompts (each prompt weighs the same) and :func:`choose_thresholds` picks the thresholds. Layers
    ``capture_qk`` does not return (not full attention, e.g. Gemma-3's sliding-window layers) get threshold 1.0 and are
    listed in the report.

    Args:
        model: a Hugging Face causal LM (eval mode; its device is used). tokenizer: its tokenizer.
        lengths: prompt lengths in tokens (or ``"4k,8k"``). target: ``"mass=0.9"`` (least density keeping at least
            that mass in every head) or ``"density=0.15"`` (most mass at that mean density).
        stride, block_size: XAttention's ``S`` and ``b`` the thresholds are for. candidates: the ``tau`` grid.
        samples: prompts per length.
        text: calibration text, cut into ``samples`` windows per length (overrides ``tasks``).
        tasks: ``"auto"`` (default): the evaluation harness's generators (:data:`AUTO_TASKS`, those whose data is
            installed; its own seed space, so no evaluation prompt is repeated), else the built-in passkey haystack;
            ``"haystack"`` or ``None``: the built-in haystack; task names or groups (``"niah_single_2,vt"``,
            ``"ruler"``): those generators. Sample ``i`` of the ``j``-th length uses task ``(j x samples + i) mod n``.
        seed: prompt seed. backend: scoring backend (see :func:`head_statistics`). progress: show a progress bar.
    Returns:
        ``(thresholds, report)``: float64 ``[num_layers, num_heads]`` and a JSON-ready dict with the per-layer and
        overall mean density/mass at the chosen thresholds, the single global ``tau`` whose mean density is closest to
        the calibrated one with its mass (the equal-density comparison), the global ``tau`` that meets the same target
        on its own (``global_at_target``: every head at ``min_mass``, or the most mass within the density budget),
        per-length figures and the raw ``[L, Hq, C]`` tables (to re-choose thresholds for another target offline).
    """
    from tqdm.auto import tqdm

    kind, value = parse_target(target)
    cands = _check_candidates(candidates)
    lens = parse_lengths(lengths) if isinstance(lengths, str) else parse_lengths([int(n) for n in lengths])
    if not isinstance(samples, int) or samples <= 0:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    config = text_config(model)
    num_layers, num_heads = int(config.num_hidden_layers), int(config.num_attention_heads)
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and max(lens) > int(max_pos):
        logger.warning("calibration length %d exceeds the model's max_position_embeddings (%d)", max(lens), max_pos)
    capture_qk = _capture_fn()
    scales = attention_scales(model)
    device = next(model.parameters()).device

    start = time.perf_counter()
    layers: list[int] | None = None
    sums: dict[int, tuple[Tensor, Tensor, int]] = {}
    num_prompts = len(lens) * samples
    # one step per (prompt, layer): at long lengths on a CPU one prompt takes minutes
    bar = tqdm(total=num_prompts * num_layers, desc="calibrate", unit="layer", disable=not progress)
    source = _PromptSource(tokenizer, text=text, tasks=tasks, seed=seed)
    used: dict[int, list[dict[str, Any]]] = {}
    for j, length in enumerate(lens):
        for label, ids in source.prompts(length, samples, offset=j * samples):
            used.setdefault(length, []).append({"source": label, "tokens": len(ids)})
            bar.set_postfix_str(f"{label} {len(ids)} tokens")
            input_ids = torch.tensor([ids], dtype=torch.long, device=device)
            with torch.no_grad():
                qk = capture_qk(model, input_ids)
            if not qk:
                raise ValueError("capture_qk returned no layer: the model has no full-attention layer to calibrate")
            if layers is None:
                layers = sorted(qk)
                bar.total = num_prompts * len(layers)
                bar.refresh()
            elif sorted(qk) != layers:
                raise ValueError(f"captured layers changed between prompts: {layers} vs {sorted(qk)}")
            bad = [i for i in layers if not 0 <= i < num_layers]
            if bad:
                raise ValueError(f"captured layer indices {bad} lie outside the model's {num_layers} layers")
            heads = {qk[i][0].shape[1] for i in layers}
            if heads != {num_heads}:
                raise ValueError(f"captured q has {sorted(heads)} heads but the model config says {num_heads}")
            rows = []
            for i in layers:
                rows.append(
                    head_statistics(
                        {i: qk.pop(i)}, candidates=cands, stride=stride, block_size=block_size, backend=backend,
                        scale=scales.get(i),
                    )
                )  # fmt: skip
                bar.update(1)
            d, m = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
            old = sums.get(length)
            sums[length] = (d, m, 1) if old is None else (old[0] + d, old[1] + m, old[2] + 1)
    bar.close()
    assert layers is not None

    per_length = {n: (d / c, m / c) for n, (d, m, c) in sums.items()}
    density = sum(d for d, _ in per_length.values()) / len(per_length)
    mass = sum(m for _, m in per_length.values()) / len(per_length)
    if kind == "mass":
        idx = _choose_indices(density, mass, cands, min_mass=value)
    else:
        idx = _choose_indices(density, mass, cands, density_budget=value)
    cand_t = torch.tensor(cands, dtype=torch.float64)
    thresholds = torch.ones(num_layers, num_heads, dtype=torch.float64)
    thresholds[layers] = cand_t[idx]
    dense_layers = [i for i in range(num_layers) if i not in set(layers)]

    calibrated = _summary(density, mass, idx)
    global_density = density.mean(dim=(0, 1))  # [C]
    global_mass = mass.mean(dim=(0, 1))
    g = int(torch.argmin((global_density - calibrated["density"]).abs()))
    g_idx = torch.full_like(idx, g)
    report: dict[str, Any] = {
        "target": {kind: value},
        "lengths": lens,
        "samples": samples,
        "stride": stride,
        "block_size": block_size,
        "candidates": cands,
        "prompts": {str(n): p for n, p in used.items()},
        "num_layers": num_layers,
        "num_heads": num_heads,
        "calibrated_layers": layers,
        "dense_layers": dense_layers,
        "calibrated": calibrated,
        "global": {"tau": cands[g], **_summary(density, mass, g_idx)},
        "global_mass_at_equal_density": _interpolate(global_density, global_mass, calibrated["density"]),
        "global_at_target": _global_at_target(density, mass, cands, kind, value),
        "heads_below_target": int((mass.gather(-1, idx[..., None])[..., 0] < value - _MASS_TOL).sum())
        if kind == "mass"
        else None,
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
    return thresholds, report


def _global_at_target(density: Tensor, mass: Tensor, cands: list[float], kind: str, value: float) -> dict[str, float] | None:
    """The one global ``tau`` that meets the target by itself: the smallest whose every head keeps ``value`` of its
    mass, or the one with the most mean mass within the mean density budget ``value`` (``None`` if there is none)."""
    best = None
    for c in sorted(range(len(cands)), key=lambda i: cands[i]):
        stats = {"tau": cands[c], **_summary(density, mass, torch.full(density.shape[:2], c, dtype=torch.long))}
        if kind == "mass" and stats["min_head_mass"] >= value - _MASS_TOL:
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


# ---------------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``xattention calibrate``."""
    parser.add_argument("--model", default="smollm2", help="model name or path for xattention.models.load_model")
    parser.add_argument("--lengths", default="4k", help="comma-separated prompt lengths in tokens, k = 1024 (default 4k)")
    parser.add_argument(
        "--target", required=True, help="mass=M (least density keeping >= M per head) or density=D (most mass at mean D)"
    )
    parser.add_argument("--out", required=True, help="thresholds JSON to write")
    parser.add_argument("--stride", type=int, default=8, help="antidiagonal stride S (default 8)")
    parser.add_argument("--block-size", type=int, default=128, help="block size b (default 128)")
    parser.add_argument(
        "--candidates",
        default=",".join(f"{c:g}" for c in DEFAULT_CANDIDATES),
        help="comma-separated candidate thresholds in (0, 1] (default: %(default)s)",
    )
    parser.add_argument("--samples", type=int, default=2, help="prompts per length (default 2)")
    parser.add_argument(
        "--tasks",
        default="auto",
        help="prompt source: auto (the evaluation harness's task generators where their data is installed, else the "
        "built-in passkey haystack), haystack, or task names/groups such as niah_single_2,vt or ruler (default auto)",
    )
    parser.add_argument("--text", default=None, help="calibrate on windows of this UTF-8 text file (overrides --tasks)")
    parser.add_argument("--seed", type=int, default=0, help="prompt seed (default 0)")
    parser.add_argument("--device", default=None, help="torch device (default: the model loader's choice)")
    parser.add_argument("--dtype", default=None, help="model dtype, e.g. bfloat16 (default: the model loader's choice)")
    parser.add_argument("--backend", default="auto", choices=("auto", "reference", "triton"), help="scoring backend")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _parse_candidates(text: str) -> list[float]:
    try:
        return _check_candidates([float(s) for s in text.split(",") if s.strip()])
    except ValueError as exc:
        raise ValueError(f"--candidates: {exc}") from None


def main(args: argparse.Namespace) -> int:
    """Run ``xattention calibrate``: load the model, calibrate, save the thresholds, print the comparison."""
    from ._extras import require_model
    from ._parsing import parse_device, parse_dtype
    from .methods import XAttention
    from .models import load_model
    from .thresholds import save_thresholds

    # everything the model is not needed for, before it loads
    require_model(args.model)
    kind, value = parse_target(args.target)
    lengths = parse_lengths(args.lengths)
    candidates = _parse_candidates(args.candidates)
    XAttention(stride=args.stride, block_size=args.block_size)
    if args.samples < 1:
        raise ValueError(f"--samples must be positive, got {args.samples}")
    device = None if args.device is None else parse_device(args.device)  # None: the model loader's choice
    text = None
    if args.text is not None:
        try:
            text = Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--text {args.text}: cannot read it as UTF-8 text ({exc})") from None
    dtype = None if args.dtype is None else parse_dtype(args.dtype, option="--dtype")
    model, tokenizer = load_model(args.model, device=device, dtype=dtype)
    model.eval()
    thresholds, report = calibrate(
        model, tokenizer, lengths=lengths, target=(kind, value), stride=args.stride, candidates=candidates,
        samples=args.samples, block_size=args.block_size, text=text, tasks=args.tasks, seed=args.seed, backend=args.backend,
        progress=not args.no_progress,
    )  # fmt: skip
    if args.text is not None:
        report["text_file"] = str(args.text)
    save_thresholds(args.out, thresholds, model_name=args.model, metadata=report)
    _print_report(report, args.out)
    return 0


def _print_report(report: dict[str, Any], out: str) -> None:
    cal, glob, at_target = report["calibrated"], report["global"], report.get("global_at_target")
    rows = [("per-head (calibrated)", cal), (f"global tau={glob['tau']:g} (nearest density)", glob)]
    if at_target is not None and at_target["tau"] != glob["tau"]:
        rows.append((f"global tau={at_target['tau']:g} (same target)", at_target))
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is an optional extra
        for name, r in rows:
            print(f"{name:36s} density {r['density']:.4f}  mass {r['mass']:.4f}  min head mass {r['min_head_mass']:.4f}")
    else:
        table = Table(title=f"calibration over lengths {report['lengths']} ({report['samples']} prompts each)")
        for col in ("thresholds", "mean density", "mean mass", "min head mass"):
            table.add_column(col)
        for name, r in rows:
            table.add_row(name, f"{r['density']:.4f}", f"{r['mass']:.4f}", f"{r['min_head_mass']:.4f}")
        Console().print(table)
    interp = report.get("global_mass_at_equal_density")
    if interp is not None:
        print(f"global tau interpolated to the calibrated density {cal['density']:.4f}: mass {interp:.4f}")
    if report["dense_layers"]:
        print(f"layers without full attention (threshold 1.0): {report['dense_layers']}")
    print(f"wrote {out} ({report['seconds']:.1f} s)")
