"""The plugin registry: entry-point loading, the load report, backend selection, hooks.

Two entry-point groups, never renamed:

- ``moe_core.backends`` — each entry point names a :class:`~moe_core.backend.Backend`
  subclass; loaded in every process that runs a forward.
- ``moe_core.hooks`` — each entry point names an object or module carrying
  ``@moe_core.hookimpl`` functions; registered on the global hook manager, which every
  runner's manager starts from.

Loading is lazy (first use), once per process, one entry point at a time in a fixed
order (group, name, distribution) that does not depend on the order in which
``importlib.metadata`` finds distributions. A failure is recorded in the load report
(name, distribution, version, exception, traceback), logged as one WARNING, whatever
it had registered is undone, and loading goes on — unless ``MOE_CORE_STRICT_PLUGINS=1``
(then :class:`PluginLoadError`, chained) or the user asks for that backend by name (then
:class:`BackendUnavailableError` from the original exception).

Duplicate metadata of one distribution (a stale ``.egg-info`` beside the installed
``.dist-info``) is not a name clash: entry points are deduplicated by normalised
distribution name, keeping the copy ``importlib`` itself would pick — the one found first
on ``sys.path``; within one directory ``.dist-info`` beats ``.egg-info``, then the higher
version. One entry-point name in two *different* distributions is an error naming both.
Each distribution's metadata is read on its own: a malformed ``entry_points.txt`` is
recorded (as ``entry_points.txt`` of group ``metadata``) and hides only its own plugins.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import sys
import threading
import traceback
import types
from typing import Any, Callable

import attrs
import pluggy

from moe_core import envs, hookspecs
from moe_core.backend import PLUGIN_API_VERSION, Backend
from moe_core.errors import (BackendNotFoundError, BackendUnavailableError, HookError, PluginLoadError,
                             PluginRegistrationError, UnsupportedConfigError)

__all__ = ["BACKENDS_GROUP", "HOOKS_GROUP", "PLUGIN_API_VERSION", "BackendInfo", "HookSet",
           "list_backends", "get_backend", "select_backend", "register_backend", "unregister_backend",
           "global_hookset", "new_plugin_manager", "hookset_for", "register_hooks", "distribution_of",
           "load_report", "reset"]

logger = logging.getLogger(__name__)

#: entry-point group of platform backends
BACKENDS_GROUP = "moe_core.backends"
#: entry-point group of hook plugins
HOOKS_GROUP = "moe_core.hooks"
#: groups in loading order (sorted, so the order is part of the contract)
GROUPS = (BACKENDS_GROUP, HOOKS_GROUP)


@attrs.define(eq=False)
class BackendInfo:
    """One line of the load report: a backend or hook plugin and its state."""

    name: str
    group: str
    distribution: str = "<code>"
    version: str = ""
    #: "loaded"; "failed" (import / instantiation raised); "rejected" (invalid registration:
    #: wrong type, API version, bad hook, duplicate name); "skipped" (not in MOE_CORE_PLUGINS);
    #: "registered" (from code, no entry point)
    state: str = "loaded"
    backend: Backend | None = None
    plugin: Any = None
    error: BaseException | None = None
    traceback: str = ""
    priority: int | None = None
    platform: str = ""
    #: why a plugin was skipped (state "skipped")
    note: str = ""

    @property
    def available(self) -> tuple[bool, str]:
        """``(ok, reason)``: whether the backend can run here (the reason when not)."""
        if self.backend is None:
            if self.error is not None:
                return False, f"{self.state}: {type(self.error).__name__}: {self.error}"
            return False, f"{self.state}: {self.note}" if self.note else self.state
        try:
            ok, reason = self.backend.is_available()
        except Exception as exc:  # a probe must not raise; keep why it did
            return False, f"is_available() raised {type(exc).__name__}: {exc}"
        return bool(ok), str(reason)

    def describe(self) -> str:
        """One line: name, state, distribution and version, availability and its reason
        (for hook plugins and metadata entries: the error, if any)."""
        where = f"{self.distribution} {self.version}".strip()
        if self.group != BACKENDS_GROUP:
            error = f": {type(self.error).__name__}: {self.error}" if self.error is not None else ""
            return f"{self.name} [{self.state}] (distribution {where}){error}"
        ok, reason = self.available
        return (f"{self.name} [{self.state}] (distribution {where}): "
                f"{'available' if ok else 'unavailable'}{': ' + reason if reason else ''}")


# -------------------------------------------------------------------------------------
# discovery
# -------------------------------------------------------------------------------------


def _normalize(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _dist(ep: importlib.metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "<unknown>", ""
    return dist.name or "<unknown>", dist.version or ""


def _rank(dist: importlib.metadata.Distribution, path: list[str]) -> tuple[Any, ...]:
    """Sort key among copies of one distribution's metadata, best first: the directory
    found first on ``sys.path`` (what ``importlib`` picks), then ``.dist-info`` before
    ``.egg-info``, then the higher version."""
    try:
        where = os.path.realpath(str(dist.locate_file("")))
        index = path.index(where) if where in path else len(path)
        kind = 0 if dist.read_text("METADATA") is not None else 1
        version = dist.version or ""
    except Exception:  # exotic finders or unreadable metadata: rank last
        return (len(path), 2, (), "")
    return (index, kind, tuple(-int(p) for p in re.findall(r"\d+", version)), version)


@attrs.frozen
class _Discovery:
    """What the installed metadata declares: entry points per group, unreadable metadata."""

    #: group -> entry points, one per (name, distribution), sorted by (name, distribution, value)
    entry_points: dict[str, list[importlib.metadata.EntryPoint]]
    #: (distribution name, version, exception) for each ``entry_points.txt`` that failed to parse
    broken: list[tuple[str, str, BaseException]]


def _discover() -> _Discovery:
    """Read every distribution's entry points, one distribution at a time, so one
    malformed ``entry_points.txt`` hides only its own plugins. Copies of one distribution's
    metadata (a stale ``.egg-info`` beside the installed ``.dist-info``) count once."""
    copies: dict[str, list[importlib.metadata.Distribution]] = {}
    for dist in importlib.metadata.distributions():
        try:
            name = dist.name
        except Exception:  # no readable METADATA: importlib skips it too
            continue
        if name:
            copies.setdefault(_normalize(name), []).append(dist)
    path = [os.path.realpath(entry or os.getcwd()) for entry in sys.path]
    found: dict[str, list[importlib.metadata.EntryPoint]] = {group: [] for group in GROUPS}
    broken: list[tuple[str, str, BaseException]] = []
    for key in sorted(copies):
        dists = copies[key]
        dist = dists[0] if len(dists) == 1 else min(dists, key=lambda d: _rank(d, path))
        if len(dists) > 1:
            logger.debug("distribution %s: %d copies of its metadata, using version %s at %s", key, len(dists),
                         dist.version, dist.locate_file(""))
        try:
            eps = list(dist.entry_points)
        except Exception as exc:
            broken.append((dist.name, dist.version or "", exc))
            continue
        for ep in eps:
            if ep.group in found:
                found[ep.group].append(ep)
    for eps in found.values():
        eps.sort(key=lambda ep: (ep.name, _normalize(_dist(ep)[0]), ep.value))
    return _Discovery(found, broken)


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    return pm


def _check_api_version(obj: Any, who: str) -> None:
    """``who`` names the plugin and its distribution in the message."""
    version = getattr(obj, "api_version", PLUGIN_API_VERSION)
    if version != PLUGIN_API_VERSION:
        raise PluginRegistrationError(
            f"plugin {who} was written for plugin API version {version!r}, "
            f"this moe-core speaks version {PLUGIN_API_VERSION}; upgrade the plugin or moe-core")


def _instantiate(target: Any, name: str, dist: str) -> Backend:
    if not (isinstance(target, type) and issubclass(target, Backend)):
        what = f"an instance of {type(target).__qualname__}" if not isinstance(target, type) else \
            f"class {target.__qualname__}, which is not a Backend subclass"
        raise PluginRegistrationError(
            f"backend entry point {name!r} (distribution {dist}) must name a moe_core.Backend subclass, "
            f"got {what}")
    _check_api_version(target, f"{name!r} (distribution {dist})")
    backend = target()
    if backend.name != name:
        raise PluginRegistrationError(
            f"backend entry point {name!r} (distribution {dist}) names class {target.__qualname__} "
            f"whose name is {backend.name!r}; they must agree")
    return backend


def _register_hook_plugin(pm: pluggy.PluginManager, plugin: Any, name: str | None, label: str) -> None:
    """Register ``plugin`` on ``pm`` and validate it; on any failure nothing stays registered."""
    if isinstance(plugin, type):
        raise PluginRegistrationError(
            f"hook plugin {label}: got class {plugin.__name__}; register an instance or a module "
            "carrying @moe_core.hookimpl functions")
    _check_api_version(plugin, label)
    was_registered = pm.is_registered(plugin)
    try:
        pm.register(plugin, name=name)
    except (pluggy.PluginValidationError, ValueError) as exc:
        if not was_registered and pm.is_registered(plugin):   # pluggy < 1.6 registers impl by impl
            pm.unregister(plugin)
        raise PluginRegistrationError(f"hook plugin {label}: {exc}") from exc
    try:
        if not pm.get_hookcallers(plugin):
            raise PluginRegistrationError(
                f"hook plugin {label}: carries no @moe_core.hookimpl function "
                f"(hooks: {', '.join(n for n in dir(hookspecs) if n.startswith('moe_core_'))})")
        pm.check_pending()
    except BaseException as exc:
        pm.unregister(plugin)
        if isinstance(exc, pluggy.PluginValidationError):
            raise PluginRegistrationError(f"hook plugin {label}: {exc}") from exc
        raise


class _Registry:
    """Process-wide state: backends by name, the load report, the global hook manager."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.loaded = False
        self._loading_thread: int | None = None
        self.backends: dict[str, BackendInfo] = {}
        self.report: list[BackendInfo] = []
        self.hooks = _new_manager()
        self._hookset: HookSet | None = None
        #: backends whose automatic selection was already logged at INFO
        self.announced: set[str] = set()

    # -- loading ---------------------------------------------------------------------
    def ensure_loaded(self) -> None:
        if self.loaded or self._loading_thread == threading.get_ident():
            return   # loaded, or a plugin being loaded calls back into the registry
        with self.lock:
            if self.loaded:
                return
            self._loading_thread = threading.get_ident()
            try:
                self._load()
                self.loaded = True
            except BaseException:
                self.backends, self.report, self.hooks = {}, [], _new_manager()   # strict: retry from scratch
                raise
            finally:
                self._loading_thread = None
                self._hookset = None

    def _load(self) -> None:
        if envs.disable_plugin_autoload():
            logger.debug("MOE_CORE_DISABLE_PLUGIN_AUTOLOAD set: no entry point loaded")
            return
        allow = envs.plugins_allowlist()
        found = _discover()
        for dist, version, exc in found.broken:
            self._fail(BackendInfo(name="entry_points.txt", group="metadata", distribution=dist, version=version,
                                   state="failed"), exc)
        seen: set[str] = set()
        for group in GROUPS:
            by_name: dict[str, list[importlib.metadata.EntryPoint]] = {}
            for ep in found.entry_points[group]:
                by_name.setdefault(ep.name, []).append(ep)
            for name, eps in by_name.items():
                seen.add(name)
                if allow is not None and name not in allow:
                    logger.debug("%s entry point %s skipped: not in MOE_CORE_PLUGINS", group, name)
                    if group == BACKENDS_GROUP:
                        dist, version = _dist(eps[0])
                        self.backends[name] = BackendInfo(name=name, group=group, distribution=dist,
                                                          version=version, state="skipped",
                                                          note="not in MOE_CORE_PLUGINS")
                    continue
                if len(eps) > 1:
                    self._reject_duplicate(group, name, eps)
                else:
                    self._load_one(group, eps[0])
        if allow is not None and allow - seen:
            logger.warning("moe-core: MOE_CORE_PLUGINS names %s, which no installed distribution provides "
                           "(installed: %s)", ", ".join(repr(n) for n in sorted(allow - seen)),
                           ", ".join(sorted(seen)) or "none")

    def _fail(self, info: BackendInfo, exc: BaseException) -> None:
        """Record a failed entry point, warn once; in strict mode raise PluginLoadError."""
        info.error = exc
        info.traceback = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.report.append(info)
        kind = {BACKENDS_GROUP: "backend", HOOKS_GROUP: "hook plugin"}.get(info.group, "metadata")
        what = f"moe-core: {kind} {info.name!r} from distribution {info.distribution} {info.version}".rstrip()
        why = f"{type(exc).__name__}: {exc}"
        if envs.strict_plugins():
            raise PluginLoadError(f"{what} {info.state}: {why} (MOE_CORE_STRICT_PLUGINS=1)") from exc
        logger.warning("%s %s and was skipped: %s", what, info.state, why)

    def _reject_duplicate(self, group: str, name: str, eps: list[importlib.metadata.EntryPoint]) -> None:
        dists = [_dist(ep) for ep in eps]
        exc = PluginRegistrationError(
            f"entry point {name!r} in group {group} is provided by several distributions: "
            + " and ".join(f"{d} {v}".strip() for d, v in dists)
            + "; uninstall one of them, or select another name with MOE_CORE_PLUGINS")
        info = BackendInfo(name=name, group=group, distribution=" + ".join(d for d, _ in dists),
                           version=" + ".join(v for _, v in dists), state="rejected")
        if group == BACKENDS_GROUP:
            self.backends[name] = info
        self._fail(info, exc)

    def _load_one(self, group: str, ep: importlib.metadata.EntryPoint) -> None:
        """Load one entry point in isolation; undo whatever it registered if it fails."""
        dist, version = _dist(ep)
        info = BackendInfo(name=ep.name, group=group, distribution=dist, version=version)
        before_backends = dict(self.backends)
        before_report = len(self.report)
        before_hooks = {id(p) for p in self.hooks.get_plugins()}
        label = f"{ep.name!r} (distribution {dist} {version})".replace(" )", ")")
        try:
            target = ep.load()
            if group == BACKENDS_GROUP:
                info.backend = _instantiate(target, ep.name, dist)
                info.priority, info.platform = info.backend.priority, info.backend.platform
            else:
                _register_hook_plugin(self.hooks, target, f"{dist}:{ep.name}", label)
                info.plugin = target
        except Exception as exc:
            # undo partial registration: backends registered from code, hook plugins, report lines
            self.backends = before_backends
            del self.report[before_report:]
            for plugin in self.hooks.get_plugins():
                if id(plugin) not in before_hooks:
                    self.hooks.unregister(plugin)
            info.state = "rejected" if isinstance(exc, PluginRegistrationError) else "failed"
            if group == BACKENDS_GROUP:
                self.backends[ep.name] = info
            self._fail(info, exc)
        else:
            if group == BACKENDS_GROUP:
                self.backends[ep.name] = info
            self.report.append(info)
            logger.debug("%s %s loaded from %s %s", group, ep.name, dist, version)


