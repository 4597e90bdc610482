"""``lora_delta``: the LoRA hooks' GPU path (align by adapter × expert, shrink, expand).

Check → allocate (static sizes: the fp32 intermediate [M·k, slices, max_rank] and the
alignment of ``M·k`` slots into ``max_loras·E`` buckets) → launch. No host sync, so the
hooks run under CUDA-graph capture; with no active adapter every block returns at once.
The math is in :mod:`moe_core.kernels._lora`; the torch definition is
:meth:`moe_core.hooks.lora.LoRAHooks._apply_torch`.
"""

from __future__ import annotations

import torch

from moe_core.align import moe_align_block_size
from moe_core.errors import MoEInputError, MoETypeError
from moe_core.kernels._launch import cdiv, next_power_of_2
from moe_core.kernels._lora import _lora_expand_kernel, _lora_shrink_kernel

__all__ = ["lora_delta", "BLOCK_M"]

#: slots per block (groups are small: one adapter and one expert each)
BLOCK_M = 16


def _is_interpreter(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, ranks: torch.Tensor, scaling: torch.Tensor,
               inp: torch.Tensor, out2d: torch.Tensor, keys: torch.Tensor, topk_weights: torch.Tensor | None, *,
               row_div: int, slice_off: int, col_stride: int) -> torch.Tensor:
    """Add ``scaling[a] · (inp[s // row_div] · A[a, e, q]ᵀ) · B[a, e, q]ᵀ`` into ``out2d`` in place.

    :param lora_a: [L, E, slices, R, K] adapter A matrices (zero-padded to R = max rank).
    :param lora_b: [L, E, slices, N_slice, R] adapter B matrices.
    :param ranks: [L] int32 rank per adapter slot.
    :param scaling: [L] fp32 ``alpha / r`` per slot.
    :param inp: [rows, K] the GEMM's unquantized input (``x`` for gate_up, ``act`` for down).
    :param out2d: [M·k, N_out] the hook buffer (slot rows), edited in place: slice ``q``
        column ``n`` is column ``q·slice_off + n·col_stride``.
    :param keys: [M, k] int32 ``a·E + e`` per slot, ``-1`` = no delta.
    :param topk_weights: [M, k] fp32 to weight the delta by, or ``None``.
    :param row_div: input row of slot ``s`` is ``s // row_div`` (``k`` for ``x``, 1 for ``act``).
    :returns: ``out2d``.
    """
    if keys.dtype != torch.int32 or keys.dim() != 2:
        raise MoETypeError(f"keys: expected int32 [M, k], got {keys.dtype} {list(keys.shape)}")
    if lora_a.dim() != 5 or lora_b.dim() != 5:
        raise MoEInputError(f"lora_a/lora_b: expected 5-D [L, E, slices, ...], got {list(lora_a.shape)} and "
                            f"{list(lora_b.shape)}")
    if inp.stride(-1) != 1 and inp.numel():
        raise MoEInputError(f"inp: the last dim must be contiguous, got strides {inp.stride()}")
    M, k = keys.shape
    S = M * k
    L, E, slices, R, K = lora_a.shape
    n_slice = lora_b.shape[3]
    sorted_ids, block_keys, n_post = moe_align_block_size(keys, BLOCK_M, L * E)
    t = torch.empty((S, slices, R), dtype=torch.float32, device=out2d.device)
    num_blocks = block_keys.shape[0]
    interp = _is_interpreter(out2d)
    block_r = max(16, min(64, next_power_of_2(R)))
    _lora_shrink_kernel[(num_blocks, slices, cdiv(R, block_r))](
        inp, lora_a, t, ranks, sorted_ids, block_keys, n_post,
        K, S, E, sorted_ids.shape[0], row_div,
        inp.stride(0), inp.stride(1),
        *lora_a.stride(),
        t.stride(0), t.stride(1), t.stride(2),
        UPCAST=interp, IEEE=interp or inp.dtype == torch.float32,
        BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=64, num_warps=4)
    w = topk_weights if topk_weights is not None else t
    _lora_expand_kernel[(num_blocks, slices, cdiv(n_slice, 64))](
        t, lora_b, out2d, ranks, scaling, w, sorted_ids, block_keys, n_post,
        n_slice, S, E, sorted_ids.shape[0], k,
        t.stride(0), t.stride(1), t.stride(2),
        *lora_b.stride(),
        out2d.stride(0), out2d.stride(1), w.stride(0) if topk_weights is not None else 0,
        slice_off, col_stride,
        MUL_WEIGHT=topk_weights is not None, UPCAST=interp,
        BLOCK_M=BLOCK_M, BLOCK_N=64, BLOCK_R=min(block_r, 32), num_warps=4)
    return out2d
