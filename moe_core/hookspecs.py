"""The hook specifications of moe-core (SEMANTICS §8), and the pluggy markers.

Hook plugins mark functions with :data:`hookimpl`; a plugin is any object or module
carrying them, registered globally through the ``moe_core.hooks`` entry-point group or
on one runner with :meth:`moe_core.MoERunner.register`. An implementation may take any
subset of its spec's arguments (pluggy passes them by name); an argument the spec lacks,
a hook name not listed here, or a plugin with no ``@hookimpl`` at all is rejected at
registration with :class:`~moe_core.errors.PluginRegistrationError`.

Call order is pluggy's, fixed per runner: ``tryfirst`` implementations, then the others
last-registered-first (a runner's own plugins before the global ones), then ``trylast``;
``wrapper=True`` implementations wrap them all. With no implementation registered the
forward calls nothing.

Contract of the arguments (SEMANTICS §8):

============  ===================  ====================  =========================================
argument      shape                may the hook write?   state when the hook runs
============  ===================  ====================  =========================================
x             [M, H]               no                    runner input, unquantized
gate_up       [M, k, N] view       yes, in place         pre-activation; scales and bias applied
act           [M·k, N/2 or N]      no                    post-activation, unquantized
down          [M, k, H] view       yes, in place         pre-combine; rows of ``-1`` slots zero
topk_weights  [M, k] fp32          no                    as given
topk_ids      [M, k] int32         no                    local ids; ``-1`` = remote or padded
layer         MoELayer             no                    the frozen layer spec
============  ===================  ====================  =========================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import torch

    from moe_core.spec import MoELayer

__all__ = ["PROJECT_NAME", "hookspec", "hookimpl"]

#: the pluggy project name; pluggy stores ``moe_core_spec``/``moe_core_impl`` attributes
PROJECT_NAME = "moe_core"

#: marker for hook specifications (used only in this module)
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: marker for hook implementations in plugins: ``@moe_core.hookimpl``
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# -------------------------------------------------------------------------------------
# Step 1: expert id mapping
# -------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def moe_core_map_expert_ids(topk_ids: torch.Tensor, layer: MoELayer) -> torch.Tensor | None:
    """Translate global expert ids to this rank's local ids.

    Called in step 1 of every forward whose ``layer.filter_expert`` is true
    (``num_experts != num_local_experts`` or unknown), before alignment. Never called
    otherwise.

    :param topk_ids: [M, k] int32 global ids as routed; padded rows of a CUDA-graph batch
        may hold stale, huge or negative values. Do not write it.
    :param layer: the frozen :class:`~moe_core.MoELayer` (``ep_rank``, ``ep_size``,
        ``expert_map``, ``num_fused_shared_experts``).
    :returns: a new [M, k] int32 tensor of local ids in ``[-1, E)``, ``-1`` for experts on
        another rank and for invalid ids; or ``None`` to let the next implementation decide.

    Stops at first non-None result.

    The result is checked (shape [M, k], int32, same device; values in ``[-1, E)`` for CPU
    tensors or under ``MOE_CORE_DEBUG=1``); anything else, or an exception, aborts the
    forward with :class:`~moe_core.errors.HookError` naming the plugin.

    Use from plugins: the in-tree ``filter_expert`` plugin implements this hook for
    ``ep_rank``/``ep_size``/``expert_map`` placements; a plugin registered on a runner runs
    before it and wins by returning a tensor. Implementations must not sync with the host
    or allocate data-dependent sizes, and must mask out-of-range ids *before* gathering
    through a table (never index with ``-1``).
    """


# -------------------------------------------------------------------------------------
# Steps 5 and 8: edits of the intermediate buffers (LoRA)
# -------------------------------------------------------------------------------------


@hookspec
def moe_core_after_gate_up(x: torch.Tensor, gate_up: torch.Tensor, topk_weights: torch.Tensor,
                           topk_ids: torch.Tensor, layer: MoELayer) -> None:
    """Edit the gemm1 output in place, before the activation (step 5).

    Called only when at least one implementation is registered.

    :param x: [M, H] the runner input, unquantized. Do not write it.
    :param gate_up: [M, k, N] view, token-major (row ``[m, j]`` is slot ``m·k + j``);
        pre-activation, scales and bias applied, routed weight included iff
        ``layer.apply_router_weight_on_input``. **May be written in place.**
    :param topk_weights: [M, k] fp32. Do not write it.
    :param topk_ids: [M, k] int32 *local* ids; ``-1`` = remote or padded. Do not touch
        rows whose id is ``-1``.
    :param layer: the frozen layer spec.
    :returns: nothing; return values are ignored.

    A raising implementation aborts the forward with :class:`~moe_core.errors.HookError`
    naming the plugin and the hook; no output is returned.

    Use from plugins: LoRA adds ``(x·Aᵀ)·Bᵀ`` per slot here, weighted like the buffer (only
    when ``apply_router_weight_on_input``), with an fp32 intermediate. No host sync, no
    data-dependent allocation (CUDA-graph capture).
    """


@hookspec
def moe_core_after_down(act: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor, layer: MoELayer, no_combine: bool) -> None:
    """Edit the gemm2 output in place, before the combine (step 8).

    Called only when at least one implementation is registered.

    :param act: [M·k, N/2 or N] post-activation input of gemm2, unquantized; rows of
        ``-1`` slots are unspecified. Do not write it.
    :param down: [M, k, H] view, token-major; routed weight included unless
        ``layer.apply_router_weight_on_input`` or ``no_combine``. **May be written in
        place**; rows of ``-1`` slots must stay zero.
    :param topk_weights: [M, k] fp32. Do not write it.
    :param topk_ids: [M, k] int32 local ids. Do not write it.
    :param layer: the frozen layer spec.
    :param no_combine: whether this forward returns ``down`` uncombined (then ``down`` is
        unweighted). Implementations may omit this parameter (pluggy passes only what they take).
    :returns: nothing; return values are ignored.

    A raising implementation aborts the forward with :class:`~moe_core.errors.HookError`
    naming the plugin and the hook; no output is returned.

    Use from plugins: a hook adds its delta with the weighting of the buffer it edits (times
    the routed weight unless ``apply_router_weight_on_input`` or ``no_combine``) and never
    writes rows whose id is ``-1``. No host sync, no data-dependent allocation.
    """
