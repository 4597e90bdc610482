"""Triton kernel of the combine (SEMANTICS §9); the wrapper is :mod:`.moe_sum`.

``out[m, h] = scale · Σ_{j < k} down[m, j, h]``: fp32 accumulation in ascending ``j``,
one multiply by ``scale``, one cast. The same kernel and order serve every M and k, so
the result never depends on the batch size (deterministic mode needs nothing else).
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_core.kernels._gdc import _pdl_enter

__all__ = ["_moe_sum_kernel"]


@triton.jit
def _moe_sum_kernel(down_ptr, out_ptr, M, H, top_k, scale, stride_dm, stride_dk, stride_om,
                    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr = False):
    _pdl_enter(PDL)
    pid_m = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H).to(tl.int64)
    mask = (rows < M)[:, None] & (cols < H)[None, :]
    src = down_ptr + rows[:, None] * stride_dm + cols[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    for j in range(0, top_k):
        acc += tl.load(src + j * stride_dk, mask=mask, other=0.0).to(tl.float32)
    acc = acc * scale
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
