"""Triton kernels of the LoRA hooks: shrink and expand, grouped by (adapter, expert).

Slots are aligned by the key ``a·E + e`` (:func:`moe_core.moe_align_block_size` with
``L·E`` buckets), so every block holds slots of one adapter ``a`` and one local expert ``e``;
blocks of key ``-1`` (no adapter, remote expert, empty slot) return at once.

- shrink: ``t[s, q, r] = Σ_h inp[s // ROW_DIV, h] · A[a, e, q, r, h]``, fp32, stored in an
  fp32 buffer [S, slices, R] (only ``r < rank[a]``).
- expand: ``out[s, col(q, n)] += scaling[a] · Σ_r t[s, q, r] · B[a, e, q, n, r]``
  (``× w[s]`` when ``MUL_WEIGHT``), fp32 math, one cast; ``col(q, n) = q·SLICE_OFF + n·COL_STRIDE``.

Every slot, row and expert offset is int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["_lora_shrink_kernel", "_lora_expand_kernel"]


@triton.jit
def _lora_shrink_kernel(
    inp_ptr, a_ptr, t_ptr, ranks_ptr,
    sorted_ptr, keys_ptr, n_post_ptr,
    K, num_slots, num_experts, EM, row_div,
    stride_im, stride_ik,
    stride_al, stride_ae, stride_aq, stride_ar, stride_ak,
    stride_ts, stride_tq, stride_tr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    q = tl.program_id(1).to(tl.int64)
    pid_r = tl.program_id(2)
    if pid_m * BLOCK_M >= tl.load(n_post_ptr):
        return
    key = tl.load(keys_ptr + pid_m).to(tl.int64)
    if key < 0:
        return
    lora = key // num_experts
    expert = key % num_experts
    rank = tl.load(ranks_ptr + lora)
    if pid_r * BLOCK_R >= rank:
        return
    offs_tid = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    slot = tl.load(sorted_ptr + offs_tid, mask=offs_tid < EM, other=num_slots).to(tl.int64)
    slot_mask = (slot >= 0) & (slot < num_slots)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    offs_k = tl.arange(0, BLOCK_K)
    in_rows = inp_ptr + (slot // row_div) * stride_im
    a_base = a_ptr + lora * stride_al + expert * stride_ae + q * stride_aq + offs_r.to(tl.int64)[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_idx = kb * BLOCK_K + offs_k
        k_mask = k_idx < K
        h_mask = slot_mask[:, None] & k_mask[None, :]
        w_mask = k_mask[:, None] & r_mask[None, :]
        h_ptrs = in_rows[:, None] + k_idx.to(tl.int64)[None, :] * stride_ik
        w_ptrs = a_base + k_idx.to(tl.int64)[:, None] * stride_ak
        if UPCAST:
            h = tl.where(h_mask, tl.load(h_ptrs, mask=h_mask).to(tl.float32), 0.0)
            w = tl.where(w_mask, tl.load(w_ptrs, mask=w_mask).to(tl.float32), 0.0)
        else:
            h = tl.load(h_ptrs, mask=h_mask, other=0.0)
            w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        if IEEE:
            acc += tl.dot(h, w, input_precision="ieee")
        else:
            acc += tl.dot(h, w)
    t_ptrs = t_ptr + slot[:, None] * stride_ts + q * stride_tq + offs_r.to(tl.int64)[None, :] * stride_tr
    tl.store(t_ptrs, acc, mask=slot_mask[:, None] & r_mask[None, :])


@triton.jit
def _lora_expand_kernel(
    t_ptr, b_ptr, out_ptr, ranks_ptr, scaling_ptr, weights_ptr,
    sorted_ptr, keys_ptr, n_post_ptr,
    N, num_slots, num_experts, EM, weights_k,
    stride_ts, stride_tq, stride_tr,
    stride_bl, stride_be, stride_bq, stride_bn, stride_br,
    stride_os, stride_on, stride_w,
    SLICE_OFF, COL_STRIDE,
    MUL_WEIGHT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    q = tl.program_id(1).to(tl.int64)
    pid_n = tl.program_id(2)
    if pid_m * BLOCK_M >= tl.load(n_post_ptr):
        return
    key = tl.load(keys_ptr + pid_m).to(tl.int64)
    if key < 0:
        return
    lora = key // num_experts
    expert = key % num_experts
    rank = tl.load(ranks_ptr + lora)
    scale = tl.load(scaling_ptr + lora)
    offs_tid = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    slot = tl.load(sorted_ptr + offs_tid, mask=offs_tid < EM, other=num_slots).to(tl.int64)
    slot_mask = (slot >= 0) & (slot < num_slots)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    n_mask = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    b_base = b_ptr + lora * stride_bl + expert * stride_be + q * stride_bq + offs_n[None, :] * stride_bn
    t_rows = t_ptr + slot[:, None] * stride_ts + q * stride_tq
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for rb in range(0, tl.cdiv(rank, BLOCK_R)):
        r_idx = rb * BLOCK_R + offs_r
        r_mask = r_idx < rank
        t_mask = slot_mask[:, None] & r_mask[None, :]
        t = tl.where(t_mask, tl.load(t_rows + r_idx.to(tl.int64)[None, :] * stride_tr, mask=t_mask), 0.0)
        b_mask = r_mask[:, None] & n_mask[None, :]
        b = tl.where(b_mask, tl.load(b_base + r_idx.to(tl.int64)[:, None] * stride_br, mask=b_mask).to(tl.float32),
                     0.0)
        acc += tl.dot(t, b, input_precision="ieee")      # fp32 intermediate stays fp32
    acc = acc * scale
    if MUL_WEIGHT:
        tw = tl.load(weights_ptr + (slot // weights_k) * stride_w + slot % weights_k, mask=slot_mask, other=0.0)
        acc = acc * tw[:, None]
    cols = q * SLICE_OFF + offs_n * COL_STRIDE
    o_ptrs = out_ptr + slot[:, None] * stride_os + cols[None, :] * stride_on
    o_mask = slot_mask[:, None] & n_mask[None, :]
    cur = tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, (cur + acc).to(out_ptr.dtype.element_ty), mask=o_mask)
