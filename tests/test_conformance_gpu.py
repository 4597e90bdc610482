"""The conformance suite on a CUDA GPU (marker ``gpu``; skipped without one): ``cuda`` passes
all of it, CUDA-graph replay included; the third-party example's ``torch._grouped_mm`` path
(bf16 on CUDA) passes it too. Same suite as ``pytest --moe-backend cuda``."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from moe_core.testing.conformance import BackendConformanceTests

pytestmark = pytest.mark.gpu

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "third_party_backend"


class TestCudaConformance(BackendConformanceTests):
    backend_name = "cuda"


class TestCudaConformanceProductionTiles(BackendConformanceTests):
    """Shapes where the [128, 128] fp8 blocks and 64-wide groups of real checkpoints tile K."""

    backend_name = "cuda"
    dtypes = (torch.bfloat16,)
    num_tokens, num_experts, top_k, hidden_size, intermediate_size = 33, 8, 2, 256, 128
    block_shape = (128, 128)
    group_size = 64
    quant_cases = ("fp8-per-tensor", "fp8-per-channel", "fp8-block", "int8_w8a8-block", "int4_w4a16-group")
    activations = ("swiglu_oai",)


class TestCudaUnfusedActivationConformance(BackendConformanceTests):
    """``cuda`` with the activation as its own kernel at every tile. ``cuda`` fuses it into
    gemm1's epilogue up to 128x128 tiles, which the suite's shapes always resolve to, so this
    class keeps the separate activation kernel covered: the whole suite, every scheme, at the
    production-sized quant blocks."""

    backend_name = "cuda"
    dtypes = (torch.bfloat16, torch.float16)
    num_tokens, num_experts, top_k, hidden_size, intermediate_size = 33, 8, 2, 256, 128
    block_shape = (128, 128)
    group_size = 64

    def make_backend(self, config: pytest.Config):
        from moe_core.backends.cuda import CudaBackend

        class UnfusedCuda(CudaBackend):
            fuse_activation = False

        return UnfusedCuda()


class TestExampleConformanceGpu(BackendConformanceTests):
    backend_name = "example"
    dtypes = (torch.bfloat16, torch.float32)
    hidden_size, intermediate_size = 64, 32

    @pytest.fixture(autouse=True)
    def _installed(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        meta = tmp_path / "moe_core_example-0.1.0.dist-info"
        meta.mkdir()
        (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: moe-core-example\nVersion: 0.1.0\n")
        (meta / "entry_points.txt").write_text("[moe_core.backends]\nexample = moe_core_example:ExampleBackend\n")
        monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
        monkeypatch.syspath_prepend(str(tmp_path))
        importlib.invalidate_caches()
