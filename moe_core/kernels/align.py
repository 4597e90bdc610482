"""``moe_align_block_size`` as Triton kernels: check, allocate (static sizes), launch.

Same contract as :func:`moe_core.align.moe_align_block_size_torch` (SEMANTICS §6); the
order of slots within a bucket is ascending here too (exact per-chunk ranks instead of
atomics), so the output equals the torch reference. One launch up to ``ONE_LAUNCH_MAX``
slots, two up to ``SCATTER_INLINE_MAX``, three above (the scatter gets its own grid). Works for any
number of experts (no single-block scan limit: the bucket scan is a Triton ``cumsum``
over ``E + 2`` rounded to a power of two lanes). No host sync.
"""

from __future__ import annotations

import logging
import math

import torch

from moe_core.align import _check, padded_capacity
from moe_core.kernels._align import _align_count_kernel, _align_scan_kernel, _align_scatter_kernel
from moe_core.kernels._launch import cdiv, next_power_of_2, pdl_args

__all__ = ["moe_align_block_size_triton", "one_token_blocks", "SCATTER_INLINE_MAX", "ONE_LAUNCH_MAX"]

logger = logging.getLogger(__name__)

#: above this many slots the scatter runs as a third, grid-parallel launch
SCATTER_INLINE_MAX = 4096
#: up to this many slots one program counts, scans and scatters: one launch (decode)
ONE_LAUNCH_MAX = 1024
#: slots ranked per inner step (a BLOCK_T × BLOCK_T comparison)
_BLOCK_T = 64
#: slots scattered per step
_BLOCK_S = 1024
#: entries of the [chunks, E1_PAD] table the one-program scan reads (bounds the chunk count)
_TABLE_BUDGET = 65536
#: what one table entry of the scan costs, in slots of a chunk's serial count: on the H200 a
#: count step of ``_BLOCK_T`` slots took ~1.6 µs and the scan ~24 µs per 65536 entries
#: (benchmarks/NOTES.md, attempt 49), so a slot of chunk costs as much as ~68 entries
_ENTRIES_PER_SLOT = 68


