"""Small launch helpers shared by the elementwise kernel wrappers (align, act, sum, quantize)."""

from __future__ import annotations

import os

import torch

__all__ = ["interpreting", "needs_fp32_store"]


def interpreting(t: torch.Tensor) -> bool:
    """Whether kernels launched on ``t`` run under the Triton interpreter (``TRITON_INTERPRET=1``
    or a CPU tensor, which only the interpreter can run)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or t.device.type == "cpu"


def needs_fp32_store(t: torch.Tensor) -> bool:
    """Whether a kernel must store fp32 and let torch cast into ``t``.

    The interpreter's fp32 -> bf16 and fp32 -> fp8 casts do not round to nearest even
    (bf16 truncates; fp8 loses the carry into the exponent at binade edges), so under the
    interpreter those outputs take an fp32 path: the kernel writes fp32, torch casts once.
    """
    return interpreting(t) and t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e4m3fnuz,
                                           torch.float8_e5m2)
