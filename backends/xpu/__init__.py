"""The ``xpu`` backend (Intel GPUs): import-light entry-point target.

Runs the shared Triton sequence; the class and its platform probe live in
:mod:`moe_core.backends.xpu.backend` (torch only at import; Triton and the kernels are
imported when a step first runs). Verified under the Triton interpreter only: no Intel GPU
has run it in this project's CI.
"""

from __future__ import annotations

from moe_core.backends.xpu.backend import INTEL_CONFIG_KEYS, XpuBackend, XpuPlatform, probe

__all__ = ["XpuBackend", "XpuPlatform", "probe", "INTEL_CONFIG_KEYS"]
