"""The one tolerance table and the normalised error metric of TESTING.md §2."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["TOLERANCES", "QUANT_TOLERANCES", "tolerance_for", "quant_tolerance_key", "normalized_errors",
           "assert_close_normalized", "assert_close_quant"]

#: path -> (maxtol, rmstol); see TESTING.md §2
TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-4, 1e-5),
    "float16": (1e-2, 2e-3),
    "bfloat16": (2e-2, 4e-3),
    "lora": (1e-2, 1e-2),
    "lora_rank128": (2e-2, 2e-2),
}


#: quantized path -> rule of TESTING.md §2. ``atol``/``rtol`` apply to outputs divided by
#: ``max|ref|`` (so they mean the same whatever the data scale); ``maxtol`` is the
#: normalised max error; ``mean_rel`` bounds ``mean|out − ref| / mean|ref|``.
QUANT_TOLERANCES: dict[str, dict[str, float]] = {
    "fp8_block": {"atol": 3.5e-2, "rtol": 3.5e-2},
    "fp8_block_large_m": {"atol": 3.9e-2, "rtol": 3.9e-2},       # M >= 8192
    "fp8": {"maxtol": 1e-1, "mean_rel": 3e-2},                    # per-tensor, per-token × per-channel
    "int8_w8a8_block": {"atol": 6.5e-2, "rtol": 6.5e-2},
    "int8_w8a8": {"maxtol": 1e-1, "mean_rel": 3e-2},              # not in the table: as fp8 per-tensor
    "weight_only": {"atol": 2e-2, "rtol": 0.0},                   # int8 / int4, vs dequantized weights
}


def quant_tolerance_key(quant: Any, M: int = 0) -> str:
    """The :data:`QUANT_TOLERANCES` key of a :class:`moe_core.QuantSpec` at batch ``M``."""
    scheme = quant.scheme
    if scheme in ("int8_w8a16", "int4_w4a16"):
        return "weight_only"
    if scheme == "fp8_w8a8":
        if quant.is_block:
            return "fp8_block_large_m" if M >= 8192 else "fp8_block"
        return "fp8"
    if scheme == "int8_w8a8":
        return "int8_w8a8_block" if quant.is_block else "int8_w8a8"
    raise KeyError(f"no quantized tolerance for scheme {scheme!r}")


def assert_close_quant(out: torch.Tensor, ref: torch.Tensor, quant: Any, *,
                       topk_ids: torch.Tensor | None = None, **context: Any) -> None:
    """Fail unless ``out`` matches ``ref`` under the quantized rule of ``quant`` (TESTING.md §2).

    Also fails on the conditions of :func:`assert_close_normalized` (NaN, infinities,
    all-zero output against a non-zero reference).
    """
    M = out.shape[0] if out.dim() else 0
    key = quant_tolerance_key(quant, M)
    rule = QUANT_TOLERANCES[key]
    assert_close_normalized(out, ref, rule.get("maxtol", math.inf), math.inf, topk_ids=topk_ids, rule=key,
                            **context)
    o = out.detach().double().cpu()
    r = ref.detach().double().cpu()
    if r.numel() == 0 or r.abs().max() == 0:
        return
    scale = r.abs().max()
    if "atol" in rule:
        on, rn = o / scale, r / scale
        bad = (on - rn).abs() > rule["atol"] + rule["rtol"] * rn.abs()
        if bad.any():
            where = tuple(int(i) for i in bad.nonzero()[0])
            raise AssertionError(f"{int(bad.sum())} elements outside atol={rule['atol']}, rtol={rule['rtol']} "
                                 f"(normalised by max|ref| = {scale:.3e}); first at {where}: out {o[where]:.6g} vs "
                                 f"ref {r[where]:.6g}{_experts_at(where, topk_ids)}; rule {key}; {context}")
    if "mean_rel" in rule:
        mean_rel = ((o - r).abs().mean() / r.abs().mean()).item()
        assert mean_rel < rule["mean_rel"], (f"mean relative error {mean_rel:.3e} >= {rule['mean_rel']}; "
                                             f"rule {key}; {context}")


def tolerance_for(dtype: torch.dtype | str) -> tuple[float, float]:
    """``(maxtol, rmstol)`` for an unquantized compute dtype."""
    key = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    return TOLERANCES[key]


def normalized_errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """``(max_err, rms_err)`` of ``out`` against ``ref``, both divided by ``max|ref|``."""
    o = out.detach().double().cpu()
    r = ref.detach().double().cpu()
    if r.numel() == 0:
        return 0.0, 0.0
    diff = (o - r).abs()
    scale = r.abs().max().item()
    if scale == 0:
        return (0.0, 0.0) if diff.max().item() == 0 else (math.inf, math.inf)
    return diff.max().item() / scale, diff.square().mean().sqrt().item() / scale


def _experts_at(where: tuple[int, ...], topk_ids: torch.Tensor | None) -> str:
    """The expert id(s) behind an output coordinate: [M, H] -> the token's row, [M, k, H] -> the slot."""
    if topk_ids is None or not where:
        return ""
    ids = topk_ids.detach().cpu()
    if len(where) == 3:
        return f"; expert {int(ids[where[0], where[1]])} (token {where[0]}, slot {where[1]})"
    return f"; experts {ids[where[0]].tolist()} (token {where[0]})"


def assert_close_normalized(out: torch.Tensor, ref: torch.Tensor, maxtol: float, rmstol: float, *,
                            topk_ids: torch.Tensor | None = None, **context: Any) -> None:
    """Fail unless ``out`` matches ``ref`` within the normalised tolerances.

    Also fails when ``ref`` is not all zero but ``out`` is, when NaN appears where ``ref``
    is finite, or when infinities sit in different places. The message gives the worst
    coordinate (token, slot, column), the expert id there when ``topk_ids`` is given, both
    values and ``context`` (shapes, config).
    """
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}; {context}"
    o = out.detach().double().cpu()
    r = ref.detach().double().cpu()
    if o.numel() == 0:
        return
    bad_nan = torch.isnan(o) & ~torch.isnan(r)
    if bad_nan.any():
        first = tuple(bad_nan.nonzero()[0].tolist())
        raise AssertionError(f"NaN at {list(first)} where the reference is finite ({int(bad_nan.sum())} "
                             f"elements){_experts_at(first, topk_ids)}; {context}")
    inf_o, inf_r = torch.isinf(o), torch.isinf(r)
    assert torch.equal(inf_o, inf_r) and torch.equal(o[inf_o], r[inf_r]), f"infinities differ; {context}"
    o = torch.where(inf_o, 0.0, o)
    r = torch.where(inf_r, 0.0, r)
    if r.abs().max() == 0:
        assert o.abs().max() == 0, f"reference is all zero but output is not (max {o.abs().max():.3e}); {context}"
        return
    assert o.abs().max() > 0, f"output is all zero but the reference is not; {context}"
    max_err, rms_err = normalized_errors(o, r)
    if max_err <= maxtol and rms_err <= rmstol:
        return
    diff = (o - r).abs()
    worst = torch.unravel_index(diff.argmax(), diff.shape)
    where = tuple(int(i) for i in worst)
    raise AssertionError(
        f"max_err {max_err:.3e} (tol {maxtol:.1e}), rms_err {rms_err:.3e} (tol {rmstol:.1e}); worst at {where}: "
        f"out {o[where].item():.6g} vs ref {r[where].item():.6g}{_experts_at(where, topk_ids)}; "
        f"shape {tuple(o.shape)}; {context}")
