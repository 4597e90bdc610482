"""``fake``: a third-party backend that runs the torch steps under its own name."""

from __future__ import annotations

from moe_core.reference import TorchBackend

__all__ = ["FakeBackend"]


class FakeBackend(TorchBackend):
    """The torch backend's steps under another name, platform and priority."""

    name = "fake"
    platform = "fake"
    priority = -1

    def is_available(self) -> tuple[bool, str]:
        return True, "fake device always present"
