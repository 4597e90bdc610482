"""The ``torch`` backend: every step of the sequence in plain torch.

It runs on CPU and CUDA tensors, supports every activation, layout and quantization
scheme, and is the default where nothing faster is available. It is *not* the test
oracle (that is the float64 loop in :mod:`moe_core.testing.oracle`); it serves as a
fast second-level reference once it has been checked against the oracle.

The GEMM reads the alignment (``sorted_token_ids`` / ``expert_ids``) like the Triton
kernel does, so an alignment bug shows up against the oracle here too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from moe_core.backend import Backend
from moe_core.quant import dequantize_activation, dequantize_weight
from moe_core.spec import MoELayer, QuantSpec

__all__ = ["TorchBackend", "apply_activation"]


def apply_activation(gate_up: torch.Tensor, layer: MoELayer) -> torch.Tensor:
    """SEMANTICS §4.3 on an fp32 [rows, N] tensor; returns fp32 [rows, N/2 or N]."""
    if not layer.is_gated:
        if layer.activation == "silu":
            return F.silu(gate_up)
        if layer.activation == "gelu":
            return F.gelu(gate_up)
        return torch.relu(gate_up).square()                               # relu2
    if layer.gate_up_layout == "interleaved":
        g, u = gate_up[:, 0::2], gate_up[:, 1::2]
    else:
        half = gate_up.shape[1] // 2
        g, u = gate_up[:, :half], gate_up[:, half:]
    limit = layer.gemm1_limit
    if layer.activation == "swiglu_oai":
        g = g.clamp(max=limit)
        u = u.clamp(-limit, limit)
        return g * torch.sigmoid(layer.gemm1_alpha * g) * (u + 1)
    if layer.activation == "gelu":
        return F.gelu(g) * u
    s = F.silu(g)
    if limit is not None:
        s = s.clamp(max=limit)
        u = u.clamp(-limit, limit)
    return s * u


def _matmul_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of fp32 tensors with IEEE fp32 accuracy (SEMANTICS §1: no TF32).

    On CUDA with ``torch.set_float32_matmul_precision`` below ``"highest"`` cuBLAS may use
    TF32; the product is then taken in float64 and rounded back, so the torch backend stays
    a trustworthy fast oracle whatever the process-wide setting.
    """
    if a.is_cuda and torch.get_float32_matmul_precision() != "highest":
        return (a.double() @ b.double()).float()
    return a @ b


class TorchBackend(Backend):
    """Plain-torch implementation of every step; lowest priority, always available."""

    name = "torch"
    platform = "any"
    priority = 0

    def is_available(self) -> tuple[bool, str]:
        return True, "plain torch runs on every device"

    def device_name(self) -> str:
        return "cpu"

    def gemm(self, a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, *,
             a_scale: torch.Tensor | None, w_scale: torch.Tensor | None, w_zp: torch.Tensor | None,
             bias: torch.Tensor | None, topk_weights: torch.Tensor, sorted_token_ids: torch.Tensor,
             expert_ids: torch.Tensor, num_tokens_post_padded: torch.Tensor, top_k: int,
             mul_routed_weight: bool, quant: QuantSpec, config: dict[str, Any]) -> torch.Tensor:
        block_m = config["BLOCK_SIZE_M"]
        numel = out.shape[0]
        num_blocks = expert_ids.shape[0]
        ids = torch.full((num_blocks * block_m,), numel, dtype=torch.int64, device=out.device)
        ids[: sorted_token_ids.shape[0]] = sorted_token_ids
        blocks = ids.view(num_blocks, block_m)
        live = torch.arange(num_blocks, device=out.device) * block_m < num_tokens_post_padded
        flat_weights = topk_weights.reshape(-1)
        a32 = a.float() if a_scale is None else dequantize_activation(a, a_scale, quant)
        for e in torch.unique(expert_ids[live]).tolist():
            slots = blocks[live & (expert_ids == e)].reshape(-1)
            slots = slots[slots < numel]
            if e < 0:
                out[slots] = 0
                continue
            y = _matmul_f32(a32[slots // top_k], dequantize_weight(w, e, quant, w_scale, w_zp).T)
            if bias is not None:
                y = y + bias[e].float()
            if mul_routed_weight:
                y = y * flat_weights[slots].unsqueeze(1)
            out[slots] = y.to(out.dtype)
        return out

    def activation(self, gate_up: torch.Tensor, out: torch.Tensor, layer: MoELayer,
                   topk_ids: torch.Tensor) -> torch.Tensor:
        out.copy_(apply_activation(gate_up.float(), layer))
        return out
