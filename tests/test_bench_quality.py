"""Quality benchmark on q/k captured from a tiny random Llama (no download), block size 32: masses checked against a
dense softmax over token masks, the oracle reaches its threshold, density grows with each knob, JSON and PNG written."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

import xattention as xa
from xattention.benchmarks import quality

transformers = pytest.importorskip("transformers")

BLOCK, SEQ = 32, 300  # 10 blocks, the last one ragged
SWEEPS = (
    ("xattention S=8", "xattention:stride=8,threshold={}", "threshold", (0.5, 0.9, 0.99)),
    ("vertical_slash", "vertical_slash:threshold={}", "threshold", (0.5, 0.9, 0.99)),
    ("flexprefill", "flexprefill:gamma={}", "gamma", (0.5, 0.9, 0.99)),
    ("streaming", "streaming:sink_blocks=1,local_blocks={}", "local_blocks", (1, 2, 4)),
    ("oracle", "oracle:threshold={}", "threshold", (0.5, 0.8, 0.9, 0.99)),
)


@pytest.fixture(scope="module")
def qk() -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    from xattention.integrations.hf import capture_qk

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # peaked attention, so the methods' selections differ
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(6.0)
    ids = torch.randint(1, 128, (1, SEQ), generator=torch.Generator().manual_seed(1))
    return capture_qk(model, ids)


@pytest.fixture(scope="module")
def points(qk) -> list[dict]:
    return quality.sweep(qk, SWEEPS, block_size=BLOCK)


def _probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Independent reference: float64 causal softmax ``[B, Hq, L, L]`` (Lq == Lk here)."""
    g = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(g, dim=1).double()
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), kk) / math.sqrt(q.shape[-1])
    causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


def _dense_mass(q: torch.Tensor, k: torch.Tensor, mask: xa.BlockMask) -> float:
    """Softmax probability summed where the token-level mask keeps the key, averaged over queries."""
    return float((_probs(q, k) * mask.to_token_mask()).sum(dim=-1).mean())


def test_masses_match_dense_softmax(qk, points) -> None:
    assert len(points) == sum(len(s[3]) for s in SWEEPS)
    for p in points:
        method = xa.method_from_spec(p["spec"], min_seq_len=0, block_size=BLOCK)
        for i, (q, k) in enumerate(qk.values()):
            mask = method.estimate(q, k)
            assert p["layer_mass"][i] == pytest.approx(_dense_mass(q, k, mask), abs=1e-5), p["spec"]
            assert p["layer_density"][i] == pytest.approx(mask.density())
        assert p["mass"] == pytest.approx(sum(p["layer_mass"]) / len(qk))


def test_oracle_reaches_threshold_and_ranges(points) -> None:
    for p in points:
        assert 0.0 < p["density"] <= 1.0 and 0.0 <= p["mass"] <= 1.0 + 1e-6, p
        if p["curve"] == "oracle":
            assert min(p["layer_mass"]) >= p["value"] - 1e-5, p


def test_no_method_beats_top_blocks_per_row(qk, points) -> None:
    """The exact form of "oracle as ceiling": per query-block row, the n highest-mass blocks keep at least as much
    mass as any method keeping n blocks there (the oracle's rule, scored here with a dense softmax)."""
    for p in points:
        method = xa.method_from_spec(p["spec"], min_seq_len=0, block_size=BLOCK)
        for q, k in qk.values():
            mask = method.estimate(q, k).mask
            probs = _probs(q, k)
            pad = 10 * BLOCK - SEQ
            blocks = torch.nn.functional.pad(probs, (0, pad, 0, pad)).unflatten(-1, (10, BLOCK)).sum(-1)
            blocks = blocks.unflatten(-2, (10, BLOCK)).sum(-2)  # [B, H, Qb, Kb]
            kept = (blocks * mask).sum(-1)
            best = blocks.sort(dim=-1, descending=True).values.cumsum(-1)
            n = mask.sum(-1).clamp(min=1)
            ceiling = best.gather(-1, (n - 1)[..., None])[..., 0]
            assert bool((kept <= ceiling + 1e-9).all()), p["spec"]


def test_density_monotone_in_knob(points) -> None:
    for curve, _, _, values in SWEEPS:
        dens = [next(p["density"] for p in points if p["curve"] == curve and p["value"] == v) for v in values]
        assert dens == sorted(dens), (curve, dens)
        # at 10 blocks the vertical-slash covers (also FlexPrefill's) already span every block at 0.5: only nondecreasing
        if curve not in ("vertical_slash", "flexprefill"):
            assert dens[0] < dens[-1], (curve, dens)


def test_main_writes_json_and_png(tmp_path, monkeypatch, points, capsys) -> None:
    record = {"benchmark": "quality", "model": "tiny", "length": SEQ, "device": "cpu", "block_size": BLOCK, "seconds": 0.0,
              "prompts": [{"task": "random", "index": 0, "seed": 1, "tokens": SEQ}], "points": points}  # fmt: skip
    monkeypatch.setattr(quality, "run", lambda *a, **kw: record)
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    args = parser.parse_args(["--model", "tiny", "--length", str(SEQ), "--prompts", "1", "--device", "cpu",
                              "--out", str(tmp_path)])  # fmt: skip
    assert quality.main(args) == 0
    saved = json.loads((tmp_path / "quality-tiny-cpu.json").read_text())
    assert [p["spec"] for p in saved["points"]] == [p["spec"] for p in points]
    png = (tmp_path / "quality-tiny-cpu.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "oracle" in capsys.readouterr().out
