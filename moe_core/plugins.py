"""The plugin registry: entry-point loading, the load report, backend selection, hooks.

Two entry-point groups, never renamed:

- ``moe_core.backends`` — each entry point names a :class:`~moe_core.backend.Backend`
  subclass; loaded in every process that runs a forward.
- ``moe_core.hooks`` — each entry point names an object or module carrying
  ``@moe_core.hookimpl`` functions; registered on the global hook manager, which every
  runner's manager starts from.

Loading is lazy (first use), once per process, one entry point at a time in a fixed
order (group, name, distribution); a failure is recorded with its traceback, warned
once, and skipped — unless ``MOE_CORE_STRICT_PLUGINS=1`` or the user asks for that
backend by name.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
import traceback
import types
import warnings
from typing import Any, Callable, Iterable

import attrs
import pluggy

from moe_core import envs, hookspecs
from moe_core.backend import PLUGIN_API_VERSION, Backend
from moe_core.errors import (BackendNotFoundError, BackendUnavailableError, HookError, PluginLoadError,
                             PluginRegistrationError, UnsupportedConfigError)

__all__ = ["BACKENDS_GROUP", "HOOKS_GROUP", "PLUGIN_API_VERSION", "BackendInfo", "HookSet",
           "list_backends", "get_backend", "select_backend", "register_backend", "unregister_backend",
           "global_hookset", "new_plugin_manager", "hookset_for", "distribution_of", "load_report", "reset"]

logger = logging.getLogger(__name__)

#: entry-point group of platform backends
BACKENDS_GROUP = "moe_core.backends"
#: entry-point group of hook plugins
HOOKS_GROUP = "moe_core.hooks"


@attrs.define(eq=False)
class BackendInfo:
    """One line of the load report: a backend or hook plugin and its state."""

    name: str
    group: str
    distribution: str = "<code>"
    version: str = ""
    #: "loaded", "failed" (import / instantiation), "rejected" (invalid registration), "registered" (in code)
    state: str = "loaded"
    backend: Backend | None = None
    plugin: Any = None
    error: BaseException | None = None
    traceback: str = ""
    priority: int | None = None
    platform: str = ""

    @property
    def available(self) -> tuple[bool, str]:
        """``(ok, reason)``: whether the backend can run here."""
        if self.backend is None:
            return False, f"{self.state}: {type(self.error).__name__}: {self.error}" if self.error else self.state
        try:
            ok, reason = self.backend.is_available()
        except Exception as exc:  # a probe must not raise; record why it did
            return False, f"is_available() raised {type(exc).__name__}: {exc}"
        return bool(ok), str(reason)

    def describe(self) -> str:
        ok, reason = self.available
        return (f"{self.name} (distribution {self.distribution} {self.version}, "
                f"{'available' if ok else 'unavailable'}: {reason or 'ok'})")


def _entry_points(group: str) -> list[importlib.metadata.EntryPoint]:
    eps = list(importlib.metadata.entry_points(group=group))
    return sorted(eps, key=lambda ep: (ep.name, ep.dist.name if ep.dist else "", ep.value))


def _dist(ep: importlib.metadata.EntryPoint) -> tuple[str, str]:
    if ep.dist is None:
        return "<unknown>", ""
    return ep.dist.name, ep.dist.version


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    return pm


class _Registry:
    """Process-wide state: backends by name, the load report, the global hook manager."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.loaded = False
        self.backends: dict[str, BackendInfo] = {}
        self.report: list[BackendInfo] = []
        self.hooks = _new_manager()
        self._hookset: HookSet | None = None

    # -- loading ---------------------------------------------------------------------
    def ensure_loaded(self) -> None:
        if self.loaded:
            return
        with self.lock:
            if self.loaded:
                return
            if not envs.disable_plugin_autoload():
                allow = envs.plugins_allowlist()
                self._load_backends(allow)
                self._load_hooks(allow)
            self.loaded = True

    def _fail(self, info: BackendInfo, exc: BaseException, what: str) -> None:
        info.error = exc
        info.traceback = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.report.append(info)
        message = (f"moe-core: {what} {info.name!r} from distribution {info.distribution} "
                   f"{info.version} failed to load: {type(exc).__name__}: {exc}")
        if envs.strict_plugins():
            raise PluginLoadError(message + " (MOE_CORE_STRICT_PLUGINS=1)") from exc
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _load_backends(self, allow: frozenset[str] | None) -> None:
        by_name: dict[str, list[importlib.metadata.EntryPoint]] = {}
        for ep in _entry_points(BACKENDS_GROUP):
            if allow is not None and ep.name not in allow:
                logger.debug("backend %s skipped: not in MOE_CORE_PLUGINS", ep.name)
                continue
            by_name.setdefault(ep.name, []).append(ep)
        for name, eps in by_name.items():
            dists = sorted({_dist(ep) for ep in eps})
            if len(dists) > 1:
                exc = PluginRegistrationError(
                    f"backend name {name!r} is provided by several distributions: "
                    + ", ".join(f"{d} {v}" for d, v in dists) + "; uninstall one or restrict MOE_CORE_PLUGINS")
                info = BackendInfo(name=name, group=BACKENDS_GROUP, distribution=" + ".join(d for d, _ in dists),
                                   state="rejected")
                self._fail(info, exc, "backend")
                self.backends[name] = info
                continue
            ep = eps[0]
            dist, version = _dist(ep)
            info = BackendInfo(name=name, group=BACKENDS_GROUP, distribution=dist, version=version)
            try:
                target = ep.load()
                info.backend = _instantiate(target, name, dist)
            except PluginRegistrationError as exc:
                info.state = "rejected"
                self._fail(info, exc, "backend")
            except Exception as exc:
                info.state = "failed"
                self._fail(info, exc, "backend")
            else:
                info.priority, info.platform = info.backend.priority, info.backend.platform
                self.report.append(info)
                logger.debug("backend %s loaded from %s %s", name, dist, version)
            self.backends[name] = info

    def _load_hooks(self, allow: frozenset[str] | None) -> None:
        for ep in _entry_points(HOOKS_GROUP):
            if allow is not None and ep.name not in allow:
                continue
            dist, version = _dist(ep)
            info = BackendInfo(name=ep.name, group=HOOKS_GROUP, distribution=dist, version=version)
            try:
                plugin = ep.load()
                _check_api_version(plugin, ep.name, dist)
                self.hooks.register(plugin, name=f"{dist}:{ep.name}")
                try:
                    self.hooks.check_pending()
                except pluggy.PluginValidationError as exc:
                    self.hooks.unregister(plugin)
                    raise PluginRegistrationError(f"hook plugin {ep.name!r} (distribution {dist}): {exc}") from exc
            except pluggy.PluginValidationError as exc:
                info.state = "rejected"
                self._fail(info, PluginRegistrationError(
                    f"hook plugin {ep.name!r} (distribution {dist}): {exc}"), "hook plugin")
            except PluginRegistrationError as exc:
                info.state = "rejected"
                self._fail(info, exc, "hook plugin")
            except Exception as exc:
                info.state = "failed"
                self._fail(info, exc, "hook plugin")
            else:
                info.plugin = plugin
                self.report.append(info)
        self._hookset = None


