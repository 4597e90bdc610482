"""Triton kernels of the fused-MoE sequence: public wrappers (check → allocate → launch) in
the public modules, ``@triton.jit`` code in the private ``_*.py`` modules.

Names are resolved lazily (module ``__getattr__``), so importing this package imports
neither Triton nor any kernel module; a kernel module that does not exist yet raises
``ImportError`` only when its name is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["activation", "grouped_gemm", "moe_align_block_size_triton", "moe_sum", "quantize_activation"]

#: public name -> the module that defines it
_WHERE = {
    "activation": "moe_core.kernels.act",
    "grouped_gemm": "moe_core.kernels.gemm",
    "moe_align_block_size_triton": "moe_core.kernels.align",
    "moe_sum": "moe_core.kernels.moe_sum",
    "quantize_activation": "moe_core.kernels.quantize",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        raise ImportError(f"moe_core.kernels.{name}: kernel module {module} is not available ({exc})") from exc
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
