"""Input checks shared by every entry point: one place, one wording, always ``ValueError``."""

from __future__ import annotations

from torch import Tensor

from .block_mask import BlockMask

__all__ = ["check_block_mask", "check_qkv"]


def check_qkv(q: Tensor, k: Tensor, v: Tensor | None = None) -> tuple[int, int, int, int, int, int]:
    """Validate attention inputs and return ``(B, Hq, Hkv, Lq, Lk, D)``.

    Expects q ``[B, Hq, Lq, D]``, k and v ``[B, Hkv, Lk, D]`` on one device with one floating dtype, ``Hq`` a multiple of
    ``Hkv`` and ``Lq <= Lk`` (queries aligned to the end of the keys).
    """
    named = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must be 4-D [B, H, L, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    devices = {str(t.device) for t in named.values()}
    if len(devices) > 1:
        raise ValueError(f"q, k, v must be on one device, got {', '.join(f'{n}={t.device}' for n, t in named.items())}")
    dtypes = {t.dtype for t in named.values()}
    if len(dtypes) > 1:
        raise ValueError(f"q, k, v must share one dtype, got {', '.join(f'{n}={t.dtype}' for n, t in named.items())}")
    b, hq, lq, d = q.shape
    _, hkv, lk, dk = k.shape
    if k.shape[0] != b:
        raise ValueError(f"batch mismatch: q has {b}, k has {k.shape[0]}")
    if dk != d:
        raise ValueError(f"head-dim mismatch: q has D={d}, k has D={dk}")
    if v is not None and tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if hkv == 0 or hq == 0 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if lq == 0 or lk == 0:
        raise ValueError(f"sequence lengths must be positive, got Lq={lq}, Lk={lk}")
    if lq > lk:
        raise ValueError(f"Lq ({lq}) must not exceed Lk ({lk}): queries are aligned to the end of the keys")
    if b == 0 or d == 0:
        raise ValueError(f"batch and head dim must be positive, got B={b}, D={d}")
    return b, hq, hkv, lq, lk, d


def check_block_mask(mask: BlockMask, q: Tensor, k: Tensor) -> None:
    """Validate that ``mask`` is a :class:`BlockMask` for checked q ``[B, Hq, Lq, D]`` and k ``[B, Hkv, Lk, D]``: shape
    ``[B, Hq, ceil(Lq/b), ceil(Lk/b)]``, ``q_len == Lq``, ``k_len == Lk``, on q's device."""
    if not isinstance(mask, BlockMask):
        raise ValueError(f"mask must be an xattention.BlockMask, got {type(mask).__name__}")
    (bsz, hq, lq), lk = q.shape[:3], k.shape[2]
    expected = (bsz, hq, -(-lq // mask.block_size), -(-lk // mask.block_size))
    if mask.shape != expected or mask.q_len != lq or mask.k_len != lk:
        raise ValueError(
            f"BlockMask of shape {mask.shape} (q_len={mask.q_len}, k_len={mask.k_len}) does not fit q/k: "
            f"need shape {expected} with q_len={lq}, k_len={lk}"
        )
    if mask.mask.device != q.device:
        raise ValueError(f"BlockMask is on {mask.mask.device} but q is on {q.device}")