def _check_api_version(obj: Any, name: str, dist: str) -> None:
    version = getattr(obj, "api_version", PLUGIN_API_VERSION)
    if version != PLUGIN_API_VERSION:
        raise PluginRegistrationError(
            f"plugin {name!r} (distribution {dist}) was written for plugin API version {version}, "
            f"this moe-core speaks version {PLUGIN_API_VERSION}; upgrade the plugin or moe-core")


def _instantiate(target: Any, name: str, dist: str) -> Backend:
    if not (isinstance(target, type) and issubclass(target, Backend)):
        raise PluginRegistrationError(
            f"backend entry point {name!r} (distribution {dist}) must name a moe_core.Backend subclass, "
            f"got {target!r}")
    _check_api_version(target, name, dist)
    backend = target()
    if backend.name != name:
        raise PluginRegistrationError(
            f"backend entry point {name!r} (distribution {dist}) names class {target.__qualname__} "
            f"whose name is {backend.name!r}; they must agree")
    return backend


_REGISTRY = _Registry()


def reset() -> None:
    """Forget every loaded plugin; the next use loads entry points again (for tests)."""
    global _REGISTRY
    _REGISTRY = _Registry()


def load_report() -> list[BackendInfo]:
    """Every entry point seen (backends and hook plugins) with its state, error and traceback."""
    _REGISTRY.ensure_loaded()
    return list(_REGISTRY.report)


