"""The grouped-GEMM Triton kernel of SEMANTICS §3 (gemm1 and gemm2).

``out[s, n] = Σ_k a[s // top_k, k] · w[e, n, k]`` (scales, bias, routed weight in the
epilogue) for every slot ``s`` listed in ``sorted_token_ids`` whose block belongs to
expert ``e = expert_ids[block]``; ``a`` [rows, K], ``w`` [E, N, K] (int4: [E, N, K/2]),
``out`` [M·k, N]. One program computes a ``BLOCK_SIZE_M × BLOCK_SIZE_N`` tile of one block.

Quantization modes (``QUANT``, a constexpr):

====  =====================================================================================
 0    none: ``a`` and ``w`` in the compute dtype
 1    w8a8 per tensor / per token × per channel: ``acc · a_scale[row] · w_scale[e, n]``
      (strides 0 where a scale is per tensor)
 2    w8a8 block ``[group_n, group_k]``: per K tile ``dot · a_scale[row, kg] · w_scale[e, n//gn, kg]``
 3    w8a16 per channel: int8 ``w`` cast to the compute dtype, ``acc · w_scale[e, n]``
 4    weight-only grouped int8 (uint8 storage): ``(q − zp) · scale`` per K group, zp default 128
 5    weight-only grouped int4 (packed along K, low nibble first): zp packed along N, default 8
====  =====================================================================================

Fused activation (``FUSE_ACT``, gemm1 only, when no hook needs ``gate_up``): the program's
``BLOCK_SIZE_N`` columns are columns of ``act`` (``N`` = its width). Gated (``FUSE_ACT == 1``):
each program also computes the matching up columns (rows ``n + N`` of ``w``, or rows ``2n`` and
``2n + 1`` when ``INTERLEAVED``) in a second accumulator and stores ``act(gate, up)``; with
``PAIR_DOT`` one dot over the program's ``2·BLOCK_SIZE_N`` gate and up rows fills one
accumulator that is split into gate and up after the K loop (interleaved: its even and odd
columns, the rows being contiguous pairs; halves: its two halves, the gate tile's rows then the
up tile's, block w8a8 rescaling each half by its own weight scale);
non-gated (``FUSE_ACT == 2``): ``act(acc)``. Gate and up are rounded to the output dtype before
the activation, as the unfused path stores them, so the output is bitwise the unfused one.
Off (``0``), the kernel is the plain GEMM.

Weight tiles through a tensor descriptor (``W_TMA``, sm90+, plain and w8a8 modes, weights
contiguous): ``w_desc`` views ``w`` as [E·N_w, K] with [BLOCK_SIZE_N, BLOCK_SIZE_K] boxes, so
each K step is one TMA copy per weight tile (the K tail is zero-filled by the copy). Gated with
``PAIR_DOT``: interleaved, the same view with [2·BLOCK_SIZE_N, BLOCK_SIZE_K] boxes (the pairs);
halves, a view [E, 2, N, K] with [1, 2, BLOCK_SIZE_N, BLOCK_SIZE_K] boxes (gate tile and up
tile in one copy; rows past the expert's N are zero-filled). Gated without it (halves tiles of
other w8a8 modes or of block w8a8 over 64 columns, tiles over 256 rows), ``w_desc_u`` reads the
up rows: the same view ``N`` rows on (halves), or for the interleaved layout two views of
[E·N, K] with a row stride of two weight rows, ``w_desc`` from row 0 (gate rows ``2n``) and
``w_desc_u`` from row 1 (up rows ``2n + 1``). Rows past an expert's end belong to the next
expert (or are zero-filled past the last); they only feed columns the store masks, as the
wrapped columns do.

Sorted mode (SEMANTICS §3 step 10, ``USE_TMA`` of a ``_down`` table): gemm1 with ``SORTED_OUT``
stores row ``p`` (the position in ``sorted_token_ids``) instead of the slot, every row of a block
(padding rows hold the epilogue of a zero row), so ``out`` is [len(sorted_token_ids), N]; gemm2
with ``SORTED_IN`` reads that buffer's row ``p`` for position ``p`` (and its activation scale row
``p``), through ``a_desc`` ([P, K] with [BLOCK_SIZE_M, BLOCK_SIZE_K] boxes, one TMA copy per K step)
when ``A_TMA``. A padding row only feeds its own output row, which the store masks.

Every offset that scales with tokens, slots, experts or program ids is int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_core.kernels._act import _gated, _plain
from moe_core.kernels._gdc import _pdl_enter

__all__ = ["_grouped_gemm_kernel"]


@triton.jit
def _w_tile(w_base, w_scale_ptr, w_zp_ptr, off_expert, w_rows, k_idx, k_mask, group_k, stride_wk,
            stride_wse, stride_wsn, stride_wsk, stride_zpe, stride_zpn, stride_zpk,
            QUANT: tl.constexpr, HAS_ZP: tl.constexpr, UPCAST: tl.constexpr):
    """The [BLOCK_SIZE_K, BLOCK_SIZE_N] weight tile at ``w_base`` ([1, BLOCK_SIZE_N] pointers to
    rows ``w_rows`` of expert ``off_expert``), dequantized for the weight-only modes; K tail masked."""
    if QUANT == 5:
        wq = tl.load(w_base + (k_idx[:, None] // 2) * stride_wk, mask=k_mask[:, None], other=0)
        wq = ((wq.to(tl.int32) >> ((k_idx[:, None] % 2) * 4)) & 0xF).to(tl.float32)
    elif UPCAST:
        wq = tl.where(k_mask[:, None],
                      tl.load(w_base + k_idx[:, None] * stride_wk, mask=k_mask[:, None]).to(tl.float32), 0.0)
    else:
        # float zero: int8/uint8 take it as 0, and int -> fp8 casts do not exist
        wq = tl.load(w_base + k_idx[:, None] * stride_wk, mask=k_mask[:, None], other=0.0)
    if QUANT == 4 or QUANT == 5:
        # weight-only grouped: dequantize the tile before the dot
        g_idx = k_idx[:, None] // group_k
        scale = tl.load(w_scale_ptr + off_expert * stride_wse + w_rows[None, :] * stride_wsn
                        + g_idx * stride_wsk, mask=k_mask[:, None], other=0.0)
        if HAS_ZP:
            if QUANT == 5:
                zp = tl.load(w_zp_ptr + off_expert * stride_zpe + (w_rows[None, :] // 2) * stride_zpn
                             + g_idx * stride_zpk, mask=k_mask[:, None], other=0)
                zp = ((zp.to(tl.int32) >> ((w_rows[None, :] % 2) * 4)) & 0xF).to(tl.float32)
            else:
                zp = tl.load(w_zp_ptr + off_expert * stride_zpe + w_rows[None, :] * stride_zpn
                             + g_idx * stride_zpk, mask=k_mask[:, None], other=0).to(tl.float32)
        else:
            zp = 8.0 if QUANT == 5 else 128.0
        wq = (wq.to(tl.float32) - zp) * scale
    return wq


@triton.jit
def _mma(a, wq, QUANT: tl.constexpr, INT_DOT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``a @ wq`` in fp32 (int32 for the int8 dot), with the operand casts of each mode."""
    if UPCAST:
        b = wq.to(tl.float32)
    elif QUANT == 1 or QUANT == 2:
        b = wq
    else:
        b = wq.to(a.dtype)
    if INT_DOT:
        part = tl.dot(a, b, out_dtype=tl.int32).to(tl.float32)
    elif IEEE:
        part = tl.dot(a, b, input_precision="ieee")
    else:
        part = tl.dot(a, b)
    return part


