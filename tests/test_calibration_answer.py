"""Calibration on the answer's attention: ``head_statistics(rows="last")``, ``calibrate(statistic="answer_mass")``,
one threshold per layer (``per="layer"``), the ``density=tau:T`` target, ``rechoose`` from a report, and their CLI.

Independent references: float64 causal softmax over the last query rows with token masks built by indexing
(``test_calibration.exact_probs`` / ``token_mask``, not the library's ``token_visibility``), and thresholds chosen by
``choose_thresholds`` on head-averaged tables computed here.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import pytest
import torch

from test_calibration import TEXT, CharTokenizer, exact_probs, hook_capture_qk, pick, tiny_llama, token_mask
from xattention import XAttention
from xattention.calibration import calibrate, choose_thresholds, head_statistics, rechoose
from xattention.thresholds import load_thresholds, save_thresholds


def naive_answer_mass(q, k, candidates, *, stride, block_size, scale=None) -> torch.Tensor:
    """float64 [Hq, C]: mass the public method's mask keeps of the last min(b, Lq) query rows, batch-averaged."""
    lq, lk = q.shape[2], k.shape[2]
    rows = min(block_size, lq)
    probs = exact_probs(q, k, scale)[:, :, lq - rows :]
    out = []
    for tau in candidates:
        bm = XAttention(threshold=tau, stride=stride, block_size=block_size).estimate(q, k, scale=scale, backend="reference")
        tok = token_mask(bm.mask, block_size, lq, lk)[:, :, lq - rows :]
        out.append((probs * tok).sum(dim=-1).mean(dim=(0, 2)))
    return torch.stack(out, dim=-1)


@contextlib.contextmanager
def one_line_error(match: str) -> Iterator[pytest.ExceptionInfo[ValueError]]:
    """pytest.raises for a ValueError whose message is one line matching ``match``."""
    with pytest.raises(ValueError, match=match) as info:
        yield info
    assert "\n" not in str(info.value), str(info.value)


# ---------------------------------------------------------------------------------------------------------------------
# head_statistics(rows="last")
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "hq", "hkv", "lq", "lk", "block_size"),
    [
        (2, 4, 2, 75, 110, 16),  # Lq < Lk, neither a multiple of b: the last 16 rows span two block rows
        (1, 3, 3, 200, 200, 32),  # Lq % b = 8
        (2, 2, 1, 10, 50, 16),  # Lq < b: every row is a "last" row
        (1, 4, 1, 128, 128, 32),  # aligned: exactly the last block row
    ],
)
def test_last_rows_mass_matches_naive_fp64(batch, hq, hkv, lq, lk, block_size) -> None:
    torch.manual_seed(3)
    q = torch.randn(batch, hq, lq, 16) * 2
    k = torch.randn(batch, hkv, lk, 16) * 2
    cands = [0.5, 0.8, 0.9, 0.95, 1.0]
    dens_last, mass_last = head_statistics(
        {0: (q, k)}, candidates=cands, stride=4, block_size=block_size, scale=0.3, rows="last"
    )  # fmt: skip
    dens_all, mass_all = head_statistics({0: (q, k)}, candidates=cands, stride=4, block_size=block_size, scale=0.3)
    assert mass_last.shape == (1, hq, len(cands)) and mass_last.dtype == torch.float64
    expected = naive_answer_mass(q, k, cands, stride=4, block_size=block_size, scale=0.3)
    torch.testing.assert_close(mass_last[0], expected, atol=1e-5, rtol=0)
    # density is the whole mask's whatever rows the mass reads: exactly the default's
    assert torch.equal(dens_last, dens_all)
    assert torch.all(mass_last[..., -1] > 1 - 1e-5)  # tau = 1 keeps every visible block
    if lq <= block_size:  # every query is a last row: the two statistics agree
        torch.testing.assert_close(mass_last, mass_all, atol=1e-6, rtol=0)


def test_last_rows_mass_sees_what_the_question_reads() -> None:
    """A head whose last query block reads one far key block (a needle) while every other row attends uniformly: at a
    low tau the mean over all rows finds the head poorly served, the question's rows find everything they read kept."""
    torch.manual_seed(0)
    length, b, d = 256, 32, 16
    needle = torch.nn.functional.normalize(torch.randn(d), dim=0)
    k = 0.05 * torch.randn(1, 1, length, d)
    k[0, 0, 70] = 30 * needle  # key block 2
    q = 0.05 * torch.randn(1, 1, length, d)
    q[0, 0, length - b :] = 30 * needle
    cands = [0.5, 1.0]
    _, mass_all = head_statistics({0: (q, k)}, candidates=cands, stride=4, block_size=b)
    _, mass_last = head_statistics({0: (q, k)}, candidates=cands, stride=4, block_size=b, rows="last")
    assert mass_last[0, 0, 0] > 0.99  # the needle's block is kept for the question rows and holds their attention
    assert mass_all[0, 0, 0] < 0.8  # the uniform rows lose a quarter of theirs: mean mass would raise this head's tau


