"""``MoERunner``: one layer, its backend and its own hook plugins; runs the one sequence
(small eager forwards optionally replayed from CUDA graphs: :mod:`moe_core.graphs`)."""

from __future__ import annotations

from typing import Any

import attrs
import pluggy
import torch

from moe_core import plugins, sequence
from moe_core.api import resolve_backend
from moe_core.backend import Backend
from moe_core.errors import MoEInputError, MoETypeError
from moe_core.graphs import GraphCache
from moe_core.spec import ExpertWeights, MoELayer, Plan, QuantSpec

__all__ = ["MoERunner"]


def _check_max_tokens(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MoETypeError(f"{attribute.name}: expected an int >= 0 (0 = off), got {value!r} "
                           f"of type {type(value).__name__}")
    if value < 0:
        raise MoEInputError(f"{attribute.name}: expected an int >= 0 (0 = off), got {value}")


@attrs.define(eq=False)
class MoERunner:
    """Runs one MoE layer through the selected backend with per-layer hooks.

    :param layer: the :class:`MoELayer`.
    :param backend: a backend name or instance; None: ``MOE_CORE_BACKEND``, else the
        available supporting backend of highest priority (chosen at the first run).
    :param cuda_graph_max_tokens: 0 (default): off. N > 0: a forward of 1..N tokens on a CUDA
        device with no hooks, no expert filtering and no ``n_valid`` is captured into a CUDA graph
        at its first call and replayed at later calls with the same shapes, flags and weight
        tensors (:mod:`moe_core.graphs`; up to 16 graphs, each keeping its weight tensors alive
        until dropped or :meth:`clear_graphs`). Results are bit-identical to the eager path.

    Hook plugins registered with :meth:`register` apply to this runner only, on top of
    the global ``moe_core.hooks`` entry points. Given the same inputs, :meth:`run` and
    :func:`moe_core.fused_experts` return bit-identical outputs.
    """

    layer: MoELayer = attrs.field(validator=attrs.validators.instance_of(MoELayer))
    backend_request: str | Backend | None = attrs.field(default=None, alias="backend")
    cuda_graph_max_tokens: int = attrs.field(default=0, kw_only=True, validator=_check_max_tokens)
    _pm: pluggy.PluginManager | None = attrs.field(default=None, init=False, repr=False)
    _hooks: plugins.HookSet | None = attrs.field(default=None, init=False, repr=False)
    _backends: dict[str, Backend] = attrs.field(factory=dict, init=False, repr=False)
    _last_plan: Plan | None = attrs.field(default=None, init=False, repr=False)
    _graphs: GraphCache = attrs.field(factory=GraphCache, init=False, repr=False)

    def _manager(self) -> pluggy.PluginManager:
        if self._pm is None:
            self._pm = plugins.new_plugin_manager()
        return self._pm

    def register(self, plugin: Any, name: str | None = None) -> None:
        """Register a hook plugin (object or module with ``@moe_core.hookimpl`` functions)
        on this runner only. A malformed plugin raises PluginRegistrationError."""
        plugins.register_hooks(self._manager(), plugin, name)
        self._hooks = None
        self._graphs.clear()       # a runner with hooks runs eagerly; free what was captured

    def unregister(self, plugin: Any) -> None:
        """Remove a hook plugin registered with :meth:`register`."""
        self._manager().unregister(plugin)
        self._hooks = None
        self._graphs.clear()

    @property
    def hooks(self) -> plugins.HookSet:
        """The hooks this runner calls (global entry points + its own)."""
        if self._hooks is None:
            self._hooks = plugins.hookset_for(self._pm) if self._pm is not None else plugins.global_hookset()
        return self._hooks

    def backend_for(self, quant: QuantSpec) -> Backend:
        """The backend this runner uses for weights quantized with ``quant``."""
        key = quant.scheme + repr(quant.block_shape) + repr(quant.per_channel)
        if key not in self._backends:
            self._backends[key] = resolve_backend(self.backend_request, self.layer, quant)
        return self._backends[key]

    @property
    def backend(self) -> Backend:
        """The backend for unquantized weights (or the one of the last run)."""
        if self._last_plan is not None:
            return self._last_plan.backend
        return self.backend_for(QuantSpec.none())

    @property
    def num_cached_graphs(self) -> int:
        """How many CUDA graphs this runner holds (see ``cuda_graph_max_tokens``)."""
        return len(self._graphs)

    def clear_graphs(self) -> None:
        """Drop every captured CUDA graph, and with them the weight tensors they keep alive."""
        self._graphs.clear()

    def run(self, x: torch.Tensor, weights: ExpertWeights, topk_weights: torch.Tensor,
            topk_ids: torch.Tensor, *, inplace: bool = False, no_combine: bool = False,
            out: torch.Tensor | None = None, n_valid: int | torch.Tensor | None = None) -> torch.Tensor:
        """Forward pass (SEMANTICS §2). ``n_valid``: rows at or past it are padding (ids → -1).

        With ``cuda_graph_max_tokens`` on, a qualifying call replays a cached CUDA graph. Inputs
        are validated as always, except that a call matching an earlier validated one in every
        property the checks read (:func:`moe_core.graphs.call_signature`) goes straight to its
        replay.

        :returns: [M, H], or [M, k, H] with ``no_combine``; ``inplace`` mutates ``x``.
        """
        graphed = (0 < self.cuda_graph_max_tokens and isinstance(x, torch.Tensor) and x.is_cuda
                   and 0 < x.shape[0] <= self.cuda_graph_max_tokens and n_valid is None
                   and not self.layer.filter_expert and not torch.cuda.is_current_stream_capturing())
        if graphed and out is None and not self.hooks.any:
            # a call like one already validated and captured: replay without prepare
            got = self._graphs.replay_known(x, weights, topk_weights, topk_ids, inplace=inplace,
                                            no_combine=no_combine)
            if got is not None:
                return got
        backend = self.backend_for(weights.quant)
        hooks = self.hooks
        plan = sequence.prepare(x, weights, topk_weights, topk_ids, self.layer, backend, hooks,
                                inplace=inplace, no_combine=no_combine, out=out, n_valid=n_valid)
        self._last_plan = plan
        # the graph path only where a replay is exactly the eager forward: no hook may run
        # Python per call, and a caller capturing its own graph gets the plain launches
        if graphed and not hooks.any:
            return self._graphs.run(plan, x, weights, topk_weights, topk_ids, inplace=inplace,
                                    no_combine=no_combine, out=out)
        return sequence.run(plan, x, weights, topk_weights, topk_ids, inplace=inplace,
                            no_combine=no_combine, out=out, n_valid=n_valid)

    def explain(self) -> str:
        """Which backend and configs were chosen, and why (after a run: that run's plan)."""
        plan = self._last_plan
        backend = plan.backend if plan is not None else self.backend
        lines = [f"backend: {backend.name} (platform {backend.platform}, priority {backend.priority}, "
                 f"distribution {plugins.distribution_of(backend)})",
                 f"requested: {self.backend_request or 'automatic (MOE_CORE_BACKEND or highest priority)'}",
                 f"hooks: after_gate_up={'yes' if self.hooks.after_gate_up else 'no'}, "
                 f"after_down={'yes' if self.hooks.after_down else 'no'}, "
                 f"id mapping={'on' if self.layer.filter_expert else 'off'}",
                 self._explain_graphs()]
        if plan is None:
            lines.append("configs: resolved at the first run")
        else:
            lines.append("activation: " + ("fused into gemm1's epilogue" if plan.fused_activation else
                                           "its own step (gemm1 writes gate_up)")
                         + ("; sorted mode (act by position in sorted_token_ids, gemm2 reads it through TMA)"
                            if plan.sorted_intermediate else ""))
            from moe_core.config import format_why

            lines.extend(format_why(plan.why))
        return "\n".join(lines)

    def _explain_graphs(self) -> str:
        if not self.cuda_graph_max_tokens:
            return "cuda graphs: off (cuda_graph_max_tokens=0)"
        if self._graphs.failed:
            return f"cuda graphs: off after a failed capture ({self._graphs.failed})"
        held = ", ".join(f"M={m}" for m in self._graphs.token_counts()) or "none yet"
        return (f"cuda graphs: forwards of 1..{self.cuda_graph_max_tokens} tokens (CUDA, no hooks, no "
                f"expert filtering, no n_valid) replay a captured graph; {len(self._graphs)} of at most "
                f"{self._graphs.max_graphs} held: {held}")
