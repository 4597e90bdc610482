"""gemm1 with the activation in its epilogue (``TritonBackend.fuse_activation``), under the
interpreter: every activation and layout, biases, per-channel / block / grouped scales of the up
half, routed weight on the input, ``-1`` slots, and odd sizes, against the float64 oracle; the
plan falls back to the plain sequence when a hook needs ``gate_up``."""

from __future__ import annotations

import pytest
import torch

import moe_core
from moe_core import ExpertWeights, MoELayer, MoERunner
from moe_core.kernels.backend import TritonBackend, interpreting
from moe_core.testing import assert_close_normalized, oracle_moe, tolerance_for
from moe_core.testing.quantize_weights import quantize_layer

pytestmark = pytest.mark.interp


@pytest.fixture(autouse=True)
def _interpreter_only() -> None:
    if not interpreting():
        pytest.skip("runs only under the Triton interpreter (the GPU suite runs the fused conformance class)")


class Fused(TritonBackend):
    name = "fused-triton"
    fuse_activation = True


class Plain(TritonBackend):
    name = "plain-triton"


ACTS = [  # activation, gated, layout, alpha, limit
    ("silu", True, "halves", None, None),
    ("silu", True, "halves", None, 0.3),
    ("gelu", True, "halves", None, None),
    ("swiglu_oai", True, "interleaved", 1.702, 0.4),
    ("silu", False, "halves", None, None),
    ("relu2", False, "halves", None, None),
]


def _case(act, gated, layout, alpha, limit, *, M=7, E=5, k=2, H=72, I=40, bias=False, dtype=torch.float32,
          seed=0, on_input=False, renormalize=True):
    g = torch.Generator().manual_seed(seed)
    N = 2 * I if gated else I
    x = (torch.randn(M, H, generator=g) / 3).to(dtype)
    w1 = torch.randn(E, N, H, generator=g) / 8
    w2 = torch.randn(E, H, I, generator=g) / 8
    b1 = (torch.randn(E, N, generator=g) / 4).to(dtype) if bias else None
    b2 = (torch.randn(E, H, generator=g) / 4).to(dtype) if bias else None
    tw, ti = moe_core.select_experts(torch.randn(M, E, generator=g), top_k=k, renormalize=renormalize)
    ti[M // 2, 0] = -1                                   # a filtered slot
    layer = MoELayer(num_experts=E, num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I,
                     activation=act, is_gated=gated, gate_up_layout=layout, gemm1_alpha=alpha,
                     gemm1_limit=limit, apply_router_weight_on_input=on_input)
    return layer, x, w1, w2, b1, b2, tw, ti


def _oracle(layer, x, w1, w2, b1, b2, tw, ti, quant=None):
    """float64, no intermediate rounding: the fused epilogue keeps gate and up in fp32."""
    return oracle_moe(x, w1, w2, tw, ti, activation=layer.activation, is_gated=layer.is_gated,
                      gate_up_layout=layer.gate_up_layout, alpha=layer.gemm1_alpha, limit=layer.gemm1_limit,
                      b1=b1, b2=b2, apply_router_weight_on_input=layer.apply_router_weight_on_input,
                      quant=quant)


@pytest.mark.parametrize("act,gated,layout,alpha,limit", ACTS)
@pytest.mark.parametrize("bias", [False, True])
def test_fused_matches_oracle_and_plain_in_fp32(act, gated, layout, alpha, limit, bias) -> None:
    layer, x, w1, w2, b1, b2, tw, ti = _case(act, gated, layout, alpha, limit, bias=bias)
    weights = ExpertWeights(w1, w2, b1=b1, b2=b2)
    runner = MoERunner(layer, backend=Fused())
    out = runner.run(x, weights, tw, ti)
    assert runner._last_plan.fused_activation
    ref = _oracle(layer, x, w1, w2, b1, b2, tw, ti)
    assert_close_normalized(out, ref, *tolerance_for(torch.float32), topk_ids=ti)
    plain = MoERunner(layer, backend=Plain()).run(x, weights, tw, ti)
    torch.testing.assert_close(out, plain, rtol=1e-6, atol=1e-6)   # fp32 gate_up: the same sums


@pytest.mark.parametrize("act,gated,layout,alpha,limit", ACTS[::2])
def test_fused_fp16_with_bias_and_odd_tiles(act, gated, layout, alpha, limit) -> None:
    layer, x, w1, w2, b1, b2, tw, ti = _case(act, gated, layout, alpha, limit, M=9, H=130, I=24, bias=True,
                                             dtype=torch.float16, seed=3)
    weights = ExpertWeights(w1.half(), w2.half(), b1=b1, b2=b2)
    cfg = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 2}
    with moe_core.override_config(cfg):                      # gated: 16 act columns per program
        out = MoERunner(layer, backend=Fused()).run(x, weights, tw, ti)
    ref = _oracle(layer, x, w1.half().float(), w2.half().float(), b1, b2, tw, ti)
    assert_close_normalized(out, ref, *tolerance_for(torch.float16), topk_ids=ti)
    with moe_core.override_config(cfg):                      # gate_up rounded as the plain path stores it
        plain = MoERunner(layer, backend=Plain()).run(x, weights, tw, ti)
    assert torch.equal(out, plain)


