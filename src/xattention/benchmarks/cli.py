"""``xattention bench {kernels,methods,quality,model,context-parallel}``: route to the benchmark modules (:data:`BENCHMARKS`)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

__all__ = ["add_arguments", "main", "run_script"]

BENCHMARKS = {
    "kernels": ("xattention.benchmarks.kernels", "dense vs sparse kernels, selection, end to end (GPU)"),
    "methods": ("xattention.benchmarks.methods", "every method: selection time, density, mass kept, end to end (GPU)"),
    "quality": ("xattention.benchmarks.quality", "attention mass kept vs density per method on real q/k, oracle as ceiling"),
    "model": ("xattention.benchmarks.model", "time to first token and peak memory of a HF model, dense vs XAttention"),
    "context-parallel": ("xattention.benchmarks.context_parallel", "ring sparse prefill over N ranks (torchrun)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (module_name, help_text) in BENCHMARKS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_bench_main=module.main)


def main(args: argparse.Namespace) -> int:
    return int(args._bench_main(args) or 0)


def run_script(
    description: str | None,
    add: Callable[[argparse.ArgumentParser], None],
    run: Callable[..., int],
    *,
    prog: str | None = None,
) -> None:
    """``python -m xattention.benchmarks.<module>``: INFO logging, the module's options, exit with its status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add(parser)
    sys.exit(run(parser.parse_args()))
