"""``xattention check``: the accuracy guard (:func:`xattention.check_accuracy`) from the command line.

Every argument is checked before the model loads (a bad one is a one-line error, exit 2); the run prints a table, a
final ``PASS: ...`` / ``FAIL: ...`` line and exits 0 on PASS, 1 on FAIL. Only argparse is imported at module level.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "main"]

_EPILOG = """\
examples:
  xattention check --model smollm2 --lengths 4k --method xattention:threshold=0.9
  xattention check --model ./my-model --lengths 8k,16k --method xattention:stride=8,thresholds=calib.json \\
      --samples 16 --tolerance-kl 0.02 --out check.json

The method runs with min_seq_len=0 unless the spec sets it (as in xattention eval), so the sparse path is what is
checked at every length. Exit status: 0 PASS, 1 FAIL, 2 bad arguments.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``xattention check``."""
    from .guard import DEFAULT_MAX_MEAN_KL, DEFAULT_MAX_NEW_TOKENS, GUARD_TASKS

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG
    parser.add_argument("--model", default="smollm2", help="model name known to xattention.models, or a local .gguf / HF folder")
    parser.add_argument("--method", required=True, help="one method spec, e.g. xattention:threshold=0.9 or ...,thresholds=FILE")
    parser.add_argument("--lengths", default="4k", help="comma-separated target lengths in tokens, k = 1024 (default 4k)")
    parser.add_argument("--samples", type=int, default=8, help="probes per length (default 8)")
    parser.add_argument(
        "--tasks", default="auto", help=f"probe tasks: auto ({', '.join(GUARD_TASKS)} where their data is installed) or names"
    )
    parser.add_argument(
        "--tolerance-kl",
        type=float,
        default=DEFAULT_MAX_MEAN_KL,
        help="largest mean KL(dense || sparse) of the next-token distribution, nats (default %(default)s)",
    )
    parser.add_argument("--max-lost", type=int, default=0, help="probes the method may answer worse than dense (default 0)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="answer budget cap (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="probe seed (default 0)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default auto: cuda when available)")
    parser.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: the model loader's)")
    parser.add_argument("--out", default=None, help="write the full report (every probe) to this JSON file")
    parser.add_argument(
        "--no-chat-template", dest="chat_template", action="store_false", default=None, help="raw prompts, no chat template"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _device(name: str) -> str:
    """``auto`` -> cuda when available; a device torch cannot parse, or CUDA without a GPU, is a ``ValueError``."""
    import torch

    from .evaluation.runner import resolve_device

    device = resolve_device(name)
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a torch device (use cpu, cuda or cuda:N)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here")
    return device


def _validate(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the run needs, checked without loading the model."""
    from .evaluation.runner import check_context, context_limit_from_files, parse_methods, torch_dtype
    from .guard import Tolerance, check_arguments

    lengths, tasks = check_arguments(args.lengths, samples=args.samples, tasks=args.tasks, max_new_tokens=args.max_new_tokens)
    methods = parse_methods(args.method)  # unknown names or parameters, a missing thresholds file
    if len(methods) != 1:
        raise ValueError(f"--method takes one method, got {len(methods)}: {', '.join(label for label, _ in methods)}")
    if args.max_lost < 0:
        raise ValueError(f"--max-lost must be >= 0, got {args.max_lost}")
    if not 0 <= args.tolerance_kl < float("inf"):
        raise ValueError(f"--tolerance-kl must be a finite number of nats >= 0, got {args.tolerance_kl}")
    tolerance = Tolerance(max_answers_lost=args.max_lost, max_mean_kl=args.tolerance_kl)
    if args.out is not None and not Path(args.out).expanduser().resolve().parent.is_dir():
        raise ValueError(f"--out {args.out}: its folder does not exist")
    dtype = None if args.dtype is None else torch_dtype(args.dtype)
    check_context(lengths, context_limit_from_files(args.model), args.model)
    return {"lengths": lengths, "tasks": tasks, "tolerance": tolerance, "dtype": dtype, "device": _device(args.device)}


def main(args: argparse.Namespace) -> int:
    """Run ``xattention check``: validate, load the model, check, print the table and verdict, write ``--out``."""
    checked = _validate(args)

    from .guard import check_accuracy
    from .models import load_model

    model, tokenizer = load_model(args.model, device=checked["device"], dtype=checked["dtype"])
    result = check_accuracy(
        model, tokenizer, args.method, lengths=checked["lengths"], samples=args.samples,
        tasks=checked["tasks"] or "auto", tolerance=checked["tolerance"], seed=args.seed,
        max_new_tokens=args.max_new_tokens, chat_template=args.chat_template, progress=not args.no_progress,
    )  # fmt: skip
    result.model = args.model
    print(f"accuracy check of {result.method} against dense on {args.model} ({args.samples} probes per length: "
          f"{', '.join(result.tasks)})")  # fmt: skip
    print(result.format_table())
    if args.out is not None:
        with open(Path(args.out).expanduser(), "w", encoding="utf-8") as fh:
            json.dump(result.to_dict(), fh, indent=2)
        print(f"wrote {args.out}")
    print(result.summary())
    return 0 if result.passed else 1
