"""Triton kernels of w8a8 activation quantization; the wrapper is :mod:`.quantize`.

Same math and rounding as :func:`moe_core.quant.quantize_activation`:
``scale = max(amax, EPS) / qmax`` (IEEE division), ``q = a / scale`` (IEEE division);
int8 rounds half to even, then clamps to [-128, 127]; fp8 clamps to ±qmax, then the cast
rounds to nearest even.

- ``_amax_partial_kernel``: per-program partial amax of the whole tensor (launch 1 of
  dynamic per-tensor; grid-strided, so the number of partials is static);
- ``_quant_kernel``: quantize with a per-tensor scale (static, or reduced from the
  partials: launch 2, program (0, 0) stores it) or a static per-row scale;
- ``_quant_group_kernel``: dynamic per token group (per token = one group of K).
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_core.kernels._gdc import _pdl_enter

__all__ = ["_amax_partial_kernel", "_quant_kernel", "_quant_group_kernel"]


@triton.jit
def _to_q(x, qmax, IS_INT8: tl.constexpr):
    """fp32 ``x`` (already divided by its scale) -> the pre-cast quantized value (fp32)."""
    if IS_INT8:
        r = tl.floor(x + 0.5)
        tie = (r - x) == 0.5
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        r = tl.where(tie & odd, r - 1.0, r)                  # round half to even
        y = tl.minimum(tl.maximum(r, -128.0), 127.0)
    else:
        y = tl.minimum(tl.maximum(x, -qmax), qmax)
    return y


@triton.jit
def _amax_partial_kernel(a_ptr, partial_ptr, rows, K, stride_ar, num_programs,
                         BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    _pdl_enter(PDL)
    pid = tl.program_id(0).to(tl.int64)
    r_lane = tl.arange(0, BLOCK_R).to(tl.int64)
    k_lane = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for r0 in range(pid * BLOCK_R, rows, num_programs * BLOCK_R):
        r = r0 + r_lane
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + k_lane
            m = (r < rows)[:, None] & (kk < K)[None, :]
            v = tl.load(a_ptr + r[:, None] * stride_ar + kk[None, :], mask=m, other=0.0).to(tl.float32)
            acc = tl.maximum(acc, tl.abs(v))
    tl.store(partial_ptr + pid, tl.max(tl.max(acc, 1), 0))


@triton.jit
def _quant_kernel(a_ptr, q_ptr, scale_ptr, scale_out_ptr, partial_ptr, n_partial, rows, K,
                  stride_ar, stride_qr, qmax, eps,
                  MODE: tl.constexpr, IS_INT8: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                  PDL: tl.constexpr = False):
    """MODE 0: static per-tensor scale; 1: static per-row scale [rows, 1]; 2: dynamic per-tensor."""
    _pdl_enter(PDL)
    pid_r = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    row_ok = r < rows
    m = row_ok[:, None] & (kk < K)[None, :]
    a = tl.load(a_ptr + r[:, None] * stride_ar + kk[None, :], mask=m, other=0.0).to(tl.float32)
    if MODE == 0:
        s = tl.load(scale_ptr)
        x = tl.math.div_rn(a, tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32) + s)
    elif MODE == 1:
        s_row = tl.load(scale_ptr + r, mask=row_ok, other=1.0)
        x = tl.math.div_rn(a, tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32) + s_row[:, None])
    else:
        p = tl.arange(0, BLOCK_P)
        amax = tl.max(tl.load(partial_ptr + p, mask=p < n_partial, other=0.0), 0)
        s = tl.math.div_rn(tl.maximum(amax, eps), qmax)
        tl.store(scale_out_ptr, s, mask=(pid_r == 0) & (pid_k == 0))
        x = tl.math.div_rn(a, tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32) + s)
    y = _to_q(x, qmax, IS_INT8)
    tl.store(q_ptr + r[:, None] * stride_qr + kk[None, :], y.to(q_ptr.dtype.element_ty), mask=m)


@triton.jit
def _group_cols(k_first, off, lane, group_k, K, row_ok):
    """Columns ``k_first + off + lane`` of one group and the [rows, lanes] mask of the valid ones."""
    kk = k_first + off + lane
    return kk, row_ok[:, None] & ((off + lane < group_k) & (kk < K))[None, :]


@triton.jit
def _quant_group_kernel(a_ptr, q_ptr, scale_out_ptr, rows, K, group_k, stride_ar, stride_qr, stride_sr,
                        qmax, eps, IS_INT8: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr,
                        ONE_PASS: tl.constexpr, PDL: tl.constexpr = False):
    """Program (group, row blocks): ``scale[r, g] = max(amax(a[r, g·gk:(g+1)·gk]), EPS) / qmax``
    for ``BLOCK_R`` rows at a time. ``ONE_PASS`` (``group_k <= BLOCK``): the tile is loaded once
    and kept.

    Groups run along grid axis 0, the fastest: the programs running at once cover whole rows of
    a few row blocks, so their reads and writes are contiguous (row blocks fastest read one
    group's column strip of many rows: 15% slower at [65536, 2880] on the H200, NOTES attempt
    38). Axis 1 holds at most 65535 programs, so each steps over the row blocks by the grid's
    height (one row block each below 65536 of them)."""
    _pdl_enter(PDL)
    grp = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, BLOCK).to(tl.int64)
    k_first = grp * group_k
    for pid_r in range(tl.program_id(1), tl.cdiv(rows, BLOCK_R), tl.num_programs(1)):
        r = tl.arange(0, BLOCK_R).to(tl.int64) + pid_r * BLOCK_R     # pid_r * BLOCK_R < rows + BLOCK_R
        row_ok = r < rows
        src = a_ptr + r[:, None] * stride_ar
        dst = q_ptr + r[:, None] * stride_qr
        if ONE_PASS:
            kk, m = _group_cols(k_first, 0, lane, group_k, K, row_ok)
            a = tl.load(src + kk[None, :], mask=m, other=0.0).to(tl.float32)
            s = tl.math.div_rn(tl.maximum(tl.max(tl.abs(a), 1), eps), qmax)
            tl.store(scale_out_ptr + r * stride_sr + grp, s, mask=row_ok)
            y = _to_q(tl.math.div_rn(a, tl.zeros([BLOCK_R, BLOCK], dtype=tl.float32) + s[:, None]), qmax,
                      IS_INT8)
            tl.store(dst + kk[None, :], y.to(q_ptr.dtype.element_ty), mask=m)
        else:
            acc = tl.zeros([BLOCK_R, BLOCK], dtype=tl.float32)
            for off in range(0, group_k, BLOCK):
                kk, m = _group_cols(k_first, off, lane, group_k, K, row_ok)
                acc = tl.maximum(acc, tl.abs(tl.load(src + kk[None, :], mask=m, other=0.0).to(tl.float32)))
            s = tl.math.div_rn(tl.maximum(tl.max(acc, 1), eps), qmax)
            tl.store(scale_out_ptr + r * stride_sr + grp, s, mask=row_ok)
            s_tile = tl.zeros([BLOCK_R, BLOCK], dtype=tl.float32) + s[:, None]
            for off in range(0, group_k, BLOCK):
                kk, m = _group_cols(k_first, off, lane, group_k, K, row_ok)
                a = tl.load(src + kk[None, :], mask=m, other=0.0).to(tl.float32)
                y = _to_q(tl.math.div_rn(a, s_tile), qmax, IS_INT8)
                tl.store(dst + kk[None, :], y.to(q_ptr.dtype.element_ty), mask=m)
