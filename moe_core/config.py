"""Kernel configs: which ``BLOCK_SIZE_*``/``GROUP_SIZE_M``/``num_warps``/``num_stages`` each
GEMM launches with, and why (SEMANTICS §5).

Lookup order per GEMM: ``override_config`` → deterministic default → tuned files
(``$MOE_CORE_CONFIG_DIR``, then the backend's config dirs; Triton-version folders) →
the backend's default heuristics. Then: the batch key nearest to M, ``USE_TMA`` popped,
the backend's key whitelist, ``BLOCK_SIZE_K`` clamped for block quant, ``BLOCK_SIZE_M``
shared, the shared-memory clamp. File naming and parsing live in :mod:`moe_core.config_files`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import types
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import attrs
import torch

from moe_core import config_files as files
from moe_core import envs
from moe_core.errors import ConfigError

if TYPE_CHECKING:
    from moe_core.backend import Backend
    from moe_core.spec import QuantSpec

__all__ = ["override_config", "get_override", "check_config", "default_heuristics", "resolve_configs",
           "Resolved", "clear_cache", "nearest_key", "estimate_shared_memory", "search_roots",
           "format_why", "TRITON_DEFAULT_STAGES"]

logger = logging.getLogger(__name__)

_OVERRIDE: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "moe_core_override_config", default=None)

#: ``num_stages`` Triton uses when a config does not set it (for the shared-memory estimate)
TRITON_DEFAULT_STAGES = 3

_LOCK = threading.Lock()
#: lookup key -> (FoundFile | None, table | None); holds successful parses and misses only
_TABLES: dict[tuple, tuple[Any, dict[int, dict[str, Any]] | None]] = {}
#: full resolution key -> Resolved
_RESOLVED: dict[tuple, Resolved] = {}
_WARNED: set[tuple] = set()


@contextlib.contextmanager
def override_config(config: Mapping[str, Any]) -> Iterator[None]:
    """Use ``config`` for both GEMMs of every forward inside the ``with`` block.

    Restored on exit, also when the block raises. ``BLOCK_SIZE_*`` must be powers of two >= 16.
    ``USE_TMA`` in an override applies to gemm2 only (as in a ``_down`` file).
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
    for key in files.BLOCK_KEYS:
        if key not in config:
            raise ConfigError(f"{source}: config lacks {key}: {config}")
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
            raise ConfigError(f"{source}: {key} must be a power of two >= 16, got {value!r}")
    return config


def clear_cache() -> None:
    """Forget every parsed table, resolution and issued warning (tests; after new files)."""
    with _LOCK:
        _TABLES.clear()
        _RESOLVED.clear()
        _WARNED.clear()
    files.triton_version.cache_clear()


def _warn_once(token: tuple, message: str, *args: Any) -> None:
    with _LOCK:
        if token in _WARNED:
            return
        _WARNED.add(token)
    logger.warning(message, *args)


def default_heuristics(M: int, E: int, dtype: str | None, block_shape: tuple[int, int] | None, *,
                       deterministic: bool = False, low_shared_memory: bool = False) -> dict[str, Any]:
    """The default table of SEMANTICS §5.5 (CUDA numbers; backends adjust stages).

    :param low_shared_memory: the device grants < 128 KiB opt-in shared memory (fp8 rows only).
    """
    if deterministic:
        return {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 8}
    if dtype == "fp8_w8a8" and block_shape is not None and all(block_shape):
        bn, bk = block_shape
        return {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "GROUP_SIZE_M": 32,
                "num_warps": 4, "num_stages": 3}
    if dtype == "fp8_w8a8":
        if low_shared_memory:
            if M > E:
                return {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 256, "GROUP_SIZE_M": 64,
                        "num_warps": 4, "num_stages": 2}
            return {"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 256, "GROUP_SIZE_M": 1,
                    "num_warps": 4, "num_stages": 4}
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
    """The outcome of config resolution for one forward.

    ``why`` holds ``gemm1`` and ``gemm2`` records (source, file, key, config, dropped keys,
    notes), the ``lookup`` facts (file names, device, Triton version, search roots) and,
    for older readers, ``source`` (gemm1's) and ``dtype``. ``why`` is read-only (mappings
    are ``MappingProxyType``, lists tuples).
    """

    config: dict[str, Any]
    down_config: dict[str, Any]
    why: Mapping[str, Any]

    def copy(self) -> Resolved:
        """Fresh config dicts (callers may mutate them); ``why`` is read-only and shared."""
        return Resolved(dict(self.config), dict(self.down_config), self.why)


