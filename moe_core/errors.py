"""Every exception moe-core raises, under one base class, :class:`MoECoreError`.

Bad arguments raise :class:`MoEInputError` (also a ``ValueError``) or
:class:`MoETypeError` (also a ``TypeError``); the message names the argument, the
expected and the actual value.
"""

from __future__ import annotations

__all__ = [
    "MoECoreError",
    "MoEInputError",
    "MoETypeError",
    "BackendNotFoundError",
    "BackendUnavailableError",
    "UnsupportedConfigError",
    "PluginLoadError",
    "PluginRegistrationError",
    "HookError",
    "BackendExecutionError",
    "ConfigError",
]


class MoECoreError(Exception):
    """Base class of every error raised by moe-core."""

    __module__ = "moe_core.errors"


class MoEInputError(MoECoreError, ValueError):
    """An argument has the wrong shape, value, device or layout.

    The message names the argument, what was expected and what was given.
    """

    __module__ = "moe_core.errors"


class MoETypeError(MoECoreError, TypeError):
    """An argument has the wrong type or dtype."""

    __module__ = "moe_core.errors"


class BackendNotFoundError(MoECoreError, LookupError):
    """A backend was asked for by a name that no installed plugin provides.

    The message lists every installed backend and its state.
    """

    __module__ = "moe_core.errors"


class BackendUnavailableError(MoECoreError, RuntimeError):
    """A backend asked for by name exists but cannot run here (no device, failed import).

    When the cause is a failed import, ``__cause__`` holds the original exception.
    """

    __module__ = "moe_core.errors"


class UnsupportedConfigError(MoECoreError, ValueError):
    """No backend (or the one asked for) supports this layer and quantization.

    The message lists every backend with the reason it gave.
    """

    __module__ = "moe_core.errors"


class PluginLoadError(MoECoreError, ImportError):
    """A plugin's entry point failed to load (raised only in strict mode)."""

    __module__ = "moe_core.errors"


class PluginRegistrationError(MoECoreError, TypeError):
    """A plugin is malformed: bad hook signature, unknown hook, duplicate name,
    priority tie, or plugin API version mismatch. Names plugin and distribution."""

    __module__ = "moe_core.errors"


class HookError(MoECoreError, RuntimeError):
    """A hook raised or returned an invalid result; the forward was aborted.

    Names the plugin and the hook; ``__cause__`` holds the original exception.
    """

    __module__ = "moe_core.errors"


class BackendExecutionError(MoECoreError, RuntimeError):
    """A backend failed while running a step of the forward pass.

    Names the backend, its distribution and the step; ``__cause__`` holds the original.
    After a failed ``inplace`` call the contents of ``x`` are undefined.
    """

    __module__ = "moe_core.errors"


class ConfigError(MoECoreError, ValueError):
    """A kernel-config file is corrupt or a config is invalid; names the file or key."""

    __module__ = "moe_core.errors"
