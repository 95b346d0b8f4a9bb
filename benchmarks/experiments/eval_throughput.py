"""Eval throughput of one batch through the harness's own code path, with the model loaded and the prompts built once,
outside the timing: ``xattention.evaluation.runner.run_batch`` (``_run_batch`` in code before 2026-12-01 evening).

    PYTHONPATH=<code to measure>/src python3 benchmarks/experiments/eval_throughput.py gemma3-270m 8192 48 \\
        xattention:stride=8,threshold=0.95 [REPEATS]

Run it once per code version (same GPU, same call) and compare ``results_per_s``; one JSON line on stdout. The prompts
are noise-haystack tasks (niah_single_1, passkey), so no data package beyond the model is needed. The first batch is
a warm-up (compilation, autotuning) and is not timed. gemma-3 needs transformers >= 5.24 on the path.
"""

from __future__ import annotations

import json
import sys
import time

import torch

import xattention
from xattention.evaluation import runner
from xattention.evaluation.config import EvalConfig
from xattention.evaluation.tasks import SampleGenerator
from xattention.integrations import hf
from xattention.methods.registry import method_from_spec
from xattention.models import load_model

TASKS = ("niah_single_1", "passkey")


def main(argv: list[str]) -> None:
    name, length, batch, spec = argv[0], int(argv[1]), int(argv[2]), argv[3]
    repeats = int(argv[4]) if len(argv) > 4 else 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model, tokenizer = load_model(name, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.eval()
    generator = SampleGenerator(tokenizer, chat_template=None, base_seed=42, max_new_tokens=None)
    samples = [generator.generate(TASKS[i % len(TASKS)], length, i // len(TASKS)) for i in range(batch)]
    method = method_from_spec(spec, min_seq_len=0)
    config = EvalConfig(model=name, lengths=str(length), methods=spec, samples=1, mass=False)
    one_batch = getattr(runner, "run_batch", None) or runner._run_batch  # the code before this script had only _run_batch
    seconds, prefill = [], []
    for repeat in range(repeats + 1):
        sync()
        start = time.perf_counter()
        predictions, prefill_ms, _ = one_batch(model, tokenizer, hf, spec, method, samples, config)
        sync()
        if repeat:
            seconds.append(time.perf_counter() - start)
            prefill.append(prefill_ms)
    record = {"code": xattention.__file__, "model": name, "length": length, "batch": batch, "spec": spec,
              "batch_s": seconds, "results_per_s": batch / min(seconds), "prefill_ms": prefill, "answers": predictions[:3]}
    sys.stdout.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