def _freeze(value: Any) -> Any:
    """Read-only view of a why record: mappings become MappingProxyType, lists tuples."""
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def nearest_key(keys: Any, M: int) -> int:
    """The batch key nearest to ``M``; ties go to the smaller key."""
    ordered = sorted(keys)
    if not ordered:
        raise ConfigError("empty config table")
    return min(ordered, key=lambda k: (abs(k - M), k))


def _bytes(dtype: torch.dtype) -> float:
    return torch.empty((), dtype=dtype).element_size()


def estimate_shared_memory(config: Mapping[str, Any], a_bytes: float, b_bytes: float) -> int:
    """Shared memory of a pipelined tile GEMM: ``stages · (BM·BK·a + BN·BK·b)`` bytes.

    :param a_bytes: bytes per input element (1 for w8a8, 2 for fp16/bf16, 4 for fp32).
    :param b_bytes: bytes per weight element (0.5 for int4).
    """
    stages = int(config.get("num_stages", TRITON_DEFAULT_STAGES))
    bm, bn, bk = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"], config["BLOCK_SIZE_K"]
    return int(stages * (bm * bk * a_bytes + bn * bk * b_bytes))


def _operand_bytes(act_dtype: torch.dtype, quant: QuantSpec) -> tuple[float, float]:
    a = 1.0 if quant.is_w8a8 else _bytes(act_dtype)
    if quant.scheme == "int4_w4a16":
        b = 0.5
    elif quant.is_quantized:
        b = 1.0
    else:
        b = _bytes(act_dtype)
    return a, b


def search_roots(backend: Backend) -> list[Any]:
    """Directories searched for tuned files: ``$MOE_CORE_CONFIG_DIR``, then the backend's."""
    from pathlib import Path

    roots: list[Any] = []
    user = envs.config_dir()
    if user:
        roots.append(Path(user))
        if not roots[0].is_dir():
            _warn_once(("no-dir", user), "moe-core: MOE_CORE_CONFIG_DIR=%s is not a directory; ignored", user)
    roots.extend(backend.config_dirs())
    return roots


def _safe(call: Any, default: Any) -> Any:
    try:
        return call()
    except Exception as exc:  # a device probe on a machine without the device
        logger.debug("config probe %r failed: %s", call, exc)
        return default


def _lookup(backend: Backend, key: files.FileKey, running: tuple[int, int, int] | None,
            roots: list[Any]) -> tuple[Any, dict[int, dict[str, Any]] | None]:
    """Memoised (file, table) for ``key``; a miss is ``(None, None)``. Loads once under a lock."""
    memo_key = (type(backend).__qualname__, backend.name, running, tuple(str(r) for r in roots),
                key.device_name, tuple(backend.device_aliases), key.E, key.N, key.dtype, key.block_shape, key.per_channel, key.down)
    hit = _TABLES.get(memo_key)
    if hit is not None:
        return hit
    with _LOCK:
        hit = _TABLES.get(memo_key)
        if hit is not None:
            return hit
        found = files.find_config_file(roots, key, [key.device_name, *backend.device_aliases], running)
        table = files.load_table(found.path) if found is not None else None   # raises: not memoised
        _TABLES[memo_key] = (found, table)
    if found is not None and found.other_version:
        _warn_once(("version", str(found)), "moe-core: using kernel-config file %s tuned with another "
                   "Triton version (running %s)", found, files.triton_folder(running))
    return found, table


def _record(source: str, found: Any = None, key: int | None = None) -> dict[str, Any]:
    return {"source": source, "file": None if found is None else str(found), "key": key,
            "config": {}, "dropped_keys": [], "notes": []}


def _finish(cfg: dict[str, Any], rec: dict[str, Any], backend: Backend, *, down: bool, tma: bool,
            has_hooks: bool, quant: QuantSpec) -> dict[str, Any]:
    """Pop/honour USE_TMA, apply the whitelist and the block-quant BLOCK_SIZE_K clamp."""
    origin = rec["file"] or rec["source"]
    if cfg.pop("USE_TMA", False):
        if not down:
            rec["notes"].append("USE_TMA ignored for gemm1 (only _down tables carry it)")
        elif has_hooks:
            rec["notes"].append("USE_TMA off: hooks are registered (rows must stay token-major)")
        elif not tma:
            rec["notes"].append(f"USE_TMA off: backend {backend.name!r} has no tensor descriptors here")
        else:
            cfg["USE_TMA"] = True
    for name in sorted(set(cfg) - set(backend.config_keys)):
        del cfg[name]
        rec["dropped_keys"].append(name)
        _warn_once(("whitelist", origin, name), "moe-core: dropping config key %r of %s: backend %r "
                   "does not take it", name, origin, backend.name)
    if quant.is_block:
        bk = quant.block_shape[1]
        old = cfg["BLOCK_SIZE_K"]
        while bk % cfg["BLOCK_SIZE_K"] and cfg["BLOCK_SIZE_K"] > 16:
            cfg["BLOCK_SIZE_K"] //= 2
        if cfg["BLOCK_SIZE_K"] != old:
            rec["notes"].append(f"BLOCK_SIZE_K {old} -> {cfg['BLOCK_SIZE_K']} (must divide block bk={bk})")
    return cfg


