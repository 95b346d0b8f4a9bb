"""``xattention eval``: offline RULER-style accuracy of sparse-prefill methods, ``xattention eval report DIR`` and
``xattention eval diagnose DIR`` (where a method's block masks drop the needle's attention).

Only argparse is imported at module level; torch, transformers and the data packages load when a run starts.
"""

from __future__ import annotations

import argparse
import re
import sys

__all__ = ["add_arguments", "main"]

_EPILOG = """\
examples:
  xattention eval --model smollm2 --tasks ruler --lengths 1k,2k,4k \\
      --methods dense,xattention:threshold=0.9 --samples 20 --out runs/smollm2
  xattention eval report runs/smollm2          # rebuild summary.md/.json and the plot from results.jsonl
  xattention eval diagnose runs/smollm2 --methods xattention:threshold=0.9 --lengths 1k --max-samples 40
      # per layer and head: attention on the answer tokens that the method's masks drop, samples it lost vs kept
      # (writes DIR/diagnose-<length>-<method>.json and .md; exactly one method and one length)

Tasks: niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue, niah_multiquery, vt, cwe, fwe (group "ruler"), passkey
(group "all" = ruler + passkey). Re-running the same command resumes: finished (task, length, sample, method) results
in DIR/results.jsonl are skipped. Exit status: 0 done, 2 bad arguments, 3 --time-budget used up (rerun to resume),
130 interrupted.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG
    parser.add_argument(
        "action",
        nargs="*",
        metavar="report|diagnose DIR",
        help="report: rebuild the summary and plot of DIR and exit; diagnose: explain a method's lost samples in DIR "
        "(needs --methods and --lengths with one value each)",
    )
    parser.add_argument("--model", default="smollm2", help="model name known to xattention.models, or a local .gguf / HF folder")
    parser.add_argument("--tasks", default="ruler", help="comma list of tasks or groups: ruler, niah, all (default: ruler)")
    parser.add_argument("--lengths", default="1k,2k,4k", help="target lengths in tokens incl. the answer budget (k = 1024)")
    parser.add_argument(
        "--methods",
        action="append",
        help="method specs, comma-separated, e.g. dense,xattention:threshold=0.9,stride=16 (repeatable). Built with "
        "method_from_spec(spec, min_seq_len=0): sparse attention runs at every length, not only above the "
        "library's 12K-key default (default: dense,xattention:threshold=0.95)",
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
    parser.add_argument(
        "--max-samples",
        type=int,
        default=None,
        metavar="N",
        help="diagnose: look at no more than N samples (lost and kept alternating)",
    )


def _report(out: str) -> int:
    from .._extras import require
    from .report import format_markdown, write_report

    require("matplotlib")  # the plot

    summary = write_report(out)
    print(format_markdown(summary))
    print(f"wrote {out}/summary.md, summary.json and score_vs_density.png")
    return 0


def _diagnose(out: str, args: argparse.Namespace) -> int:
    from pathlib import Path

    from .._parsing import parse_lengths

    # diagnose() checks the method, the results file and --max-samples before it loads the model; a length list is ours
    if not args.methods:
        raise ValueError("diagnose needs --methods with exactly one method label, e.g. --methods xattention:threshold=0.9")
    lengths = parse_lengths(args.lengths)
    if len(lengths) != 1:
        raise ValueError(f"diagnose takes exactly one length, got {len(lengths)}: give e.g. --lengths 1k")

    import json

    from .diagnose import diagnose, format_diagnosis

    result = diagnose(
        out,
        method_label=",".join(args.methods),
        length=lengths[0],
        max_samples=args.max_samples,
        progress=not args.no_progress,
        base_seed=args.seed,
        chat_template=args.chat_template,
    )
    label = result["method"]
    stem = f"diagnose-{lengths[0]}-{_sanitise(label)}"
    markdown = format_diagnosis(result)
    (Path(out) / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (Path(out) / f"{stem}.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    print(f"wrote {out}/{stem}.json and {stem}.md")
    return 0


def _sanitise(label: str) -> str:
    """A method label as a file-name part: ``xattention:threshold=0.9`` -> ``xattention_threshold_0.9``."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", label).strip("_.") or "method"


def main(args: argparse.Namespace) -> int:
    if args.action:
        if len(args.action) == 2 and args.action[0] == "diagnose":
            return _diagnose(args.action[1], args)
        if len(args.action) != 2 or args.action[0] != "report":
            raise ValueError(
                f"unexpected arguments {' '.join(args.action)!r}; did you mean 'xattention eval report DIR' or "
                "'xattention eval diagnose DIR'?"
            )
        return _report(args.action[1])
    if not args.out:
        raise ValueError("--out DIR is required")
    if args.report_only:
        return _report(args.out)

    from .runner import EvalConfig, TimeBudgetExceeded, run_eval

    same = ("model", "tasks", "lengths", "samples", "out", "seed", "device", "dtype", "batch_size", "max_new_tokens",
            "mass", "chat_template", "time_budget")  # fmt: skip
    config = EvalConfig(
        methods=",".join(args.methods) if args.methods else "dense,xattention:threshold=0.95",
        progress=not args.no_progress,
        **{name: getattr(args, name) for name in same},
    )
    config.validate()  # unknown tasks, methods, parameters, devices and bad lengths fail here, before any model loads
    from .._extras import require_model

    # the model and, at the end, the plot: a base install without the hf extra fails now, not after the run
    require_model(args.model, "matplotlib")
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