def test_rows_bad_value_is_a_one_line_error() -> None:
    q = torch.randn(1, 2, 32, 8)
    with one_line_error("rows must be one of all, last"):
        head_statistics({0: (q, q)}, candidates=[0.5], stride=4, block_size=16, rows="first")


# ---------------------------------------------------------------------------------------------------------------------
# calibrate(statistic=..., per=...) on a tiny random Llama
# ---------------------------------------------------------------------------------------------------------------------

CANDS = [0.5, 0.7, 0.8, 0.9, 0.95, 1.0]
KW = dict(stride=4, block_size=32, candidates=CANDS, samples=1, text=TEXT, progress=False, capture=hook_capture_qk)


def naive_answer_tables(model, lengths):
    """Per-length float64 answer-mass tables [L, Hq, C] of calibrate()'s text prompts, averaged over lengths."""
    tables = []
    for n in lengths:
        qk = hook_capture_qk(model, torch.tensor([CharTokenizer().encode(TEXT[: n - 1])]))
        tables.append(torch.stack([naive_answer_mass(*qk[i], CANDS, stride=4, block_size=32) for i in sorted(qk)]))
    return sum(tables) / len(tables)


def test_calibrate_answer_mass_uses_the_last_rows_tables() -> None:
    model = tiny_llama()
    thr, report = calibrate(model, CharTokenizer(), lengths=[96, 160], target="mass=0.9", statistic="answer_mass", **KW)
    expected = naive_answer_tables(model, [96, 160])
    torch.testing.assert_close(torch.tensor(report["tables"]["mass"], dtype=torch.float64), expected, atol=2e-5, rtol=0)
    assert report["statistic"] == "answer_mass" and report["per"] == "head"
    # the same hull search on that table: every head at its least density reaching 0.9 of the answer rows' mass
    density = torch.tensor(report["tables"]["density"], dtype=torch.float64)
    mass = torch.tensor(report["tables"]["mass"], dtype=torch.float64)
    torch.testing.assert_close(thr, choose_thresholds(density, mass, CANDS, min_mass=0.9))
    _, default = calibrate(model, CharTokenizer(), lengths=[96, 160], target="mass=0.9", **KW)
    assert default["statistic"] == "mass" and default["tables"]["density"] == report["tables"]["density"]


@pytest.mark.parametrize("statistic", ["mass", "answer_mass"])
def test_calibrate_per_layer_shares_one_threshold_and_round_trips(tmp_path, statistic) -> None:
    model = tiny_llama(num_layers=3)
    thr, report = calibrate(
        model, CharTokenizer(), lengths=[256], target="density=0.8", statistic=statistic, per="layer", **KW
    )  # fmt: skip
    assert thr.shape == (3, 4) and all(len(set(row)) == 1 for row in thr.tolist())
    density = torch.tensor(report["tables"]["density"], dtype=torch.float64)
    mass = torch.tensor(report["tables"]["mass"], dtype=torch.float64)
    # the head-averaged tables through the same search, one row per layer
    per_layer = choose_thresholds(density.mean(1, keepdim=True), mass.mean(1, keepdim=True), CANDS, density_budget=0.8)
    torch.testing.assert_close(thr, per_layer.expand(-1, 4))
    assert pick(density, thr, CANDS).mean().item() <= 0.8 + 1e-4
    assert report["per"] == "layer" and report["statistic"] == statistic
    path = tmp_path / "layer.json"
    save_thresholds(path, thr, model_name="tiny", metadata=report)
    torch.testing.assert_close(load_thresholds(path, num_layers=3, num_heads=4), thr)
    meta = json.loads(path.read_text())["metadata"]
    assert meta["statistic"] == statistic and meta["per"] == "layer" and meta["target"] == {"density": 0.8}


def test_density_of_a_global_tau_target() -> None:
    """density=tau:0.9 spends what one global tau=0.9 spends on the calibration prompts, and keeps at least its mass."""
    model = tiny_llama()
    for per in ("head", "layer"):
        thr, report = calibrate(
            model, CharTokenizer(), lengths=[256], target="density=tau:0.9", statistic="answer_mass", per=per, **KW
        )  # fmt: skip
        density = torch.tensor(report["tables"]["density"], dtype=torch.float64)
        mass = torch.tensor(report["tables"]["mass"], dtype=torch.float64)
        budget = density[..., CANDS.index(0.9)].mean().item()
        assert report["density_of_tau"] == 0.9
        assert report["target"]["density"] == pytest.approx(budget, abs=1e-5)
        assert pick(density, thr, CANDS).mean().item() <= budget + 1e-4
        # global tau = 0.9 is a feasible choice, so the chosen mass is at least its (up to the tables' rounding)
        assert pick(mass, thr, CANDS).mean().item() >= mass[..., CANDS.index(0.9)].mean().item() - 1e-4


