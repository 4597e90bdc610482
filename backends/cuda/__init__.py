"""The ``cuda`` backend (NVIDIA GPUs): import-light entry-point target.

Runs the shared Triton kernel sequence (:class:`moe_core.kernels.backend.TritonBackend`);
this module only describes the backend and probes the platform. Triton and the kernels
are imported when a step first runs.
"""

from __future__ import annotations

from typing import Any

import torch

from moe_core.backend import package_config_dirs
from moe_core.kernels.backend import TritonBackend

__all__ = ["CudaBackend"]


class CudaBackend(TritonBackend):
    """NVIDIA CUDA through the shared Triton kernels (TMA predicate: sm90+, fp8: sm89+)."""

    name = "cuda"
    platform = "cuda"
    priority = 100
    fp8_dtype = torch.float8_e4m3fn
    fp8_min_capability = (8, 9)
    #: Measured on the H200 (benchmarks/NOTES.md, attempts 6 and 11): fusing the activation into
    #: gemm1 saves 3-12% from M = 1 to 1024; at the prefill tiles the fused kernel matches or
    #: beats the GEMM plus the activation kernel once gemm1 is tuned fused (``moe-core tune``
    #: times gemm1 with its activation), so every tile fuses.
    fuse_activation = True

    def uses_weight_tma(self, config: dict[str, Any], quant: Any, activation: Any) -> bool:
        """Weight tiles through TMA on sm90+ for bf16/fp16 weights at one-block decode tiles
        (``BLOCK_SIZE_M`` 16) and at prefill tiles of at least 128 × 128 weight rows; measured
        on the H200 (benchmarks/NOTES.md, attempts 21 and 23): 2-13% faster there, slower at
        the 32-row and 64-row-box tiles of the tables and for fp8."""
        from moe_core.kernels.gemm import weight_box_rows

        if quant.scheme != "none":
            return False
        bm = config["BLOCK_SIZE_M"]
        return (bm == 16 or (bm >= 128 and weight_box_rows(config, activation) >= 128)) and self.has_tma()

    def is_available(self) -> tuple[bool, str]:
        if getattr(torch.version, "hip", None):
            return False, f"torch is a ROCm build (HIP {torch.version.hip}); use the 'hip' backend"
        if not torch.cuda.is_available():
            return False, "torch sees no CUDA device"
        if torch.cuda.device_count() == 0:
            return False, "torch reports CUDA but no device is visible (CUDA_VISIBLE_DEVICES?)"
        return True, f"CUDA device {torch.cuda.get_device_name()}"

    # -- config data -----------------------------------------------------------------
    @property
    def device_aliases(self) -> tuple[str, ...]:  # type: ignore[override]
        """Hopper siblings: an H200 (same SM, more bandwidth) falls back to the H100 tables."""
        name = self.device_name()
        if name.startswith("NVIDIA_H200") or name.startswith("NVIDIA_H100"):
            return tuple(n for n in ("NVIDIA_H200", "NVIDIA_H100_80GB_HBM3") if n != name)
        return ()

    def config_dirs(self) -> list[Any]:
        """The shipped tables, ``configs/triton_X_Y_Z/`` inside this package."""
        return list(package_config_dirs("moe_core.backends.cuda"))
