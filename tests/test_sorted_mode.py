"""Sorted mode (SEMANTICS §3 step 10, ``USE_TMA`` of a ``_down`` table) under the interpreter:
gemm1 stores ``act`` by position in ``sorted_token_ids``, gemm2 reads it so (pointer loads, or
one TMA copy per K step); bitwise the slot-major path, every valid position written, and the
whole forward against the float64 oracle. The GPU suite runs the TMA reads on sm90."""

from __future__ import annotations

import pytest
import torch

import moe_core
from moe_core import ExpertWeights, MoELayer, MoERunner, QuantSpec
from moe_core.errors import MoEInputError
from moe_core.kernels.backend import TritonBackend, interpreting
from moe_core.testing import assert_close_normalized, oracle_moe, tolerance_for
from tests.forward_cases import epilogue_layer, gated_case

pytestmark = pytest.mark.interp


@pytest.fixture(autouse=True)
def _interpreter_only() -> None:
    if not interpreting():
        pytest.skip("runs only under the Triton interpreter (the GPU suite runs sorted mode on sm90)")


def _aligned(ids: torch.Tensor, bm: int, E: int):
    from moe_core.align import moe_align_block_size_torch

    return moe_align_block_size_torch(ids, bm, E)


def _gemm(a, w, out, ids, k, cfg, aligned, *, activation=None, mul=False, tw=None, **mode):
    from moe_core.kernels.gemm import grouped_gemm

    sorted_ids, expert_ids, n_post = aligned
    tw = torch.ones(ids.shape, dtype=torch.float32) if tw is None else tw
    return grouped_gemm(a, w, out, a_scale=None, w_scale=None, w_zp=None, bias=None, topk_weights=tw,
                        sorted_token_ids=sorted_ids, expert_ids=expert_ids, num_tokens_post_padded=n_post,
                        top_k=k, mul_routed_weight=mul, quant=QuantSpec.none(), config=cfg,
                        activation=activation, **mode)


def _case(seed: int, N: int, K: int, fused: str | None, dtype=torch.float16):
    M, E, k = 13, 5, 2
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(M, K, generator=g) / 4).to(dtype)
    w = (torch.randn(E, N, K, generator=g) / 8).to(dtype)
    ids = torch.randint(0, E, (M, k), generator=g, dtype=torch.int32)
    ids[3, 1] = -1                                      # a filtered slot
    ids[:, 0][ids[:, 0] == 2] = 3                       # expert 2 has at most the second slots
    layer = epilogue_layer(fused, E, k, N, K)
    return a, w, ids, k, layer


@pytest.mark.parametrize("fused", [None, "halves", "interleaved", "plain"])
@pytest.mark.parametrize("bm", [16, 32])
def test_sorted_out_stores_row_p_for_position_p(fused, bm) -> None:
    N, K = 48, 40
    a, w, ids, k, layer = _case(bm + len(fused or ""), N, K, fused)
    cfg = {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 16, "GROUP_SIZE_M": 2}
    aligned = _aligned(ids, bm, w.shape[0])
    sorted_ids, expert_ids, n_post = aligned
    cols = N // 2 if layer is not None and layer.is_gated else N
    plain = _gemm(a, w, torch.full((ids.numel(), cols), float("nan"), dtype=a.dtype), ids, k, cfg, aligned,
                  activation=layer)
    P = sorted_ids.shape[0]
    out = _gemm(a, w, torch.full((P, cols), float("nan"), dtype=a.dtype), ids, k, cfg, aligned,
                activation=layer, sorted_out=True)
    n = int(n_post)
    S = ids.numel()
    valid = sorted_ids[:n] < S
    assert valid.any() and (~valid).any(), "the case needs padding rows"
    # every valid position holds its slot's row, bitwise the slot-major store
    assert torch.equal(out[:n][valid], plain[sorted_ids[:n][valid].long()])
    # padding rows are written (finite), rows past the padded count are never touched
    assert torch.isfinite(out[:n]).all()
    assert torch.isnan(out[n:]).all()
    # blocks of filtered slots are zero in sorted order too
    minus = (expert_ids[: n // bm] == -1).repeat_interleave(bm)
    assert torch.equal(out[:n][minus], torch.zeros_like(out[:n][minus]))


@pytest.mark.parametrize("a_tma", [False, True])
@pytest.mark.parametrize("N,K,bn,bk", [(48, 40, 32, 16), (40, 72, 16, 64), (24, 136, 32, 128)])
def test_sorted_in_is_bitwise_the_slot_major_gemm2(a_tma, N, K, bn, bk) -> None:
    """gemm2 over the sorted-mode buffer (pointer rows or TMA boxes) equals gemm2 over ``act``
    by slot; the buffer's padding rows hold garbage that must stay in masked rows."""
    act_slot, w, ids, _, _ = _case(N + K, N, K, None)
    M, k = ids.shape
    act_slot = (torch.randn(M * k, K, generator=torch.Generator().manual_seed(1)) / 4).half()
    cfg = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "GROUP_SIZE_M": 2}
    aligned = _aligned(ids, 16, w.shape[0])
    sorted_ids, _, n_post = aligned
    tw = torch.rand(ids.shape, generator=torch.Generator().manual_seed(2))
    plain = _gemm(act_slot, w, torch.full((M * k, N), float("nan"), dtype=torch.float16), ids, 1, cfg, aligned,
                  mul=True, tw=tw)
    # the sorted buffer: row p is slot sorted_ids[p]; padding rows large garbage, not zeros
    act_sorted = torch.full((sorted_ids.shape[0], K), 1e4, dtype=torch.float16)
    valid = sorted_ids < M * k
    act_sorted[valid] = act_slot[sorted_ids[valid].long()]
    out = _gemm(act_sorted, w, torch.full((M * k, N), float("nan"), dtype=torch.float16), ids, 1, cfg, aligned,
                mul=True, tw=tw, sorted_in=True, a_tma=a_tma)
    flat = ids.reshape(-1)
    assert torch.equal(out[flat >= 0], plain[flat >= 0])
    assert torch.equal(out[flat == -1], torch.zeros_like(out[flat == -1]))
    assert int(n_post) > int(valid.sum()), "the case needs padding rows"


def test_sorted_mode_checks_the_buffer_rows() -> None:
    a, w, ids, k, layer = _case(0, 48, 40, "halves")
    cfg = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 16}
    aligned = _aligned(ids, 16, w.shape[0])
    short = torch.empty((ids.numel(), 24), dtype=a.dtype)       # slot rows, fewer than P
    with pytest.raises(MoEInputError, match=r"out: sorted mode needs >= len\(sorted_token_ids\)"):
        _gemm(a, w, short, ids, k, cfg, aligned, activation=layer, sorted_out=True)
    with pytest.raises(MoEInputError, match=r"a: sorted mode needs"):
        _gemm(short, w.transpose(1, 2)[:, :, :24].contiguous(), torch.empty((ids.numel(), 40), dtype=a.dtype),
              ids, 1, cfg, aligned, sorted_in=True)


