"""Programmatic dependent launch (``moe_core.kernels._gdc``): when it is asked for.

That it changes no bit of a forward is a GPU test (``test_gpu_graphs.py::test_pdl_changes_no_bit``).
"""

from __future__ import annotations

import pytest
import torch


def test_pdl_is_never_asked_for_outside_a_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Programmatic dependent launch: no launch argument for CPU (interpreter) tensors, and none
    anywhere with ``MOE_CORE_PDL=0``; the bench's ``without_pdl`` sets that around one call only."""
    from moe_core import bench, envs
    from moe_core.kernels._launch import pdl_args

    monkeypatch.delenv("MOE_CORE_PDL", raising=False)
    assert envs.pdl() and pdl_args(torch.empty(2)) == {}
    for off in ("0", "false", "off"):
        monkeypatch.setenv("MOE_CORE_PDL", off)
        assert not envs.pdl()
    monkeypatch.setenv("MOE_CORE_PDL", "1")
    seen = bench.without_pdl(lambda: envs.pdl())()
    assert seen is False and envs.pdl()
