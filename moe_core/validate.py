"""Step 0: every input check of TESTING.md §9, before any launch.

Metadata (shape, dtype, device, stride) is always checked; *values* of GPU tensors
(id ranges, NaN weights) only under ``MOE_CORE_DEBUG=1`` because that needs a host
sync. Values of CPU tensors are always checked. Messages name the argument, the
expected and the actual value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

from moe_core import envs
from moe_core.errors import ConfigError, HookError, MoEInputError, MoETypeError
from moe_core.spec import ExpertWeights, MoELayer, QuantSpec

if TYPE_CHECKING:
    from moe_core.backend import Backend
    from moe_core.plugins import HookSet

__all__ = ["check_forward", "check_mapped_ids", "check_resolved_configs", "expected_weight_dtypes"]

_FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _need_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise MoETypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def expected_weight_dtypes(quant: QuantSpec, act_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The weight dtypes a scheme accepts."""
    if quant.scheme == "none":
        return (act_dtype,)
    if quant.scheme == "fp8_w8a8":
        return _FP8
    if quant.scheme == "int8_w8a8":
        return (torch.int8,)
    if quant.scheme == "int8_w8a16":
        return (torch.int8,) if quant.group_size is None else (torch.uint8,)
    return (torch.uint8,)  # int4 packed


