"""``grouped_gemm``: the public wrapper of the grouped-GEMM kernel (SEMANTICS §3).

Check → launch (the output is the caller's; nothing is allocated here). Grid:
``cdiv(len(sorted_token_ids), BLOCK_SIZE_M) · cdiv(N_out, BLOCK_SIZE_N)``, static, so the
launch is CUDA-graph safe; ``num_tokens_post_padded`` stays on the device.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from moe_core.errors import MoEInputError, MoETypeError
from moe_core.kernels._launch import cdiv, pdl_args

if TYPE_CHECKING:
    from moe_core.spec import MoELayer, QuantSpec

__all__ = ["grouped_gemm", "quant_mode", "weight_box_rows", "weight_descriptor_ok", "activation_descriptor_ok",
           "LAUNCH_KEYS"]

logger = logging.getLogger(__name__)

#: config keys the kernel launch takes (everything else is data for the resolver)
LAUNCH_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")

_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2")
             if hasattr(torch, n))


def weight_box_rows(config: dict[str, Any], activation: MoELayer | None) -> int:
    """Weight rows one program reads per K step and operand: ``BLOCK_SIZE_N``, or half of it
    (at least 16) when a gated activation is fused, as the program then reads that many gate
    rows and as many up rows for its ``act`` columns."""
    BN = config["BLOCK_SIZE_N"]
    return max(16, BN // 2) if activation is not None and activation.is_gated else BN


def _tma_rows_ok(t: torch.Tensor, mode: int, upcast: bool) -> bool:
    """The preconditions every descriptor read shares: the tile is the operand as stored (plain
    or w8a8, no dequantization, no interpreter upcast), rows contiguous along the last dim with a
    16-byte aligned start and stride."""
    return (mode in (0, 1, 2) and not upcast and t.stride(-1) == 1
            and (t.stride(-2) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0)


def weight_descriptor_ok(w: torch.Tensor, mode: int, upcast: bool) -> bool:
    """Whether the kernel can read ``w``'s tiles through a tensor descriptor: plain or w8a8
    weights (no dequantization in the tile), ``w`` [E, N, K] contiguous with 16-byte aligned rows
    (so the interleaved layout's up view, one row on, is aligned too), and no interpreter upcast."""
    E, N, K = w.shape
    return _tma_rows_ok(w, mode, upcast) and w.stride(1) == K and w.stride(0) == N * K


def activation_descriptor_ok(a: torch.Tensor, mode: int, upcast: bool) -> bool:
    """Whether gemm2 can read its sorted-mode input ``a`` [P, K] through a tensor descriptor:
    plain or w8a8 input, rows contiguous and 16-byte aligned, no interpreter upcast."""
    return _tma_rows_ok(a, mode, upcast)


def _weight_descriptors(w: torch.Tensor, BN: int, BK: int, activation: MoELayer | None,
                        pair: bool) -> tuple[Any, Any]:
    """Host tensor descriptors (gate or only rows, up rows) of ``w`` with [BN, BK] boxes: [E·N, K]
    twice, or for the interleaved gated layout the even rows and the odd rows, each [E·N/2, K]
    with a row stride of 2·K (the odd view starts one row, K elements, on). With ``pair`` (one dot
    over gate and up): interleaved, [E·N, K] with [2·BN, BK] boxes; halves, [E, 2, N/2, K] with
    [1, 2, BN, BK] boxes (the gate and the up tile of one program)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    E, N, K = w.shape
    if pair and activation.gate_up_layout == "interleaved":
        desc = TensorDescriptor(w, [E * N, K], [K, 1], [2 * BN, BK])
        return desc, desc
    if pair:                     # halves: [E, 2, N/2, K], one box holds the gate and the up tile
        desc = TensorDescriptor(w, [E, 2, N // 2, K], [N * K, N // 2 * K, K, 1], [1, 2, BN, BK])
        return desc, desc
    if activation is not None and activation.is_gated and activation.gate_up_layout == "interleaved":
        flat = w.reshape(-1)
        pairs = E * N // 2
        return (TensorDescriptor(flat, [pairs, K], [2 * K, 1], [BN, BK]),
                TensorDescriptor(flat[K:], [pairs, K], [2 * K, 1], [BN, BK]))
    desc = TensorDescriptor(w, [E * N, K], [K, 1], [BN, BK])
    return desc, desc


def quant_mode(quant: QuantSpec) -> int:
    """The kernel's ``QUANT`` constexpr for ``quant`` (see :mod:`moe_core.kernels._gemm`)."""
    if quant.scheme == "none":
        return 0
    if quant.is_w8a8:
        return 2 if quant.is_block else 1
    if quant.scheme == "int8_w8a16":
        return 3 if quant.group_size is None else 4
    return 5  # int4_w4a16


def _strides(t: torch.Tensor | None, n: int) -> list[int]:
    """``n`` strides of ``t``: size-1 (broadcast) dims and missing dims give 0."""
    if t is None:
        return [0] * n
    out = [t.stride(i) if i < t.dim() and t.shape[i] != 1 else 0 for i in range(n)]
    return out


def _is_interpreter(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def _check(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, mode: int, quant: QuantSpec,
           a_scale: torch.Tensor | None, w_scale: torch.Tensor | None, out_cols: int) -> None:
    if a.dim() != 2 or w.dim() != 3 or out.dim() != 2:
        raise MoEInputError(f"grouped_gemm: expected a [rows, K], w [E, N_out, K], out [S, N_out]; got "
                            f"a {list(a.shape)}, w {list(w.shape)}, out {list(out.shape)}")
    pack = 2 if mode == 5 else 1
    if w.shape[2] * pack != a.shape[1]:
        raise MoEInputError(f"grouped_gemm: w: expected K = a.shape[1] = {a.shape[1]}"
                            f"{' (packed: K/2 bytes)' if pack == 2 else ''}, got w {list(w.shape)}")
    if out.shape[1] != out_cols:
        what = "w.shape[1]" if out_cols == w.shape[1] else "w.shape[1] / 2 (gated, activation fused)"
        raise MoEInputError(f"grouped_gemm: out: expected N_out = {what} = {out_cols} columns, "
                            f"got {list(out.shape)}")
    if a.shape[1] > 1 and a.stride(1) != 1:
        raise MoEInputError(f"grouped_gemm: a: the last dim must be contiguous, got strides {a.stride()}")
    if mode in (1, 2) and a_scale is None:
        raise MoEInputError(f"grouped_gemm: scheme {quant.scheme!r} needs an activation scale, got None")
    if mode and w_scale is None:
        raise MoEInputError(f"grouped_gemm: scheme {quant.scheme!r} needs a weight scale, got None")
    if mode == 0 and a.dtype != w.dtype:
        raise MoETypeError(f"grouped_gemm: w: expected {a.dtype} (the dtype of a), got {w.dtype}")
    if mode in (1, 2) and (a.dtype in _FP8) != (w.dtype in _FP8):
        raise MoETypeError(f"grouped_gemm: w8a8 needs a and w both fp8 or both int8, got {a.dtype} and {w.dtype}")


def _pair_dot(activation: MoELayer | None, mode: int, BN: int) -> bool:
    """Whether a gated gemm1 program runs one dot over its ``BN`` gate and ``BN`` up rows, split
    in the epilogue, instead of two dots; bitwise the same (NOTES attempts 25, 27, 29).

    Interleaved, the rows are contiguous pairs (any mode); halves, two tiles N rows apart, for
    plain weights and for block w8a8 up to 64 act columns (a weight scale per half: 2-4% faster
    there on the H200, 2x slower at 128 columns). A TMA box holds at most 256 rows.
    """
    if activation is None or not activation.is_gated or 2 * BN > 256:
        return False
    if activation.gate_up_layout == "interleaved" or mode == 0:
        return True
    return mode == 2 and 2 * BN <= 128


def _fused_act_args(layer: MoELayer | None) -> dict[str, Any]:
    """The kernel's fused-activation constexprs for ``layer`` (none: the plain GEMM)."""
    if layer is None:
        return {}
    from moe_core.kernels.act import _ACT_CODE

    limit = layer.gemm1_limit
    return {"FUSE_ACT": 1 if layer.is_gated else 2, "ACT": _ACT_CODE[layer.activation],
            "INTERLEAVED": layer.is_gated and layer.gate_up_layout == "interleaved",
            "HAS_LIMIT": limit is not None and layer.activation != "swiglu_oai",
            "ALPHA": float(layer.gemm1_alpha if layer.gemm1_alpha is not None else 1.0),
            "LIMIT": float(limit if limit is not None else 0.0)}


def _block_scale_uniform(group_n: int, BN: int, N: int, activation: MoELayer | None) -> bool:
    """Whether every program's weight rows fall in one ``[bn]`` scale block (per half when the
    gated activation is fused), so the kernel loads one weight scale per K block.

    ``BN`` is the program's output columns and ``N`` the output width; columns past ``N`` wrap
    and are never stored, so their scale does not matter.
    """
    if activation is None or not activation.is_gated:
        return group_n % BN == 0
    if activation.gate_up_layout == "interleaved":    # rows 2n and 2n + 1
        return group_n % (2 * BN) == 0
    return group_n % BN == 0 and N % group_n == 0   # up rows n + N start a block too


def grouped_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, *,
                 a_scale: torch.Tensor | None, w_scale: torch.Tensor | None, w_zp: torch.Tensor | None,
                 bias: torch.Tensor | None, topk_weights: torch.Tensor, sorted_token_ids: torch.Tensor,
                 expert_ids: torch.Tensor, num_tokens_post_padded: torch.Tensor, top_k: int,
                 mul_routed_weight: bool, quant: QuantSpec, config: dict[str, Any],
                 activation: MoELayer | None = None, weight_tma: bool = False,
                 sorted_out: bool = False, sorted_in: bool = False, a_tma: bool = False) -> torch.Tensor:
    """``out[s] = (a[s // top_k] @ w[e]ᵀ)·scales + bias (· topk_weights[s])`` for every slot
    ``s`` of a block of expert ``e``; rows of ``-1`` blocks are written as zeros. With
    ``activation``, ``out[s] = act(that row)`` (SEMANTICS §4.3, from fp32) instead.

    :param a: [rows, K] input (``x`` for gemm1, ``act`` for gemm2; fp8/int8 for w8a8); rows may be strided.
    :param w: [E, N_out, K] weights (int4: [E, N_out, K/2] uint8); any strides.
    :param out: [S, N_out] output, S = M·k; every valid slot row is written (mutated).
    :param a_scale: w8a8 activation scale: numel 1, [rows, 1] or block [rows, ⌈K/bk⌉].
    :param w_scale: weight scale in the layout of SEMANTICS §4.1.
    :param w_zp: optional zero points (grouped weight-only).
    :param bias: optional [E, N_out] bias in the compute dtype.
    :param topk_weights: [M, k] fp32, ``stride(1) == 1``; read only when ``mul_routed_weight``.
    :param sorted_token_ids: [P] int32 slots grouped by expert, sentinel ``S``.
    :param expert_ids: [cdiv(P, BLOCK_SIZE_M)] int32 expert of each block (``-1`` or any id
        outside ``[0, E)``: filtered, zero rows).
    :param num_tokens_post_padded: [1] int32 on the device.
    :param top_k: slots per row of ``a`` (k for gemm1, 1 for gemm2).
    :param mul_routed_weight: multiply each row by its slot's routed weight.
    :param quant: the :class:`~moe_core.spec.QuantSpec`.
    :param config: launch config (``BLOCK_SIZE_M/N/K``, ``GROUP_SIZE_M``, ``num_warps``, ``num_stages``).
    :param activation: gemm1 only: the layer whose activation the epilogue applies; ``out`` is
        then ``act`` ([S, N_out/2] gated, [S, N_out] otherwise). A gated program computes
        ``BLOCK_SIZE_N / 2`` act columns from ``BLOCK_SIZE_N`` weight rows, as the config's
        unfused tile did.
    :param weight_tma: read the weight tiles through a tensor descriptor (TMA) where
        :func:`weight_descriptor_ok` allows it; ignored elsewhere.
    :param sorted_out: sorted mode, gemm1: ``out`` is [P, N_out] (P = len(sorted_token_ids)) and
        row ``p`` holds position ``p`` of ``sorted_token_ids``, padding rows included.
    :param sorted_in: sorted mode, gemm2: ``a`` is such a [P, K] buffer (and ``a_scale`` [P, ·]).
    :param a_tma: with ``sorted_in``, read ``a``'s tiles through a tensor descriptor where
        :func:`activation_descriptor_ok` allows it.
    :returns: ``out``.
    """
    from moe_core.kernels._gemm import _grouped_gemm_kernel

    mode = quant_mode(quant)
    gated = activation is not None and activation.is_gated
    out_cols = w.shape[1] // 2 if gated else w.shape[1]
    _check(a, w, out, mode, quant, a_scale, w_scale, out_cols)
    EM = sorted_token_ids.shape[0]
    N, K = out.shape[1], a.shape[1]
    S = a.shape[0] * top_k if sorted_out else out.shape[0]    # valid slots M·k
    if sorted_out and sorted_in:
        raise MoEInputError("grouped_gemm: sorted_out (gemm1) and sorted_in (gemm2) exclude each other")
    sorted_buffer = ("out", out) if sorted_out else ("a", a) if sorted_in else None
    if sorted_buffer is not None and sorted_buffer[1].shape[0] < EM:
        name, t = sorted_buffer
        raise MoEInputError(f"grouped_gemm: {name}: sorted mode needs >= len(sorted_token_ids) = {EM} "
                            f"rows, got {list(t.shape)}")
    if S == 0 or EM == 0 or N == 0:
        return out
    BM, BK = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_K"]
    BN = weight_box_rows(config, activation)
    group_n = group_k = 0
    w_scale_uniform = False
    if mode == 2:
        group_n, group_k = quant.block_shape
        if group_k % BK:
            raise MoEInputError(f"grouped_gemm: config: BLOCK_SIZE_K = {BK} must divide the block "
                                f"quantization's bk = {group_k}")
        w_scale_uniform = _block_scale_uniform(group_n, BN, N, activation)
    elif mode in (4, 5):
        group_k = quant.group_size
    if mode == 5 and K % 2:
        raise MoEInputError(f"grouped_gemm: int4 weights need an even K, got K = {K}")
    if expert_ids.shape[0] < cdiv(EM, BM):
        raise MoEInputError(f"grouped_gemm: expert_ids: expected >= cdiv({EM}, BLOCK_SIZE_M={BM}) blocks, "
                            f"got {expert_ids.shape[0]}; the alignment used another BLOCK_SIZE_M")

    interp = _is_interpreter(a)
    # the interpreter has no bf16 or fp8 arithmetic: such loads are cast to fp32 (IEEE dots)
    upcast = interp and (out.dtype == torch.bfloat16 or a.dtype in _FP8 or w.dtype in _FP8)
    int_dot = mode in (1, 2) and a.dtype == torch.int8 and not upcast
    ieee = out.dtype == torch.float32 or upcast

    if mode in (1, 2):
        a_s = a_scale
        a_strides = [0, 0] if a_s.numel() == 1 else _strides(a_s, 2)
    else:
        a_s, a_strides = None, [0, 0]
    if mode == 1:
        ws_strides = [w_scale.stride(0) if w_scale.shape[0] != 1 else 0, 0, 0]
        if w_scale.numel() != w_scale.shape[0]:          # per channel: [E, N_out(, 1)]
            ws_strides[1] = w_scale.stride(1)
    else:
        ws_strides = _strides(w_scale, 3)
    zp_strides = _strides(w_zp, 3)
    b_strides = _strides(bias, 2)
    grid = (cdiv(EM, BM) * cdiv(N, BN),)
    # compile options the resolver let through the backend's whitelist: num_warps, num_stages
    # and backend keys (HIP waves_per_eu / matrix_instr_nonkdim / kpack, XPU grf_mode)
    extra = {key: value for key, value in config.items()
             if key not in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "USE_TMA")}
    dummy = out
    w_desc = w_desc_u = None
    pair = _pair_dot(activation, mode, BN)
    if weight_tma and weight_descriptor_ok(w, mode, upcast):
        w_desc, w_desc_u = _weight_descriptors(w, BN, BK, activation, pair)
    a_desc = None
    if sorted_in and a_tma and activation_descriptor_ok(a, mode, upcast):
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_desc = TensorDescriptor(a, list(a.shape), list(a.stride()), [BM, BK])
    _grouped_gemm_kernel[grid](
        a, a_desc if a_desc is not None else a,
        w, w_desc if w_desc is not None else w, w_desc_u if w_desc_u is not None else w, out,
        a_s if a_s is not None else dummy, w_scale if w_scale is not None else dummy,
        w_zp if w_zp is not None else dummy, bias if bias is not None else dummy, topk_weights,
        sorted_token_ids, expert_ids, num_tokens_post_padded,
        N, K, EM, S, top_k, topk_weights.shape[1],
        a.stride(0), a.stride(1),
        w.stride(0), w.stride(1), w.stride(2),
        out.stride(0), out.stride(1),
        a_strides[0], a_strides[1],
        ws_strides[0], ws_strides[1], ws_strides[2],
        zp_strides[0], zp_strides[1], zp_strides[2],
        b_strides[0], b_strides[1],
        topk_weights.stride(0),
        group_n, group_k, w.shape[0],
        QUANT=mode,
        HAS_ZP=w_zp is not None,
        HAS_BIAS=bias is not None,
        MUL_ROUTED_WEIGHT=bool(mul_routed_weight),
        INT_DOT=int_dot,
        UPCAST=upcast,
        IEEE=ieee,
        BLOCK_SIZE_M=BM,
        BLOCK_SIZE_N=BN,
        BLOCK_SIZE_K=BK,
        GROUP_SIZE_M=config.get("GROUP_SIZE_M", 1),
        **_fused_act_args(activation),
        **({"W_SCALE_UNIFORM": True} if w_scale_uniform else {}),
        **({"W_TMA": True} if w_desc is not None else {}),
        **({"SORTED_OUT": True} if sorted_out else {}),
        **({"SORTED_IN": True} if sorted_in else {}),
        **({"A_TMA": True} if a_desc is not None else {}),
        **({"PAIR_DOT": True} if pair else {}),
        **pdl_args(out),
        **extra,
    )
    return out
