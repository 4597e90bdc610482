"""``XpuBackend``: Intel GPUs (``torch.xpu``) through the shared Triton kernels, as declared
data and predicates.

Nothing here re-implements a step of the sequence. What differs from CUDA:

- **detection**: ``torch.xpu.is_available()`` with a visible device; tensors live on ``xpu``;
- **config keys**: ``grf_mode`` (the register-file size of Intel's Triton backend) besides
  the base keys;
- **defaults**: the shared SEMANTICS §5.5 table; tiles of 64×64 and more ask for
  ``grf_mode="large"`` (256 registers per thread, fewer spills on big accumulators);
- **no fp8** (its Triton dot path is not verified here), **no TMA**, no shared-memory clamp;
- config files are named after ``torch.xpu.get_device_name()``.

The platform probe (:func:`probe`) returns a frozen :class:`XpuPlatform`; ``XpuBackend(probe=...)``
replaces it (tests run the whole forward of a pretend Intel GPU on CPU under the interpreter).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import torch

from moe_core.backend import BASE_CONFIG_KEYS, Backend, package_config_dirs
from moe_core.kernels.backend import TritonBackend, interpreting

__all__ = ["XpuBackend", "XpuPlatform", "probe", "INTEL_CONFIG_KEYS", "LARGE_GRF_TILE"]

#: Intel-only Triton compile options an XPU config may carry (SEMANTICS §5.1)
INTEL_CONFIG_KEYS = frozenset({"grf_mode"})
#: ``BLOCK_SIZE_M · BLOCK_SIZE_N`` from which the defaults ask for the large register file
LARGE_GRF_TILE = 64 * 64


@dataclasses.dataclass(frozen=True)
class XpuPlatform:
    """What the XPU probe found."""

    #: whether this torch has an ``xpu`` device module at all
    has_xpu: bool
    #: visible devices
    device_count: int = 0
    #: ``torch.xpu.get_device_name()`` ("Intel(R) Data Center GPU Max 1550")
    device_name: str = ""
    #: why the probe says what it says
    note: str = ""


def probe() -> XpuPlatform:
    """Look at the real platform. Never raises; a failure is recorded in ``note``."""
    xpu = getattr(torch, "xpu", None)
    if xpu is None:
        return XpuPlatform(False, note="this torch build has no torch.xpu")
    try:
        if not xpu.is_available():
            return XpuPlatform(True, note="torch.xpu.is_available() is False (no Intel GPU or driver)")
        count = xpu.device_count()
        if count == 0:
            return XpuPlatform(True, note="torch.xpu reports no visible device")
        return XpuPlatform(True, count, xpu.get_device_name(xpu.current_device()))
    except Exception as exc:  # noqa: BLE001 - the reason is kept, not swallowed
        return XpuPlatform(True, note=f"probing the XPU failed: {type(exc).__name__}: {exc}")


class XpuBackend(TritonBackend):
    """Intel XPU through the shared Triton kernels (``grf_mode`` config key, no fp8, no TMA)."""

    name = "xpu"
    platform = "xpu"
    priority = 100
    config_keys = BASE_CONFIG_KEYS | INTEL_CONFIG_KEYS
    fp8_min_capability = None

    def __init__(self, probe: Callable[[], XpuPlatform] | None = None) -> None:
        self._probe = probe if probe is not None else globals()["probe"]

    @functools.cached_property
    def platform_info(self) -> XpuPlatform:
        """The probe's answer, asked once per instance."""
        return self._probe()

    # -- capability ------------------------------------------------------------------
    def is_available(self) -> tuple[bool, str]:
        info = self.platform_info
        if info.device_count == 0:
            return False, info.note
        where = "under the Triton interpreter (CPU tensors)" if interpreting() else f"{info.device_count} device(s)"
        return True, f"Intel GPU {info.device_name or '?'}, {where}"

    def supports_fp8(self) -> tuple[bool, str]:
        return False, "backend 'xpu' has no fp8 w8a8 (its Triton fp8 dot path is not verified); use int8 or weight-only"

    def device(self) -> torch.device:
        if interpreting() or self.platform_info.device_count == 0:
            return torch.device("cpu")
        return torch.device("xpu", torch.xpu.current_device())

    def capability(self) -> tuple[int, int] | None:
        """None: Intel GPUs have no CUDA compute capability."""
        return None

    # -- device facts ------------------------------------------------------------------
    def device_name(self) -> str:
        return self.platform_info.device_name.replace(" ", "_")

    def config_dirs(self) -> list[Any]:
        return list(package_config_dirs("moe_core.backends.xpu"))

    def has_tma(self) -> bool:
        return False

    def shared_memory_limit(self) -> int | None:
        return None

    def default_config(self, M: int, E: int, N: int, K: int, top_k: int, dtype: str | None,
                       block_shape: tuple[int, int] | None, *, deterministic: bool = False) -> dict[str, Any]:
        """The shared §5.5 table; big tiles ask for the large register file."""
        config = Backend.default_config(self, M, E, N, K, top_k, dtype, block_shape, deterministic=deterministic)
        if not deterministic and config["BLOCK_SIZE_M"] * config["BLOCK_SIZE_N"] >= LARGE_GRF_TILE:
            config["grf_mode"] = "large"
        return config