def _clamp_shared_memory(cfg: dict[str, Any], rec: dict[str, Any], limit: int | None,
                         a_bytes: float, b_bytes: float, gemm: str) -> None:
    """Fewer stages first, then smaller BLOCK_SIZE_K / BLOCK_SIZE_N (never BLOCK_SIZE_M)."""
    if not limit:
        return
    need = estimate_shared_memory(cfg, a_bytes, b_bytes)
    if need <= limit:
        return
    before = dict(cfg)
    stages = int(cfg.get("num_stages", TRITON_DEFAULT_STAGES))
    while stages > 1 and estimate_shared_memory({**cfg, "num_stages": stages}, a_bytes, b_bytes) > limit:
        stages -= 1
    cfg["num_stages"] = stages
    for dim in ("BLOCK_SIZE_K", "BLOCK_SIZE_N"):
        while cfg[dim] > 16 and estimate_shared_memory(cfg, a_bytes, b_bytes) > limit:
            cfg[dim] //= 2
    after = estimate_shared_memory(cfg, a_bytes, b_bytes)
    changed = {k: f"{before.get(k)} -> {cfg[k]}" for k in cfg if before.get(k) != cfg[k]}
    note = f"shared memory {need} B > device limit {limit} B: {changed}" + (
        "" if after <= limit else f" (still {after} B)")
    rec["notes"].append(note)
    _warn_once(("smem", rec["file"] or rec["source"], gemm, tuple(sorted(before.items())), limit),
               "moe-core: %s config of %s clamped: %s", gemm, rec["file"] or rec["source"], note)