def test_rechoose_from_a_report_matches_choosing_on_its_tables(tmp_path) -> None:
    model = tiny_llama()
    _, report = calibrate(model, CharTokenizer(), lengths=[160], target="mass=0.9", statistic="answer_mass", **KW)
    report = json.loads(json.dumps(report))  # as it comes back from the file
    density = torch.tensor(report["tables"]["density"], dtype=torch.float64)
    mass = torch.tensor(report["tables"]["mass"], dtype=torch.float64)
    same, again = rechoose(report, target="mass=0.9")
    torch.testing.assert_close(same, choose_thresholds(density, mass, CANDS, min_mass=0.9))
    assert again["rechosen"] and again["statistic"] == "answer_mass" and again["per_length"].keys() == {"160"}
    other, out = rechoose(report, target="density=tau:0.95", per="layer")
    budget = density[..., CANDS.index(0.95)].mean().item()
    assert pick(density, other, CANDS).mean().item() <= budget + 1e-9
    assert all(len(set(row)) == 1 for row in other.tolist()) and out["per"] == "layer"


def test_bad_statistic_per_and_targets_are_one_line_errors() -> None:
    model = tiny_llama()
    with one_line_error("statistic must be one of mass, answer_mass"):
        calibrate(model, CharTokenizer(), lengths=[96], statistic="answer", **KW)
    with one_line_error("per must be one of head, layer"):
        calibrate(model, CharTokenizer(), lengths=[96], per="group", **KW)
    with one_line_error(r"needs 0\.33 among the candidate"):
        calibrate(model, CharTokenizer(), lengths=[96], target="density=tau:0.33", **KW)
    with one_line_error("not a number"):
        calibrate(model, CharTokenizer(), lengths=[96], target="density=tau:high", **KW)
    with one_line_error(r"must lie in \(0, 1\]"):
        calibrate(model, CharTokenizer(), lengths=[96], target="density=tau:1.5", **KW)
    with one_line_error("not a report of xattention calibrate"):
        rechoose({"tables": {}}, target="mass=0.9")


# ---------------------------------------------------------------------------------------------------------------------
# xattention calibrate --statistic / --per / --from
# ---------------------------------------------------------------------------------------------------------------------


def test_cli_answer_mass_per_layer_and_rechoose(tmp_path, monkeypatch, capsys) -> None:
    import xattention.models
    from xattention import cli

    model = tiny_llama()
    monkeypatch.setattr(xattention.models, "load_model", lambda name, *, device=None, dtype=None: (model, CharTokenizer()))
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    first, second = tmp_path / "head.json", tmp_path / "layer.json"
    common = ["--stride", "4", "--block-size", "32", "--candidates", "0.5,0.9,0.95,1", "--no-progress"]
    rc = cli.main(
        ["calibrate", "--model", "tiny", "--lengths", "128", "--target", "density=tau:0.9", "--statistic", "answer_mass",
         "--out", str(first), "--samples", "1", "--text", str(text_file), *common]
    )  # fmt: skip
    assert rc == 0
    meta = json.loads(first.read_text())["metadata"]
    assert meta["statistic"] == "answer_mass" and meta["per"] == "head" and meta["density_of_tau"] == 0.9
    assert "per-head (answer_mass)" in capsys.readouterr().out
    # another target and per-layer from the same tables, without the model
    monkeypatch.setattr(xattention.models, "load_model", lambda *a, **k: pytest.fail("--from must not load the model"))
    rc = cli.main(["calibrate", "--from", str(first), "--target", "density=tau:0.95", "--per", "layer", "--out", str(second)])
    assert rc == 0
    doc = json.loads(second.read_text())
    assert doc["model"] == "tiny" and doc["metadata"]["from"] == str(first) and doc["metadata"]["per"] == "layer"
    assert doc["metadata"]["statistic"] == "answer_mass" and all(len(set(row)) == 1 for row in doc["thresholds"])
    # a statistic the file's tables are not of, a file without tables, an unknown statistic: one line, exit 2
    capsys.readouterr()
    assert cli.main(["calibrate", "--from", str(first), "--target", "mass=0.9", "--statistic", "mass", "--out", "x"]) == 2
    assert "are of statistic answer_mass" in capsys.readouterr().err
    (tmp_path / "bare.json").write_text(json.dumps({"format": "xattention-thresholds/1", "metadata": {}}))
    assert cli.main(["calibrate", "--from", str(tmp_path / "bare.json"), "--target", "mass=0.9", "--out", "x"]) == 2
    assert "no calibration tables" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["calibrate", "--target", "mass=0.9", "--out", "x", "--statistic", "answer"])
    assert exc.value.code == 2
