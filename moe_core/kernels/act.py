"""The activation step (SEMANTICS §4.3) as a Triton kernel: check, allocate, launch.

fp32 math, one cast to ``out``'s dtype; rows of ``-1`` slots are written as zeros (not
skipped: a following dynamic per-tensor quantization reads every row). The torch
definition is :func:`moe_core.reference.apply_activation`.
"""

from __future__ import annotations

import logging

import torch

from moe_core.errors import MoEInputError, MoETypeError
from moe_core.kernels._act import _act_kernel
from moe_core.kernels._launch import cdiv, needs_fp32_store, next_power_of_2, pdl_args
from moe_core.spec import ACTIVATIONS, GATE_UP_LAYOUTS

__all__ = ["activation"]

logger = logging.getLogger(__name__)

_ACT_CODE = {"silu": 0, "gelu": 1, "relu2": 2, "swiglu_oai": 3}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _check(gate_up: torch.Tensor, out: torch.Tensor, activation: str, is_gated: bool, layout: str,
           alpha: float | None, limit: float | None, topk_ids: torch.Tensor | None) -> None:
    if activation not in ACTIVATIONS:
        raise MoEInputError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
    gated_ok, plain_ok = ACTIVATIONS[activation]
    if (is_gated and not gated_ok) or (not is_gated and not plain_ok):
        raise MoEInputError(f"activation: {activation!r} does not exist with is_gated={is_gated}")
    if layout not in GATE_UP_LAYOUTS:
        raise MoEInputError(f"layout: expected one of {GATE_UP_LAYOUTS}, got {layout!r}")
    if activation == "swiglu_oai" and (alpha is None or limit is None):
        raise MoEInputError(f"swiglu_oai needs alpha and limit, got alpha={alpha}, limit={limit}")
    for name, t in (("gate_up", gate_up), ("out", out)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise MoEInputError(f"{name}: expected a 2-D tensor, got "
                                f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise MoETypeError(f"{name}: expected float16, bfloat16 or float32, got {t.dtype}")
        if t.numel() and t.stride(-1) != 1:
            raise MoEInputError(f"{name}: the last dim must be contiguous, got strides {t.stride()}")
    S, N = gate_up.shape
    width = N // 2 if is_gated else N
    if is_gated and N % 2:
        raise MoEInputError(f"gate_up: a gated activation needs an even width N, got {N}")
    if tuple(out.shape) != (S, width):
        raise MoEInputError(f"out: expected [{S}, {width}] ({'N/2 gated' if is_gated else 'N'}), "
                            f"got {list(out.shape)}")
    if out.device != gate_up.device:
        raise MoEInputError(f"out: expected device {gate_up.device}, got {out.device}")
    if topk_ids is not None:
        if topk_ids.numel() != S:
            raise MoEInputError(f"topk_ids: expected M·k = {S} slots (one per gate_up row), "
                                f"got shape {list(topk_ids.shape)}")
        if topk_ids.dtype not in (torch.int32, torch.int64):
            raise MoETypeError(f"topk_ids: expected int32, got {topk_ids.dtype}")
        if topk_ids.device != gate_up.device:
            raise MoEInputError(f"topk_ids: expected device {gate_up.device}, got {topk_ids.device}")


def activation(gate_up: torch.Tensor, out: torch.Tensor, *, activation: str, is_gated: bool,
               layout: str = "halves", alpha: float | None = None, limit: float | None = None,
               topk_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``out = act(gate_up)`` per SEMANTICS §4.3 (fp32 math, one cast).

    :param gate_up: [S, N] gemm1 output, one row per slot (token-major).
    :param out: [S, N/2] (gated) or [S, N] (non-gated), written in place (every row).
    :param activation: ``silu``, ``gelu``, ``relu2`` or ``swiglu_oai``.
    :param is_gated: whether ``gate_up`` holds gate and up parts.
    :param layout: ``halves`` or ``interleaved`` (gated only).
    :param alpha: ``swiglu_oai``'s alpha.
    :param limit: clamp limit (``swiglu_oai``, or gated ``silu`` with a limit).
    :param topk_ids: [M, k] (M·k = S) expert ids; rows of ``-1`` slots become zeros.
    :returns: ``out``.
    """
    _check(gate_up, out, activation, is_gated, layout, alpha, limit, topk_ids)
    S = gate_up.shape[0]
    width = out.shape[1]
    if S == 0 or width == 0:
        return out
    ids = None
    if topk_ids is not None:
        ids = topk_ids.reshape(-1)
        if ids.dtype != torch.int32:
            ids = ids.to(torch.int32)
        if not ids.is_contiguous():
            ids = ids.contiguous()
    target = torch.empty(out.shape, dtype=torch.float32, device=out.device) if needs_fp32_store(out) else out
    block_n = min(next_power_of_2(width), 1024)
    block_s = max(1, min(next_power_of_2(S), 4096 // block_n))
    grid = (cdiv(S, block_s), cdiv(width, block_n))
    _act_kernel[grid](
        gate_up, target, ids if ids is not None else gate_up, S, width, gate_up.stride(0), target.stride(0),
        gate_up.shape[1] // 2, float(alpha if alpha is not None else 1.0), float(limit if limit is not None else 0.0),
        ACT=_ACT_CODE[activation], GATED=is_gated, INTERLEAVED=is_gated and layout == "interleaved",
        HAS_LIMIT=limit is not None and activation != "swiglu_oai", HAS_IDS=ids is not None,
        BLOCK_S=block_s, BLOCK_N=block_n, num_warps=4, **pdl_args(target))
    if target is not out:
        out.copy_(target)
    return out
