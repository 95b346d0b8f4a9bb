"""Where does XAttention (S=8, tau=0.9) lose gemma-3-270m's passkey at 8K? Sparse attention in chosen layers and rows only.

    PYTHONPATH=src python3 benchmarks/passkey_ablation.py {layers,rows,needle,heads} 4,5,6 OUT.jsonl

``layers``: dense, all three full-attention layers (5, 11, 17), each one alone. ``rows``: layer 5 only, with only its last
query-block row sparse, or every row but the last. ``needle``: layer 5 only, with only the rows holding the passkey's
tokens sparse, or every row but those. ``heads``: layer 5 only, one of its four query heads sparse. What is not named
stays dense (every causally visible block). CPU, float32, one prompt at a time (no padding), greedy decoding as in
``xattention eval``; one JSON line per (sample, configuration).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable

import torch

from xattention import BlockMask, XAttention
from xattention.evaluation.diagnose import answer_positions
from xattention.evaluation.runner import _generate
from xattention.evaluation.scoring import score
from xattention.evaluation.tasks import Sample, SampleGenerator
from xattention.integrations import hf
from xattention.models import load_model

FULL_LAYERS = (5, 11, 17)


@dataclasses.dataclass(kw_only=True, eq=False)
class SomeRowsSparse(XAttention):
    """XAttention in the query-block ``rows`` (negative indices count from the end; ``None``: all) of the query ``heads``
    (``None``: all) only, dense elsewhere; ``invert`` swaps the two regions."""

    rows: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    invert: bool = False

    def estimate(self, q, k, *, causal=True, scale=None, backend="auto"):  # type: ignore[no-untyped-def]
        bm = super().estimate(q, k, causal=causal, scale=scale, backend=backend)
        num_heads, num_rows = bm.mask.shape[1], bm.mask.shape[2]
        rows = torch.zeros(num_rows, dtype=torch.bool, device=bm.mask.device)
        rows[list(range(num_rows)) if self.rows is None else list(self.rows)] = True
        heads = torch.zeros(num_heads, dtype=torch.bool, device=bm.mask.device)
        heads[list(range(num_heads)) if self.heads is None else list(self.heads)] = True
        sparse = heads[:, None] & rows[None, :]  # [Hq, Qb]
        if self.invert:
            sparse = ~sparse
        mask = torch.where(sparse[..., None], bm.mask, bm.visible().expand_as(bm.mask))
        return BlockMask(mask, bm.block_size, bm.q_len, bm.k_len, bm.causal)


def xattention(rows: tuple[int, ...] | None = None, invert: bool = False, heads: tuple[int, ...] | None = None) -> XAttention:
    if rows is None and heads is None:
        return XAttention(stride=8, threshold=0.9, min_seq_len=0)
    return SomeRowsSparse(stride=8, threshold=0.9, min_seq_len=0, rows=rows, heads=heads, invert=invert)


def needle_rows(tokenizer, sample: Sample) -> tuple[int, ...]:  # type: ignore[no-untyped-def]
    return tuple(sorted({p // 128 for p in answer_positions(tokenizer, sample)}))


# experiment -> configuration -> (tokenizer, sample) -> {layer: method}, or None for dense
Config = Callable[..., dict[int, XAttention] | None]
EXPERIMENTS: dict[str, dict[str, Config]] = {
    "layers": {
        "dense": lambda tok, s: None,
        "all": lambda tok, s: dict.fromkeys(FULL_LAYERS, xattention()),
        **{f"L{i}": (lambda tok, s, i=i: {i: xattention()}) for i in FULL_LAYERS},
    },
    "rows": {
        "L5-last": lambda tok, s: {5: xattention((-1,))},
        "L5-rest": lambda tok, s: {5: xattention((-1,), invert=True)},
    },
    "heads": {f"L5-h{h}": (lambda tok, s, h=h: {5: xattention(heads=(h,))}) for h in range(4)},
    "needle": {
        "L5-needle-rows": lambda tok, s: {5: xattention(needle_rows(tok, s))},
        "L5-other-rows": lambda tok, s: {5: xattention(needle_rows(tok, s), invert=True)},
    },
}


def main(experiment: str, samples: str, out_path: str) -> None:
    configs = EXPERIMENTS[experiment]
    model, tokenizer = load_model("gemma3-270m", device="cpu")
    model.eval()
    generator = SampleGenerator(tokenizer, chat_template=None, base_seed=42)
    with open(out_path, "a") as out:
        for index in (int(x) for x in samples.split(",")):
            sample = generator.generate("passkey", 8192, index)
            for name, config in configs.items():
                start = time.time()
                methods = config(tokenizer, sample)
                if methods is not None:
                    hf.apply(model, methods)
                try:
                    (prediction,), _ = _generate(model, tokenizer, [sample], torch.device("cpu"))
                finally:
                    hf.remove(model)
                record = {
                    "experiment": experiment, "sample": index, "config": name, "score": score(prediction, sample.references),
                    "prediction": prediction[:60], "seconds": round(time.time() - start),
                }  # fmt: skip
                line = json.dumps(record) + "\n"
                sys.stdout.write(line)
                out.write(line)
                out.flush()


if __name__ == "__main__":
    main(*sys.argv[1:4])
