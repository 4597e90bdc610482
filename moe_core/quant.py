"""Quantization math in plain torch: how activations are quantized inside the sequence
and how quantized weights are read (SEMANTICS §4.1). The torch backend uses this; the
Triton kernels implement the same rounding.

Activation quantization (w8a8), ``qmax`` = 448 (fp8 e4m3fn), 240 (e4m3fnuz) or 127 (int8):

- static: ``q = clamp(a / scale)`` with the given scale;
- dynamic per tensor: ``scale = max(amax(a), EPS) / qmax`` (numel 1);
- dynamic per token (``per_channel``): ``scale[r] = max(amax(a[r]), EPS) / qmax`` ([rows, 1]);
- dynamic per token group of ``bk`` (block): ``scale[r, g]`` over ``a[r, g·bk:(g+1)·bk]``.

fp8 rounds to nearest even on the cast; int8 rounds half to even, then clamps to [-128, 127].
Division is a true (IEEE) division ``a / scale``, not a multiply by a reciprocal.

Rows of ``-1`` slots: gemm1 writes them as zeros and every activation maps 0 to 0, so in
the torch backend those rows of ``act`` are exactly zero and take no part in a dynamic
per-tensor ``amax`` of the gemm2 input. A kernel that leaves them unwritten must mask them
out of that ``amax`` (or zero them) to give the same scale.
"""

from __future__ import annotations

import torch

from moe_core.spec import QuantSpec

__all__ = ["EPS", "qmax_of", "quantize_activation", "dequantize_activation", "dequantize_weight",
           "unpack_int4"]

#: floor of amax before dividing, so an all-zero row gets a finite scale
EPS = 1e-10


def qmax_of(dtype: torch.dtype) -> float:
    """Largest representable magnitude of a quantized activation dtype."""
    if dtype == torch.int8:
        return 127.0
    return float(torch.finfo(dtype).max)


def _div_qmax(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """``amax / qmax`` as an IEEE division on every device (CUDA turns ``tensor / python_float``
    into a multiply by the rounded reciprocal, which the Triton kernels do not do)."""
    return amax / torch.full_like(amax, qmax)


def _expand_groups(scale: torch.Tensor, size: int, group: int) -> torch.Tensor:
    """Repeat the last dim of ``scale`` ``group`` times and crop to ``size``."""
    return scale.repeat_interleave(group, dim=-1)[..., :size]


def quantize_activation(a: torch.Tensor, quant: QuantSpec, scale: torch.Tensor | None, *,
                        fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``a`` [rows, K] for a w8a8 GEMM; returns ``(a_q, a_scale)`` (a new buffer)."""
    qdtype = fp8_dtype if quant.scheme == "fp8_w8a8" else torch.int8
    qmax = qmax_of(qdtype)
    a32 = a.float()
    rows, K = a32.shape
    if scale is not None:
        s = scale.float().reshape(-1, 1) if scale.numel() > 1 else scale.float().reshape(1)
        full = s if s.dim() == 1 else s
    elif quant.is_block:
        bk = quant.block_shape[1]
        groups = -(-K // bk)
        padded = torch.nn.functional.pad(a32.abs(), (0, groups * bk - K))
        s = _div_qmax(padded.view(rows, groups, bk).amax(dim=-1).clamp(min=EPS), qmax)
        full = _expand_groups(s, K, bk)
    elif quant.per_channel:
        s = _div_qmax(a32.abs().amax(dim=-1, keepdim=True).clamp(min=EPS), qmax)
        full = s
    else:
        s = _div_qmax((a32.abs().amax() if a32.numel() else a32.new_zeros(())).clamp(min=EPS).reshape(1), qmax)
        full = s
    q = a32 / full
    if qdtype == torch.int8:
        q = torch.round(q).clamp(-128, 127).to(torch.int8)
    else:
        q = q.clamp(-qmax, qmax).to(qdtype)
    return q, s.contiguous()


def dequantize_activation(a_q: torch.Tensor, a_scale: torch.Tensor, quant: QuantSpec) -> torch.Tensor:
    """fp32 value of a quantized activation ``a_q`` [rows, K] with its scale."""
    a32 = a_q.float()
    if quant.is_block and a_scale.dim() == 2 and a_scale.shape[-1] != 1:
        return a32 * _expand_groups(a_scale, a32.shape[1], quant.block_shape[1])
    if a_scale.numel() == 1:
        return a32 * a_scale.reshape(())
    return a32 * a_scale.reshape(-1, 1)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] uint8 (two values per byte, low nibble first) -> [..., K] int32 in [0, 16)."""
    p = packed.to(torch.int32)
    return torch.stack((p & 0xF, (p >> 4) & 0xF), dim=-1).flatten(-2)


def dequantize_weight(w: torch.Tensor, e: int, quant: QuantSpec, scale: torch.Tensor | None,
                      zp: torch.Tensor | None) -> torch.Tensor:
    """fp32 [N_out, K] value of expert ``e``'s weight ``w[e]`` under ``quant``."""
    we = w[e]
    if quant.scheme == "none":
        return we.float()
    if quant.scheme == "int4_w4a16":
        q = unpack_int4(we).float()
    elif quant.scheme == "int8_w8a16" and quant.group_size is not None:
        q = we.to(torch.int32).float()  # uint8 storage
    else:
        q = we.float()
    n_out, K = q.shape
    se = scale[e].float()
    if quant.is_weight_only and quant.group_size is not None:
        g = quant.group_size
        if zp is None:
            z = torch.full_like(se, 8.0 if quant.scheme == "int4_w4a16" else 128.0)
        elif quant.scheme == "int4_w4a16":
            z = unpack_int4(zp[e].transpose(0, 1)).transpose(0, 1).float()[:n_out]   # packed along N
        else:
            z = zp[e].float()
        return (q - _expand_groups(z, K, g)) * _expand_groups(se, K, g)
    if quant.is_block:
        bn, bk = quant.block_shape
        full = _expand_groups(se, K, bk)                                           # [⌈N/bn⌉, K]
        full = full.repeat_interleave(bn, dim=0)[:n_out]
        return q * full
    if se.numel() == 1:
        return q * se.reshape(())
    return q * se.reshape(n_out, 1)
