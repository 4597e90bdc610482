"""``ExampleBackend``: moe-core's torch backend with one step replaced, the expert GEMM.

The activation, the combine and activation quantization are inherited from
:class:`moe_core.reference.TorchBackend`; the alignment is moe-core's public
``moe_align_block_size``. moe-core keeps validation, config resolution, hooks and the order
of the steps.
"""

from __future__ import annotations

from typing import Any

import torch

from moe_core.reference import TorchBackend
from moe_core.spec import MoELayer, QuantSpec


class ExampleBackend(TorchBackend):
    """The expert GEMMs through ``torch._grouped_mm`` on CUDA (bf16), a per-expert torch loop elsewhere."""

    name = "example"
    platform = "any"
    priority = -10          # never chosen automatically over torch; select it by name

    def is_available(self) -> tuple[bool, str]:
        return True, "plain torch; torch._grouped_mm on CUDA bf16"

    def device(self) -> torch.device:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    def supports(self, layer: MoELayer, quant: QuantSpec) -> tuple[bool, str]:
        if quant.scheme != "none":
            return False, f"the example backend computes unquantized weights only, got {quant.scheme}"
        return True, ""

    def align(self, topk_ids: torch.Tensor, block_m: int,
              num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # moe-core's public alignment: its Triton kernel on CUDA (no host sync, so the forward
        # can be captured in a CUDA graph), the torch reference elsewhere
        import moe_core

        return moe_core.moe_align_block_size(topk_ids, block_m, num_experts)

    def gemm(self, a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, **kw: Any) -> torch.Tensor:
        from moe_core_example.gemm import grouped_expert_gemm

        return grouped_expert_gemm(a, w, out, **kw)
