"""``moe-core-example``: a third-party moe-core backend, installed as its own distribution.

Entry point (``setup.cfg``)::

    [options.entry_points]
    moe_core.backends =
        example = moe_core_example:ExampleBackend

The registry imports this module and instantiates :class:`ExampleBackend` with no arguments,
so it stays light: the class only describes itself; the GEMM lives in
:mod:`moe_core_example.gemm` and is imported on the first call.
"""

from __future__ import annotations

from moe_core_example.backend import ExampleBackend

__all__ = ["ExampleBackend"]
