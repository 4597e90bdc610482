"""The combine (SEMANTICS §9) as a Triton kernel: check, launch.

``out[m] = scale · Σ_j down[m, j]`` summed in fp32 (ascending ``j``), cast once. One
kernel for every ``k`` and every ``M``, so it is the deterministic path too; every call
applies ``scale`` (R4).
"""

from __future__ import annotations

import logging
import sys
import types

import torch

from moe_core.errors import MoEInputError, MoETypeError
from moe_core.kernels._launch import cdiv, needs_fp32_store, next_power_of_2, pdl_args
from moe_core.kernels._sum import _moe_sum_kernel

__all__ = ["moe_sum"]

logger = logging.getLogger(__name__)

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def moe_sum(down: torch.Tensor, out: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Sum the ``k`` expert outputs of each token, times ``scale``.

    :param down: [M, k, H] expert outputs (last dim contiguous; any row / slot strides).
    :param out: [M, H] output, written in place (may be ``x`` under ``inplace``).
    :param scale: ``routed_scaling_factor`` (1.0 when the layer has none).
    :returns: ``out``.
    """
    if not isinstance(down, torch.Tensor) or down.dim() != 3:
        raise MoEInputError(f"down: expected a 3-D [M, k, H] tensor, got "
                            f"{list(down.shape) if isinstance(down, torch.Tensor) else type(down).__name__}")
    M, k, H = down.shape
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (M, H):
        raise MoEInputError(f"out: expected shape [{M}, {H}], got "
                            f"{list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    for name, t in (("down", down), ("out", out)):
        if t.dtype not in _FLOATS:
            raise MoETypeError(f"{name}: expected float16, bfloat16 or float32, got {t.dtype}")
        if t.numel() and t.stride(-1) != 1:
            raise MoEInputError(f"{name}: the last dim must be contiguous, got strides {t.stride()}")
    if out.device != down.device:
        raise MoEInputError(f"out: expected device {down.device}, got {out.device}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise MoETypeError(f"scale: expected a float, got {type(scale).__name__}")
    if M == 0 or H == 0:
        return out
    target = torch.empty(out.shape, dtype=torch.float32, device=out.device) if needs_fp32_store(out) else out
    block_h = min(next_power_of_2(H), 1024)
    block_m = max(1, min(next_power_of_2(M), 2048 // block_h))
    grid = (cdiv(M, block_m), cdiv(H, block_h))
    _moe_sum_kernel[grid](down, target, M, H, k, float(scale), down.stride(0), down.stride(1), target.stride(0),
                          BLOCK_M=block_m, BLOCK_H=block_h, num_warps=4, **pdl_args(target))
    if target is not out:
        out.copy_(target)
    return out


class _CallableModule(types.ModuleType):
    """This module is also the package attribute ``moe_core.kernels.moe_sum`` once imported
    (submodule and function share the name); calling it calls :func:`moe_sum`."""

    def __call__(self, down: torch.Tensor, out: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return moe_sum(down, out, scale)


sys.modules[__name__].__class__ = _CallableModule
