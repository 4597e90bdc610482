"""The grouped expert GEMM of the example backend (the ``gemm`` step of moe-core's sequence).

Contract (moe-core ``Backend.gemm``): for every slot ``s`` of a block of expert ``e``,
``out[s] = a[s // top_k] @ w[e]ᵀ (+ bias[e]) (· topk_weights[s])``; rows of ``-1`` slots are 0.

The slots' experts are read back from the alignment (``sorted_token_ids``/``expert_ids``) with
scatters of static size, the slots are sorted by expert, and ``torch._grouped_mm`` multiplies
each expert's contiguous group on CUDA. No host sync, no data-dependent shape: the CUDA path
can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import Any

import torch


def slot_experts(sorted_token_ids: torch.Tensor, expert_ids: torch.Tensor, num_tokens_post_padded: torch.Tensor,
                 num_slots: int, block_m: int) -> torch.Tensor:
    """[S] int64 expert of every slot (``-1``: filtered), from the alignment."""
    P = sorted_token_ids.shape[0]
    pos = torch.arange(P, device=sorted_token_ids.device)
    expert_of_pos = expert_ids.long().repeat_interleave(block_m)[:P]
    valid = (sorted_token_ids < num_slots) & (pos < num_tokens_post_padded.long())
    target = torch.where(valid, sorted_token_ids.long(), num_slots)           # invalid -> a dump row
    experts = torch.full((num_slots + 1,), -1, dtype=torch.long, device=sorted_token_ids.device)
    experts.scatter_(0, target, torch.where(valid, expert_of_pos, -1))
    return experts[:num_slots]


def _use_grouped_mm(a: torch.Tensor, w: torch.Tensor) -> bool:
    # torch._grouped_mm on CUDA: bf16, 16-byte aligned rows
    return (hasattr(torch, "_grouped_mm") and a.is_cuda and a.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
            and (a.shape[1] * 2) % 16 == 0 and (w.shape[1] * 2) % 16 == 0)


def grouped_expert_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, *, a_scale: Any, w_scale: Any,
                        w_zp: Any, bias: torch.Tensor | None, topk_weights: torch.Tensor,
                        sorted_token_ids: torch.Tensor, expert_ids: torch.Tensor,
                        num_tokens_post_padded: torch.Tensor, top_k: int, mul_routed_weight: bool,
                        quant: Any, config: dict[str, Any]) -> torch.Tensor:
    """The ``gemm`` step: see the module docstring. ``out`` [S, N_out] is written and returned."""
    S, N = out.shape
    E = w.shape[0]
    experts = slot_experts(sorted_token_ids, expert_ids, num_tokens_post_padded, S, config["BLOCK_SIZE_M"])
    rows = torch.arange(S, device=out.device) // top_k
    if _use_grouped_mm(a, w):
        key = torch.where(experts < 0, E, experts)                            # filtered slots last
        order = torch.argsort(key, stable=True)
        counts = torch.zeros(E + 1, dtype=torch.int32, device=out.device)
        counts.scatter_add_(0, key, torch.ones_like(key, dtype=torch.int32))
        counts[E - 1] += counts[E]               # filtered slots ride in the last group; zeroed below
        offs = torch.cumsum(counts[:E], dim=0, dtype=torch.int32)
        y_sorted = torch._grouped_mm(a[rows[order]], w.transpose(1, 2), offs=offs).float()
        y = torch.empty_like(y_sorted)
        y[order] = y_sorted
    else:
        y = torch.zeros(S, N, dtype=torch.float32, device=out.device)
        for e in range(E):
            mine = experts == e
            if bool(mine.any()):
                y[mine] = a[rows[mine]].float() @ w[e].float().T
    live = experts >= 0
    if bias is not None:
        y = y + bias.float()[experts.clamp(min=0)]
    if mul_routed_weight:
        y = y * torch.where(live, topk_weights.reshape(-1).float(), 0.0).unsqueeze(1)
    out.copy_(torch.where(live.unsqueeze(1), y, 0.0))
    return out