def resolve_configs(backend: Backend, *, M: int, E: int, I: int, H: int, top_k: int,
                    act_dtype: torch.dtype, quant: QuantSpec, has_hooks: bool,
                    device_name: str | None = None) -> Resolved:
    """Resolve the gemm1 and gemm2 configs for one forward; both share ``BLOCK_SIZE_M``.

    :param M: tokens (not ``M·k``): the batch key is the one nearest to it.
    :param E: local experts; :param I: logical intermediate size per partition (file ``N``).
    :param device_name: use this device name instead of ``backend.device_name()`` (the
        ``configs`` command on a machine without the device).
    :returns: a fresh :class:`Resolved` the caller may mutate.
    """
    override = get_override()
    det = envs.deterministic()
    dtype = quant.config_dtype(act_dtype)
    block = tuple(quant.block_shape) if quant.is_block else None
    device = device_name if device_name is not None else str(_safe(backend.device_name, ""))
    device = device.replace(" ", "_")
    running = files.triton_version()
    roots = [] if (override is not None or det) else search_roots(backend)
    limit = _safe(backend.shared_memory_limit, None)
    tma = bool(_safe(backend.has_tma, False))
    memo_key = (type(backend).__qualname__, backend.name, device, tuple(backend.device_aliases),
                backend.config_keys, limit, tma, running, tuple(str(r) for r in roots),
                M, E, I, H, top_k, act_dtype, dtype, block, quant.per_channel, quant.scheme,
                has_hooks, det, None if override is None else repr(sorted(override.items())))
    hit = _RESOLVED.get(memo_key)
    if hit is not None:
        return hit.copy()
    up_key = files.FileKey(E=E, N=I, device_name=device, dtype=dtype, block_shape=block,
                           per_channel=quant.per_channel)
    down_key = attrs.evolve(up_key, down=True)
    lookup = {"up_file_name": files.config_file_name(up_key),
              "down_file_name": files.config_file_name(down_key),
              "device_name": device, "triton": files.triton_folder(running),
              "roots": [str(r) for r in roots], "M": M}

    if override is not None:
        up_rec, down_rec = _record("override_config"), _record("override_config")
        up, down = dict(override), dict(override)
    elif det:
        up_rec, down_rec = _record("deterministic default"), _record("deterministic default")
        up = backend.default_config(M, E, 2 * I, H, top_k, dtype, block, deterministic=True)
        down = backend.default_config(M, E, H, I, top_k, dtype, block, deterministic=True)
    else:
        up_found, up_table = _lookup(backend, up_key, running, roots)
        down_found, down_table = _lookup(backend, down_key, running, roots)
        if up_table is not None:
            k = nearest_key(up_table, M)
            up_rec, up = _record("file", up_found, k), dict(up_table[k])
        else:
            if roots:
                _warn_once(("missing", up_key, tuple(lookup["roots"])), "moe-core: no tuned config for %s "
                           "(searched %s); using backend %r defaults", lookup["up_file_name"],
                           ", ".join(lookup["roots"]), backend.name)
            else:
                logger.debug("backend %r declares no config dirs; using its defaults", backend.name)
            up_rec = _record("default")
            up = backend.default_config(M, E, 2 * I, H, top_k, dtype, block)
        if down_table is not None:
            k = nearest_key(down_table, M)
            down_rec, down = _record("file", down_found, k), dict(down_table[k])
        elif up_table is not None:
            _warn_once(("no-down", str(up_found)), "moe-core: no %s; gemm2 reuses %s without TMA",
                       lookup["down_file_name"], up_found)
            down_rec = _record("up table (no _down file)", up_found, up_rec["key"])
            down = dict(up_table[up_rec["key"]])
            down.pop("USE_TMA", None)
        else:
            down_rec = _record("default")
            down = backend.default_config(M, E, H, I, top_k, dtype, block)

    up = _finish(dict(up), up_rec, backend, down=False, tma=tma and not has_hooks, has_hooks=has_hooks,
                 quant=quant)
    down = _finish(dict(down), down_rec, backend, down=True, tma=tma and not has_hooks, has_hooks=has_hooks,
                   quant=quant)
    if down["BLOCK_SIZE_M"] != up["BLOCK_SIZE_M"]:
        note = f"BLOCK_SIZE_M {down['BLOCK_SIZE_M']} -> {up['BLOCK_SIZE_M']} (shared with gemm1)"
        down_rec["notes"].append(note)
        up_src, down_src = up_rec["file"] or up_rec["source"], down_rec["file"] or down_rec["source"]
        _warn_once(("block_m", up_src, down_src), "moe-core: gemm2 config of %s has BLOCK_SIZE_M %d, "
                   "gemm1 config of %s has %d; both GEMMs share one alignment, gemm2 uses %d",
                   down_src, down["BLOCK_SIZE_M"], up_src, up["BLOCK_SIZE_M"], up["BLOCK_SIZE_M"])
        down["BLOCK_SIZE_M"] = up["BLOCK_SIZE_M"]
    a_bytes, b_bytes = _operand_bytes(act_dtype, quant)
    _clamp_shared_memory(up, up_rec, limit, a_bytes, b_bytes, "gemm1")
    _clamp_shared_memory(down, down_rec, limit, a_bytes, b_bytes, "gemm2")
    lookup["shared_memory_limit"] = limit
    check_config(up, source=up_rec["file"] or up_rec["source"])
    check_config(down, source=down_rec["file"] or down_rec["source"])
    up_rec["config"], down_rec["config"] = dict(up), dict(down)
    why = {"source": up_rec["source"], "dtype": dtype, "gemm1": up_rec, "gemm2": down_rec,
           "lookup": lookup, "dropped_keys": sorted(set(up_rec["dropped_keys"]) | set(down_rec["dropped_keys"]))}
    resolved = Resolved(config=up, down_config=down, why=_freeze(why))
    with _LOCK:
        _RESOLVED[memo_key] = resolved
    return resolved.copy()


def format_why(why: Mapping[str, Any]) -> list[str]:
    """Human-readable lines of a :class:`Resolved` ``why`` record (for ``explain`` and the CLI)."""
    lines = []
    lookup = why.get("lookup")
    source = why.get("gemm1", {}).get("source")
    if isinstance(lookup, Mapping) and source in ("override_config", "deterministic default"):
        lines.append(f"configs for M={lookup['M']}: {source}, no files searched")
    elif isinstance(lookup, Mapping):
        roots = ", ".join(lookup["roots"]) or "no directories"
        lines.append(f"configs for M={lookup['M']} on {lookup['device_name'] or '?'} ({lookup['triton']}): "
                     f"looked for {lookup['up_file_name']} and {lookup['down_file_name']} in {roots}")
    for gemm in ("gemm1", "gemm2"):
        rec = why.get(gemm)
        if not isinstance(rec, Mapping):
            continue
        where = rec["file"] or "-"
        key = "" if rec["key"] is None else f", entry {rec['key']}"
        lines.append(f"{gemm}: {rec['source']}{key} ({where}): {dict(rec['config'])}")
        if rec["dropped_keys"]:
            lines.append(f"  dropped keys: {', '.join(rec['dropped_keys'])}")
        lines.extend(f"  {note}" for note in rec["notes"])
    return lines
