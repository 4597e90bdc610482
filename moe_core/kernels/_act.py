"""Triton kernel of the activation step (SEMANTICS §4.3); the wrapper is :mod:`.act`.

``out[s, j] = act(gate_up[s])[j]`` in fp32, cast once to ``out``'s dtype; rows of slots
whose id is ``-1`` are written as zeros. ``gate_up`` [S, N], ``out`` [S, N/2] gated or
[S, N] non-gated; gated halves: ``g = gate_up[s, j]``, ``u = gate_up[s, N/2 + j]``;
interleaved: ``g = gate_up[s, 2j]``, ``u = gate_up[s, 2j + 1]``.

``ACT``: 0 silu, 1 gelu (exact erf), 2 relu2, 3 swiglu_oai
(``g' = min(g, limit)``, ``u' = clamp(u, ±limit)``, ``g'·sigmoid(alpha·g')·(u' + 1)``).
Gated silu with ``HAS_LIMIT``: ``min(silu(g), limit)·clamp(u, ±limit)``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_core.kernels._gdc import _pdl_enter

__all__ = ["_act_kernel", "_gated", "_plain"]


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _plain(x, ACT: tl.constexpr):
    if ACT == 0:
        y = x * _sigmoid(x)
    elif ACT == 1:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    else:
        r = tl.maximum(x, 0.0)
        y = r * r
    return y


@triton.jit
def _gated(g, u, alpha, limit, ACT: tl.constexpr, HAS_LIMIT: tl.constexpr):
    """Gated activation of fp32 gate ``g`` and up ``u`` (also gemm1's fused epilogue)."""
    if ACT == 3:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        y = g * _sigmoid(alpha * g) * (u + 1.0)
    else:
        a = _plain(g, ACT)
        if HAS_LIMIT:
            a = tl.minimum(a, limit)
            u = tl.minimum(tl.maximum(u, -limit), limit)
        y = a * u
    return y


@triton.jit
def _act_kernel(gu_ptr, out_ptr, ids_ptr, S, N_OUT, stride_gs, stride_os, half, alpha, limit,
                ACT: tl.constexpr, GATED: tl.constexpr, INTERLEAVED: tl.constexpr,
                HAS_LIMIT: tl.constexpr, HAS_IDS: tl.constexpr,
                BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = False):
    _pdl_enter(PDL)
    pid_s = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < S
    mask = row_ok[:, None] & (cols < N_OUT)[None, :]
    live = row_ok
    if HAS_IDS:
        eid = tl.load(ids_ptr + rows, mask=row_ok, other=-1)
        live = row_ok & (eid >= 0)
    load_mask = mask & live[:, None]
    row_base = gu_ptr + rows[:, None] * stride_gs
    if GATED:
        if INTERLEAVED:
            g = tl.load(row_base + 2 * cols[None, :], mask=load_mask, other=0.0).to(tl.float32)
            u = tl.load(row_base + 2 * cols[None, :] + 1, mask=load_mask, other=0.0).to(tl.float32)
        else:
            g = tl.load(row_base + cols[None, :], mask=load_mask, other=0.0).to(tl.float32)
            u = tl.load(row_base + half + cols[None, :], mask=load_mask, other=0.0).to(tl.float32)
        y = _gated(g, u, alpha, limit, ACT, HAS_LIMIT)
    else:
        x = tl.load(row_base + cols[None, :], mask=load_mask, other=0.0).to(tl.float32)
        y = _plain(x, ACT)
    y = tl.where(live[:, None], y, 0.0)
    tl.store(out_ptr + rows[:, None] * stride_os + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
