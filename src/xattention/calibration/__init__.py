"""Per-head threshold calibration for XAttention (the paper's "threshold prediction", Xu et al., 2025, Sec. 2.3).

One global ``tau`` over-spends on heads whose attention is concentrated and under-spends on diffuse heads; the paper
credits per-head thresholds found by dynamic programming but did not release the search. This package is that search:

* :mod:`.statistics` — :func:`head_statistics`: per (layer, head, candidate ``tau``) the density of XAttention's mask
  and the exact attention mass it keeps (over every query row, or the last block of rows: the answer's), on captured
  post-RoPE ``q``/``k``;
* :mod:`.choose` — :func:`choose_thresholds`: the least density reaching a mass per head, or the most mass under a
  mean-density budget (the hull search; ``docs/calibration.md`` has the algorithm and its optimality argument);
* :mod:`.runner` — :func:`calibrate`: prompts (:mod:`xattention.evaluation.prompts`) through a ``capture`` of q/k,
  statistics averaged over prompts, thresholds chosen (per head or per layer), and a report against one global
  ``tau``; :func:`rechoose`: another target from a report's tables, without the model;
* :mod:`.cli` — ``xattention calibrate --model smollm2 --lengths 4k,8k --target mass=0.9 --out thresholds.json``
  (:func:`add_arguments` / :func:`main`); the file loads with :func:`xattention.thresholds.load_thresholds`.
"""

from __future__ import annotations

from .._common import attention_scales
from .._parsing import parse_lengths as parse_lengths  # importable from here, as before the package split
from ..evaluation.prompts import AUTO_TASKS as AUTO_TASKS
from ..evaluation.prompts import haystack_prompt, text_prompts
from .choose import choose_thresholds
from .cli import add_arguments, main
from .runner import calibrate, parse_target, rechoose
from .statistics import DEFAULT_CANDIDATES, head_statistics

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
    "rechoose",
    "text_prompts",
]
