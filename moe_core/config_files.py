"""Tuned kernel-config files: naming, parsing and the directory search (SEMANTICS §5.2, §5.3).

Names (ours)::

    E={E},N={N},device_name={name}[,dtype={d}][,block_shape=[bn,bk]][,per_channel_quant=True][_down].json

``N`` is the logical intermediate size per partition (``I``). When reading, the SGLang
spelling ``[bn, bk]`` and an empty ``device_name=`` are accepted too. Directories may be
:class:`pathlib.Path` or :class:`importlib.resources.abc.Traversable` objects.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Union

import attrs

from moe_core.errors import ConfigError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = ["FileKey", "config_file_name", "parse_file_name", "triton_version", "triton_folder",
           "version_folders", "find_config_file", "load_table", "parse_table", "FoundFile", "write_json", "write_table", "ENTRY_KEY_ORDER"]

Dir = Union[Path, "Traversable"]

_NAME_RE = re.compile(
    r"^E=(?P<E>\d+),N=(?P<N>\d+),device_name=(?P<device>[^,]*?)"
    r"(?:,dtype=(?P<dtype>[A-Za-z0-9_]+?))?"
    r"(?:,block_shape=\[(?P<bn>\d+), ?(?P<bk>\d+)\])?"
    r"(?P<per_channel>,per_channel_quant=True)?"
    r"(?P<down>_down)?\.json$")
_FOLDER_RE = re.compile(r"^triton_(\d+)_(\d+)_(\d+)$")
#: keys whose values must be powers of two >= 16 (the ``tl.dot`` path)
BLOCK_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K")


@attrs.frozen
class FileKey:
    """What a config file is for; its name is a function of these fields.

    :param E: local experts.
    :param N: logical intermediate size per partition (``I``).
    :param device_name: torch's device name with spaces replaced by ``_`` ("" = any device).
    :param dtype: config dtype string (SEMANTICS §4.2) or None for fp16/bf16.
    :param block_shape: ``(bn, bk)`` of block quantization, or None.
    :param per_channel: per-token × per-channel w8a8.
    :param down: the gemm2 (``_down``) table.
    """

    E: int
    N: int
    device_name: str
    dtype: str | None = None
    block_shape: tuple[int, int] | None = attrs.field(
        default=None, converter=lambda b: tuple(b) if b is not None and all(b) else None)
    per_channel: bool = False
    down: bool = False


def config_file_name(key: FileKey) -> str:
    """Our file name for ``key`` (``[bn,bk]`` without a space)."""
    name = f"E={key.E},N={key.N},device_name={key.device_name.replace(' ', '_')}"
    if key.dtype:
        name += f",dtype={key.dtype}"
    if key.block_shape is not None:
        name += f",block_shape=[{key.block_shape[0]},{key.block_shape[1]}]"
    if key.per_channel:
        name += ",per_channel_quant=True"
    if key.down:
        name += "_down"
    return name + ".json"


def parse_file_name(name: str) -> FileKey | None:
    """The :class:`FileKey` of a file name in our, vLLM's or SGLang's spelling; None if not one."""
    m = _NAME_RE.match(name)
    if m is None:
        return None
    block = (int(m["bn"]), int(m["bk"])) if m["bn"] is not None else None
    return FileKey(E=int(m["E"]), N=int(m["N"]), device_name=m["device"], dtype=m["dtype"],
                   block_shape=block, per_channel=m["per_channel"] is not None, down=m["down"] is not None)


@functools.lru_cache(maxsize=1)
def triton_version() -> tuple[int, int, int] | None:
    """``(X, Y, Z)`` of the running Triton, or None when Triton is missing (cached)."""
    try:
        import triton
    except ImportError:
        return None
    nums = re.findall(r"\d+", triton.__version__.split("+")[0])[:3]
    return tuple(int(n) for n in nums + ["0"] * (3 - len(nums)))  # type: ignore[return-value]


def triton_folder(version: tuple[int, int, int] | None = None) -> str:
    """``triton_X_Y_Z`` of ``version`` (default: the running Triton)."""
    version = version if version is not None else triton_version()
    if version is None:
        return "triton_unknown"
    return "triton_{}_{}_{}".format(*version)


def version_folders(root: Dir, running: tuple[int, int, int] | None) -> list[tuple[Dir, bool]]:
    """The folders of ``root`` to search, in order, each with "is another Triton version".

    The running version's ``triton_X_Y_Z`` first, then the other ``triton_*`` folders newest
    first, then ``root`` itself. Missing folders are left out.
    """
    try:
        if not root.is_dir():
            return []
        children = list(root.iterdir())
    except OSError:
        return []
    exact: list[tuple[Dir, bool]] = []
    others: list[tuple[tuple[int, ...], Dir]] = []
    for child in children:
        m = _FOLDER_RE.match(child.name)
        if m is None or not child.is_dir():
            continue
        version = tuple(int(g) for g in m.groups())
        if running is not None and version == tuple(running):
            exact.append((child, False))
        else:
            others.append((version, child))
    others.sort(key=lambda vc: vc[0], reverse=True)
    return exact + [(c, True) for _, c in others] + [(root, False)]


@attrs.frozen
class FoundFile:
    """A config file found by :func:`find_config_file`."""

    path: Any                       # Path or Traversable
    other_version: bool             # found in another Triton version's folder
    device_name: str                # the device part of its name (exact, alias or "")

    def __str__(self) -> str:
        return str(self.path)


def find_config_file(roots: Iterable[Dir], key: FileKey, device_names: Iterable[str],
                     running: tuple[int, int, int] | None) -> FoundFile | None:
    """The first file for ``key`` in the search order of SEMANTICS §5.3.

    :param roots: ``$MOE_CORE_CONFIG_DIR`` first, then the backend's config dirs.
    :param device_names: the exact device name, then its aliases; ``""`` (any device,
        as in one SGLang file) is tried last in each folder.
    :param running: the running Triton version.
    """
    preference = [n for n in dict.fromkeys([*device_names, ""])]
    for root in roots:
        for folder, other in version_folders(root, running):
            by_device: dict[str, Any] = {}
            for child in folder.iterdir():
                parsed = parse_file_name(child.name)
                if parsed is None or attrs.evolve(parsed, device_name=key.device_name) != key:
                    continue
                if parsed.device_name in preference and parsed.device_name not in by_device:
                    by_device[parsed.device_name] = child
            for name in preference:
                if name in by_device and by_device[name].is_file():
                    return FoundFile(by_device[name], other, name)
    return None


def parse_table(text: str, source: str) -> dict[int, dict[str, Any]]:
    """Parse the JSON body of a config file into ``{batch size: entry}``.

    Non-integer top-level keys (vLLM's ``triton_version``) are ignored. Raises
    :class:`ConfigError` naming ``source`` when the JSON is corrupt, an entry is not an
    object of scalars, a block size is missing or not a power of two >= 16, or no entry is left.
    """
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"corrupt kernel-config file {source}: {exc}") from exc
    if not isinstance(body, dict):
        raise ConfigError(f"corrupt kernel-config file {source}: expected a JSON object of "
                          f"batch sizes, got {type(body).__name__}")
    table: dict[int, dict[str, Any]] = {}
    for raw_key, entry in body.items():
        try:
            m = int(raw_key)
        except (TypeError, ValueError):
            continue
        if not isinstance(entry, dict):
            raise ConfigError(f"corrupt kernel-config file {source}: entry {raw_key!r} must be an "
                              f"object, got {type(entry).__name__}")
        for name, value in entry.items():
            if not isinstance(value, (int, str)):       # bool is an int
                raise ConfigError(f"corrupt kernel-config file {source}: entry {raw_key!r} key "
                                  f"{name!r} must be an int, bool or string, got {value!r}")
        for name in BLOCK_KEYS:
            value = entry.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ConfigError(f"corrupt kernel-config file {source}: entry {raw_key!r} {name} "
                                  f"must be a power of two >= 16, got {value!r}")
        table[m] = dict(entry)
    if not table:
        raise ConfigError(f"corrupt kernel-config file {source}: no batch-size entries")
    return table


def load_table(path: Dir) -> dict[int, dict[str, Any]]:
    """Read and parse one config file (:func:`parse_table`); ConfigError names the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read kernel-config file {path}: {exc}") from exc
    return parse_table(text, str(path))


#: key order of each entry :func:`write_table` writes (others follow, sorted)
ENTRY_KEY_ORDER = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages",
                   "USE_TMA")


def write_json(path: Path, body: Any) -> None:
    """Write ``body`` as indented JSON at ``path`` atomically (temp file + rename), so an
    interrupted writer leaves the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(body, indent=4) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_table(path: Path, table: Mapping[Any, Any]) -> None:
    """Write a config table in our file format (:func:`write_json`): batch sizes ascending
    (int or digit-string keys; other top-level keys such as vLLM's ``triton_version`` first, as
    they were), each entry's keys in :data:`ENTRY_KEY_ORDER`."""
    def order(key: Any) -> int:
        return int(key) if str(key).isdigit() else -1

    def entry(value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        keys = [k for k in ENTRY_KEY_ORDER if k in value] + sorted(k for k in value if k not in ENTRY_KEY_ORDER)
        return {k: value[k] for k in keys}

    write_json(path, {str(k): entry(table[k]) for k in sorted(table, key=order)})
