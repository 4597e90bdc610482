"""The one orchestration of the fused-MoE forward pass (SEMANTICS §2).

``prepare`` does steps 0–2 (validate, resolve configs and hooks) and returns a
:class:`~moe_core.spec.Plan`; ``run`` does steps 1 and 3–9 with the plan's backend::

    ids      = map_expert_ids(topk_ids)                    # 1  hook, only when filter_expert
    sorted, expert_ids, n_post = backend.align(ids)        # 3
    gate_up  = backend.gemm(x, w1)        [M·k, N]         # 4
    after_gate_up(x, gate_up[M, k, N])                     # 5  hook
    act      = backend.activation(gate_up)                 # 6  (or 4-6 in gemm1: fused_activation)
    down     = backend.gemm(act, w2)      [M·k, H]         # 7
    after_down(act, down[M, k, H])                         # 8  hook
    out      = backend.combine(down)      [M, H]           # 9

Every entry point (:func:`moe_core.fused_experts`, :meth:`moe_core.MoERunner.run`, the
custom ops) calls these two functions; there is no second copy.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Mapping

import torch

from moe_core import config as _config
from moe_core import validate
from moe_core.errors import BackendExecutionError, HookError, MoECoreError
from moe_core.spec import ExpertWeights, MoELayer, Plan

if TYPE_CHECKING:
    from moe_core.backend import Backend
    from moe_core.plugins import HookSet

__all__ = ["prepare", "run"]

logger = logging.getLogger(__name__)


def prepare(x: torch.Tensor, weights: ExpertWeights, topk_weights: torch.Tensor,
            topk_ids: torch.Tensor, layer: MoELayer, backend: Backend, hooks: HookSet, *,
            inplace: bool = False, no_combine: bool = False, out: torch.Tensor | None = None,
            n_valid: int | torch.Tensor | None = None) -> Plan:
    """Steps 0 and 2: check every input (before any launch) and resolve the configs.

    :param x: [M, H] tokens.
    :param weights: the layer's :class:`ExpertWeights`.
    :param topk_weights: [M, k] fp32 routed weights.
    :param topk_ids: [M, k] int32 (or int64, converted in :func:`run`) expert ids.
    :returns: the :class:`Plan` for :func:`run`; nothing is mutated.
    """
    validate.check_forward(x, weights, topk_weights, topk_ids, layer, backend, hooks,
                           inplace=inplace, no_combine=no_combine, out=out, n_valid=n_valid)
    M = x.shape[0]
    E = weights.w2.shape[0]
    resolved = _config.resolve_configs(
        backend, M=M, E=E, I=layer.intermediate_size, H=layer.hidden_size, top_k=layer.top_k,
        act_dtype=x.dtype, quant=weights.quant, has_hooks=hooks.any)
    validate.check_resolved_configs(resolved.config, resolved.down_config)
    fused = hooks.after_gate_up is None and backend.fuses_activation(layer, weights.quant, resolved.config)
    # the resolver keeps USE_TMA only without hooks (R3) and where the backend has TMA; the
    # unfused activation kernel indexes rows by slot, so sorted mode needs the fused gemm1
    sorted_mode = fused and bool(resolved.down_config.get("USE_TMA", False))
    return Plan(backend=backend, layer=layer, quant=weights.quant, config=resolved.config,
                down_config=resolved.down_config, hooks=hooks, why=resolved.why, fused_activation=fused,
                sorted_intermediate=sorted_mode)


class _step:
    """Label one step for the profiler and turn a backend failure into BackendExecutionError.

    A class, not a generator context manager, and the ``record_function`` label only while a
    profiler runs: the eager forward enters six of these, and both costs showed up in its
    host time (``benchmarks/host_overhead.py``).
    """

    __slots__ = ("plan", "step", "label")

    def __init__(self, plan: Plan, step: str) -> None:
        self.plan, self.step, self.label = plan, step, None

    def __enter__(self) -> None:
        if torch._C._autograd._profiler_enabled():   # any profiler: kineto, NVTX, ITT
            self.label = torch.profiler.record_function(f"moe_core::{self.step}")
            self.label.__enter__()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if self.label is not None:
            self.label.__exit__(exc_type, exc, tb)
        if exc is None or isinstance(exc, MoECoreError) or not isinstance(exc, Exception):
            return False
        from moe_core.plugins import distribution_of

        raise BackendExecutionError(
            f"backend {self.plan.backend.name!r} (distribution {distribution_of(self.plan.backend)}) "
            f"failed in step {self.step!r}: {type(exc).__name__}: {exc}") from exc


def _map_ids(plan: Plan, topk_ids: torch.Tensor, n_valid: int | torch.Tensor | None) -> torch.Tensor:
    """Step 1: int32 local ids; remote experts and rows past ``n_valid`` become -1."""
    ids = topk_ids if topk_ids.dtype == torch.int32 else topk_ids.to(torch.int32)
    if plan.layer.filter_expert:
        mapped = plan.hooks.map_expert_ids(ids, plan.layer)
        if mapped is None:
            raise HookError("layer.filter_expert is on (num_experts != num_local_experts) but no "
                            "moe_core_map_expert_ids hook mapped the ids; install or register "
                            "the 'filter_expert' hook plugin")
        validate.check_mapped_ids(mapped, ids, plan.layer.num_local_experts)
        ids = mapped
    if n_valid is not None:
        rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1)
        ids = torch.where(rows < n_valid, ids, torch.full_like(ids, -1))
    return ids


def _gemm(plan: Plan, which: int, a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, *,
          bias: torch.Tensor | None, topk_weights: torch.Tensor,
          aligned: tuple[torch.Tensor, torch.Tensor, torch.Tensor], top_k: int, mul_routed_weight: bool,
          config: Mapping[str, Any], activation: MoELayer | None = None) -> torch.Tensor:
    """Steps 4 / 7: gemm ``which`` (1 or 2) into ``out``; w8a8 quantizes ``a`` first, into a separate buffer.
    ``activation``: the layer, when gemm1 applies its activation (``out`` is ``act``). In sorted
    mode gemm1 stores and gemm2 reads ``act`` by position in ``sorted_token_ids``."""
    quant = plan.quant
    a_scale = None
    if quant.is_w8a8:
        with _step(plan, f"quantize_gemm{which}_input"):
            a, a_scale = plan.backend.quantize_activation(a, quant, getattr(quant, f"a{which}_scale"))
    sorted_ids, expert_ids, n_post = aligned
    with _step(plan, f"gemm{which}"):
        plan.backend.gemm(a, w, out, a_scale=a_scale, w_scale=getattr(quant, f"w{which}_scale"),
                          w_zp=getattr(quant, f"w{which}_zp"), bias=bias, topk_weights=topk_weights,
                          sorted_token_ids=sorted_ids, expert_ids=expert_ids, num_tokens_post_padded=n_post,
                          top_k=top_k, mul_routed_weight=mul_routed_weight, quant=quant, config=dict(config),
                          **({} if activation is None else {"activation": activation}),
                          **({} if not plan.sorted_intermediate else
                             {"sorted_out": True} if which == 1 else {"sorted_in": True}))
    return out


def run(plan: Plan, x: torch.Tensor, weights: ExpertWeights, topk_weights: torch.Tensor,
        topk_ids: torch.Tensor, *, inplace: bool = False, no_combine: bool = False,
        out: torch.Tensor | None = None, n_valid: int | torch.Tensor | None = None) -> torch.Tensor:
    """Steps 1 and 3–9 of the forward pass with the resolved ``plan``.

    :returns: [M, H] (``out`` or ``x`` when given / ``inplace``), or [M, k, H] with
        ``no_combine`` (unweighted, unscaled). With ``inplace`` ``x`` is mutated.
    """
    layer, backend, hooks = plan.layer, plan.backend, plan.hooks
    w1, w2 = weights.w1, weights.w2
    M, H = x.shape
    k = topk_ids.shape[1]
    E = w2.shape[0]
    N = w1.shape[1]
    S = M * k
    if M == 0:
        if no_combine:
            return x.new_empty((0, k, H))
        return x if inplace else (out if out is not None else torch.empty_like(x))

    with _step(plan, "map_expert_ids"):
        ids = _map_ids(plan, topk_ids, n_valid)
    with _step(plan, "align"):
        aligned = backend.align(ids, plan.block_m, E)

    act_rows = aligned[0].shape[0] if plan.sorted_intermediate else S
    act = torch.empty((act_rows, N // 2 if layer.is_gated else N), dtype=x.dtype, device=x.device)
    if plan.fused_activation:      # steps 4-6 in one kernel: no hook needs gate_up
        _gemm(plan, 1, x, w1, act, bias=weights.b1, topk_weights=topk_weights, aligned=aligned, top_k=k,
              mul_routed_weight=layer.apply_router_weight_on_input, config=plan.config,
              activation=layer)
    else:
        gate_up = torch.empty((S, N), dtype=x.dtype, device=x.device)
        _gemm(plan, 1, x, w1, gate_up, bias=weights.b1, topk_weights=topk_weights, aligned=aligned, top_k=k,
              mul_routed_weight=layer.apply_router_weight_on_input, config=plan.config)
        if hooks.after_gate_up is not None:
            hooks.after_gate_up(x=x, gate_up=gate_up.view(M, k, N), topk_weights=topk_weights,
                                topk_ids=ids, layer=layer)
        with _step(plan, "activation"):
            backend.activation(gate_up, act, layer, ids)

    down = torch.empty((S, H), dtype=x.dtype, device=x.device)
    _gemm(plan, 2, act, w2, down, bias=weights.b2, topk_weights=topk_weights, aligned=aligned, top_k=1,
          mul_routed_weight=not (layer.apply_router_weight_on_input or no_combine), config=plan.down_config)
    if hooks.after_down is not None:
        hooks.after_down(act=act, down=down.view(M, k, H), topk_weights=topk_weights,
                         topk_ids=ids, layer=layer, no_combine=no_combine)
    if no_combine:
        return down.view(M, k, H)

    result = x if inplace else (out if out is not None else torch.empty_like(x))
    with _step(plan, "combine"):
        backend.combine(down.view(M, k, H), result, layer.scaling)
    return result