def register_backend(backend: type[Backend] | Backend) -> Backend:
    """Register a backend from code (no entry point); its name must be new."""
    reg = _REGISTRY
    reg.ensure_loaded()
    instance = backend() if isinstance(backend, type) else backend
    if not isinstance(instance, Backend):
        raise PluginRegistrationError(f"register_backend: expected a moe_core.Backend, got {backend!r}")
    _check_api_version(instance, instance.name, "<code>")
    with reg.lock:
        if instance.name in reg.backends:
            raise PluginRegistrationError(
                f"backend name {instance.name!r} is already provided by distribution "
                f"{reg.backends[instance.name].distribution}")
        info = BackendInfo(name=instance.name, group=BACKENDS_GROUP, state="registered", backend=instance,
                           priority=instance.priority, platform=instance.platform)
        reg.backends[instance.name] = info
        reg.report.append(info)
    return instance


def unregister_backend(name: str) -> None:
    """Remove a backend registered with :func:`register_backend` (or loaded) by name."""
    reg = _REGISTRY
    with reg.lock:
        info = reg.backends.pop(name, None)
        if info is not None:
            reg.report.remove(info)


def list_backends() -> list[BackendInfo]:
    """The backends of the load report, sorted by name, each with state and reason."""
    _REGISTRY.ensure_loaded()
    return sorted(_REGISTRY.backends.values(), key=lambda i: i.name)


def _roster() -> str:
    lines = [f"  - {info.describe()}" for info in list_backends()]
    return "\n".join(lines) if lines else "  (no backend installed)"


def get_backend(name: str) -> Backend:
    """The backend called ``name``; raises if unknown, broken or unavailable here."""
    _REGISTRY.ensure_loaded()
    info = _REGISTRY.backends.get(name)
    if info is None:
        raise BackendNotFoundError(f"no backend named {name!r}; installed backends:\n{_roster()}")
    if info.backend is None:
        cls = PluginRegistrationError if info.state == "rejected" else BackendUnavailableError
        raise cls(f"backend {name!r} (distribution {info.distribution}) could not be loaded: "
                  f"{type(info.error).__name__}: {info.error}\ninstalled backends:\n{_roster()}") from info.error
    ok, reason = info.available
    if not ok:
        raise BackendUnavailableError(f"backend {name!r} is not available here: {reason}\n"
                                      f"installed backends:\n{_roster()}")
    return info.backend


def distribution_of(backend: Backend) -> str:
    """``"name version"`` of the distribution that provided ``backend`` (``<code>`` if registered in code)."""
    info = _REGISTRY.backends.get(backend.name)
    if info is None or info.backend is not backend:
        return "<code>"
    return f"{info.distribution} {info.version}".strip()


def select_backend(name: str | None, layer: Any, quant: Any) -> Backend:
    """The backend for ``layer``/``quant``: ``name``, else ``MOE_CORE_BACKEND``, else the
    available supporting backend of highest priority (a tie is an error)."""
    requested = name or envs.backend()
    if requested:
        backend = get_backend(requested)
        ok, reason = backend.supports(layer, quant)
        if not ok:
            raise UnsupportedConfigError(f"backend {requested!r} does not support this layer: {reason}\n"
                                         f"installed backends:\n{_roster()}")
        return backend
    candidates: list[Backend] = []
    reasons: list[str] = []
    for info in list_backends():
        ok, reason = info.available
        if ok and info.backend is not None:
            ok, reason = info.backend.supports(layer, quant)
        if ok:
            candidates.append(info.backend)
        else:
            reasons.append(f"  - {info.name}: {reason}")
    if not candidates:
        raise UnsupportedConfigError("no backend supports this layer here:\n" + "\n".join(reasons))
    top = max(b.priority for b in candidates)
    best = [b for b in candidates if b.priority == top]
    if len(best) > 1:
        raise PluginRegistrationError(
            f"backends {', '.join(repr(b.name) for b in best)} are all available with priority {top}; "
            "set MOE_CORE_BACKEND or pass backend= to choose")
    logger.info("backend %s selected: priority %d", best[0].name, top)
    return best[0]


