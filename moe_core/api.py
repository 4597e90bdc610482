"""The functional entry point :func:`fused_experts`: thin, it calls :mod:`moe_core.sequence`."""

from __future__ import annotations

import torch

from moe_core import plugins, sequence
from moe_core.backend import Backend
from moe_core.errors import MoEInputError
from moe_core.spec import ExpertWeights, MoELayer, QuantSpec

__all__ = ["fused_experts", "infer_layer", "resolve_backend"]


def infer_layer(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                quant: QuantSpec) -> MoELayer:
    """The layer implied by the shapes: gated ``silu`` when ``w1.shape[1] == 2·I``,
    non-gated ``silu`` when ``w1.shape[1] == I``; anything else needs an explicit layer."""
    for name, t, dims in (("x", x, 2), ("w1", w1, 3), ("w2", w2, 3), ("topk_ids", topk_ids, 2)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            raise MoEInputError(f"{name}: expected a {dims}-D tensor, got "
                                f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    pack = 2 if quant.scheme == "int4_w4a16" else 1
    E, H, I = w2.shape[0], w2.shape[1], w2.shape[2] * pack
    if w1.shape[1] == 2 * I:
        gated = True
    elif w1.shape[1] == I:
        gated = False
    else:
        raise MoEInputError(f"w1: cannot infer the layer: w1 has {w1.shape[1]} rows, expected 2·I = {2 * I} "
                            f"(gated) or I = {I} with I = w2.shape[2]; pass layer=MoELayer(...)")
    k = topk_ids.shape[1]
    if not 1 <= k <= E:
        raise MoEInputError(f"topk_ids: expected 1 <= k <= E = {E} columns, got {k}")
    return MoELayer(num_local_experts=E, num_experts=E, top_k=k, hidden_size=H, intermediate_size=I,
                    activation="silu", is_gated=gated)


def resolve_backend(backend: str | Backend | None, layer: MoELayer, quant: QuantSpec) -> Backend:
    """A Backend instance from a name, an instance, or None (``MOE_CORE_BACKEND``, else auto)."""
    if isinstance(backend, Backend):
        ok, reason = backend.supports(layer, quant)
        if not ok:
            from moe_core.errors import UnsupportedConfigError

            raise UnsupportedConfigError(f"backend {backend.name!r} does not support this layer: {reason}")
        return backend
    return plugins.select_backend(backend, layer, quant)


def fused_experts(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, *, layer: MoELayer | None = None, quant: QuantSpec | None = None,
                  b1: torch.Tensor | None = None, b2: torch.Tensor | None = None, inplace: bool = False,
                  no_combine: bool = False, backend: str | Backend | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Run one MoE layer forward (SEMANTICS §2) with the globally registered hooks.

    :param x: [M, H] tokens (fp16, bf16 or fp32; the compute dtype).
    :param w1: [E, N, H] gate/up weights (N = 2·I gated); int4 packed [E, N, H/2].
    :param w2: [E, H, I] down weights; int4 packed [E, H, I/2].
    :param topk_weights: [M, k] float32 routed weights.
    :param topk_ids: [M, k] int32 expert ids (int64 is converted); ``-1`` = skip the slot.
    :param layer: the :class:`MoELayer`; None infers gated/non-gated ``silu`` from the shapes.
    :param quant: the :class:`QuantSpec` of the weights (default unquantized).
    :param b1: optional [E, N] gemm1 bias; ``b2`` optional [E, H] gemm2 bias.
    :param inplace: write the result into ``x`` (mutates ``x``).
    :param no_combine: return the unweighted, unscaled [M, k, H] expert outputs.
    :param backend: a backend name or instance; None: ``MOE_CORE_BACKEND``, else automatic.
    :param out: optional [M, H] output buffer (must not alias an input).
    :returns: [M, H] (or [M, k, H] with ``no_combine``).
    """
    quant = quant if quant is not None else QuantSpec.none()
    weights = ExpertWeights(w1, w2, b1=b1, b2=b2, quant=quant)
    if layer is None:
        layer = infer_layer(x, w1, w2, topk_ids, quant)
    chosen = resolve_backend(backend, layer, quant)
    hooks = plugins.global_hookset()
    plan = sequence.prepare(x, weights, topk_weights, topk_ids, layer, chosen, hooks,
                            inplace=inplace, no_combine=no_combine, out=out)
    return sequence.run(plan, x, weights, topk_weights, topk_ids, inplace=inplace,
                        no_combine=no_combine, out=out)
