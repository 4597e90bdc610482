"""fused_experts and MoERunner.run give bit-identical outputs; a locally written
Mixtral-style block (plain torch, per-expert loop) matches the fused layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_core
from moe_core import ExpertWeights, MoELayer, MoERunner, QuantSpec
from moe_core.testing import assert_close_normalized, oracle_moe, tolerance_for
from moe_core.testing import strategies as routes
from moe_core.testing.quantize_weights import quantize_layer
from moe_core.testing.strategies import single_torch_thread  # noqa: F401  (autouse)



CASES = {
    "silu-fp32": dict(),
    "silu-bf16-bias-scale": dict(dtype=torch.bfloat16, bias=True, routed_scaling_factor=2.5),
    "gelu-fp16-minus-one": dict(dtype=torch.float16, activation="gelu", routing="with_minus_one"),
    "swiglu_oai-bf16": dict(dtype=torch.bfloat16, activation="swiglu_oai", gemm1_alpha=1.702, gemm1_limit=7.0,
                            bias=True),
    "relu2-plain": dict(activation="relu2", is_gated=False),
    "weight-on-input": dict(k=1, apply_router_weight_on_input=True),
    "no_combine": dict(no_combine=True, routed_scaling_factor=0.5),
    "fp8-block": dict(dtype=torch.bfloat16, quant=("fp8_w8a8", {"block_shape": (16, 16)})),
    "fp8-per-tensor-static": dict(dtype=torch.float16, quant=("fp8_w8a8", {"static": True})),
    "int8-channel": dict(quant=("int8_w8a8", {"per_channel": True})),
    "int8-w8a16-grouped-zp": dict(dtype=torch.bfloat16, quant=("int8_w8a16", {"group_size": 16, "zero_point": True})),
    "int4-w4a16": dict(dtype=torch.float16, quant=("int4_w4a16", {"group_size": 16})),
}


def _build(dtype=torch.float32, k=2, bias=False, routing="softmax_topk", quant=None, no_combine=False, **layer_kw):
    M, H, I, E = 19, 32, 32, 6
    layer = MoELayer(num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I, **layer_kw)
    g = torch.Generator().manual_seed(42)
    x = (torch.randn(M, H, generator=g) / 10).to(dtype)
    w1 = torch.randn(E, layer.gate_up_rows, H, generator=g) / 10
    w2 = torch.randn(E, H, I, generator=g) / 10
    b1 = (torch.randn(E, layer.gate_up_rows, generator=g) / 10).to(dtype) if bias else None
    b2 = (torch.randn(E, H, generator=g) / 10).to(dtype) if bias else None
    tw, ids = routes.ROUTINGS[routing](M, E, k, 1)
    if layer.apply_router_weight_on_input:
        tw = torch.rand(M, 1, generator=g) + 0.5
    if quant is None:
        spec = QuantSpec.none()
        w1, w2 = w1.to(dtype), w2.to(dtype)
    else:
        scheme, kw = quant
        kw = dict(kw)
        if kw.pop("static", False):
            kw["a1_scale"] = torch.tensor([x.float().abs().max().item() / 448.0])
            kw["a2_scale"] = torch.tensor([0.05 / 448.0])
        w1, w2, spec = quantize_layer(w1, w2, scheme, **kw)
    return layer, x, ExpertWeights(w1, w2, b1=b1, b2=b2, quant=spec), tw, ids, no_combine


@pytest.mark.parametrize("name", list(CASES))
def test_fused_experts_and_runner_are_bit_identical(name: str) -> None:
    layer, x, weights, tw, ids, no_combine = _build(**CASES[name])
    a = moe_core.fused_experts(x, weights.w1, weights.w2, tw, ids, layer=layer, quant=weights.quant, b1=weights.b1,
                               b2=weights.b2, no_combine=no_combine, backend="torch")
    runner = MoERunner(layer, backend="torch")
    b = runner.run(x, weights, tw, ids, no_combine=no_combine)
    assert a.dtype == b.dtype == x.dtype and a.shape == b.shape
    assert torch.equal(a, b)
    assert torch.isfinite(a).all() and a.abs().max() > 0
    # a second run of the same runner, int64 ids, and the in-place variants agree too
    assert torch.equal(runner.run(x, weights, tw, ids.long(), no_combine=no_combine), a)
    if not no_combine:
        x1, x2 = x.clone(), x.clone()
        moe_core.fused_experts(x1, weights.w1, weights.w2, tw, ids, layer=layer, quant=weights.quant, b1=weights.b1,
                               b2=weights.b2, inplace=True, backend="torch")
        runner.run(x2, weights, tw, ids, inplace=True)
        assert torch.equal(x1, a) and torch.equal(x2, a)


def test_inferred_layer_equals_explicit_layer() -> None:
    layer, x, weights, tw, ids, _ = _build()
    a = moe_core.fused_experts(x, weights.w1, weights.w2, tw, ids, backend="torch")
    b = MoERunner(layer, backend="torch").run(x, weights, tw, ids)
    assert torch.equal(a, b)


# -- a Mixtral-style block written here, in plain torch ------------------------------------------
class MixtralExpert(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False)     # gate
        self.w3 = nn.Linear(hidden, inter, bias=False)     # up
        self.w2 = nn.Linear(inter, hidden, bias=False)     # down

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(h)) * self.w3(h))


class MixtralBlock(nn.Module):
    """Router (softmax over all experts, top-k, renormalise) and a loop over experts."""

    def __init__(self, hidden: int, inter: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(MixtralExpert(hidden, inter) for _ in range(num_experts))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.gate(h).float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(h.dtype)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                out.index_add_(0, token, expert(h[token]) * weights[token, slot, None])
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mixtral_block_matches(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    H, I, E, k, M = 48, 40, 8, 2, 37
    block = MixtralBlock(H, I, E, k).to(dtype)
    x = (torch.randn(M, H) / 10).to(dtype) * 10
    with torch.no_grad():
        want = block(x)
        logits = block.gate(x)
        tw, ids = moe_core.select_experts(logits, k, renormalize=True)
        w1 = torch.stack([torch.cat([ex.w1.weight, ex.w3.weight]) for ex in block.experts])
        w2 = torch.stack([ex.w2.weight for ex in block.experts])
        layer = MoELayer(num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I)
        got = moe_core.fused_experts(x, w1, w2, tw, ids, layer=layer, backend="torch")
        got_runner = MoERunner(layer, backend="torch").run(x, ExpertWeights(w1, w2), tw, ids)
    assert torch.equal(got, got_runner)
    # both against the float64 oracle on the same routing and weights
    ref = oracle_moe(x, w1, w2, tw, ids, round_intermediate=None if dtype == torch.float32 else dtype)
    assert_close_normalized(got, ref, *tolerance_for(dtype))
    assert_close_normalized(want, ref, *tolerance_for(dtype))
    # and with each other directly
    assert_close_normalized(got, want.double(), *tolerance_for(dtype))
