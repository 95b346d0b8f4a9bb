"""Offline RULER-style long-context evaluation: seeded generators, RULER scoring, a resumable runner and reports.

>>> from xattention.evaluation import EvalConfig, run_eval
>>> run_eval(EvalConfig(model="smollm2", tasks="ruler", lengths="1k,2k,4k",
...                     methods="dense,xattention:threshold=0.9", samples=20, out="runs/smollm2"))

The command line is ``xattention eval`` (see ``xattention eval --help``). Submodules load lazily: importing this package
reads no data and imports neither transformers nor the data packages.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "TASKS",
    "TASK_GROUPS",
    "EvalConfig",
    "Sample",
    "SampleGenerator",
    "paired_differences",
    "run_eval",
    "score",
    "string_match_all",
    "string_match_part",
    "summarize",
    "write_report",
]

_WHERE = {
    "TASKS": "tasks",
    "TASK_GROUPS": "tasks",
    "Sample": "tasks",
    "SampleGenerator": "tasks",
    "EvalConfig": "config",
    "run_eval": "runner",
    "score": "scoring",
    "string_match_all": "scoring",
    "string_match_part": "scoring",
    "paired_differences": "report",
    "summarize": "report",
    "write_report": "report",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