_REGISTRY = _Registry()


def reset() -> None:
    """Forget every loaded plugin; the next use loads entry points again (for tests)."""
    global _REGISTRY
    _REGISTRY = _Registry()


def load_report() -> list[BackendInfo]:
    """Every entry point seen (backends and hook plugins), in loading order, with its
    state, error and traceback; backends skipped by ``MOE_CORE_PLUGINS`` are not in it."""
    _REGISTRY.ensure_loaded()
    return list(_REGISTRY.report)


def register_backend(backend: type[Backend] | Backend) -> Backend:
    """Register a backend from code (no entry point); its name must be new.

    :raises PluginRegistrationError: not a Backend, API version mismatch, or the name is taken.
    """
    reg = _REGISTRY
    reg.ensure_loaded()
    instance = backend() if isinstance(backend, type) and issubclass(backend, Backend) else backend
    if not isinstance(instance, Backend):
        raise PluginRegistrationError(f"register_backend: expected a moe_core.Backend, got {backend!r}")
    _check_api_version(instance, f"{instance.name!r} (registered from code)")
    with reg.lock:
        old = reg.backends.get(instance.name)
        if old is not None and old.state != "skipped":
            raise PluginRegistrationError(
                f"backend name {instance.name!r} is already provided by distribution "
                f"{old.distribution} {old.version}".rstrip())
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
        if info is not None and info in reg.report:
            reg.report.remove(info)


