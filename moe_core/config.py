"""Kernel configs: which ``BLOCK_SIZE_*``/``num_warps``/``num_stages`` each GEMM launches with.

Lookup order (SEMANTICS §5.3): ``override_config`` → deterministic default → tuned
files → the backend's default heuristics. This first version has the override, the
deterministic switch and the defaults; tuned-file lookup arrives with the config issue.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import attrs
import torch

from moe_core import envs
from moe_core.errors import ConfigError

if TYPE_CHECKING:
    from moe_core.backend import Backend
    from moe_core.spec import QuantSpec

__all__ = ["override_config", "get_override", "default_heuristics", "resolve_configs", "Resolved"]

logger = logging.getLogger(__name__)

_OVERRIDE: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "moe_core_override_config", default=None)


@contextlib.contextmanager
def override_config(config: Mapping[str, Any]) -> Iterator[None]:
    """Use ``config`` for both GEMMs of every forward inside the ``with`` block.

    Restored on exit, also when the block raises. ``BLOCK_SIZE_*`` must be powers of two >= 16.
    """
    checked = check_config(dict(config), source="override_config")
    token = _OVERRIDE.set(checked)
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def get_override() -> dict[str, Any] | None:
    """The active ``override_config`` dict, or None."""
    return _OVERRIDE.get()


def check_config(config: dict[str, Any], *, source: str) -> dict[str, Any]:
    """Validate the block sizes of one config entry; raise ConfigError naming ``source``."""
    for key in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K"):
        if key not in config:
            raise ConfigError(f"{source}: config lacks {key}: {config}")
        value = config[key]
        if not isinstance(value, int) or value < 16 or value & (value - 1):
            raise ConfigError(f"{source}: {key} must be a power of two >= 16, got {value!r}")
    return config


def default_heuristics(M: int, E: int, dtype: str | None, block_shape: tuple[int, int] | None, *,
                       deterministic: bool = False) -> dict[str, Any]:
    """The default table of SEMANTICS §5.5 (CUDA numbers; backends adjust stages)."""
    if deterministic:
        return {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 8}
    if dtype == "fp8_w8a8" and block_shape is not None and all(block_shape):
        bn, bk = block_shape
        return {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "GROUP_SIZE_M": 32,
                "num_warps": 4, "num_stages": 3}
    if dtype == "fp8_w8a8":
        if M > E:
            return {"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 256, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 32,
                    "num_warps": 8, "num_stages": 4}
        return {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1,
                "num_warps": 4, "num_stages": 4}
    if M > E:
        return {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 8}
    return {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1}


@attrs.frozen
class Resolved:
    """The outcome of config resolution for one forward."""

    config: dict[str, Any]
    down_config: dict[str, Any]
    why: dict[str, Any]


def _whitelist(backend: Backend, config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    kept = {k: v for k, v in config.items() if k in backend.config_keys}
    return kept, sorted(set(config) - set(kept))


def _clamp_block_k(config: dict[str, Any], quant: QuantSpec) -> dict[str, Any]:
    """Block quant: BLOCK_SIZE_K must divide bk (SEMANTICS §5.4)."""
    if quant.is_block:
        bk = quant.block_shape[1]
        while bk % config["BLOCK_SIZE_K"] and config["BLOCK_SIZE_K"] > 16:
            config["BLOCK_SIZE_K"] //= 2
    return config


def resolve_configs(backend: Backend, *, M: int, E: int, I: int, H: int, top_k: int,
                    act_dtype: torch.dtype, quant: QuantSpec, has_hooks: bool) -> Resolved:
    """Resolve the gemm1 and gemm2 configs for one forward; both share ``BLOCK_SIZE_M``."""
    dtype = quant.config_dtype(act_dtype)
    override = get_override()
    if override is not None:
        source = "override_config"
        up = dict(override)
        down = dict(override)
    else:
        det = envs.deterministic()
        source = "deterministic default" if det else "default"
        up = backend.default_config(M, E, 2 * I, H, top_k, dtype, quant.block_shape, deterministic=det)
        down = backend.default_config(M, E, H, I, top_k, dtype, quant.block_shape, deterministic=det)
    up = _clamp_block_k(dict(up), quant)
    down = _clamp_block_k(dict(down), quant)
    up.pop("USE_TMA", None)
    down.pop("USE_TMA", None)
    if down["BLOCK_SIZE_M"] != up["BLOCK_SIZE_M"]:
        down["BLOCK_SIZE_M"] = up["BLOCK_SIZE_M"]
    up, dropped_up = _whitelist(backend, up)
    down, dropped_down = _whitelist(backend, down)
    why = {"source": source, "gemm1": dict(up), "gemm2": dict(down),
           "dropped_keys": sorted(set(dropped_up) | set(dropped_down)), "dtype": dtype}
    return Resolved(config=up, down_config=down, why=why)
