"""Shared by the benchmark scripts: stand-ins for every Triton kernel the sequence launches."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Any, Callable


class StandIn:
    """Takes a ``@triton.jit`` kernel's place: ``kernel[grid](*args, **kwargs)`` calls
    ``on_launch(name, kernel, args, kwargs)`` instead of launching."""

    def __init__(self, name: str, kernel: Any, on_launch: Callable[[str, Any, tuple, dict], None]) -> None:
        self.name, self.kernel, self.on_launch = name, kernel, on_launch

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return lambda *args, **kwargs: self.on_launch(self.name, self.kernel, args, kwargs)


def replace_kernels(on_launch: Callable[[str, Any, tuple, dict], None]) -> None:
    """Put a :class:`StandIn` in place of every ``_*_kernel`` in the ``moe_core.kernels`` modules
    (the private kernel modules and the wrappers that imported the names). Once per process:
    stand-ins already in place stay."""
    import moe_core.kernels

    for info in pkgutil.iter_modules(moe_core.kernels.__path__, "moe_core.kernels."):
        importlib.import_module(info.name)
    for module in [m for n, m in list(sys.modules.items()) if n.startswith("moe_core.kernels.")]:
        for name in dir(module):
            obj = getattr(module, name)
            if name.startswith("_") and name.endswith("_kernel") and not isinstance(obj, StandIn):
                setattr(module, name, StandIn(name, obj, on_launch))
