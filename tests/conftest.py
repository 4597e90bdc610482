"""Shared fixtures: interpreter switch, registry isolation, NaN-filled empties, Hypothesis profiles."""

from __future__ import annotations

import os

# Before anything imports Triton: run kernels under the interpreter when no GPU exists.
try:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest
import torch
from hypothesis import settings

settings.register_profile("dev", deadline=None, max_examples=20)
settings.register_profile("ci", deadline=None, max_examples=30, derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

HAS_GPU = torch.cuda.is_available()

# Tests use small tensors: one intra-op thread per process is faster than oversubscribing the
# CI machine's 2 cores (pytest -n 2 already runs two processes).
if not HAS_GPU:
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch: pytest.MonkeyPatch):
    """Fresh plugin registry and config memo per test; MOE_CORE_* variables restored."""
    from moe_core import plugins

    for name in list(os.environ):
        if name.startswith("MOE_CORE_"):
            monkeypatch.delenv(name)
    plugins.reset()
    _clear_memos()
    yield
    plugins.reset()
    _clear_memos()


def _clear_memos() -> None:
    from moe_core import config

    clear = getattr(config, "clear_cache", None)
    if clear is not None:
        clear()


@pytest.fixture
def nan_empty(monkeypatch: pytest.MonkeyPatch):
    """``torch.empty``/``empty_like`` return NaN-filled float tensors (unwritten rows show up)."""
    from moe_core.testing.conformance import poison_empty

    poison_empty(monkeypatch)
    yield


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if HAS_GPU else "cpu")
