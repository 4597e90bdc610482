"""w8a8 activation quantization as Triton kernels: check, allocate, launch.

Exactly the semantics and rounding of :func:`moe_core.quant.quantize_activation`
(static per-tensor or per-row; dynamic per-tensor, per-token ``[rows, 1]``, per token
group ``[rows, ceil(K / group_k)]``; fp8 e4m3fn / e4m3fnuz or int8). Dynamic per-tensor
needs a global amax and takes two launches (static number of partial maxima, then
quantize), never a host sync.
"""

from __future__ import annotations

import logging

import torch

from moe_core.errors import MoEInputError, MoETypeError
from moe_core.kernels._launch import cdiv, needs_fp32_store, next_power_of_2, pdl_args
from moe_core.kernels._quantize import _amax_partial_kernel, _quant_group_kernel, _quant_kernel
from moe_core.quant import EPS, qmax_of

__all__ = ["quantize_activation", "QDTYPES"]

logger = logging.getLogger(__name__)

#: quantized activation dtypes this module writes
QDTYPES = (torch.int8, torch.float8_e4m3fn, torch.float8_e4m3fnuz)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
#: most partial maxima of the dynamic per-tensor path (programs of launch 1)
_MAX_PARTIALS = 512
#: most programs along a CUDA grid's axis 1 (the per-token-group kernel steps past it)
_MAX_GRID_Y = 65535


def _check(a: torch.Tensor, qdtype: torch.dtype, group_k: int | None,
           static_scale: torch.Tensor | None) -> None:
    if not isinstance(a, torch.Tensor) or a.dim() != 2:
        raise MoEInputError(f"a: expected a 2-D [rows, K] tensor, got "
                            f"{list(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__}")
    if a.dtype not in _FLOATS:
        raise MoETypeError(f"a: expected float16, bfloat16 or float32, got {a.dtype}")
    if a.numel() and a.stride(-1) != 1:
        raise MoEInputError(f"a: the last dim must be contiguous, got strides {a.stride()}")
    if qdtype not in QDTYPES:
        raise MoETypeError(f"qdtype: expected one of {QDTYPES}, got {qdtype}")
    if group_k is not None and (isinstance(group_k, bool) or not isinstance(group_k, int) or group_k < 1):
        raise MoEInputError(f"group_k: expected a positive int or None, got {group_k!r}")
    if static_scale is not None:
        if not isinstance(static_scale, torch.Tensor) or static_scale.dtype != torch.float32:
            raise MoETypeError(f"static_scale: expected a float32 tensor, got "
                               f"{getattr(static_scale, 'dtype', type(static_scale).__name__)}")
        rows = a.shape[0]
        if static_scale.numel() != 1 and tuple(static_scale.shape) != (rows, 1):
            raise MoEInputError(f"static_scale: expected numel 1 or [rows, 1] = [{rows}, 1], "
                                f"got {list(static_scale.shape)}")
        if static_scale.device != a.device:
            raise MoEInputError(f"static_scale: expected device {a.device}, got {static_scale.device}")


def quantize_activation(a: torch.Tensor, *, qdtype: torch.dtype, per_channel: bool = False,
                        group_k: int | None = None, static_scale: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``a`` for a w8a8 GEMM into a new buffer.

    :param a: [rows, K] activations (fp16, bf16, fp32; last dim contiguous).
    :param qdtype: ``torch.int8``, ``torch.float8_e4m3fn`` or ``torch.float8_e4m3fnuz``.
    :param per_channel: dynamic per-token scales [rows, 1].
    :param group_k: dynamic per token group of ``group_k`` columns, scales [rows, ceil(K/group_k)].
    :param static_scale: fp32 scale of numel 1 (per tensor) or [rows, 1]; given means static.
    :returns: ``(a_q [rows, K] qdtype, a_scale fp32)``; ``a_scale`` is [1] for per-tensor.
    """
    _check(a, qdtype, group_k, static_scale)
    rows, K = a.shape
    device = a.device
    qmax = qmax_of(qdtype)
    is_int8 = qdtype == torch.int8
    a_q = torch.empty((rows, K), dtype=qdtype, device=device)
    target = torch.empty((rows, K), dtype=torch.float32, device=device) if needs_fp32_store(a_q) else a_q

    def finish() -> torch.Tensor:
        if target is not a_q:
            a_q.copy_(target)
        return a_q

    if static_scale is not None:
        per_row = static_scale.numel() != 1
        scale = static_scale.reshape(-1, 1) if per_row else static_scale.reshape(1)
        if rows and K:
            flat = scale.reshape(-1)
            if not flat.is_contiguous():
                flat = flat.contiguous()
            _launch_scaled(a, target, flat, flat, flat, 1, mode=1 if per_row else 0, qmax=qmax, is_int8=is_int8)
        return finish(), scale.contiguous()
    if group_k is not None or per_channel:
        gk = group_k if group_k is not None else K
        n_groups = cdiv(K, gk) if gk else 0
        scale = torch.empty((rows, n_groups if group_k is not None else 1), dtype=torch.float32, device=device)
        if rows and K:
            block = min(next_power_of_2(gk), 2048)
            # ~4K elements per program: one program per (row, group of 128) left the GPU idle
            # (H200, mixtral M=4096 fp8: 826 µs of a 5 ms forward; benchmarks/NOTES.md, attempt 9)
            block_r = max(1, min(next_power_of_2(rows), 4096 // block))
            grid = (n_groups, min(cdiv(rows, block_r), _MAX_GRID_Y))    # groups fastest (the kernel says why)
            _quant_group_kernel[grid](
                a, target, scale, rows, K, gk, a.stride(0), target.stride(0), scale.stride(0),
                qmax, EPS, IS_INT8=is_int8, BLOCK_R=block_r, BLOCK=block, ONE_PASS=gk <= block, num_warps=4,
                **pdl_args(target))
        return finish(), scale
    # dynamic per tensor: launch 1 partial amax, launch 2 reduce + quantize
    if rows == 0 or K == 0:
        return finish(), torch.full((1,), EPS, dtype=torch.float32, device=device) / qmax
    scale = torch.empty((1,), dtype=torch.float32, device=device)
    block_k = min(next_power_of_2(K), 1024)
    block_r = max(1, min(next_power_of_2(rows), 4096 // block_k))
    n_partial = min(cdiv(rows, block_r), _MAX_PARTIALS)
    partial = torch.empty((n_partial,), dtype=torch.float32, device=device)
    _amax_partial_kernel[(n_partial,)](a, partial, rows, K, a.stride(0), n_partial,
                                       BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4, **pdl_args(a))
    _launch_scaled(a, target, partial, scale, partial, n_partial, mode=2, qmax=qmax, is_int8=is_int8)
    return finish(), scale


def _launch_scaled(a: torch.Tensor, target: torch.Tensor, scale_in: torch.Tensor, scale_out: torch.Tensor,
                   partial: torch.Tensor, n_partial: int, *, mode: int, qmax: float, is_int8: bool) -> None:
    rows, K = a.shape
    block_k = min(next_power_of_2(K), 1024)
    block_r = max(1, min(next_power_of_2(rows), 4096 // block_k))
    grid = (cdiv(rows, block_r), cdiv(K, block_k))
    _quant_kernel[grid](a, target, scale_in, scale_out, partial, n_partial, rows, K, a.stride(0),
                        target.stride(0), qmax, EPS, MODE=mode, IS_INT8=is_int8, BLOCK_R=block_r,
                        BLOCK_K=block_k, BLOCK_P=next_power_of_2(max(n_partial, 1)), num_warps=4,
                        **pdl_args(a))
