"""Calibration on the answer's attention: ``head_statistics(rows="last")``.

Independent reference: float64 causal softmax over the last query rows with token masks built by indexing
(``test_calibration.exact_probs`` / ``token_mask``, not the library's ``token_visibility``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from test_calibration import exact_probs, token_mask
from xattention import XAttention
from xattention.calibration import head_statistics


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