def test_fused_router_weight_on_input() -> None:
    # weights below 1 (no renormalisation at k = 1), so dropping them from either half shows
    layer, x, w1, w2, b1, b2, tw, ti = _case("silu", True, "halves", None, None, k=1, bias=True, on_input=True,
                                             renormalize=False)
    assert float(tw.max()) < 0.9
    out = MoERunner(layer, backend=Fused()).run(x, ExpertWeights(w1, w2, b1=b1, b2=b2), tw, ti)
    assert_close_normalized(out, _oracle(layer, x, w1, w2, b1, b2, tw, ti), *tolerance_for(torch.float32))


@pytest.mark.parametrize("scheme,kw", [
    ("fp8_w8a8", {"per_channel": True}),
    ("fp8_w8a8", {"block_shape": (32, 32)}),
    ("int8_w8a16", {}),
    ("int8_w8a16", {"group_size": 32, "zero_point": True}),
    ("int4_w4a16", {"group_size": 32, "zero_point": True}),
])
@pytest.mark.parametrize("layout", ["halves", "interleaved"])
def test_fused_scales_of_the_up_half(scheme: str, kw: dict, layout: str) -> None:
    act, alpha, limit = ("silu", None, None) if layout == "halves" else ("swiglu_oai", 1.702, 7.0)
    layer, x, w1, w2, _, _, tw, ti = _case(act, True, layout, alpha, limit, H=64, I=64, seed=5)
    # different weight magnitudes for gate and up rows, so swapped scales cannot pass
    rows = torch.arange(w1.shape[1])
    up = rows % 2 == 1 if layout == "interleaved" else rows >= w1.shape[1] // 2
    w1 = w1 * torch.where(up, 4.0, 0.5)[None, :, None]
    q1, q2, quant = quantize_layer(w1, w2, scheme, **kw)
    weights = ExpertWeights(q1, q2, quant=quant)
    out = MoERunner(layer, backend=Fused()).run(x, weights, tw, ti)
    plain = MoERunner(layer, backend=Plain()).run(x, weights, tw, ti)
    ref = _oracle(layer, x, q1, q2, None, None, tw, ti, quant=quant)
    maxtol, rmstol = tolerance_for(torch.float32)
    assert_close_normalized(plain, ref, maxtol * 10, rmstol * 10, topk_ids=ti)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bn", [64, 128], ids=["uniform-scale", "scale-per-row"])
def test_block_w8a8_halves_pair_dot_rescales_each_half(bn: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Block w8a8 halves as one dot over the gate and up tiles: with [32, 32] blocks a program of
    32 act columns has one weight scale per half, one of 64 a scale per row pair of blocks; both
    must match the two-dot path (gate and up rows of different magnitudes, so a scale of the
    wrong half cannot pass)."""
    import moe_core.kernels.gemm as gemm

    layer, x, w1, w2, _, _, tw, ti = _case("silu", True, "halves", None, None, H=64, I=64, seed=9)
    w1 = w1 * torch.where(torch.arange(w1.shape[1]) >= 64, 4.0, 0.5)[None, :, None]
    q1, q2, quant = quantize_layer(w1, w2, "fp8_w8a8", block_shape=(32, 32))
    weights = ExpertWeights(q1, q2, quant=quant)
    cfg = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1}
    assert gemm._pair_dot(layer, 2, bn // 2)
    with moe_core.override_config(cfg):
        pair = MoERunner(layer, backend=Fused()).run(x, weights, tw, ti)
        monkeypatch.setattr(gemm, "_pair_dot", lambda activation, mode, BN: False)
        two = MoERunner(layer, backend=Fused()).run(x, weights, tw, ti)
    assert pair.abs().max() > 0
    torch.testing.assert_close(pair, two, rtol=1e-5, atol=1e-5)


def test_a_gate_up_hook_turns_fusion_off() -> None:
    layer, x, w1, w2, b1, b2, tw, ti = _case("gelu", True, "halves", None, None)
    seen = []

    class Spy:
        @moe_core.hookimpl
        def moe_core_after_gate_up(self, x, gate_up, topk_weights, topk_ids, layer):
            seen.append(gate_up.shape)

    runner = MoERunner(layer, backend=Fused())
    runner.register(Spy())
    out = runner.run(x, ExpertWeights(w1, w2), tw, ti)
    assert not runner._last_plan.fused_activation and seen == [(7, 2, 80)]
    assert_close_normalized(out, _oracle(layer, x, w1, w2, None, None, tw, ti), *tolerance_for(torch.float32))


def test_fused_output_width_is_checked() -> None:
    from moe_core.errors import MoEInputError
    from moe_core.kernels.gemm import grouped_gemm
    from moe_core.spec import QuantSpec

    layer, x, w1, w2, *_ , tw, ti = _case("silu", True, "halves", None, None)
    ids = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(MoEInputError, match=r"w.shape\[1\] / 2 \(gated, activation fused\) = 40 columns"):
        grouped_gemm(x, w1, torch.empty(x.shape[0] * 2, 80), a_scale=None, w_scale=None, w_zp=None, bias=None,
                     topk_weights=tw, sorted_token_ids=ids, expert_ids=ids, num_tokens_post_padded=ids, top_k=2,
                     mul_routed_weight=False, quant=QuantSpec.none(),
                     config={"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32}, activation=layer)
