"""moe-core: a plugin-registry framework for the Mixture-of-Experts layer of LLM inference.

One sequence runs the fused-MoE forward (resolve config → align → gemm1 → activation →
gemm2 → combine); platform backends plug in through the ``moe_core.backends`` entry
points, hook plugins (LoRA, expert filtering) through ``moe_core.hooks``.

Importing this package loads no backend and compiles no kernel.
"""

from __future__ import annotations

from typing import Any

from moe_core import errors
from moe_core.align import moe_align_block_size
from moe_core.api import fused_experts
from moe_core.backend import PLUGIN_API_VERSION, Backend
from moe_core.config import override_config
from moe_core.hookspecs import hookimpl
from moe_core.plugins import BackendInfo, get_backend, list_backends, register_backend
from moe_core.routing import select_experts
from moe_core.runner import MoERunner
from moe_core.spec import ExpertWeights, MoELayer, QuantSpec

__all__ = [
    "Backend",
    "BackendInfo",
    "ExpertWeights",
    "MoELayer",
    "MoERunner",
    "PLUGIN_API_VERSION",
    "QuantSpec",
    "errors",
    "fused_experts",
    "get_backend",
    "hookimpl",
    "list_backends",
    "moe_align_block_size",
    "override_config",
    "register_backend",
    "select_experts",
]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("moe-core")
        except PackageNotFoundError:  # running from a source tree without install
            return "0+unknown"
    raise AttributeError(f"module 'moe_core' has no attribute {name!r}")