def _values_checked(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" or envs.debug()


def _check_scale_tensors(quant: QuantSpec, device: torch.device) -> None:
    """Types, dtypes and devices of the scale / zero-point tensors, and scheme consistency.

    The named constructors of :class:`QuantSpec` check most of this already; a spec built
    with the plain attrs ``__init__`` reaches here unchecked, so nothing is assumed.
    """
    if not quant.is_quantized:
        for name in QuantSpec.TENSOR_FIELDS:
            if getattr(quant, name) is not None:
                raise MoEInputError(f"{name}: a scale was given but the quantization scheme is 'none'")
        if quant.per_channel or quant.block_shape is not None or quant.group_size is not None:
            raise MoEInputError("quant: per_channel / block_shape / group_size given but the "
                                "quantization scheme is 'none'")
        return
    for name in ("w1_scale", "w2_scale"):
        if getattr(quant, name) is None:
            raise MoEInputError(f"{name}: scheme {quant.scheme!r} needs a weight scale tensor, got None")
    if quant.is_w8a8 and quant.per_channel and quant.block_shape is not None:
        raise MoEInputError("quant: per_channel=True and block_shape are two schemes; pass one of them")
    if quant.is_block and (quant.a1_scale is not None or quant.a2_scale is not None):
        raise MoEInputError("a1_scale: block-wise quantization computes activation scales per token group; "
                            "a1_scale/a2_scale must be None")
    if quant.is_weight_only:
        for name in ("a1_scale", "a2_scale"):
            if getattr(quant, name) is not None:
                raise MoEInputError(f"{name}: {quant.scheme} keeps 16-bit activations; an activation "
                                    "scale belongs to a w8a8 scheme")
        if quant.block_shape is not None or quant.per_channel:
            raise MoEInputError(f"quant: {quant.scheme} takes group_size, not per_channel / block_shape")
        if quant.scheme == "int4_w4a16" and quant.group_size is None:
            raise MoEInputError("group_size: int4_w4a16 needs a group size, got None")
        if quant.group_size is None and quant.w1_zp is not None:
            raise MoEInputError("w1_zp: per-channel int8_w8a16 has no zero points; pass group_size")
    elif quant.group_size is not None or quant.w1_zp is not None or quant.w2_zp is not None:
        raise MoEInputError(f"quant: group_size / zero points belong to weight-only schemes, not {quant.scheme}")
    for name in QuantSpec.TENSOR_FIELDS:
        t = getattr(quant, name)
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise MoETypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if "zp" not in name and t.dtype != torch.float32:
            raise MoETypeError(f"{name}: expected dtype torch.float32, got {t.dtype}")
        if t.device != device:
            raise MoEInputError(f"{name}: expected device {device} (the device of x), got {t.device}")


def _check_scales(quant: QuantSpec, E: int, N: int, H: int, I: int, M: int, k: int) -> None:
    """Scale layouts of SEMANTICS §4.1 for both GEMMs (gemm1: N_out=N, K=H; gemm2: N_out=H, K=I)."""
    if not quant.is_quantized:
        return
    for which, n_out, K, rows in ((1, N, H, M), (2, H, I, M * k)):
        ws = getattr(quant, f"w{which}_scale")
        name = f"w{which}_scale"
        if quant.is_block:
            bn, bk = quant.block_shape
            want = (E, -(-n_out // bn), -(-K // bk))
            if _shape(ws) != want:
                raise MoEInputError(f"{name}: block [{bn}, {bk}] scales must be [E, ⌈N_out/bn⌉, ⌈K/bk⌉] = "
                                    f"{list(want)}, got {list(_shape(ws))}")
        elif quant.is_w8a8 and quant.per_channel or quant.scheme == "int8_w8a16" and quant.group_size is None:
            if _shape(ws) not in ((E, n_out), (E, n_out, 1)):
                raise MoEInputError(f"{name}: per-channel scales must be [E, N_out] = [{E}, {n_out}] "
                                    f"or [E, N_out, 1], got {list(_shape(ws))}")
        elif quant.is_w8a8:
            if _shape(ws) not in ((E,), (E, 1), (E, 1, 1)):
                raise MoEInputError(f"{name}: per-tensor scales must be [E] = [{E}] (one per expert), got "
                                    f"{list(_shape(ws))}; per-channel scales need per_channel=True")
        else:  # grouped weight-only
            g = quant.group_size
            if K % g:
                raise MoEInputError(f"group_size: K = {K} of gemm{which} is not a multiple of group_size {g}")
            want = (E, n_out, K // g)
            if _shape(ws) != want:
                raise MoEInputError(f"{name}: group scales must be [E, N_out, K/g] = {list(want)}, "
                                    f"got {list(_shape(ws))}")
            zp = getattr(quant, f"w{which}_zp")
            if zp is not None:
                zwant = (E, n_out // 2, K // g) if quant.scheme == "int4_w4a16" else want
                if _shape(zp) != zwant:
                    raise MoEInputError(f"w{which}_zp: zero points must be {list(zwant)}, got {list(_shape(zp))}")
        a_s = getattr(quant, f"a{which}_scale")
        if a_s is not None:
            if a_s.dim() == 1 and a_s.numel() != 1:
                raise MoEInputError(f"a{which}_scale: a 1-D activation scale must have numel 1, got "
                                    f"{list(_shape(a_s))}; per-token scales are [rows, 1]")
            if a_s.numel() != 1 and _shape(a_s) != (rows, 1):
                raise MoEInputError(f"a{which}_scale: expected numel 1 or [rows, 1] = [{rows}, 1], "
                                    f"got {list(_shape(a_s))}")


def check_forward(x: torch.Tensor, weights: ExpertWeights, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, layer: MoELayer, backend: Backend, hooks: HookSet, *,
                  inplace: bool, no_combine: bool, out: torch.Tensor | None,
                  n_valid: int | torch.Tensor | None) -> None:
    """Raise MoEInputError / MoETypeError for any bad input of one forward."""
    x = _need_tensor("x", x)
    w1, w2, quant = weights.w1, weights.w2, weights.quant
    topk_ids = _need_tensor("topk_ids", topk_ids)
    topk_weights = _need_tensor("topk_weights", topk_weights)
    if x.dim() != 2:
        raise MoEInputError(f"x: expected a 2-D [M, H] tensor, got shape {list(_shape(x))}")
    ok, reason = backend.supports_dtype(x.dtype)
    if not ok:
        raise MoETypeError(f"x: backend {backend.name!r} cannot compute in {x.dtype}: {reason}")
    M, H = x.shape
    if H != layer.hidden_size:
        raise MoEInputError(f"x: expected hidden size H = layer.hidden_size = {layer.hidden_size}, got {H}")
    if x.numel() and x.stride(-1) != 1:
        raise MoEInputError(f"x: the last dim must be contiguous (stride 1), got strides {x.stride()}")
    for name, w in (("w1", w1), ("w2", w2)):
        if w.dim() != 3:
            raise MoEInputError(f"{name}: expected a 3-D [E, rows, K] tensor, got shape {list(_shape(w))}")
        if w.device != x.device:
            raise MoEInputError(f"{name}: expected device {x.device} (the device of x), got {w.device}")
        allowed = expected_weight_dtypes(quant, x.dtype)
        if w.dtype not in allowed:
            raise MoETypeError(f"{name}: scheme {quant.scheme!r} with x of {x.dtype} needs weights of "
                               f"{' or '.join(map(str, allowed))}, got {w.dtype}")
    E = w1.shape[0]
    if w2.shape[0] != E:
        raise MoEInputError(f"w2: expected E = w1.shape[0] = {E} experts, got {w2.shape[0]}")
    if E != layer.num_local_experts:
        raise MoEInputError(f"w1: expected E = layer.num_local_experts = {layer.num_local_experts}, got {E}")
    pack = 2 if quant.scheme == "int4_w4a16" else 1
    N, I = layer.gate_up_rows, layer.intermediate_size
    if w1.shape[1] != N:
        raise MoEInputError(f"w1: expected {N} rows ({'2·I' if layer.is_gated else 'I'} with I = {I}), "
                            f"got shape {list(_shape(w1))}")
    if w1.shape[2] * pack != H:
        raise MoEInputError(f"w1: expected last dim {H // pack if pack == 2 else H} (H = {H}"
                            f"{', packed two per byte' if pack == 2 else ''}), got shape {list(_shape(w1))}")
    if w2.shape[1] != H or w2.shape[2] * pack != I:
        raise MoEInputError(f"w2: expected shape [{E}, {H}, {I // pack}] ([E, H, I]"
                            f"{' packed' if pack == 2 else ''}), got {list(_shape(w2))}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != M:
        raise MoEInputError(f"topk_ids: expected shape [M, k] with M = {M}, got {list(_shape(topk_ids))}")
    if _shape(topk_weights) != _shape(topk_ids):
        raise MoEInputError(f"topk_weights: expected the shape of topk_ids {list(_shape(topk_ids))}, "
                            f"got {list(_shape(topk_weights))}")
    k = topk_ids.shape[1]
    if k != layer.top_k:
        raise MoEInputError(f"topk_ids: expected k = layer.top_k = {layer.top_k} columns, got {k}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise MoETypeError(f"topk_ids: expected an int32 (or int64) tensor, got {topk_ids.dtype}")
    if not topk_weights.dtype.is_floating_point:
        raise MoETypeError(f"topk_weights: expected float32, got {topk_weights.dtype}")
    if topk_weights.dtype != torch.float32:
        raise MoETypeError(f"topk_weights: expected float32 (never downcast), got {topk_weights.dtype}")
    if M and topk_weights.stride(1) != 1:
        raise MoEInputError(f"topk_weights: expected stride(1) == 1, got strides {topk_weights.stride()}")
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if t.device != x.device:
            raise MoEInputError(f"{name}: expected device {x.device} (the device of x), got {t.device}")
    for name, b, rows in (("b1", weights.b1, N), ("b2", weights.b2, H)):
        if b is None:
            continue
        if quant.is_weight_only and quant.group_size is not None:
            raise MoEInputError(f"{name}: biases are not supported with grouped {quant.scheme} weights")
        if _shape(b) != (E, rows):
            raise MoEInputError(f"{name}: expected shape [E, {rows}] = [{E}, {rows}], got {list(_shape(b))}")
        if b.dtype != x.dtype:
            raise MoETypeError(f"{name}: expected the compute dtype {x.dtype}, got {b.dtype}")
        if b.device != x.device:
            raise MoEInputError(f"{name}: expected device {x.device} (the device of x), got {b.device}")
    _check_scale_tensors(quant, x.device)
    _check_scales(quant, E, N, H, I, M, k)
    if inplace and no_combine:
        raise MoEInputError("inplace=True and no_combine=True: no_combine returns [M, k, H], "
                            "which cannot be written into x")
    if inplace and x.requires_grad:
        raise MoEInputError("x: inplace=True on a tensor that requires grad")
    if out is not None:
        _check_out(out, x, weights, topk_weights, topk_ids, inplace=inplace, no_combine=no_combine)
    if hooks.any and not backend.accepts_hooks:
        raise MoEInputError(f"hooks: backend {backend.name!r} takes no hooks, but hooks are registered")
    if layer.expert_map is not None:
        _check_expert_map(layer, x.device)
    if n_valid is not None:
        _check_n_valid(n_valid, M)
    if M and _values_checked(topk_ids):
        _check_id_values(topk_ids, topk_weights, layer, n_valid)


def _check_out(out: object, x: torch.Tensor, weights: ExpertWeights, topk_weights: torch.Tensor,
               topk_ids: torch.Tensor, *, inplace: bool, no_combine: bool) -> None:
    """``out=``: [M, H] in the dtype and on the device of ``x``, aliasing no input."""
    out = _need_tensor("out", out)
    M, H = x.shape
    if no_combine:
        raise MoEInputError("out: no_combine returns a new [M, k, H] tensor; out= takes an [M, H] "
                            "buffer and cannot be combined with no_combine=True")
    if inplace:
        raise MoEInputError("out: inplace=True writes into x; pass out= or inplace=True, not both")
    if _shape(out) != (M, H) or out.dtype != x.dtype or out.device != x.device:
        raise MoEInputError(f"out: expected [{M}, {H}] {x.dtype} on {x.device}, got "
                            f"{list(_shape(out))} {out.dtype} on {out.device}")
    quant = weights.quant
    inputs = (("x", x), ("w1", weights.w1), ("w2", weights.w2), ("b1", weights.b1), ("b2", weights.b2),
              ("topk_weights", topk_weights), ("topk_ids", topk_ids),
              *((name, getattr(quant, name)) for name in quant.TENSOR_FIELDS))
    for name, t in inputs:
        if isinstance(t, torch.Tensor) and _overlaps(out, t):
            raise MoEInputError(f"out: shares memory with {name}; pass a separate buffer"
                                f"{' (or inplace=True to write into x)' if name == 'x' else ''}")


def _span(t: torch.Tensor) -> tuple[int, int]:
    """``[first, last)`` byte addresses a tensor can touch (through its strides)."""
    extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) + 1
    neg = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if stride < 0)
    start = t.data_ptr() + neg * t.element_size()
    return start, start + extent * t.element_size()


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors' memory ranges intersect (same device, both non-empty)."""
    if not a.numel() or not b.numel() or a.device != b.device:
        return False
    a0, a1 = _span(a)
    b0, b1 = _span(b)
    return a0 < b1 and b0 < a1


def _check_n_valid(n_valid: int | torch.Tensor, M: int) -> None:
    if isinstance(n_valid, torch.Tensor):
        if n_valid.numel() != 1 or n_valid.dtype.is_floating_point or n_valid.dtype == torch.bool:
            raise MoETypeError(f"n_valid: expected an int or a one-element integer tensor, got "
                               f"{list(n_valid.shape)} {n_valid.dtype}")
        if not _values_checked(n_valid):
            return
        value = int(n_valid.reshape(()))
    elif isinstance(n_valid, bool) or not isinstance(n_valid, int):
        raise MoETypeError(f"n_valid: expected an int or a one-element integer tensor, got {type(n_valid).__name__}")
    else:
        value = n_valid
    if not 0 <= value <= M:
        raise MoEInputError(f"n_valid: expected 0 <= n_valid <= M = {M}, got {value}")


def _check_expert_map(layer: MoELayer, device: torch.device) -> None:
    """The explicit global -> local table: int32 [E_g], values in [-1, E), no duplicate local id."""
    table = layer.expert_map
    E_g, E = layer.num_experts, layer.num_local_experts
    if table.dim() != 1 or table.shape[0] != E_g:
        raise MoEInputError(f"expert_map: expected a 1-D table of length num_experts = {E_g}, "
                            f"got shape {list(_shape(table))}")
    if table.dtype != torch.int32:
        raise MoETypeError(f"expert_map: expected dtype torch.int32, got {table.dtype}")
    if not _values_checked(table):
        return
    if bool(((table < -1) | (table >= E)).any()):
        bad = table[(table < -1) | (table >= E)][0]
        raise MoEInputError(f"expert_map: values must lie in [-1, {E}) (num_local_experts), got {int(bad)}")
    used = table[table >= 0]
    if used.unique().numel() != used.numel():
        raise MoEInputError("expert_map: two global ids map to the same local id; each local expert "
                            "must appear at most once")


def _check_id_values(topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer: MoELayer,
                     n_valid: int | torch.Tensor | None) -> None:
    """Id range ``[-1, E_g)`` and finite weights of valid slots, in rows ``< n_valid``."""
    rows = topk_ids.shape[0] if n_valid is None else int(n_valid)
    ids = topk_ids[:rows]
    upper = layer.num_experts if layer.num_experts is not None else None
    bad = ids < -1
    if upper is not None:
        bad |= ids >= upper
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        raise MoEInputError(f"topk_ids: values must lie in [-1, {upper}) "
                            f"(num_experts), got {int(ids[where[0], where[1]])} at row {where[0]}, column {where[1]}")
    valid = ids >= 0
    w = topk_weights[:rows]
    if bool((~torch.isfinite(w) & valid).any()):
        raise MoEInputError("topk_weights: NaN or infinite routed weights in rows with a valid expert id")


def check_mapped_ids(mapped: object, ids: torch.Tensor, num_local_experts: int) -> None:
    """Validate a ``moe_core_map_expert_ids`` result: [M, k] int32 in ``[-1, E)``."""
    if not isinstance(mapped, torch.Tensor):
        raise HookError(f"moe_core_map_expert_ids returned {type(mapped).__name__}, expected an int32 tensor")
    if mapped.shape != ids.shape or mapped.dtype != torch.int32 or mapped.device != ids.device:
        raise HookError(f"moe_core_map_expert_ids returned {list(mapped.shape)} {mapped.dtype} on {mapped.device}, "
                        f"expected {list(ids.shape)} torch.int32 on {ids.device}")
    if _values_checked(mapped) and mapped.numel():
        if bool(((mapped < -1) | (mapped >= num_local_experts)).any()):
            raise HookError(f"moe_core_map_expert_ids returned ids outside [-1, {num_local_experts})")


def check_resolved_configs(config: Mapping[str, Any], down_config: Mapping[str, Any]) -> None:
    """After resolution (step 2): ``BLOCK_SIZE_*`` powers of two >= 16 and one shared
    ``BLOCK_SIZE_M`` (both GEMMs read one alignment). Raises ConfigError naming the key."""
    for which, cfg in (("gemm1", config), ("gemm2", down_config)):
        for key in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K"):
            value = cfg.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ConfigError(f"{which} config: {key} must be a power of two >= 16, got {value!r} in {dict(cfg)}")
    if config["BLOCK_SIZE_M"] != down_config["BLOCK_SIZE_M"]:
        raise ConfigError(f"gemm2 config: BLOCK_SIZE_M = {down_config['BLOCK_SIZE_M']} differs from gemm1's "
                          f"{config['BLOCK_SIZE_M']}; both GEMMs share one alignment")