@triton.jit
def _block_rescaled(acc, part, a_s, w_s, W_SCALE_UNIFORM: tl.constexpr):
    """``acc + part · a_s[:, None] · w_s[None, :]`` for one K block of block w8a8; with one
    weight scale for the program (``W_SCALE_UNIFORM``, ``w_s`` a scalar) folded into the row
    scales: one multiply-add per element instead of two multiplies and an add."""
    if W_SCALE_UNIFORM:
        return acc + part * (a_s * w_s)[:, None]
    return acc + part * a_s[:, None] * w_s[None, :]


@triton.jit
def _halves_rescaled(acc, part, a_s, w_s_g, w_s_u, BLOCK_SIZE_N: tl.constexpr):
    """:func:`_block_rescaled` of a halves pair accumulator (gate columns ``[0, BLOCK_SIZE_N)``,
    up columns after) whose halves have one weight scale each: per element the product the
    two-dot path multiplies by, so the result is bitwise that path's."""
    cols = tl.arange(0, 2 * BLOCK_SIZE_N)
    scale = tl.where(cols[None, :] < BLOCK_SIZE_N, (a_s * w_s_g)[:, None], (a_s * w_s_u)[:, None])
    return acc + part * scale


# EM and num_valid_tokens change with every batch size; specialising them (divisibility by 16)
# would compile each config twice or more as M varies, for no faster code.
@triton.jit(do_not_specialize=["EM", "num_valid_tokens", "num_experts"])
def _grouped_gemm_kernel(
    a_ptr, a_desc, w_ptr, w_desc, w_desc_u, out_ptr,
    a_scale_ptr, w_scale_ptr, w_zp_ptr, bias_ptr, topk_weights_ptr,
    sorted_token_ids_ptr, expert_ids_ptr, num_tokens_post_padded_ptr,
    N, K, EM, num_valid_tokens, top_k, weights_k,
    stride_am, stride_ak,
    stride_we, stride_wn, stride_wk,
    stride_om, stride_on,
    stride_asm, stride_ask,
    stride_wse, stride_wsn, stride_wsk,
    stride_zpe, stride_zpn, stride_zpk,
    stride_be, stride_bn,
    stride_tw,
    group_n, group_k, num_experts,
    QUANT: tl.constexpr,
    HAS_ZP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr,
    INT_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
    FUSE_ACT: tl.constexpr = 0,
    ACT: tl.constexpr = 0,
    INTERLEAVED: tl.constexpr = False,
    HAS_LIMIT: tl.constexpr = False,
    ALPHA: tl.constexpr = 1.0,
    LIMIT: tl.constexpr = 0.0,
    W_SCALE_UNIFORM: tl.constexpr = False,
    W_TMA: tl.constexpr = False,
    SORTED_OUT: tl.constexpr = False,
    SORTED_IN: tl.constexpr = False,
    A_TMA: tl.constexpr = False,
    PAIR_DOT: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    _pdl_enter(PDL)
    # -- program -> (pid_m, pid_n), grouped along M -------------------------------------
    pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(EM, BLOCK_SIZE_M)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    num_pid_in_group = GROUP_SIZE_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_SIZE_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_SIZE_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # 1. blocks past the padded count do nothing (the count stays on the device)
    num_tokens_post_padded = tl.load(num_tokens_post_padded_ptr)
    if pid_m * BLOCK_SIZE_M >= num_tokens_post_padded:
        return

    # 3./4. rows of this block: slots (int64), sentinel rows masked
    offs_tid = pid_m.to(tl.int64) * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M).to(tl.int64)
    offs_token = tl.load(sorted_token_ids_ptr + offs_tid, mask=offs_tid < EM,
                         other=num_valid_tokens).to(tl.int64)
    token_mask = (offs_token >= 0) & (offs_token < num_valid_tokens)
    offs_cn = pid_n.to(tl.int64) * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N).to(tl.int64)
    if SORTED_OUT:      # 10. sorted mode: row = position, every row of the block
        out_ptrs = out_ptr + offs_tid[:, None] * stride_om + offs_cn[None, :] * stride_on
        out_mask = (offs_tid[:, None] < EM) & (offs_cn[None, :] < N)
    else:
        out_ptrs = out_ptr + offs_token[:, None] * stride_om + offs_cn[None, :] * stride_on
        out_mask = token_mask[:, None] & (offs_cn[None, :] < N)

    # 2. expert -1 (filtered slots) or outside [0, E) (the one-token layout passes the routed ids
    #    unchecked): zero rows, never touch w[-1] or w[E]
    off_expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if (off_expert < 0) | (off_expert >= num_experts):
        zeros = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=out_ptr.dtype.element_ty)
        tl.store(out_ptrs, zeros, mask=out_mask)
        return

    offs_bn = offs_cn % N                       # wrapped columns are computed, never stored
    # weight rows of the output columns (gate rows when the activation is fused)
    if FUSE_ACT == 1:
        if INTERLEAVED:
            rows_g = offs_bn * 2
            rows_u = rows_g + 1
        else:
            rows_g = offs_bn
            rows_u = offs_bn + N
    else:
        rows_g = offs_bn
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    # 4. A row of each slot: its token, or in sorted mode its position
    a_row = offs_tid if SORTED_IN else offs_token // top_k
    a_rows = a_ptr + a_row * stride_am
    if PAIR_DOT:
        offs_w = tl.arange(0, 2 * BLOCK_SIZE_N).to(tl.int64)
        if INTERLEAVED:
            # one dot over the program's gate/up row pairs: 2·BLOCK_SIZE_N contiguous weight
            # rows (wrapped past the expert's 2N like the columns)
            rows_w = (pid_n.to(tl.int64) * (2 * BLOCK_SIZE_N) + offs_w) % (2 * N)
        else:
            # halves: the gate tile's rows, then the up tile's (N rows on)
            rows_w = (pid_n.to(tl.int64) * BLOCK_SIZE_N + offs_w % BLOCK_SIZE_N) % N + (offs_w // BLOCK_SIZE_N) * N
        w_base = w_ptr + off_expert * stride_we + rows_w[None, :] * stride_wn
    else:
        rows_w = rows_g
        w_base = w_ptr + off_expert * stride_we + rows_g[None, :] * stride_wn
        if FUSE_ACT == 1:
            w_base_u = w_ptr + off_expert * stride_we + rows_u[None, :] * stride_wn
    if W_TMA:
        # first row of the program's tile in the descriptor's view (gate rows when fused)
        if PAIR_DOT and INTERLEAVED:
            desc_row = (off_expert * 2 * N + pid_n.to(tl.int64) * (2 * BLOCK_SIZE_N)).to(tl.int32)
        elif PAIR_DOT:
            desc_row = (pid_n * BLOCK_SIZE_N).to(tl.int32)    # halves: [E, 2, N, K] view, dim 2
        elif FUSE_ACT == 1 and INTERLEAVED:
            desc_row = (off_expert * N + pid_n.to(tl.int64) * BLOCK_SIZE_N).to(tl.int32)
            desc_row_u = desc_row                  # the same pair index in the up view (w_desc_u)
        else:
            n_w = stride_we // stride_wn
            desc_row = (off_expert * n_w + pid_n.to(tl.int64) * BLOCK_SIZE_N).to(tl.int32)
            if FUSE_ACT == 1:
                desc_row_u = desc_row + N          # halves: up rows are N rows on (w_desc_u is w_desc)
    if QUANT == 1 or QUANT == 2:
        a_scale_rows = a_scale_ptr + a_row * stride_asm
    if QUANT == 1 or QUANT == 3:
        w_scale_cols = w_scale_ptr + off_expert * stride_wse + rows_g * stride_wsn
        if FUSE_ACT == 1:
            w_scale_cols_u = w_scale_ptr + off_expert * stride_wse + rows_u * stride_wsn
    if QUANT == 2:
        # W_SCALE_UNIFORM: the program's weight rows lie in one [bn] block (gate rows in one, up
        # rows in one), so its first row stands for all: one weight scale per K block
        scale_rows_g = rows_w                    # the pairs' rows when PAIR_DOT
        if W_SCALE_UNIFORM:
            scale_rows_g = pid_n.to(tl.int64) * BLOCK_SIZE_N * (2 if FUSE_ACT == 1 and INTERLEAVED else 1)
        w_scale_cols = w_scale_ptr + off_expert * stride_wse + (scale_rows_g // group_n) * stride_wsn
        # the up rows' scale: two dots, or a halves pair with one scale per half
        if FUSE_ACT == 1 and (not PAIR_DOT or (W_SCALE_UNIFORM and not INTERLEAVED)):
            scale_rows_u = rows_u
            if W_SCALE_UNIFORM:
                scale_rows_u = scale_rows_g + 1 if INTERLEAVED else scale_rows_g + N
            w_scale_cols_u = w_scale_ptr + off_expert * stride_wse + (scale_rows_u // group_n) * stride_wsn

    # 5. K loop, fp32 accumulation, K tail masked
    if PAIR_DOT:
        acc = tl.zeros((BLOCK_SIZE_M, 2 * BLOCK_SIZE_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    if FUSE_ACT == 1 and not PAIR_DOT:
        acc_u = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_SIZE_K)):
        k_idx = kb * BLOCK_SIZE_K + offs_k
        k_mask = k_idx < K
        a_mask = token_mask[:, None] & k_mask[None, :]
        a_ptrs = a_rows[:, None] + k_idx[None, :] * stride_ak
        if A_TMA:
            a = a_desc.load([(pid_m * BLOCK_SIZE_M).to(tl.int32), kb * BLOCK_SIZE_K])
        elif UPCAST:
            # interpreter: no bf16/fp8 arithmetic on CPU, so cast every load to fp32 first
            a = tl.where(a_mask, tl.load(a_ptrs, mask=a_mask).to(tl.float32), 0.0)
        else:
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        if W_TMA:
            if PAIR_DOT and not INTERLEAVED:     # [1, 2, BN, BK] box: gate tile, then up tile
                wq = tl.reshape(w_desc.load([off_expert.to(tl.int32), 0, desc_row, kb * BLOCK_SIZE_K]),
                                (2 * BLOCK_SIZE_N, BLOCK_SIZE_K)).T
            else:
                wq = w_desc.load([desc_row, kb * BLOCK_SIZE_K]).T
        else:
            wq = _w_tile(w_base, w_scale_ptr, w_zp_ptr, off_expert, rows_w, k_idx, k_mask, group_k, stride_wk,
                         stride_wse, stride_wsn, stride_wsk, stride_zpe, stride_zpn, stride_zpk, QUANT, HAS_ZP,
                         UPCAST)
        if QUANT == 2:
            # this K block's scales, loaded before its dot so their latency overlaps the MMA
            # (after the dot they waited for its result, then for the loads, every K block)
            kg = (kb * BLOCK_SIZE_K) // group_k
            a_s = tl.load(a_scale_rows + kg * stride_ask, mask=token_mask, other=0.0)
            w_s = tl.load(w_scale_cols + kg * stride_wsk)
            if FUSE_ACT == 1 and (not PAIR_DOT or (W_SCALE_UNIFORM and not INTERLEAVED)):
                w_s_u = tl.load(w_scale_cols_u + kg * stride_wsk)
        part = _mma(a, wq, QUANT, INT_DOT, UPCAST, IEEE)
        if FUSE_ACT == 1 and not PAIR_DOT:
            if W_TMA:
                wq_u = w_desc_u.load([desc_row_u, kb * BLOCK_SIZE_K]).T
            else:
                wq_u = _w_tile(w_base_u, w_scale_ptr, w_zp_ptr, off_expert, rows_u, k_idx, k_mask, group_k,
                               stride_wk, stride_wse, stride_wsn, stride_wsk, stride_zpe, stride_zpn, stride_zpk,
                               QUANT, HAS_ZP, UPCAST)
            part_u = _mma(a, wq_u, QUANT, INT_DOT, UPCAST, IEEE)
        if QUANT == 2:
            if PAIR_DOT and W_SCALE_UNIFORM and not INTERLEAVED:
                acc = _halves_rescaled(acc, part, a_s, w_s, w_s_u, BLOCK_SIZE_N)
            else:
                acc = _block_rescaled(acc, part, a_s, w_s, W_SCALE_UNIFORM)
            if FUSE_ACT == 1 and not PAIR_DOT:
                acc_u = _block_rescaled(acc_u, part_u, a_s, w_s_u, W_SCALE_UNIFORM)
        else:
            acc += part
            if FUSE_ACT == 1 and not PAIR_DOT:
                acc_u += part_u
    if PAIR_DOT and INTERLEAVED:        # columns 2c and 2c + 1 are act column c's gate and up
        acc, acc_u = tl.split(tl.reshape(acc, (BLOCK_SIZE_M, BLOCK_SIZE_N, 2)))
    elif PAIR_DOT:                      # columns c and BLOCK_SIZE_N + c
        acc, acc_u = tl.split(tl.permute(tl.reshape(acc, (BLOCK_SIZE_M, 2, BLOCK_SIZE_N)), (0, 2, 1)))

    # 6. scales after the loop
    if QUANT == 1:
        a_s = tl.load(a_scale_rows, mask=token_mask, other=0.0)
        w_s = tl.load(w_scale_cols)
        acc = acc * a_s[:, None] * w_s[None, :]
        if FUSE_ACT == 1:
            acc_u = acc_u * a_s[:, None] * tl.load(w_scale_cols_u)[None, :]
    if QUANT == 3:
        w_s = tl.load(w_scale_cols)
        acc = acc * w_s[None, :]
        if FUSE_ACT == 1:
            acc_u = acc_u * tl.load(w_scale_cols_u)[None, :]
    # 7. bias
    if HAS_BIAS:
        bias = tl.load(bias_ptr + off_expert * stride_be + rows_g * stride_bn).to(tl.float32)
        acc = acc + bias[None, :]
        if FUSE_ACT == 1:
            acc_u = acc_u + tl.load(bias_ptr + off_expert * stride_be + rows_u * stride_bn).to(tl.float32)[None, :]
    # 8. routed weight of the slot (topk_weights [M, weights_k], row stride stride_tw)
    if MUL_ROUTED_WEIGHT:
        tw = tl.load(topk_weights_ptr + (offs_token // weights_k) * stride_tw + offs_token % weights_k,
                     mask=token_mask, other=0.0)
        acc = acc * tw[:, None]
        if FUSE_ACT == 1:
            acc_u = acc_u * tw[:, None]
    # fused activation of SEMANTICS §4.3. gate_up is rounded to the compute dtype first, as the
    # unfused path stores it, so fusing changes no bit of the output (hook neutrality, §8)
    if FUSE_ACT == 1:
        g = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        u = acc_u.to(out_ptr.dtype.element_ty).to(tl.float32)
        acc = _gated(g, u, ALPHA, LIMIT, ACT, HAS_LIMIT)
    elif FUSE_ACT == 2:
        acc = _plain(acc.to(out_ptr.dtype.element_ty).to(tl.float32), ACT)
    # 9./10. cast once, store the slot rows
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
