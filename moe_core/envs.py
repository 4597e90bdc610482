"""Every ``MOE_CORE_*`` environment variable, read in this one place.

Each accessor reads the environment at call time (never cached at import), so tests
and long-running servers see changes.
"""

from __future__ import annotations

import os

__all__ = [
    "backend",
    "plugins_allowlist",
    "disable_plugin_autoload",
    "strict_plugins",
    "config_dir",
    "debug",
    "deterministic",
    "pdl",
    "forward_state",
    "ENV_VARS",
]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def backend() -> str | None:
    """``MOE_CORE_BACKEND``: the backend name to use when none is passed. Default: unset (auto)."""
    value = os.environ.get("MOE_CORE_BACKEND", "").strip()
    return value or None


def plugins_allowlist() -> frozenset[str] | None:
    """``MOE_CORE_PLUGINS``: comma-separated entry-point names allowed to load
    (backends and hooks). Default: unset (all)."""
    value = os.environ.get("MOE_CORE_PLUGINS")
    if value is None or not value.strip():
        return None
    return frozenset(part.strip() for part in value.split(",") if part.strip())


def disable_plugin_autoload() -> bool:
    """``MOE_CORE_DISABLE_PLUGIN_AUTOLOAD=1``: load no entry points at all; only
    plugins registered in code exist. Default: off."""
    return _flag("MOE_CORE_DISABLE_PLUGIN_AUTOLOAD")


def strict_plugins() -> bool:
    """``MOE_CORE_STRICT_PLUGINS=1``: any plugin load failure raises instead of
    being recorded and skipped. Default: off (our CI turns it on)."""
    return _flag("MOE_CORE_STRICT_PLUGINS")


def config_dir() -> str | None:
    """``MOE_CORE_CONFIG_DIR``: a directory of tuned kernel-config JSON files,
    searched before the backend's own. Default: unset."""
    value = os.environ.get("MOE_CORE_CONFIG_DIR", "").strip()
    return value or None


def debug() -> bool:
    """``MOE_CORE_DEBUG=1``: also validate *values* of GPU tensors (id ranges, NaN
    weights), which costs a host sync. CPU tensors are always checked. Default: off."""
    return _flag("MOE_CORE_DEBUG")


def deterministic() -> bool:
    """``MOE_CORE_DETERMINISTIC=1``: skip tuned files and use the deterministic
    default config and combine for every M. Default: off."""
    return _flag("MOE_CORE_DETERMINISTIC")


def pdl() -> bool:
    """``MOE_CORE_PDL=0``: launch the Triton kernels without programmatic dependent launch
    (on by default on NVIDIA sm_90+, where each kernel's launch overlaps the end of the one
    before). Default: on."""
    return os.environ.get("MOE_CORE_PDL", "").strip().lower() not in {"0", "false", "no", "off"}


def forward_state() -> tuple[str | None, ...]:
    """The raw values of every variable that can change what one forward launches
    (``MOE_CORE_CONFIG_DIR``, ``_DETERMINISTIC``, ``_DEBUG``, ``_PDL``): a replayed CUDA graph
    is reused only while these are as they were when it was captured."""
    get = os.environ.get
    return (get("MOE_CORE_CONFIG_DIR"), get("MOE_CORE_DETERMINISTIC"), get("MOE_CORE_DEBUG"), get("MOE_CORE_PDL"))


#: name -> one-line description, for the README and ``moe-core --help``.
ENV_VARS = {
    "MOE_CORE_BACKEND": backend.__doc__.split(":", 1)[1].strip(),
    "MOE_CORE_PLUGINS": plugins_allowlist.__doc__.split(":", 1)[1].strip(),
    "MOE_CORE_DISABLE_PLUGIN_AUTOLOAD": disable_plugin_autoload.__doc__.split(":", 1)[1].strip(),
    "MOE_CORE_STRICT_PLUGINS": strict_plugins.__doc__.split(":", 1)[1].strip(),
    "MOE_CORE_CONFIG_DIR": config_dir.__doc__.split(":", 1)[1].strip(),
    "MOE_CORE_DEBUG": debug.__doc__.split(":", 1)[1].strip(),
    "MOE_CORE_DETERMINISTIC": deterministic.__doc__.split(":", 1)[1].strip(),
    "MOE_CORE_PDL": pdl.__doc__.split(":", 1)[1].strip(),
}
