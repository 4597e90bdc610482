"""Weight tiles through tensor descriptors (TMA) in the grouped GEMM, under the interpreter:
bitwise the pointer loads (fp16, every fused mode, ragged N and K, ``-1`` blocks), against
the float64 oracle through a backend that opts in; where the kernel must fall back
(:func:`weight_descriptor_ok`); and the cuda backend's measured tile rule."""

from __future__ import annotations

import pytest
import torch

from moe_core import ExpertWeights, MoELayer, MoERunner, QuantSpec
from moe_core.kernels.backend import TritonBackend, interpreting
from moe_core.testing import assert_close_normalized, tolerance_for
from tests.forward_cases import epilogue_layer, gated_case

pytestmark = pytest.mark.interp


@pytest.fixture(autouse=True)
def _interpreter_only() -> None:
    if not interpreting():
        pytest.skip("runs only under the Triton interpreter (the GPU suite runs TMA on sm90)")


def _gemm(a, w, ids, k, cfg, *, tma, activation=None, tw=None):
    from moe_core.align import moe_align_block_size_torch
    from moe_core.kernels.gemm import grouped_gemm

    sorted_ids, expert_ids, n_post = moe_align_block_size_torch(ids, cfg["BLOCK_SIZE_M"], w.shape[0])
    cols = w.shape[1] // 2 if activation is not None and activation.is_gated else w.shape[1]
    out = torch.full((ids.numel(), cols), float("nan"), dtype=a.dtype)
    tw = torch.ones(ids.shape, dtype=torch.float32) if tw is None else tw
    return grouped_gemm(a, w, out, a_scale=None, w_scale=None, w_zp=None, bias=None, topk_weights=tw,
                        sorted_token_ids=sorted_ids, expert_ids=expert_ids, num_tokens_post_padded=n_post,
                        top_k=k, mul_routed_weight=False, quant=QuantSpec.none(), config=cfg,
                        activation=activation, weight_tma=tma)


# N, K, BLOCK_SIZE_N, BLOCK_SIZE_K: N not a multiple of BN (rows of the next expert feed masked
# columns; the last expert's run past the end and are zero-filled), K not a multiple of BK
SHAPES = [(48, 64, 32, 32), (40, 72, 16, 64), (64, 40, 64, 16), (24, 136, 32, 128)]


@pytest.mark.parametrize("N,K,bn,bk", SHAPES)
@pytest.mark.parametrize("fused", [None, "halves", "interleaved", "plain"])
def test_tma_tiles_are_bitwise_the_pointer_tiles(N, K, bn, bk, fused) -> None:
    M, E, k = 13, 5, 2
    g = torch.Generator().manual_seed(N + K)
    a = (torch.randn(M, K, generator=g) / 4).half()
    w = (torch.randn(E, N, K, generator=g) / 8).half()
    ids = torch.randint(0, E, (M, k), generator=g, dtype=torch.int32)
    ids[3, 1] = -1
    ids[7, 0] = E - 1                                   # the last expert's rows reach the end of w
    layer = epilogue_layer(fused, E, k, N, K)
    cfg = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "GROUP_SIZE_M": 2}
    plain = _gemm(a, w, ids, k, cfg, tma=False, activation=layer)
    tma = _gemm(a, w, ids, k, cfg, tma=True, activation=layer)
    assert not torch.isnan(tma).any(), "TMA path left rows unwritten"
    assert torch.equal(tma, plain)
    if fused is None:   # the GEMM itself against float64
        flat = ids.reshape(-1)
        for s in torch.nonzero(flat >= 0).flatten().tolist():
            want = a[s // k].double() @ w[int(flat[s])].double().T
            torch.testing.assert_close(tma[s].double(), want, atol=2e-3, rtol=2e-3)
        assert torch.equal(tma[flat == -1], torch.zeros_like(tma[flat == -1]))


def test_interleaved_tiles_over_256_rows_take_the_two_views() -> None:
    """A gated tile of 512 act columns reads 512 gate/up pairs: over a TMA box's 256 rows, so
    gate and up come through the two strided views (two dots), still bitwise the pointer loads."""
    M, E, k, N, K = 13, 3, 2, 96, 32
    g = torch.Generator().manual_seed(9)
    a = (torch.randn(M, K, generator=g) / 4).half()
    w = (torch.randn(E, N, K, generator=g) / 8).half()
    ids = torch.randint(0, E, (M, k), generator=g, dtype=torch.int32)
    layer = epilogue_layer("interleaved", E, k, N, K)
    cfg = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 512, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1}
    plain = _gemm(a, w, ids, k, cfg, tma=False, activation=layer)
    tma = _gemm(a, w, ids, k, cfg, tma=True, activation=layer)
    assert not torch.isnan(tma).any() and torch.equal(tma, plain)


