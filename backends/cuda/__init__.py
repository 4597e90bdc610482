"""The ``cuda`` backend (NVIDIA GPUs): import-light entry-point target.

Runs the shared Triton kernel sequence; this module only describes the backend and
probes the platform. Kernels are imported when a step first runs.
"""

from __future__ import annotations

import torch

from moe_core.backend import Backend

__all__ = ["CudaBackend"]


class CudaBackend(Backend):
    """NVIDIA CUDA through the shared Triton kernels."""

    name = "cuda"
    platform = "cuda"
    priority = 100

    def is_available(self) -> tuple[bool, str]:
        if getattr(torch.version, "hip", None):
            return False, f"torch is a ROCm build (HIP {torch.version.hip}); use the 'hip' backend"
        if not torch.cuda.is_available():
            return False, "torch sees no CUDA device"
        return False, "the Triton kernel sequence is not built yet"
