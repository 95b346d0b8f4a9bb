"""Kernels: Triton implementations, each beside its plain-PyTorch twin in :mod:`.reference`.

Nothing here imports Triton at import time; :func:`resolve_backend` picks an implementation from the inputs' device.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os

import torch

__all__ = [
    "BACKENDS",
    "capability",
    "fa4_available",
    "fa4_usable",
    "resolve_backend",
    "softmax_scale",
    "tma_usable",
    "triton_usable",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "triton", "flex", "fa4")


def softmax_scale(scale: float | None, head_dim: int) -> float:
    """The attention score scale: ``scale`` when given, else ``1 / sqrt(head_dim)``."""
    return scale if scale is not None else 1.0 / math.sqrt(head_dim)


# Constants for one process: torch.compile reads them once instead of tracing into importlib / the CUDA driver.
@torch.compiler.assume_constant_result
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@torch.compiler.assume_constant_result
def _capability_number(index: int) -> int:  # an int, not a tuple: dynamo compares constant ints, not constant tuples
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def capability(device: torch.device) -> int:
    """Compute capability of a CUDA ``device`` as one int, ``10 * major + minor`` (90 for Hopper)."""
    return _capability_number(device.index if device.index is not None else torch.cuda.current_device())


def triton_usable(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices of compute capability >= 8.0, or anywhere under ``TRITON_INTERPRET=1``."""
    if not _installed("triton"):
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return device.type == "cuda" and capability(device) >= 80


def tma_usable(*tensors: torch.Tensor) -> bool:
    """Bulk tensor copies (TMA) need compute capability >= 9.0, 16-bit data, 16-byte aligned bases and strides."""
    t = tensors[0]
    if t.device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if capability(t.device) < 90 or t.element_size() != 2:
        return False
    return all(x.data_ptr() % 16 == 0 and x.stride(-1) == 1 and all(st * 2 % 16 == 0 for st in x.stride()[:-1]) for x in tensors)


@torch.compiler.assume_constant_result  # on a plain function: dynamo does not honour it on a functools.cache wrapper
def fa4_available() -> bool:
    """``flash_attn.cute`` (package ``flash-attn-4``) can be imported."""
    return _fa4_importable()


@functools.cache
def _fa4_importable() -> bool:
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        from flash_attn.cute import flash_attn_func  # noqa: F401
    except Exception as exc:  # a broken or partial install must not break the library: Triton takes over
        logger.info("flash_attn.cute present but not importable (%s): FlashAttention-4 backend off", exc)
        return False
    return True


def fa4_usable(device: torch.device) -> bool:
    """FlashAttention-4 runs on ``device``: CUDA compute capability 9.x-11.x and ``flash_attn.cute`` importable."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return capability(device) // 10 in (9, 10, 11) and fa4_available()


def resolve_backend(backend: str, device: torch.device, supported: tuple[str, ...] = ("reference", "triton")) -> str:
    """Map ``backend`` (one of :data:`BACKENDS`) to a concrete one that ``supported`` lists, for tensors on ``device``.

    ``"auto"`` is FlashAttention-4 where ``supported`` lists it and :func:`fa4_usable`, else Triton on a CUDA GPU of
    capability >= 8.0 (not under the interpreter, which is for tests), else the reference. An explicit backend that
    cannot run raises ``ValueError``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        on_gpu = device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
        if "fa4" in supported and on_gpu and fa4_usable(device):
            return "fa4"
        return "triton" if "triton" in supported and on_gpu and triton_usable(device) else "reference"
    if backend not in supported:
        raise ValueError(f"backend {backend!r} is not available here; choose one of {('auto', *supported)}")
    if backend == "triton" and not triton_usable(device):
        raise ValueError(
            f"backend='triton' needs a CUDA GPU with compute capability >= 8.0 and the triton package "
            f"(or TRITON_INTERPRET=1); got device {device}"
        )
    if backend == "fa4" and not fa4_usable(device):
        raise ValueError(
            f"backend='fa4' needs the flash-attn-4 package (pip install 'xattention[fa4]') and a CUDA GPU of compute "
            f"capability 9.x-11.x; got device {device}"
        )
    if backend == "flex" and device.type != "cuda":
        raise ValueError(f"backend='flex' (torch FlexAttention) needs a CUDA device, got {device}")
    return backend
