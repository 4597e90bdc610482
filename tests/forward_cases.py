"""Small gated forward cases the interpreter tests share: inputs, routing, layer and the oracle."""

from __future__ import annotations

from typing import NamedTuple

import torch

import moe_core
from moe_core import MoELayer
from moe_core.testing import oracle_moe


class GatedCase(NamedTuple):
    x: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    layer: MoELayer

    def oracle(self) -> torch.Tensor:
        """The float64 oracle of this case's forward."""
        layer = self.layer
        return oracle_moe(self.x, self.w1, self.w2, self.topk_weights, self.topk_ids,
                          routed_scaling_factor=layer.routed_scaling_factor, activation=layer.activation,
                          gate_up_layout=layer.gate_up_layout, alpha=layer.gemm1_alpha, limit=layer.gemm1_limit)


def gated_case(seed: int, dtype: torch.dtype, layout: str, *, M: int = 19, E: int = 6, k: int = 2, H: int = 64,
               I: int = 48) -> GatedCase:
    """A gated layer (``halves``: silu; ``interleaved``: gpt-oss's clamped swiglu) with
    ``routed_scaling_factor`` 1.5 and softmax top-k routing."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, H, generator=g) / 3).to(dtype)
    w1 = (torch.randn(E, 2 * I, H, generator=g) / 8).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / 8).to(dtype)
    tw, ti = moe_core.select_experts(torch.randn(M, E, generator=g), top_k=k)
    act = {"activation": "swiglu_oai", "gemm1_alpha": 1.702, "gemm1_limit": 7.0} if layout == "interleaved" else {}
    layer = MoELayer(num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I, routed_scaling_factor=1.5,
                     gate_up_layout=layout, **act)
    return GatedCase(x, w1, w2, tw, ti, layer)


def epilogue_layer(fused: str | None, E: int, k: int, N: int, K: int) -> MoELayer | None:
    """gemm1's fused-activation layer for an [E, N, K] weight: None (the plain GEMM),
    ``halves`` / ``interleaved`` (gated silu, N = 2·I) or ``plain`` (non-gated relu2, N = I)."""
    if fused is None:
        return None
    gated = fused != "plain"
    return MoELayer(num_local_experts=E, top_k=k, hidden_size=K, intermediate_size=N // 2 if gated else N,
                    activation="silu" if gated else "relu2", is_gated=gated,
                    gate_up_layout="interleaved" if fused == "interleaved" else "halves")
