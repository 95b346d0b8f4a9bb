"""BlockMask: visibility, density, index round trips, token masks and shape checks against hand-computed cases."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from naive import naive_token_mask, visible_columns
from xattention import BlockMask
from xattention.block_mask import block_indices, causal_block_bounds, forced_blocks, visible_blocks

# (q_len, k_len, block_size): square, chunked prefill with offsets that are / are not multiples of the block, ragged ends
GEOMETRIES = [(64, 64, 16), (50, 50, 16), (1, 1, 16), (1, 100, 16), (40, 100, 16), (48, 112, 16), (17, 300, 32), (300, 300, 32)]


def _hand_visible(q_len: int, k_len: int, block: int, causal: bool) -> torch.Tensor:
    qb, kb = -(-q_len // block), -(-k_len // block)
    out = torch.zeros(qb, kb, dtype=torch.bool)
    for r in range(qb):
        for c in visible_columns(r, q_len, k_len, block, causal):
            out[r, c] = True
    return out


@pytest.mark.parametrize(("q_len", "k_len", "block"), GEOMETRIES)
@pytest.mark.parametrize("causal", [True, False])
def test_visible_matches_token_level_definition(q_len: int, k_len: int, block: int, causal: bool) -> None:
    qb, kb = -(-q_len // block), -(-k_len // block)
    mask = BlockMask(torch.zeros(1, 1, qb, kb, dtype=torch.bool), block, q_len, k_len, causal)
    # a block is visible iff some (query i, key j) pair in it has j <= k_len - q_len + i
    want = torch.zeros(qb, kb, dtype=torch.bool)
    for i in range(q_len):
        for j in range(k_len):
            if not causal or j <= k_len - q_len + i:
                want[i // block, j // block] = True
    assert torch.equal(mask.visible(), want)
    assert torch.equal(want, _hand_visible(q_len, k_len, block, causal))


def test_causal_block_bounds_hand_cases() -> None:
    # Lq = Lk = 50, b = 16: rows hold queries 0-15, 16-31, 32-47, 48-49 -> diagonal blocks 0, 1, 2, 3
    lo, hi = causal_block_bounds(50, 50, 16)
    assert lo.tolist() == [0, 1, 2, 3] and hi.tolist() == [0, 1, 2, 3]
    # Lq = 40, Lk = 100, offset 60 (not a multiple of 16): row 0 holds key positions 60-75 -> blocks 3 and 4
    lo, hi = causal_block_bounds(40, 100, 16)
    assert lo.tolist() == [3, 4, 5] and hi.tolist() == [4, 5, 6]
    # offset 64 (a multiple): one diagonal block per row
    lo, hi = causal_block_bounds(48, 112, 16)
    assert lo.tolist() == hi.tolist() == [4, 5, 6]


def test_density_hand_computed() -> None:
    # Lq = Lk = 64, b = 16: 4 x 4 blocks, 10 causally visible (lower triangle with diagonal)
    m = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    m[0, 0, :, 0] = True  # 4 kept
    m[0, 0, 0, 3] = True  # above the diagonal: not visible, not counted
    m[1, 0] = torch.ones(4, 4, dtype=torch.bool).tril()  # all 10
    mask = BlockMask(m, 16, 64, 64)
    assert mask.density_per_head().flatten().tolist() == pytest.approx([0.4, 1.0])
    assert mask.density() == pytest.approx(0.7)
    # non-causal: 16 visible blocks
    nc = BlockMask(m, 16, 64, 64, causal=False)
    assert nc.density_per_head().flatten().tolist() == pytest.approx([5 / 16, 10 / 16])


def test_density_ragged_chunked_prefill() -> None:
    # Lq = 40, Lk = 100, b = 16: Qb = 3, Kb = 7; visible columns per row: 0-4, 0-5, 0-6 -> 5 + 6 + 7 = 18
    m = torch.zeros(1, 2, 3, 7, dtype=torch.bool)
    m[0, 0, :, 0] = True
    m[0, 1, 2, :] = True
    mask = BlockMask(m, 16, 40, 100)
    assert mask.visible().sum().item() == 18
    assert mask.density_per_head().flatten().tolist() == pytest.approx([3 / 18, 7 / 18])


@pytest.mark.parametrize(("q_len", "k_len", "block"), GEOMETRIES)
@pytest.mark.parametrize("causal", [True, False])
def test_full_keeps_exactly_the_visible_blocks(q_len: int, k_len: int, block: int, causal: bool) -> None:
    full = BlockMask.full(2, 3, block_size=block, q_len=q_len, k_len=k_len, causal=causal)
    assert full.shape == (2, 3, -(-q_len // block), -(-k_len // block))
    assert torch.equal(full.mask, _hand_visible(q_len, k_len, block, causal).expand(2, 3, -1, -1))
    assert full.density() == pytest.approx(1.0)


@pytest.mark.parametrize(("q_len", "k_len", "block"), GEOMETRIES)
@pytest.mark.parametrize("causal", [True, False])
def test_to_token_mask(q_len: int, k_len: int, block: int, causal: bool) -> None:
    qb, kb = -(-q_len // block), -(-k_len // block)
    m = torch.rand(2, 2, qb, kb) < 0.5
    tok = BlockMask(m, block, q_len, k_len, causal).to_token_mask()
    assert tok.shape == (2, 2, q_len, k_len) and tok.dtype == torch.bool
    for bi in range(2):  # loop check on one head, indexing helper on all
        for i in range(0, q_len, max(1, q_len // 7)):
            for j in range(k_len):
                want = bool(m[bi, 1, i // block, j // block]) and (not causal or j <= k_len - q_len + i)
                assert bool(tok[bi, 1, i, j]) == want
    assert torch.equal(tok, naive_token_mask(m, block, q_len, k_len, causal))


@pytest.mark.parametrize(("q_len", "k_len", "block"), GEOMETRIES)
@pytest.mark.parametrize("causal", [True, False])
def test_indices_round_trip(q_len: int, k_len: int, block: int, causal: bool) -> None:
    qb, kb = -(-q_len // block), -(-k_len // block)
    m = torch.rand(2, 3, qb, kb) < 0.4
    mask = BlockMask(m, block, q_len, k_len, causal)
    indices, counts = mask.to_indices()
    assert indices.dtype == torch.int32 and counts.dtype == torch.int32
    assert indices.shape == (2, 3, qb, kb) and counts.shape == (2, 3, qb)
    kept = m & _hand_visible(q_len, k_len, block, causal)  # blocks above the diagonal hold nothing and are dropped
    for bi in range(2):
        for h in range(3):
            for r in range(qb):
                cols = [c for c in range(kb) if kept[bi, h, r, c]]
                assert counts[bi, h, r].item() == len(cols)
                assert indices[bi, h, r].tolist() == cols + [kb] * (kb - len(cols))
    back = BlockMask.from_indices(indices, counts, block_size=block, q_len=q_len, k_len=k_len, causal=causal)
    assert torch.equal(back.mask, kept)
    assert (back.block_size, back.q_len, back.k_len, back.causal) == (block, q_len, k_len, causal)


def test_from_indices_ignores_entries_past_count_and_rejects_out_of_range() -> None:
    idx = torch.tensor([[[[2, 0, 9], [1, 1, 1]]]], dtype=torch.int32)  # [1, 1, 2, 3]; 9 lies past the count
    cnt = torch.tensor([[[2, 1]]], dtype=torch.int32)
    mask = BlockMask.from_indices(idx, cnt, block_size=16, q_len=32, k_len=64, causal=False)
    assert mask.mask[0, 0].tolist() == [[True, False, True, False], [False, True, False, False]]
    with pytest.raises(ValueError, match="outside"):
        BlockMask.from_indices(idx, torch.tensor([[[3, 1]]], dtype=torch.int32), block_size=16, q_len=32, k_len=64)
    with pytest.raises(ValueError, match="indices must be"):
        BlockMask.from_indices(idx[0], cnt, block_size=16, q_len=32, k_len=64)


def test_shape_validation() -> None:
    ok = torch.zeros(1, 1, 2, 4, dtype=torch.bool)
    BlockMask(ok, 16, 32, 64)
    with pytest.raises(ValueError, match="bool"):
        BlockMask(ok.float(), 16, 32, 64)
    with pytest.raises(ValueError, match="4-D"):
        BlockMask(ok[0], 16, 32, 64)
    with pytest.raises(ValueError, match="blocks but"):
        BlockMask(ok, 16, 33, 64)  # needs 3 query blocks
    with pytest.raises(ValueError, match="blocks but"):
        BlockMask(ok, 32, 32, 64)
    with pytest.raises(ValueError, match="must not exceed"):
        BlockMask(torch.zeros(1, 1, 4, 2, dtype=torch.bool), 16, 64, 32)
    with pytest.raises(ValueError, match="block_size"):
        BlockMask(ok, 0, 32, 64)
    with pytest.raises(ValueError, match="positive"):
        BlockMask(ok, 16, 0, 64)


def test_to_device_and_repr() -> None:
    mask = BlockMask.full(1, 2, block_size=16, q_len=40, k_len=40)
    moved = mask.to("cpu")
    assert torch.equal(moved.mask, mask.mask) and moved.q_len == 40 and moved.causal
    assert "density=1.000" in repr(mask)


def test_meta_mask_density_is_one_clear_error() -> None:
    mask = BlockMask(torch.zeros(1, 2, 3, 3, dtype=torch.bool, device="meta"), 16, 48, 48)
    with pytest.raises(ValueError, match="meta"):
        mask.density()
    assert "density=meta" in repr(mask)


@pytest.mark.parametrize(("q_len", "k_len", "block"), GEOMETRIES)
@pytest.mark.parametrize("causal", [True, False])
def test_geometry_of_any_rows_is_the_full_geometrys_rows(q_len: int, k_len: int, block: int, causal: bool) -> None:
    """``rows=`` picks rows out of the full geometry (a rank's query blocks in context-parallel selection)."""
    full_vis, full_forced = visible_blocks(q_len, k_len, block, causal=causal), forced_blocks(q_len, k_len, block)
    assert full_vis.shape == full_forced.shape == (-(-q_len // block), -(-k_len // block))
    rows = torch.tensor([r for r in range(full_vis.shape[0]) if r % 2 == 0][::-1])  # any order, any subset
    assert torch.equal(visible_blocks(q_len, k_len, block, rows=rows, causal=causal), full_vis[rows])
    assert torch.equal(forced_blocks(q_len, k_len, block, rows=rows), full_forced[rows])
    lo, hi = causal_block_bounds(q_len, k_len, block)
    for r in range(full_forced.shape[0]):  # the sink and the diagonal blocks, nothing else
        want = {0, *range(int(lo[r]), int(hi[r]) + 1)}
        assert set(torch.nonzero(full_forced[r]).flatten().tolist()) == want


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (1, 2, 4, 33)])
def test_block_indices_lists_kept_columns_ascending(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    mask = torch.rand(shape) < 0.4
    indices, counts = block_indices(mask)
    assert indices.dtype == counts.dtype == torch.int32 and indices.shape == mask.shape
    kb = shape[-1]
    for row, cnt, kept in zip(indices.view(-1, kb).tolist(), counts.flatten().tolist(), mask.view(-1, kb), strict=True):
        cols = torch.nonzero(kept).flatten().tolist()
        assert cnt == len(cols) and row == cols + [kb] * (kb - len(cols))


def test_flex_backend_imports_without_triton() -> None:
    """FlexAttention is torch's: its launcher must not need the Triton kernels module (triton hidden here)."""
    code = "import sys; sys.modules['triton'] = None; import xattention.kernels.flex"
    subprocess.run([sys.executable, "-c", code], check=True)
