"""Synthetic long-context q/k/v whose attention has the structure real LLM heads show.

Four components, each a separate subspace of the head dimension so their strengths are easy to reason about:

* **sink**: the first ``sink`` keys carry a direction every query shares (StreamingLLM's attention sink);
* **vertical**: ``verticals`` random key positions carry that direction too (MInference's vertical lines);
* **local** and **slash**: rotary features ``cos/sin(w (i - j))``: a low frequency makes nearby keys score high (local),
  a frequency with period ``slash_period`` makes keys at multiples of that offset score high (slash lines);
* the rest is Gaussian noise.

Each query head draws its own mix, so some heads are local, some vertical, some slash, as in real models.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["structured_qkv"]


def _rotary(positions: Tensor, freqs: Tensor) -> Tensor:
    angles = positions[:, None].float() * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)  # [L, 2F]


def structured_qkv(
    batch: int,
    q_heads: int,
    kv_heads: int,
    length: int,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    seed: int = 0,
    sink: int = 4,
    verticals: int = 32,
    slash_period: int = 997,
    strength: float = 8.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Return q ``[B, Hq, L, D]`` and k, v ``[B, Hkv, L, D]`` with sink, vertical, local and slash structure.

    Deterministic for a seed. ``head_dim`` must be >= 32 (8 dims per component plus noise). ``strength`` is the mean
    logit (in nats, after the ``1/sqrt(D)`` scale) by which a structured key beats the noise.
    """
    if head_dim < 32:
        raise ValueError(f"structured_qkv needs head_dim >= 32, got {head_dim}")
    # Built on the target device (a 256K-token CPU detour costs more than the benchmark); one seed, one device, one draw.
    gen = torch.Generator(device=device).manual_seed(seed)
    pos = torch.arange(length, device=device)
    q = torch.randn(batch, q_heads, length, head_dim, generator=gen, device=device) * 0.5
    k = torch.randn(batch, kv_heads, length, head_dim, generator=gen, device=device) * 0.5
    v = torch.randn(batch, kv_heads, length, head_dim, generator=gen, device=device)
    scale = math.sqrt(head_dim)

    # dims [0, 8): local (4 low frequencies), [8, 16): slash (4 harmonics of the slash period)
    local = _rotary(pos, torch.tensor([1 / 64, 1 / 128, 1 / 256, 1 / 512], device=device))
    slash = _rotary(pos, 2 * math.pi / slash_period * torch.arange(1, 5, device=device).float())
    # dims [16, 24): the shared "sink/vertical" direction
    special = torch.zeros(length, dtype=torch.bool, device=device)
    special[:sink] = True
    special[torch.randperm(length, generator=gen, device=device)[: min(verticals, length)]] = True

    for h in range(kv_heads):
        k[:, h, :, 0:8] += local * 1.5
        k[:, h, :, 8:16] += slash * 1.5
        k[:, h, :, 16:24] += special[:, None].float() * 2.0
    for h in range(q_heads):
        w = torch.rand(3, generator=gen, device=device)
        w = w / w.sum() * 3.0 * strength  # each head its own mix of local / slash / vertical strength
        # peak logits: 4 rotary pairs x 1.5 for local/slash, 8 dims x 2.0 for the special direction
        q[:, h, :, 0:8] += local * w[0] * scale / 6
        q[:, h, :, 8:16] += slash * w[1] * scale / 6
        q[:, h, :, 16:24] += w[2] * scale / 16
    return q.to(dtype), k.to(dtype), v.to(dtype)
