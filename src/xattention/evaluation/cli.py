"""``xattention eval``: offline RULER-style accuracy of sparse-prefill methods, and ``xattention eval report DIR``.

Only argparse is imported at module level; torch, transformers and the data packages load when a run starts.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "main"]

_EPILOG = """\
examples:
  xattention eval --model smollm2 --tasks ruler --lengths 1k,2k,4k \\
      --methods dense,xattention:threshold=0.9 --samples 20 --out runs/smollm2
  xattention eval report runs/smollm2          # rebuild summary.md/.json and the plot from results.jsonl

Tasks: niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue, niah_multiquery, vt, cwe, fwe (group "ruler"), passkey
(group "all" = ruler + passkey). Re-running the same command resumes: finished (task, length, sample, method) results
in DIR/results.jsonl are skipped. Exit status: 0 done, 2 bad arguments, 3 --time-budget used up (rerun to resume),
130 interrupted.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG
    parser.add_argument("action", nargs="*", metavar="report DIR", help="rebuild the summary and plot of DIR and exit")
    parser.add_argument("--model", default="smollm2", help="model name known to xattention.models, or a local .gguf / HF folder")
    parser.add_argument("--tasks", default="ruler", help="comma list of tasks or groups: ruler, niah, all (default: ruler)")
    parser.add_argument("--lengths", default="1k,2k,4k", help="target lengths in tokens incl. the answer budget (k = 1024)")
    parser.add_argument(
        "--methods",
        action="append",
        help="method specs, comma-separated, e.g. dense,xattention:threshold=0.9,stride=16 (repeatable). Built with "
        "method_from_spec(spec, min_seq_len=0): sparse attention runs at every length, not only above the "
        "library's 12K-key default (default: dense,xattention:threshold=0.9)",
    )
    parser.add_argument("--samples", type=int, default=10, help="samples per (task, length) (default: 10)")
    parser.add_argument("--out", help="output folder: results.jsonl, summary.md, summary.json, score_vs_density.png")
    parser.add_argument("--seed", type=int, default=42, help="base seed (default: 42)")
    parser.add_argument("--device", default="auto", help="cuda, cuda:1, cpu, ... (default: auto = cuda when available)")
    parser.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: load_model's, float32 for GGUF)")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per generate call, left-padded (default: 1)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="answer budget for every task (default: RULER's per task)"
    )
    parser.add_argument("--mass", action="store_true", help="also record the attention mass kept (slower)")
    parser.add_argument(
        "--no-chat-template",
        dest="chat_template",
        action="store_false",
        default=None,
        help="raw prompts even if the tokenizer has a chat template (default: use it when present)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start no new batch after this many seconds; writes the summary so far and exits 3 (rerun to resume)",
    )
    parser.add_argument("--report-only", action="store_true", help="only rebuild the summary and plot of --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _report(out: str) -> int:
    from .report import format_markdown, write_report

    summary = write_report(out)
    print(format_markdown(summary))
    print(f"wrote {out}/summary.md, summary.json and score_vs_density.png")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.action:
        if len(args.action) != 2 or args.action[0] != "report":
            raise ValueError(f"unexpected arguments {' '.join(args.action)!r}; did you mean 'xattention eval report DIR'?")
        return _report(args.action[1])
    if not args.out:
        raise ValueError("--out DIR is required")
    if args.report_only:
        return _report(args.out)

    from .runner import EvalConfig, TimeBudgetExceeded, run_eval

    config = EvalConfig(
        model=args.model,
        tasks=args.tasks,
        lengths=args.lengths,
        methods=",".join(args.methods) if args.methods else "dense,xattention:threshold=0.9",
        samples=args.samples,
        out=args.out,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        mass=args.mass,
        chat_template=args.chat_template,
        progress=not args.no_progress,
        time_budget=args.time_budget,
    )
    config.validate()  # unknown tasks, methods, parameters and bad lengths fail here, before any model loads
    try:
        run_eval(config)
    except KeyboardInterrupt:
        print(f"interrupted; finished results are in {args.out}/results.jsonl, rerun the same command to resume",
              file=sys.stderr)  # fmt: skip
        return 130
    except TimeBudgetExceeded as exc:
        _report(args.out)  # the partial summary (at least one batch was written)
        print(f"xattention eval: {exc}", file=sys.stderr)
        return 3
    return _report(args.out)
