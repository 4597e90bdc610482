"""torch custom ops ``moe_core::fused_experts`` and ``moe_core::fused_experts_inplace``.

Servers call these so a layer runs under ``torch.compile`` (the op is opaque to Dynamo
and Inductor; ``register_fake`` gives its output shape) and inside CUDA-graph capture
(the sequence makes no host sync and no data-dependent allocation).

How the layer, quantization, backend and hooks reach an op that takes only tensors and
primitives:

- **layer, backend, hooks** live in a :class:`~moe_core.runner.MoERunner`, registered once
  with :func:`register_runner` (or built by :func:`handle_for_layer`); the op receives the
  runner's integer ``handle``. The handle is a compile-time constant for Dynamo (it guards
  on it), so the runner lookup happens outside any traced region.
- **quantization** travels as primitives (``quant_scheme``, ``per_channel``,
  ``block_shape``, ``group_size``) plus the scale / zero-point tensors; the op body rebuilds
  the :class:`~moe_core.spec.QuantSpec` with its named constructors.
- **padding** of a CUDA-graph batch: an optional one-element integer tensor ``n_valid``
  (rows ``>= n_valid`` become ``-1``), updated in place between replays.

The op bodies call :meth:`MoERunner.run`, i.e. :mod:`moe_core.sequence` — the one copy
of the forward pass. Registration runs once per process (guarded by a process-wide state
object, so a second import of this module under another name reuses the first's ops).

Use :func:`fused_experts_op` / :func:`fused_experts_inplace_op` (unpack
:class:`~moe_core.spec.ExpertWeights` into the op arguments), or call
``torch.ops.moe_core.fused_experts(...)`` directly with the schema below.
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
import types
from typing import Any

import torch

from moe_core.errors import MoEInputError, MoETypeError
from moe_core.spec import ExpertWeights, MoELayer, QuantSpec

__all__ = ["register_runner", "handle_for_layer", "release", "runner_of", "quant_args",
           "fused_experts_op", "fused_experts_inplace_op", "OP_ARGS"]

logger = logging.getLogger(__name__)

#: the arguments after ``x`` shared by both ops (schema text)
OP_ARGS = ("Tensor w1, Tensor w2, Tensor topk_weights, Tensor topk_ids, int handle, "
           "Tensor? b1=None, Tensor? b2=None, str quant_scheme=\"none\", "
           "Tensor? w1_scale=None, Tensor? w2_scale=None, Tensor? a1_scale=None, Tensor? a2_scale=None, "
           "Tensor? w1_zp=None, Tensor? w2_zp=None, bool per_channel=False, int[]? block_shape=None, "
           "int? group_size=None, Tensor? n_valid=None")
_SCHEMA = f"(Tensor x, {OP_ARGS}, bool no_combine=False) -> Tensor"
_SCHEMA_INPLACE = f"(Tensor(a!) x, {OP_ARGS}) -> ()"

_STATE_KEY = "moe_core._ops_state"


def _state() -> types.ModuleType:
    """Process-wide state: the runner registry and the registration flag (one per process,
    whatever name this module was imported under)."""
    state = sys.modules.get(_STATE_KEY)
    if state is None:
        state = types.ModuleType(_STATE_KEY)
        state.lock = threading.Lock()
        state.runners = {}                 # handle -> MoERunner
        state.handles = {}                 # id(runner) -> handle
        state.counter = itertools.count(1)
        state.registered = False
        state = sys.modules.setdefault(_STATE_KEY, state)
    return state


# -- the runner registry ----------------------------------------------------------------------
def register_runner(runner: Any) -> int:
    """The integer handle of ``runner`` (a :class:`~moe_core.runner.MoERunner`) for the ops;
    registering the same runner again returns the same handle. The registry keeps the
    runner alive until :func:`release`."""
    from moe_core.runner import MoERunner

    if not isinstance(runner, MoERunner):
        raise MoETypeError(f"runner: expected a MoERunner, got {type(runner).__name__}")
    state = _state()
    with state.lock:
        handle = state.handles.get(id(runner))
        if handle is None or state.runners.get(handle) is not runner:
            handle = next(state.counter)
            state.runners[handle] = runner
            state.handles[id(runner)] = handle
        return handle


def handle_for_layer(layer: MoELayer, backend: Any = None) -> int:
    """A handle for a new :class:`~moe_core.runner.MoERunner` of ``layer`` (global hooks only)."""
    from moe_core.runner import MoERunner

    return register_runner(MoERunner(layer, backend=backend))


def runner_of(handle: int) -> Any:
    """The runner registered under ``handle``; MoEInputError when there is none."""
    runner = _state().runners.get(handle)
    if runner is None:
        raise MoEInputError(f"handle: no runner registered under {handle}; call "
                            "moe_core.ops.register_runner(runner) first")
    return runner


def release(handle: int) -> None:
    """Forget the runner of ``handle`` (later calls with it raise)."""
    state = _state()
    with state.lock:
        runner = state.runners.pop(handle, None)
        if runner is not None:
            state.handles.pop(id(runner), None)


# -- quantization <-> primitives ------------------------------------------------------------------
def quant_args(quant: QuantSpec) -> dict[str, Any]:
    """The op arguments that carry ``quant`` (inverse of :func:`_quant_from`)."""
    return {"quant_scheme": quant.scheme, "w1_scale": quant.w1_scale, "w2_scale": quant.w2_scale,
            "a1_scale": quant.a1_scale, "a2_scale": quant.a2_scale, "w1_zp": quant.w1_zp,
            "w2_zp": quant.w2_zp, "per_channel": bool(quant.per_channel),
            "block_shape": list(quant.block_shape) if quant.block_shape is not None else None,
            "group_size": quant.group_size}


def _quant_from(scheme: str, w1_scale: torch.Tensor | None, w2_scale: torch.Tensor | None,
                a1_scale: torch.Tensor | None, a2_scale: torch.Tensor | None, w1_zp: torch.Tensor | None,
                w2_zp: torch.Tensor | None, per_channel: bool, block_shape: list[int] | None,
                group_size: int | None) -> QuantSpec:
    if scheme == "none":
        return QuantSpec.none()
    if scheme in ("fp8_w8a8", "int8_w8a8"):
        make = QuantSpec.fp8_w8a8 if scheme == "fp8_w8a8" else QuantSpec.int8_w8a8
        return make(w1_scale, w2_scale, a1_scale=a1_scale, a2_scale=a2_scale, per_channel=per_channel,
                    block_shape=tuple(block_shape) if block_shape else None)
    if scheme == "int8_w8a16":
        return QuantSpec.int8_w8a16(w1_scale, w2_scale, group_size=group_size, w1_zp=w1_zp, w2_zp=w2_zp)
    if scheme == "int4_w4a16":
        return QuantSpec.int4_w4a16(w1_scale, w2_scale, group_size=group_size, w1_zp=w1_zp, w2_zp=w2_zp)
    raise MoEInputError(f"quant_scheme: expected one of none, fp8_w8a8, int8_w8a8, int8_w8a16, int4_w4a16, "
                        f"got {scheme!r}")


def _run(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
         topk_ids: torch.Tensor, handle: int, b1: torch.Tensor | None, b2: torch.Tensor | None,
         quant_scheme: str, w1_scale: torch.Tensor | None, w2_scale: torch.Tensor | None,
         a1_scale: torch.Tensor | None, a2_scale: torch.Tensor | None, w1_zp: torch.Tensor | None,
         w2_zp: torch.Tensor | None, per_channel: bool, block_shape: list[int] | None,
         group_size: int | None, n_valid: torch.Tensor | None, *, inplace: bool,
         no_combine: bool) -> torch.Tensor:
    """The body of both ops: rebuild the weights and run the runner (the one sequence)."""
    quant = _quant_from(quant_scheme, w1_scale, w2_scale, a1_scale, a2_scale, w1_zp, w2_zp,
                        per_channel, block_shape, group_size)
    weights = ExpertWeights(w1, w2, b1=b1, b2=b2, quant=quant)
    return runner_of(handle).run(x, weights, topk_weights, topk_ids, inplace=inplace,
                                 no_combine=no_combine, n_valid=n_valid)


# -- registration (once per process) ---------------------------------------------------------------
def _register() -> None:
    state = _state()
    with state.lock:
        if state.registered:
            return

        def fused_experts_impl(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                               topk_weights: torch.Tensor, topk_ids: torch.Tensor, handle: int,
                               b1: torch.Tensor | None = None, b2: torch.Tensor | None = None,
                               quant_scheme: str = "none", w1_scale: torch.Tensor | None = None,
                               w2_scale: torch.Tensor | None = None, a1_scale: torch.Tensor | None = None,
                               a2_scale: torch.Tensor | None = None, w1_zp: torch.Tensor | None = None,
                               w2_zp: torch.Tensor | None = None, per_channel: bool = False,
                               block_shape: list[int] | None = None, group_size: int | None = None,
                               n_valid: torch.Tensor | None = None, no_combine: bool = False) -> torch.Tensor:
            return _run(x, w1, w2, topk_weights, topk_ids, handle, b1, b2, quant_scheme, w1_scale, w2_scale,
                        a1_scale, a2_scale, w1_zp, w2_zp, per_channel, block_shape, group_size, n_valid,
                        inplace=False, no_combine=no_combine)

        def fused_experts_inplace_impl(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                                       topk_weights: torch.Tensor, topk_ids: torch.Tensor, handle: int,
                                       b1: torch.Tensor | None = None, b2: torch.Tensor | None = None,
                                       quant_scheme: str = "none", w1_scale: torch.Tensor | None = None,
                                       w2_scale: torch.Tensor | None = None,
                                       a1_scale: torch.Tensor | None = None,
                                       a2_scale: torch.Tensor | None = None, w1_zp: torch.Tensor | None = None,
                                       w2_zp: torch.Tensor | None = None, per_channel: bool = False,
                                       block_shape: list[int] | None = None, group_size: int | None = None,
                                       n_valid: torch.Tensor | None = None) -> None:
            _run(x, w1, w2, topk_weights, topk_ids, handle, b1, b2, quant_scheme, w1_scale, w2_scale,
                 a1_scale, a2_scale, w1_zp, w2_zp, per_channel, block_shape, group_size, n_valid,
                 inplace=True, no_combine=False)

        op = torch.library.custom_op("moe_core::fused_experts", fused_experts_impl, mutates_args=(),
                                     schema=_SCHEMA)
        op_inplace = torch.library.custom_op("moe_core::fused_experts_inplace", fused_experts_inplace_impl,
                                             mutates_args=("x",), schema=_SCHEMA_INPLACE)

        @op.register_fake
        def _fake(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, handle: int, b1: torch.Tensor | None = None,
                  b2: torch.Tensor | None = None, quant_scheme: str = "none",
                  w1_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                  a1_scale: torch.Tensor | None = None, a2_scale: torch.Tensor | None = None,
                  w1_zp: torch.Tensor | None = None, w2_zp: torch.Tensor | None = None,
                  per_channel: bool = False, block_shape: list[int] | None = None,
                  group_size: int | None = None, n_valid: torch.Tensor | None = None,
                  no_combine: bool = False) -> torch.Tensor:
            # mirrors sequence.run: [M, H] like x, or [M, k, H] with no_combine
            if no_combine:
                return x.new_empty((x.shape[0], topk_ids.shape[1], x.shape[1]))
            return torch.empty_like(x)

        @op_inplace.register_fake
        def _fake_inplace(x: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            return None

        state.op, state.op_inplace = op, op_inplace
        state.registered = True
        logger.debug("registered torch ops moe_core::fused_experts and moe_core::fused_experts_inplace")


_register()


# -- convenience callers ----------------------------------------------------------------------------
def _op_args(weights: ExpertWeights, x: torch.Tensor, n_valid: int | torch.Tensor | None) -> dict[str, Any]:
    if isinstance(n_valid, int) and not isinstance(n_valid, bool):
        n_valid = torch.full((), n_valid, dtype=torch.int64, device=x.device)
    return {"b1": weights.b1, "b2": weights.b2, "n_valid": n_valid, **quant_args(weights.quant)}


def fused_experts_op(x: torch.Tensor, weights: ExpertWeights, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, *, handle: int, no_combine: bool = False,
                     n_valid: int | torch.Tensor | None = None) -> torch.Tensor:
    """``torch.ops.moe_core.fused_experts`` with the weights unpacked.

    :param x: [M, H] tokens (not mutated).
    :param weights: the layer's :class:`ExpertWeights`.
    :param topk_weights: [M, k] fp32; ``topk_ids`` [M, k] int32 (int64 converted).
    :param handle: from :func:`register_runner` / :func:`handle_for_layer`.
    :param no_combine: return [M, k, H] unweighted, unscaled.
    :param n_valid: rows ``>= n_valid`` are padding (int or a one-element device tensor).
    :returns: a new [M, H] tensor ([M, k, H] with ``no_combine``).
    """
    return torch.ops.moe_core.fused_experts(x, weights.w1, weights.w2, topk_weights, topk_ids, handle,
                                            no_combine=no_combine, **_op_args(weights, x, n_valid))


def fused_experts_inplace_op(x: torch.Tensor, weights: ExpertWeights, topk_weights: torch.Tensor,
                             topk_ids: torch.Tensor, *, handle: int,
                             n_valid: int | torch.Tensor | None = None) -> None:
    """``torch.ops.moe_core.fused_experts_inplace``: writes the [M, H] result into ``x`` (mutated)."""
    torch.ops.moe_core.fused_experts_inplace(x, weights.w1, weights.w2, topk_weights, topk_ids, handle,
                                             **_op_args(weights, x, n_valid))
