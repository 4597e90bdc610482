"""The ``hip`` backend (AMD ROCm): import-light entry-point target.

Runs the shared Triton sequence; the class and its platform probe live in
:mod:`moe_core.backends.hip.backend` (torch only at import; Triton and the kernels are
imported when a step first runs). Verified under the Triton interpreter only: no AMD GPU
has run it in this project's CI.
"""

from __future__ import annotations

from moe_core.backends.hip.backend import (AMD_CONFIG_KEYS, K_PADDING, HipBackend, HipPlatform,
                                           e4m3fn_to_e4m3fnuz, pad_weight_k, probe)

__all__ = ["HipBackend", "HipPlatform", "probe", "e4m3fn_to_e4m3fnuz", "pad_weight_k", "AMD_CONFIG_KEYS",
           "K_PADDING"]
