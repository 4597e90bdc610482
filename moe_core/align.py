"""``moe_align_block_size``: group routed slots by expert, each group padded to a
multiple of ``block_m`` (SEMANTICS §6). This module holds the torch reference; GPU
backends run a Triton kernel with the same contract.

Worked example — ``topk_ids = [[0, -1], [1, 0]]``, E = 2, ``block_m`` = 2, numel = 4.
Buckets are ``id + 1`` so expert ``-1`` comes first::

    bucket -1: slots {1}    -> 1, 4
    bucket  0: slots {0, 3} -> 0, 3
    bucket  1: slots {2}    -> 2, 4

    sorted_token_ids       = [1, 4, 0, 3, 2, 4, 4]   (P = 4 + 3·1 = 7, sentinel 4)
    expert_ids             = [-1, 0, 1, -1]          (blocks past the count hold -1)
    num_tokens_post_padded = [6]
"""

from __future__ import annotations

import torch

from moe_core.errors import MoEInputError, MoETypeError

__all__ = ["moe_align_block_size", "moe_align_block_size_torch", "padded_capacity"]


def padded_capacity(numel: int, block_m: int, num_experts: int) -> int:
    """``P = numel + min(numel, E + 1)·(block_m − 1)``: the static length of ``sorted_token_ids``."""
    return numel + min(numel, num_experts + 1) * (block_m - 1)


def _check(topk_ids: torch.Tensor, block_m: int, num_experts: int) -> None:
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2:
        raise MoEInputError(f"topk_ids: expected a 2-D [M, k] tensor, got "
                            f"{tuple(topk_ids.shape) if isinstance(topk_ids, torch.Tensor) else type(topk_ids).__name__}")
    if topk_ids.dtype != torch.int32:
        raise MoETypeError(f"topk_ids: expected dtype torch.int32 (convert int64 explicitly), got {topk_ids.dtype}")
    if not isinstance(block_m, int) or block_m < 1:
        raise MoEInputError(f"block_m: expected a positive int, got {block_m!r}")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise MoEInputError(f"num_experts: expected a positive int, got {num_experts!r}")


def moe_align_block_size_torch(topk_ids: torch.Tensor, block_m: int,
                               num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch reference of SEMANTICS §6; slots keep ascending order within a bucket.

    No host sync: every size is a function of ``numel``, ``E`` and ``block_m``.
    :param topk_ids: [M, k] int32 local ids in ``[-1, E)``.
    :returns: ``sorted_token_ids`` int32 [P], ``expert_ids`` int32 [cdiv(P, block_m)],
        ``num_tokens_post_padded`` int32 [1].
    """
    _check(topk_ids, block_m, num_experts)
    device = topk_ids.device
    numel = topk_ids.numel()
    P = padded_capacity(numel, block_m, num_experts)
    num_blocks = -(-P // block_m)
    buckets = topk_ids.reshape(-1).to(torch.int64) + 1                     # [numel] in [0, E]
    counts = torch.bincount(buckets, minlength=num_experts + 1)           # [E + 1]
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded                             # exclusive prefix sum
    total = padded.sum()
    # slot position: bucket start + rank of the slot among earlier slots of its bucket
    order = torch.argsort(buckets, stable=True)
    sorted_buckets = buckets[order]
    first_of_bucket = torch.cumsum(counts, 0) - counts
    rank = torch.arange(numel, device=device) - first_of_bucket[sorted_buckets]
    positions = starts[sorted_buckets] + rank
    sorted_token_ids = torch.full((P,), numel, dtype=torch.int32, device=device)
    sorted_token_ids[positions] = order.to(torch.int32)
    # expert id of each block: the bucket whose padded range holds the block's first row
    block_starts = torch.arange(num_blocks, device=device) * block_m
    ends = torch.cumsum(padded, 0)
    block_bucket = torch.searchsorted(ends, block_starts, right=True)
    expert_ids = torch.where(block_starts < total, block_bucket - 1, -1).to(torch.int32)
    return sorted_token_ids, expert_ids, total.reshape(1).to(torch.int32)


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int,
                         num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Public entry: the torch reference on CPU tensors, the Triton kernel on GPU tensors
    when one is available (see :mod:`moe_core.kernels`). Same contract either way."""
    if topk_ids.is_cuda:
        try:
            from moe_core.kernels import moe_align_block_size_triton
        except ImportError:  # kernels not built for this platform
            pass
        else:
            _check(topk_ids, block_m, num_experts)
            return moe_align_block_size_triton(topk_ids, block_m, num_experts)
    return moe_align_block_size_torch(topk_ids, block_m, num_experts)