def _chunking(numel: int, e1_pad: int) -> tuple[int, int]:
    """(slots per chunk, chunks). The count launch walks a chunk serially, ``_BLOCK_T`` slots a
    step, and the one-program scan reads the whole [chunks, E1_PAD] table, so the two balance
    at ``chunk ≈ sqrt(numel · E1_PAD / _ENTRIES_PER_SLOT)`` (the nearest power of two); never
    under ``_BLOCK_T``, nor so small that the table outgrows ``_TABLE_BUDGET`` (or 256 chunks)."""
    max_chunks = min(256, max(8, _TABLE_BUDGET // e1_pad))
    smallest = max(_BLOCK_T, next_power_of_2(cdiv(numel, max_chunks)))
    balanced = 1 << round(math.log2(max(1.0, math.sqrt(numel * e1_pad / _ENTRIES_PER_SLOT))))
    chunk = max(smallest, balanced)
    return chunk, cdiv(numel, chunk)


def moe_align_block_size_triton(topk_ids: torch.Tensor, block_m: int,
                                num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group slots by expert, each group padded to ``block_m`` (SEMANTICS §6).

    :param topk_ids: [M, k] int32 local ids in ``[-1, E)``; other values are treated as ``-1``.
    :param block_m: ``BLOCK_SIZE_M`` of the grouped GEMM.
    :param num_experts: local experts ``E``.
    :returns: ``sorted_token_ids`` int32 [P] (sentinel ``M·k``), ``expert_ids`` int32
        [cdiv(P, block_m)] (``-1`` for the ``-1`` bucket and past the count),
        ``num_tokens_post_padded`` int32 [1]; all new device tensors.
    """
    _check(topk_ids, block_m, num_experts)
    device = topk_ids.device
    ids = topk_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    numel = ids.numel()
    P = padded_capacity(numel, block_m, num_experts)
    num_blocks = cdiv(P, block_m)
    sorted_ids = torch.empty((P,), dtype=torch.int32, device=device)
    expert_ids = torch.empty((num_blocks,), dtype=torch.int32, device=device)
    n_post = torch.empty((1,), dtype=torch.int32, device=device)
    if numel == 0:
        expert_ids.fill_(-1)
        n_post.zero_()
        return sorted_ids, expert_ids, n_post
    e1_pad = max(16, next_power_of_2(num_experts + 2))   # buckets 0..E plus an unused bin
    one_launch = numel <= ONE_LAUNCH_MAX
    chunk, num_chunks = (max(_BLOCK_T, next_power_of_2(numel)), 1) if one_launch else _chunking(numel, e1_pad)
    g_pad = next_power_of_2(num_chunks)
    bt = max(16, min(e1_pad, 8192 // g_pad))
    rank = torch.empty((numel,), dtype=torch.int32, device=device)
    table = torch.empty((num_chunks, e1_pad), dtype=torch.int32, device=device)
    scan_warps = 4 if e1_pad <= 1024 else 8
    pdl = pdl_args(ids)
    if not one_launch:
        _align_count_kernel[(num_chunks,)](
            ids, rank, table, sorted_ids, numel, num_experts, P, chunk, num_chunks,
            E1_PAD=e1_pad, BLOCK_T=_BLOCK_T, BLOCK_P=1024, num_warps=4, **pdl)
    inline = numel <= SCATTER_INLINE_MAX
    _align_scan_kernel[(1,)](
        ids, rank, table, sorted_ids, expert_ids, n_post, numel, num_experts, block_m, num_chunks,
        num_blocks, chunk, P, E1_PAD=e1_pad, G_PAD=g_pad, BT=bt, BLOCK_S=_BLOCK_S, BLOCK_B=1024, SCATTER=inline,
        COUNT=one_launch, BLOCK_T=_BLOCK_T, BLOCK_P=1024, num_warps=scan_warps, **pdl)
    if not inline:
        _align_scatter_kernel[(cdiv(numel, _BLOCK_S),)](
            ids, rank, table, sorted_ids, numel, num_experts, chunk, E1_PAD=e1_pad, BLOCK_S=_BLOCK_S,
            num_warps=4, **pdl)
    return sorted_ids, expert_ids, n_post


#: the constant buffers of :func:`one_token_blocks`, per (device, k, block_m)
_ONE_TOKEN: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def one_token_blocks(topk_ids: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The alignment of a single token (M = 1) without a kernel: one block per slot, in slot order.

    One token's k slots go to k experts, so grouping them by expert (SEMANTICS §6) only orders k
    one-row blocks. The grouped GEMM computes each row the same in any block, so results are
    bitwise those of the sorted layout, and the forward at M = 1 saves the align launch (a
    one-program kernel of ~5 µs on an H200, plus its launch boundary).

    :param topk_ids: [1, k] int32 local ids.
    :returns: ``sorted_token_ids`` [k·block_m] (block ``b`` holds slot ``b``, then the sentinel
        ``k``), ``expert_ids`` = the ids themselves (a view; the GEMM turns ids outside ``[0, E)``
        into zero rows, as bucket −1 of the sorted layout), ``num_tokens_post_padded`` =
        [k·block_m]; or None while a CUDA graph is being captured and the two constant buffers
        (made once per device, k and ``block_m``) do not exist yet: kernels captured to make them
        would never have run outside the graph.
    """
    k = topk_ids.shape[1]
    ids = topk_ids.reshape(-1)
    if topk_ids.shape[0] != 1 or ids.dtype != torch.int32 or not ids.is_contiguous():
        return None
    if type(topk_ids) is not torch.Tensor:     # a tracer's fake tensor must not enter the cache
        return None
    key = (str(topk_ids.device), k, block_m)
    consts = _ONE_TOKEN.get(key)
    if consts is None:
        if topk_ids.is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        sorted_ids = torch.full((k * block_m,), k, dtype=torch.int32, device=topk_ids.device)
        sorted_ids[::block_m] = torch.arange(k, dtype=torch.int32, device=topk_ids.device)
        n_post = torch.full((1,), k * block_m, dtype=torch.int32, device=topk_ids.device)
        consts = _ONE_TOKEN.setdefault(key, (sorted_ids, n_post))
    return consts[0], ids, consts[1]