class TmaTriton(TritonBackend):
    """Every GEMM asks for weight TMA (the interpreter emulates the descriptor loads)."""

    name = "tma-triton"
    fuse_activation = True

    def uses_weight_tma(self, config, quant, activation) -> bool:
        return True


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("layout", ["halves", "interleaved"])
def test_forward_with_weight_tma_matches_oracle(dtype, layout, nan_empty) -> None:
    case = gated_case(5, dtype, layout)
    weights = ExpertWeights(case.w1, case.w2)
    out = MoERunner(case.layer, backend=TmaTriton()).run(case.x, weights, case.topk_weights, case.topk_ids)
    assert_close_normalized(out, case.oracle(), *tolerance_for(dtype), topk_ids=case.topk_ids)
    if dtype == torch.float16:
        # The interpreter's dot is numpy's fp32 matmul, whose summation order follows the
        # operand's memory layout and the CPU's BLAS kernel: the descriptor's transposed tile
        # can round a gemm1 output one fp16 ulp apart on some CPUs (9 of 1216 outputs on an
        # AMD EPYC, none on the machines before), which gemm2 carries on. So on the CPU the
        # two paths agree to within the fp16 rounding of the largest output; the bitwise
        # guarantee is the GPU test's (test_gpu_numerics.py::test_weight_tma_is_bitwise_the_pointer_loads).
        plain = MoERunner(case.layer, backend=TritonBackend()).run(case.x, weights, case.topk_weights, case.topk_ids)
        diff = (out.float() - plain.float()).abs().max().item()
        assert diff <= 2.0 ** -10 * plain.float().abs().max().item(), diff


def test_weight_descriptor_ok_falls_back_where_tma_cannot_read() -> None:
    from moe_core.kernels.gemm import weight_descriptor_ok

    w = torch.zeros(4, 32, 64, dtype=torch.float16)
    assert weight_descriptor_ok(w, 0, False)
    assert weight_descriptor_ok(w, 2, False)                             # w8a8: the tile is the operand
    for mode in (3, 4, 5):                                               # dequantized in the tile
        assert not weight_descriptor_ok(w, mode, False)
    assert not weight_descriptor_ok(w, 0, True)                          # interpreter upcast
    assert not weight_descriptor_ok(w.transpose(1, 2).contiguous().transpose(1, 2), 0, False)
    assert not weight_descriptor_ok(torch.zeros(4, 32, 36, dtype=torch.float16), 0, False)  # 72-byte rows
    assert not weight_descriptor_ok(torch.zeros(4, 33, 64, dtype=torch.float16)[:, :32], 0, False)


def test_cuda_weight_tma_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_core.backends.cuda import CudaBackend

    cuda = CudaBackend()
    gated = MoELayer(num_local_experts=4, top_k=1, hidden_size=64, intermediate_size=16)
    none, fp8 = QuantSpec.none(), QuantSpec.fp8_w8a8(torch.ones(1), torch.ones(1))

    def cfg(bm: int, bn: int) -> dict[str, int]:
        return {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": 64}

    assert not cuda.uses_weight_tma(cfg(16, 64), none, None)            # CPU: no TMA
    monkeypatch.setattr(CudaBackend, "has_tma", lambda self: True)
    assert cuda.uses_weight_tma(cfg(16, 64), none, None)                 # decode tiles
    assert not cuda.uses_weight_tma(cfg(32, 128), none, None)
    assert not cuda.uses_weight_tma(cfg(64, 128), none, None)
    assert cuda.uses_weight_tma(cfg(128, 128), none, None)               # gemm2: 128 weight rows
    assert not cuda.uses_weight_tma(cfg(128, 128), none, gated)          # gated gemm1: 64 + 64 rows
    assert cuda.uses_weight_tma(cfg(128, 256), none, gated)
    assert not cuda.uses_weight_tma(cfg(128, 256), fp8, None)            # fp8 measured slower
    assert not TritonBackend().uses_weight_tma(cfg(128, 256), none, None)
