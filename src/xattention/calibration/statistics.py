"""Per (layer, head, candidate threshold): the block density XAttention's mask would have and the exact attention mass
it keeps, on captured post-RoPE ``q``/``k`` — over every query row, or over only the last block of query rows (the
prompt's question and answer prefix: the rows whose attention produces the answer)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validation import check_qkv
from ..block_mask import BlockMask
from ..kernels import resolve_backend, softmax_scale

__all__ = ["DEFAULT_CANDIDATES", "MASS_TOL", "ROWS", "check_candidates", "head_statistics"]

# Dense where XAttention's density changes fast (tau >= 0.9), coarse below; 1.0 keeps every block with a non-zero score
# and is the fallback for heads that no smaller tau serves.
DEFAULT_CANDIDATES: tuple[float, ...] = (
    0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.875, 0.9, 0.925, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 1.0,
)  # fmt: skip

# Masses equal up to float64 rounding of a float32 sum count as reaching the target (tau = 1 keeps mass 0.99999994).
MASS_TOL = 1e-6

# Which query rows the mass column averages over: every row, or the last block_size rows (see head_statistics).
ROWS: tuple[str, ...] = ("all", "last")


def check_candidates(candidates: Sequence[float]) -> list[float]:
    """``candidates`` as floats; ``ValueError`` unless they are distinct thresholds in ``(0, 1]``, at least one."""
    values = [float(c) for c in candidates]
    if not values:
        raise ValueError("candidates must hold at least one threshold")
    bad = [c for c in values if not 0.0 < c <= 1.0 or math.isnan(c)]
    if bad:
        raise ValueError(f"candidate thresholds must lie in (0, 1], got {bad}")
    if len(set(values)) != len(values):
        raise ValueError(f"candidate thresholds must be distinct, got {values}")
    return values


def _last_rows_block_mass(q: Tensor, k: Tensor, rows: int, block_size: int, scale: float | None) -> Tensor:
    """Exact causal softmax probability of the last ``rows`` queries per (block row, key block), float32
    ``[B, Hq, R, Kb]`` where block row ``0`` is the one holding query ``Lq - rows`` (queries aligned to the end of the
    keys; query head ``h`` reads K head ``h // (Hq // Hkv)``). Zero above the causal diagonal, so a kept block keeps
    exactly its entry."""
    bsz, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    b = block_size
    factor = softmax_scale(scale, d)
    q_last = q[:, :, lq - rows :].float().reshape(bsz, hkv, hq // hkv, rows, d)
    logits = torch.einsum("bhgtd,bhud->bhgtu", q_last, k.float()).reshape(bsz, hq, rows, lk) * factor
    positions = torch.arange(lk - rows, lk, device=q.device)  # the last rows' key positions
    future = torch.arange(lk, device=q.device)[None, :] > positions[:, None]
    probs = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
    kb = -(-lk // b)
    per_key_block = F.pad(probs, (0, kb * b - lk)).view(bsz, hq, rows, kb, b).sum(dim=-1)  # [B, Hq, rows, Kb]
    first = (lq - rows) // b
    block_row = torch.arange(lq - rows, lq, device=q.device) // b - first  # each row's block row, from 0
    out = per_key_block.new_zeros(bsz, hq, int(block_row[-1]) + 1, kb)
    return out.index_add_(2, block_row, per_key_block)


def _layer_statistics(
    q: Tensor,
    k: Tensor,
    candidates: Sequence[float],
    *,
    stride: int,
    block_size: int,
    backend: str,
    scale: float | None,
    rows: str,
) -> tuple[Tensor, Tensor]:
    """float64 ``(density [Hq, C], mass [Hq, C])`` for one layer, averaged over the batch."""
    from ..kernels import reference

    _, _, _, lq, lk, _ = check_qkv(q, k)
    if resolve_backend(backend, q.device) == "triton":
        from ..kernels import antidiagonal as scoring
        from ..kernels import select as selection
    else:
        scoring = selection = reference
    # Scores once per layer; only the cheap selection runs per candidate.
    scores = scoring.antidiagonal_block_scores(q, k, stride=stride, block_size=block_size, causal=True, scale=scale)
    if rows == "all":
        true = reference.true_block_scores(q, k, block_size=block_size, causal=True, scale=scale)
    else:  # only the last n <= block_size rows' probabilities, so no full attention matrix
        n = min(block_size, lq)
        last = _last_rows_block_mass(q, k, n, block_size, scale)  # [B, Hq, 1 or 2 block rows, Kb]
        first_row = (lq - n) // block_size
    density, mass = [], []
    for tau in candidates:
        keep = selection.select_blocks(scores, tau, q_len=lq, k_len=lk, block_size=block_size, causal=True)
        mask = BlockMask(keep, block_size, lq, lk, causal=True)
        density.append(mask.density_per_head().double().mean(dim=0))
        if rows == "all":
            # true_block_scores is zero above the causal diagonal, so no visibility mask is needed here
            mass.append(((true * keep).sum(dim=(-1, -2)).double() / lq).mean(dim=0))
        else:
            mass.append(((last * keep[:, :, first_row:]).sum(dim=(-1, -2)).double() / n).mean(dim=0))
    return torch.stack(density, dim=-1), torch.stack(mass, dim=-1)


def head_statistics(
    qk: Mapping[int, tuple[Tensor, Tensor]],
    *,
    candidates: Sequence[float],
    stride: int = 8,
    block_size: int = 128,
    backend: str = "auto",
    scale: float | Mapping[int, float] | None = None,
    rows: str = "all",
) -> tuple[Tensor, Tensor]:
    """Density and exact attention mass of XAttention's mask per (layer, head, candidate threshold).

    For each layer the antidiagonal block scores (:func:`xattention.kernels.reference.antidiagonal_block_scores`, or its
    Triton twin) and the exact block masses (:func:`~xattention.kernels.reference.true_block_scores`) are computed once;
    then, per candidate ``tau``, :func:`~xattention.kernels.reference.select_blocks` gives the mask, whose

    * density is the fraction of causally visible blocks kept (:meth:`BlockMask.density_per_head`), and
    * mass is the exact softmax probability inside kept blocks, averaged over the query rows that ``rows`` names
      (1.0 for the dense mask): ``"all"`` (default) every query; ``"last"`` only the last ``min(block_size, Lq)``
      queries — in a prompt that ends with its question (and a chat template's answer prefix) these are the rows whose
      attention produces the answer, so this mass measures what the answer reads rather than what the whole prefill
      reads. The density is the whole mask's in both cases: it is what the prefill costs.

    Both are averaged over the batch. Attention is causal with queries aligned to the end of the keys.

    Args:
        qk: ``{layer index: (q [B, Hq, Lq, D], k [B, Hkv, Lk, D])}``, post-RoPE (as
            :func:`xattention.integrations.hf.capture_qk` returns); every layer must have the same ``Hq``.
        candidates: thresholds ``tau`` in ``(0, 1]``, length ``C``.
        stride: antidiagonal stride ``S`` (default 8); block_size: ``b`` (default 128), ``b % S == 0``.
        backend: ``"auto"`` (Triton on a capable GPU, else the PyTorch reference), ``"reference"`` or ``"triton"``.
        scale: softmax scale, one for all layers or ``{layer: scale}`` (default ``1/sqrt(D)``).
        rows: ``"all"`` or ``"last"``, the query rows the mass averages over (see above).
    Returns:
        ``(density, mass)``, float64 ``[L, Hq, C]`` on the CPU, where row ``i`` is the ``i``-th layer of ``sorted(qk)``.
    """
    cands = check_candidates(candidates)
    if rows not in ROWS:
        raise ValueError(f"rows must be one of {', '.join(ROWS)}, got {rows!r}")
    if not qk:
        raise ValueError("qk is empty: no attention layer was captured")
    if not isinstance(stride, int) or stride <= 0 or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"stride and block_size must be positive ints, got stride={stride!r}, block_size={block_size!r}")
    if block_size % stride != 0:
        raise ValueError(f"block_size ({block_size}) must be a multiple of stride ({stride})")
    densities, masses = [], []
    num_heads: int | None = None
    for layer in sorted(qk):
        q, k = qk[layer]
        _, hq, _, _, _, _ = check_qkv(q, k)
        if q.is_meta:  # statistics are values: a meta tensor has none (it failed copying the tables to the CPU)
            raise ValueError(f"layer {layer}: q and k are on the meta device; calibration needs their values")
        if num_heads is not None and hq != num_heads:
            raise ValueError(f"layer {layer} has {hq} query heads but earlier layers have {num_heads}")
        num_heads = hq
        layer_scale = scale.get(layer) if isinstance(scale, Mapping) else scale
        d, m = _layer_statistics(
            q, k, cands, stride=stride, block_size=block_size, backend=backend, scale=layer_scale, rows=rows
        )  # fmt: skip
        densities.append(d.cpu())
        masses.append(m.cpu())
    return torch.stack(densities), torch.stack(masses)
