"""The host side of the sequence: grid arithmetic of the kernel wrappers, profiler labels of
the steps, and a backend failing inside a step (TESTING.md §11)."""

from __future__ import annotations

import pytest
import torch
import triton

import moe_core
from moe_core.kernels._launch import cdiv, next_power_of_2


@pytest.mark.parametrize("n", [*range(0, 70), 127, 128, 129, 1023, 1024, 1025, 65535, 65536, 2**31 - 1, 2**31 + 5])
def test_grid_arithmetic_equals_triton(n: int) -> None:
    assert next_power_of_2(n) == triton.next_power_of_2(n)
    for b in (1, 3, 16, 64, 128, 4096):
        assert cdiv(n, b) == triton.cdiv(n, b)


def test_steps_are_labelled_only_while_profiling() -> None:
    E, k, H, I, M = 4, 2, 32, 16, 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, H, generator=g)
    w1, w2 = torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    tw, ti = moe_core.select_experts(torch.randn(M, E, generator=g), top_k=k)
    plain = moe_core.fused_experts(x, w1, w2, tw, ti, backend="torch")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        profiled = moe_core.fused_experts(x, w1, w2, tw, ti, backend="torch")
    names = {e.key for e in prof.key_averages()}
    assert {"moe_core::align", "moe_core::gemm1", "moe_core::activation", "moe_core::gemm2",
            "moe_core::combine"} <= names
    assert torch.equal(plain, profiled)


@pytest.mark.parametrize("step", ["align", "gemm", "activation", "combine"])
def test_backend_failure_in_a_step_is_named_and_chained(step: str) -> None:
    from moe_core.errors import BackendExecutionError
    from moe_core.reference import TorchBackend

    class Broken(TorchBackend):
        name = "broken"

    def boom(self, *args, **kwargs):
        raise RuntimeError(f"{step} exploded")

    setattr(Broken, step, boom)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 32, generator=g)
    tw, ti = moe_core.select_experts(torch.randn(2, 4, generator=g), top_k=2)
    with pytest.raises(BackendExecutionError, match=rf"backend 'broken' .* failed in step '{step}1?': "
                                                    rf"RuntimeError: {step} exploded") as err:
        moe_core.fused_experts(x, torch.randn(4, 32, 32, generator=g), torch.randn(4, 32, 16, generator=g),
                               tw, ti, backend=Broken())
    assert isinstance(err.value.__cause__, RuntimeError)
