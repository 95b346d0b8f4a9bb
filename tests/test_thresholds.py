"""Thresholds files: exact float64 round trip, metadata, and a clear ValueError for every malformed input."""

from __future__ import annotations

import json

import pytest
import torch

from xattention import load_thresholds, save_thresholds
from xattention.thresholds import FORMAT


def test_round_trip_is_exact(tmp_path) -> None:
    values = torch.rand(5, 7, dtype=torch.float64) * 0.9 + 0.05
    values[0, 0] = 1.0
    values[0, 1] = 0.8  # a calibrated 0.8 must come back as 0.8, not float32's 0.800000011920929
    path = tmp_path / "sub" / "thr.json"
    save_thresholds(path, values, model_name="smollm2", metadata={"lengths": [1024, 2048], "target": 0.95})
    loaded = load_thresholds(path, num_layers=5, num_heads=7)
    assert loaded.dtype == torch.float64
    assert torch.equal(loaded, values)
    doc = json.loads(path.read_text())
    assert doc["format"] == FORMAT and doc["model"] == "smollm2"
    assert (doc["num_layers"], doc["num_heads"]) == (5, 7)
    assert doc["metadata"] == {"lengths": [1024, 2048], "target": 0.95}
    assert torch.equal(load_thresholds(path), values)  # no expected shape given: any shape


def test_shape_mismatch_names_both_shapes(tmp_path) -> None:
    path = tmp_path / "thr.json"
    save_thresholds(path, torch.full((3, 4), 0.9), model_name="m")
    with pytest.raises(ValueError, match=r"\[3, 4\].*\[30, 9\]"):
        load_thresholds(path, num_layers=30, num_heads=9)
    with pytest.raises(ValueError, match=r"\[3, 4\].*\[3, 5\]"):
        load_thresholds(path, num_heads=5)


def _write(tmp_path, doc) -> str:
    path = tmp_path / "bad.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


def _doc(**overrides):
    doc = {"format": FORMAT, "model": "m", "num_layers": 2, "num_heads": 2, "thresholds": [[0.5, 0.5], [0.5, 0.5]]}
    doc.update(overrides)
    return doc


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "format"),
        (_doc(format="other/1"), "format"),
        ({"format": FORMAT, "model": "m"}, "lacks"),
        (_doc(thresholds=[[0.5, 0.5], [0.5]]), "rectangular"),
        (_doc(thresholds=[]), "rectangular"),
        (_doc(thresholds=[[0.5, "x"], [0.5, 0.5]]), "rectangular"),
        (_doc(thresholds=[[0.5, 0.0], [0.5, 0.5]]), r"\(0, 1\]"),
        (_doc(thresholds=[[0.5, 1.5], [0.5, 0.5]]), r"\(0, 1\]"),
        (json.dumps(_doc(num_layers=1, num_heads=1, thresholds=[[float("nan")]])), "finite"),  # json writes NaN
        (_doc(num_layers=3), "declares"),
    ],
)
def test_malformed_files_raise(tmp_path, doc, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_thresholds(_write(tmp_path, doc))


def test_missing_file_raises_value_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        load_thresholds(tmp_path / "absent.json")


def test_binary_file_raises_value_error_naming_it(tmp_path) -> None:
    path = tmp_path / "model.gguf"  # e.g. a model file given where the thresholds belong
    path.write_bytes(b"GGUF\x03\x00\x00\x00\xff\xfe\x80")
    with pytest.raises(ValueError, match=f"thresholds file {path} is not UTF-8 text"):
        load_thresholds(path)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (torch.full((4,), 0.5), "num_layers, num_heads"),
        (torch.full((2, 2), 1.5), r"\(0, 1\]"),
        (torch.tensor([[0.5, float("nan")]]), r"\(0, 1\]"),
        (torch.ones(2, 2, dtype=torch.int64), "float"),
        (torch.full((2, 2), 0.5, device="meta"), "meta device"),  # was Tensor.item()'s RuntimeError
    ],
)
def test_save_rejects_bad_tensors(tmp_path, values, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        save_thresholds(tmp_path / "t.json", values, model_name="m")