class SortedTriton(TritonBackend):
    """The shared kernels with tensor descriptors (the interpreter emulates the TMA loads)."""

    name = "sorted-triton"
    fuse_activation = True

    def has_tma(self) -> bool:
        return True


CFG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1, "USE_TMA": True}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("layout", ["halves", "interleaved"])
def test_forward_in_sorted_mode_matches_oracle(dtype, layout, nan_empty) -> None:
    case = gated_case(7, dtype, layout)
    weights = ExpertWeights(case.w1, case.w2)
    runner = MoERunner(case.layer, backend=SortedTriton())
    with moe_core.override_config(CFG):
        out = runner.run(case.x, weights, case.topk_weights, case.topk_ids)
        assert runner._last_plan.sorted_intermediate
        assert "sorted mode" in runner.explain()
    assert_close_normalized(out, case.oracle(), *tolerance_for(dtype), topk_ids=case.topk_ids)
    with moe_core.override_config({key: v for key, v in CFG.items() if key != "USE_TMA"}):
        plain = MoERunner(case.layer, backend=SortedTriton()).run(case.x, weights, case.topk_weights, case.topk_ids)
    assert torch.equal(out, plain)


def test_sorted_mode_needs_the_fused_activation() -> None:
    """Unfused, the activation kernel indexes rows by slot: USE_TMA is kept, sorted mode is off."""
    M, E, k, H, I = 9, 4, 2, 32, 16
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(M, H, generator=g) / 3).half()
    w1, w2 = (torch.randn(E, 2 * I, H, generator=g) / 8).half(), (torch.randn(E, H, I, generator=g) / 8).half()
    tw, ti = moe_core.select_experts(torch.randn(M, E, generator=g), top_k=k)
    layer = MoELayer(num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I)
    unfused = type("UnfusedSorted", (SortedTriton,), {"fuse_activation": False})()
    runner = MoERunner(layer, backend=unfused)
    with moe_core.override_config(CFG):
        out = runner.run(x, ExpertWeights(w1, w2), tw, ti)
    assert runner._last_plan.down_config.get("USE_TMA") and not runner._last_plan.sorted_intermediate
    assert_close_normalized(out, oracle_moe(x, w1, w2, tw, ti), *tolerance_for(torch.float16), topk_ids=ti)


def test_fp8_forward_in_sorted_mode_matches_the_slot_major_path() -> None:
    """w8a8 block: gemm2's activation scale rows follow the sorted buffer (pointer loads here:
    the interpreter upcasts fp8, so no descriptor)."""
    from moe_core.testing import quantize_weights as qw

    M, E, k, H, I = 17, 4, 2, 128, 128
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(M, H, generator=g) / 3).to(torch.bfloat16)
    w1f, w2f = torch.randn(E, 2 * I, H, generator=g) / 8, torch.randn(E, H, I, generator=g) / 8
    q1, s1 = qw.quantize_w8a8(w1f, torch.float8_e4m3fn, block_shape=[128, 128])
    q2, s2 = qw.quantize_w8a8(w2f, torch.float8_e4m3fn, block_shape=[128, 128])
    weights = ExpertWeights(q1, q2, quant=QuantSpec.fp8_w8a8(s1, s2, block_shape=[128, 128]))
    tw, ti = moe_core.select_experts(torch.randn(M, E, generator=g), top_k=k)
    layer = MoELayer(num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I)
    cfg = {**CFG, "BLOCK_SIZE_K": 128}
    with moe_core.override_config(cfg):
        runner = MoERunner(layer, backend=SortedTriton())
        out = runner.run(x, weights, tw, ti)
        assert runner._last_plan.sorted_intermediate
    with moe_core.override_config({key: v for key, v in cfg.items() if key != "USE_TMA"}):
        plain = MoERunner(layer, backend=SortedTriton()).run(x, weights, tw, ti)
    assert torch.equal(out, plain)