def list_backends() -> list[BackendInfo]:
    """Every backend entry point and code-registered backend, sorted by name, each with
    its state and (through :attr:`BackendInfo.available`) its reason."""
    _REGISTRY.ensure_loaded()
    return sorted(_REGISTRY.backends.values(), key=lambda i: i.name)


def _roster() -> str:
    lines = [f"  - {info.describe()}" for info in list_backends()]
    if envs.disable_plugin_autoload():
        lines.append("  (MOE_CORE_DISABLE_PLUGIN_AUTOLOAD is set: no entry point was loaded)")
    return "\n".join(lines) if lines else "  (no backend installed)"


def get_backend(name: str) -> Backend:
    """The backend called ``name``.

    :raises BackendNotFoundError: no backend of that name (the message lists every backend).
    :raises PluginRegistrationError: its registration was invalid (duplicate name, API version).
    :raises BackendUnavailableError: it failed to load (``__cause__`` is the original
        exception), was skipped, or cannot run here.
    """
    _REGISTRY.ensure_loaded()
    info = _REGISTRY.backends.get(name)
    if info is None:
        raise BackendNotFoundError(f"no backend named {name!r}; installed backends:\n{_roster()}")
    if info.backend is None:
        if info.error is None:
            raise BackendUnavailableError(f"backend {name!r} (distribution {info.distribution}) was "
                                          f"{info.state}: {info.note}\ninstalled backends:\n{_roster()}")
        cls = PluginRegistrationError if info.state == "rejected" else BackendUnavailableError
        raise cls(f"backend {name!r} (distribution {info.distribution} {info.version}) could not be loaded: "
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
    available supporting backend of highest priority.

    :raises PluginRegistrationError: several available supporting backends share the top priority.
    :raises UnsupportedConfigError: none (or not the named one) supports the layer.
    """
    requested = name or envs.backend()
    if requested:
        backend = get_backend(requested)
        ok, reason = backend.supports(layer, quant)
        if not ok:
            raise UnsupportedConfigError(f"backend {requested!r} does not support this layer: {reason}\n"
                                         f"installed backends:\n{_roster()}")
        return backend
    candidates: list[BackendInfo] = []
    reasons: list[str] = []
    for info in list_backends():
        ok, reason = info.available
        if ok and info.backend is not None:
            ok, reason = info.backend.supports(layer, quant)
        if ok:
            candidates.append(info)
        else:
            reasons.append(f"  - {info.name}: {reason}")
    if not candidates:
        raise UnsupportedConfigError("no backend supports this layer here:\n" + "\n".join(reasons))
    top = max(i.backend.priority for i in candidates)
    best = [i for i in candidates if i.backend.priority == top]
    if len(best) > 1:
        raise PluginRegistrationError(
            f"backends {', '.join(f'{i.name!r} (distribution {i.distribution})' for i in best)} are all "
            f"available with priority {top}; set MOE_CORE_BACKEND or pass backend= to choose, "
            "or uninstall one")
    chosen = best[0]
    level = logging.DEBUG if chosen.name in _REGISTRY.announced else logging.INFO   # one INFO per backend
    _REGISTRY.announced.add(chosen.name)
    logger.log(level, "backend %s selected: priority %d, distribution %s %s", chosen.name, top,
               chosen.distribution, chosen.version)
    return chosen.backend


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


def _responder(pm: pluggy.PluginManager, hook_name: str, kwargs: dict[str, Any]) -> str:
    """The plugin whose implementation gave a firstresult hook its result: replays the
    plain implementations in pluggy's call order (error path only; map hooks are pure)."""
    impls = [i for i in getattr(pm.hook, hook_name).get_hookimpls() if not (i.wrapper or i.hookwrapper)]
    for impl in reversed(impls):
        try:
            if impl.function(*[kwargs[a] for a in impl.argnames]) is not None:
                return impl.plugin_name
        except Exception:
            return impl.plugin_name
    return "<unknown plugin>"


def _mapper(pm: pluggy.PluginManager) -> Callable[..., Any] | None:
    name = "moe_core_map_expert_ids"
    call = _caller(pm, name)
    if call is None:
        return None

    def map_expert_ids(topk_ids: Any, layer: Any) -> Any:
        result = call(topk_ids=topk_ids, layer=layer)
        if result is None:
            return None
        from moe_core.validate import check_mapped_ids

        try:
            check_mapped_ids(result, topk_ids, layer.num_local_experts)
        except HookError as exc:
            plugin = _responder(pm, name, {"topk_ids": topk_ids, "layer": layer})
            raise HookError(f"hook {name} of plugin {plugin!r} returned an invalid result: {exc}; "
                            "the forward was aborted") from exc
        return result

    return map_expert_ids


@attrs.frozen(eq=False)
class HookSet:
    """The hook callers of one runner (or of the functional path); ``None`` where no
    implementation is registered, so the forward calls no pluggy machinery for them.

    ``map_expert_ids(topk_ids, layer)`` returns validated int32 local ids or None; the
    other two take the keyword arguments of their hookspecs. Any failure is a HookError
    naming the plugin and the hook.
    """

    map_expert_ids: Callable[..., Any] | None = None
    after_gate_up: Callable[..., Any] | None = None
    after_down: Callable[..., Any] | None = None

    @property
    def any(self) -> bool:
        """Whether a buffer-editing hook (after_gate_up / after_down) is registered."""
        return self.after_gate_up is not None or self.after_down is not None


def hookset_for(pm: pluggy.PluginManager) -> HookSet:
    """Build the :class:`HookSet` of a plugin manager (snapshot of its current impls)."""
    return HookSet(map_expert_ids=_mapper(pm), after_gate_up=_caller(pm, "moe_core_after_gate_up"),
                   after_down=_caller(pm, "moe_core_after_down"))


def global_hookset() -> HookSet:
    """The hooks registered through the ``moe_core.hooks`` entry points."""
    reg = _REGISTRY
    reg.ensure_loaded()
    if reg._hookset is None:
        reg._hookset = hookset_for(reg.hooks)
    return reg._hookset


def new_plugin_manager() -> pluggy.PluginManager:
    """A fresh manager holding the global hook plugins, for one runner to extend.

    Global plugins are registered first, so a runner's own plugins run before them
    (pluggy: last registered first) unless ``tryfirst``/``trylast`` say otherwise.
    """
    _REGISTRY.ensure_loaded()
    pm = _new_manager()
    for name, plugin in _REGISTRY.hooks.list_name_plugin():
        pm.register(plugin, name=name)
    return pm


def register_hooks(pm: pluggy.PluginManager, plugin: Any, name: str | None = None) -> None:
    """Register hook ``plugin`` (a module or an instance) on ``pm`` under ``name``
    (default: the module name, or ``ClassName@0x<id>``), which errors quote.

    :raises PluginRegistrationError: a class instead of an instance, no hookimpl, an
        unknown hook, an argument the spec lacks, an API version mismatch, or a name or
        object already registered; nothing stays registered then.
    """
    if name is None:   # pluggy's default for an instance is str(id(obj)): unreadable in errors
        name = plugin.__name__ if isinstance(plugin, types.ModuleType) else \
            f"{type(plugin).__qualname__}@{id(plugin):#x}"
    _register_hook_plugin(pm, plugin, name, repr(name))
