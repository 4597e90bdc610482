"""Small launch helpers shared by the kernel wrappers (gemm, align, act, sum, quantize, LoRA)."""

from __future__ import annotations

import os

import torch

from moe_core import envs

__all__ = ["cdiv", "interpreting", "needs_fp32_store", "next_power_of_2", "pdl_args"]


# Host-side grid arithmetic in plain Python: Triton 3.6 made ``triton.cdiv`` and
# ``triton.next_power_of_2`` constexpr functions whose host call costs microseconds each,
# and a forward computes about twenty of them.
def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ints (what ``triton.cdiv`` computes)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (0 for 0, as ``triton.next_power_of_2``)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


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


_PDL_DEVICES: dict[int, bool] = {}


def pdl_args(t: torch.Tensor) -> dict[str, bool]:
    """Launch arguments that turn on programmatic dependent launch for a kernel on ``t``'s
    device (see :mod:`moe_core.kernels._gdc`): ``PDL`` (the kernel's constexpr) and Triton's
    ``launch_pdl``, on NVIDIA sm_90+ outside the interpreter unless ``MOE_CORE_PDL=0``; else none."""
    if t.device.type != "cuda" or interpreting(t) or not envs.pdl():
        return {}
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    ok = _PDL_DEVICES.get(index)
    if ok is None:
        from moe_core.kernels._gdc import HAS_GDC

        ok = (HAS_GDC and getattr(torch.version, "hip", None) is None
              and torch.cuda.get_device_capability(index) >= (9, 0))
        _PDL_DEVICES[index] = ok
    return {"PDL": True, "launch_pdl": True} if ok else {}
