"""The moe-core pytest plugin (``pytest11`` entry point ``moe_core``): backend conformance.

``pytest --moe-backend NAME`` adds the conformance suite
(:class:`moe_core.testing.conformance.BackendConformanceTests`) run against the installed
backend ``NAME`` to whatever else is collected; ``pytest --moe-backend NAME --pyargs
moe_core.testing.plugin`` runs it alone. A test module may instead subclass the base class
itself (``backend_name = "mine"``); ``--moe-backend`` then names the backend of subclasses
that leave ``backend_name`` unset.

Import-light: loaded by every pytest run in an environment where moe-core is installed, so
this module imports neither torch nor moe-core until the option is used.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest

__all__ = ["pytest_addoption", "pytest_configure", "pytest_collection_modifyitems", "selected_backend"]

#: markers the conformance suite uses, registered here so ``--strict-markers`` projects accept them
_MARKERS = {
    "moe_conformance": "moe_conformance: a test of the moe-core backend conformance suite",
    "gpu": "gpu: needs a CUDA GPU; skipped (never failed) where none exists",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("moe_core", "moe-core backend conformance")
    group.addoption("--moe-backend", action="store", default=None, metavar="NAME", dest="moe_backend",
                    help="run the moe-core backend conformance suite against the installed backend NAME "
                         "(see `moe-core backends`)")


def pytest_configure(config: pytest.Config) -> None:
    known = {line.split(":", 1)[0].split("(", 1)[0].strip() for line in config.getini("markers")}
    for name, line in _MARKERS.items():
        if name not in known:
            config.addinivalue_line("markers", line)


def selected_backend(config: pytest.Config) -> str | None:
    """The ``--moe-backend`` value, or None."""
    return config.getoption("moe_backend", default=None)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """With ``--moe-backend NAME``: collect ``TestBackendConformance[NAME]`` in front of the
    other items (before ``-k``/``-m`` deselection, which then applies to it too)."""
    name = selected_backend(config)
    if not name:
        return
    from moe_core.testing import conformance

    cls = type("TestBackendConformance", (conformance.BackendConformanceTests,),
               {"backend_name": name, "__module__": "moe_core_conformance",
                "__doc__": f"The moe-core conformance suite against backend {name!r} (--moe-backend)."})
    holder = types.ModuleType("moe_core_conformance", f"moe-core conformance suite for backend {name!r}")
    holder.TestBackendConformance = cls  # type: ignore[attr-defined]
    module = pytest.Module.from_parent(session, path=Path(conformance.__file__))
    module.obj = holder
    items[:0] = list(session.genitems(module))