# -------------------------------------------------------------------------------------
# hooks
# -------------------------------------------------------------------------------------


def _plugin_of(pm: pluggy.PluginManager, hook_name: str, exc: BaseException) -> str:
    """Name the plugin whose hookimpl raised ``exc``, by matching frames to impl functions."""
    impls = getattr(pm.hook, hook_name).get_hookimpls()
    codes = {impl.function.__code__: impl.plugin_name for impl in impls if hasattr(impl.function, "__code__")}
    tb = exc.__traceback__
    culprit = "<unknown plugin>"
    while tb is not None:
        culprit = codes.get(tb.tb_frame.f_code, culprit)
        tb = tb.tb_next
    return culprit


def _caller(pm: pluggy.PluginManager, hook_name: str) -> Callable[..., Any] | None:
    hook = getattr(pm.hook, hook_name)
    if not hook.get_hookimpls():
        return None

    def call(**kwargs: Any) -> Any:
        try:
            return hook(**kwargs)
        except HookError:
            raise
        except Exception as exc:
            plugin = _plugin_of(pm, hook_name, exc)
            raise HookError(f"hook {hook_name} of plugin {plugin!r} raised {type(exc).__name__}: {exc}; "
                            "the forward was aborted") from exc

    call.__name__ = hook_name
    return call


@attrs.frozen(eq=False)
class HookSet:
    """The hook callers of one runner (or of the functional path); ``None`` where no
    implementation is registered, so the forward calls no pluggy machinery for them."""

    map_expert_ids: Callable[..., Any] | None = None
    after_gate_up: Callable[..., Any] | None = None
    after_down: Callable[..., Any] | None = None

    @property
    def any(self) -> bool:
        """Whether a buffer-editing hook (after_gate_up / after_down) is registered."""
        return self.after_gate_up is not None or self.after_down is not None


def hookset_for(pm: pluggy.PluginManager) -> HookSet:
    """Build the :class:`HookSet` of a plugin manager (snapshot of its current impls)."""
    def mapper() -> Callable[..., Any] | None:
        call = _caller(pm, "moe_core_map_expert_ids")
        if call is None:
            return None
        return lambda topk_ids, layer: call(topk_ids=topk_ids, layer=layer)

    return HookSet(map_expert_ids=mapper(), after_gate_up=_caller(pm, "moe_core_after_gate_up"),
                   after_down=_caller(pm, "moe_core_after_down"))


def global_hookset() -> HookSet:
    """The hooks registered through the ``moe_core.hooks`` entry points."""
    reg = _REGISTRY
    reg.ensure_loaded()
    if reg._hookset is None:
        reg._hookset = hookset_for(reg.hooks)
    return reg._hookset


def new_plugin_manager() -> pluggy.PluginManager:
    """A fresh manager holding the global hook plugins, for one runner to extend."""
    _REGISTRY.ensure_loaded()
    pm = _new_manager()
    for name, plugin in _REGISTRY.hooks.list_name_plugin():
        pm.register(plugin, name=name)
    return pm


def register_hooks(pm: pluggy.PluginManager, plugin: Any, name: str | None = None) -> None:
    """Register ``plugin`` on ``pm``; a malformed plugin raises PluginRegistrationError."""
    label = name or getattr(plugin, "__name__", type(plugin).__name__)
    try:
        pm.register(plugin, name=name)
        pm.check_pending()
    except (pluggy.PluginValidationError, ValueError) as exc:
        if pm.is_registered(plugin):
            pm.unregister(plugin)
        raise PluginRegistrationError(f"hook plugin {label!r}: {exc}") from exc
