"""The one tolerance table and the normalised error metric of TESTING.md §2."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["TOLERANCES", "tolerance_for", "normalized_errors", "assert_close_normalized"]

#: path -> (maxtol, rmstol); see TESTING.md §2
TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-4, 1e-5),
    "float16": (1e-2, 2e-3),
    "bfloat16": (2e-2, 4e-3),
    "lora": (1e-2, 1e-2),
    "lora_rank128": (2e-2, 2e-2),
}


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


def assert_close_normalized(out: torch.Tensor, ref: torch.Tensor, maxtol: float, rmstol: float,
                            **context: Any) -> None:
    """Fail unless ``out`` matches ``ref`` within the normalised tolerances.

    Also fails when ``ref`` is not all zero but ``out`` is, when NaN appears where ``ref``
    is finite, or when infinities sit in different places. The message gives the worst
    coordinate, both values and ``context`` (shapes, config).
    """
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}; {context}"
    o = out.detach().double().cpu()
    r = ref.detach().double().cpu()
    if o.numel() == 0:
        return
    bad_nan = torch.isnan(o) & ~torch.isnan(r)
    assert not bad_nan.any(), (f"NaN at {bad_nan.nonzero()[0].tolist()} where the reference is finite "
                               f"({int(bad_nan.sum())} elements); {context}")
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
        f"out {o[where].item():.6g} vs ref {r[where].item():.6g}; shape {tuple(o.shape)}; {context}")
