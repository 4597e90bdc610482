"""Fixture distributions for plugin-discovery tests (TESTING.md §10).

A distribution is a ``<dist>-<version>.dist-info`` (or stale ``<dist>.egg-info``) folder
with ``METADATA``/``PKG-INFO`` and ``entry_points.txt``, plus its plugin modules, written
into a folder that is prepended to ``sys.path``. ``importlib.metadata`` sees it at once;
nothing is installed. The :func:`dists` fixture removes the modules it wrote from
``sys.modules`` afterwards, so module names may repeat across tests.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

__all__ = ["DistFactory", "dists", "BACKEND_HEADER"]

#: prelude of generated backend modules: a cheap backend reusing the torch steps
BACKEND_HEADER = """
from moe_core.reference import TorchBackend
from moe_core.backend import Backend
"""


class DistFactory:
    """Writes fixture distributions under one root on ``sys.path``."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.monkeypatch = monkeypatch
        self.modules: set[str] = set()
        self._on_path: set[Path] = set()

    def folder(self, sub: str | None = None) -> Path:
        """A folder on ``sys.path`` (``sub`` gives a second, separately prepended one)."""
        where = self.root if sub is None else self.root / sub
        where.mkdir(parents=True, exist_ok=True)
        if where not in self._on_path:
            self.monkeypatch.syspath_prepend(str(where))
            self._on_path.add(where)
        return where

    def add(self, dist: str, version: str = "1.0", *, backends: dict[str, str] | None = None,
            hooks: dict[str, str] | None = None, modules: dict[str, str] | None = None,
            egg_info: bool = False, sub: str | None = None) -> Path:
        """Write one distribution.

        :param backends: entry-point name -> ``module:attr`` in ``moe_core.backends``.
        :param hooks: entry-point name -> ``module`` or ``module:attr`` in ``moe_core.hooks``.
        :param modules: module name -> source (dedented) written beside the metadata.
        :param egg_info: write ``<dist>.egg-info/PKG-INFO`` instead of a ``.dist-info``.
        :param sub: a sub-folder prepended to ``sys.path`` on its own (for shadowing).
        :returns: the metadata folder.
        """
        where = self.folder(sub)
        stem = dist.replace("-", "_")
        meta = where / (f"{stem}.egg-info" if egg_info else f"{stem}-{version}.dist-info")
        meta.mkdir()
        head = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
        (meta / ("PKG-INFO" if egg_info else "METADATA")).write_text(head)
        text = ""
        for group, entries in (("moe_core.backends", backends), ("moe_core.hooks", hooks)):
            if entries:
                text += f"[{group}]\n" + "".join(f"{n} = {v}\n" for n, v in entries.items()) + "\n"
        (meta / "entry_points.txt").write_text(text)
        for name, source in (modules or {}).items():
            (where / f"{name}.py").write_text(textwrap.dedent(source))
            self.modules.add(name)
        importlib.invalidate_caches()
        return meta

    def cleanup(self) -> None:
        """Forget the generated modules."""
        for name in self.modules:
            sys.modules.pop(name, None)
        importlib.invalidate_caches()


@pytest.fixture
def dists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DistFactory]:
    """A :class:`DistFactory` writing under ``tmp_path``; modules forgotten afterwards."""
    factory = DistFactory(tmp_path, monkeypatch)
    yield factory
    factory.cleanup()
