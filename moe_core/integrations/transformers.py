"""Run the MoE blocks of a Hugging Face transformers model through moe-core.

```python
from moe_core.integrations.transformers import patch_moe, unpatch_moe
report = patch_moe(model)              # every MoE block now runs a moe-core MoERunner
print(report)                          # which blocks, which backend, which weights were copied
unpatch_moe(model)                     # the original forwards are back
```

Supported blocks (transformers 4.57 and 5.x): ``MixtralSparseMoeBlock``,
``Qwen2MoeSparseMoeBlock``, ``Qwen3MoeSparseMoeBlock``, ``DeepseekV3MoE``, ``GptOssMLP``.
For each block, patching builds a :class:`~moe_core.MoELayer` and the
:class:`~moe_core.ExpertWeights` from the block's own parameters (transformers 5 stores
them fused: no copy; transformers 4 stores per-expert ``nn.Linear`` layers: one stacked
copy per block), routes with :func:`moe_core.select_experts` (the model's scoring,
grouping, correction bias, renormalisation and scaling) on the logits of the block's own
router (gpt-oss: the router's own top-k, see ``_hf_adapters``), keeps shared experts as the model computes them (output = routed + shared), and
returns what the original block returns (a tensor, or ``(hidden, router_logits)`` /
``(hidden, router_scores)`` where the block does).

The patched forward is for inference: it runs under ``torch.no_grad()`` (no gradient
reaches the experts), and a block in training mode runs its original forward (logged once).
Any other block that holds experts is *unsupported* and is reported by name: an error by
default, or listed in the returned :class:`PatchReport` with ``strict=False``.

This module imports transformers only in :func:`tiny_model` (the test/benchmark helper);
patching works on the modules of an already-built model.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import attrs
import torch
from torch import nn

from moe_core.backend import Backend
from moe_core.errors import MoEInputError, MoETypeError, UnsupportedConfigError
from moe_core.integrations._hf_adapters import (SUPPORTED_BLOCKS, BlockPlan, UnsupportedBlock, looks_like_moe,
                                                plan_block)
from moe_core.integrations._hf_models import TINY_ARCHS, tiny_config, tiny_model
from moe_core.runner import MoERunner

__all__ = ["patch_moe", "unpatch_moe", "is_patched", "PatchReport", "SUPPORTED_BLOCKS", "TINY_ARCHS",
           "tiny_config", "tiny_model"]

logger = logging.getLogger(__name__)

_STATE = "_moe_core_patch"
_NO_FORWARD = object()          # the block had no instance-level forward before patching


@attrs.frozen
class PatchReport:
    """What :func:`patch_moe` did.

    :param patched: ``(module name, block class, arch, weight layout)`` per patched block.
    :param unsupported: ``(module name, block class, reason)`` per MoE block left as it was.
    :param backend: the backend name each patched block resolved to (one per distinct name).
    """

    patched: tuple[tuple[str, str, str, str], ...]
    unsupported: tuple[tuple[str, str, str], ...]
    backend: tuple[str, ...]

    @property
    def copied(self) -> tuple[str, ...]:
        """Names of blocks whose per-expert weights were stacked into one copy."""
        return tuple(name for name, _, _, layout in self.patched if layout != "fused")

    def __str__(self) -> str:
        lines = [f"moe-core patched {len(self.patched)} MoE block(s), backend {', '.join(self.backend) or '-'}"]
        lines += [f"  {name}: {cls} ({arch}, weights {layout})" for name, cls, arch, layout in self.patched]
        if self.unsupported:
            lines.append(f"unsupported, left unpatched: {len(self.unsupported)}")
            lines += [f"  {name}: {cls}: {reason}" for name, cls, reason in self.unsupported]
        return "\n".join(lines)


@attrs.define(eq=False)
class _PatchState:
    plan: BlockPlan
    runner: MoERunner
    original_forward: Any
    warned_training: bool = False


def _patched_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """The forward that replaces a MoE block's: route, moe-core runner, shared experts."""
    state: _PatchState = getattr(self, _STATE)
    if self.training:
        if not state.warned_training:
            logger.warning("moe-core: %s is in training mode; it runs its original forward (the patched "
                           "forward is inference-only)", type(self).__name__)
            state.warned_training = True
        return _call_original(self, state, hidden_states, *args, **kwargs)
    if args or kwargs:
        raise MoEInputError(f"{type(self).__name__}: the patched forward takes hidden_states only, got "
                            f"{len(args)} more positional and keyword arguments {sorted(kwargs)}")
    plan = state.plan
    shape = hidden_states.shape
    with torch.no_grad():
        h = hidden_states.reshape(-1, shape[-1])
        if h.stride(-1) != 1:
            h = h.contiguous()
        aux, topk_weights, topk_ids = plan.route(h)
        out = state.runner.run(h, plan.weights(), topk_weights, topk_ids)
        if plan.shared is not None:
            out = out + plan.shared(h)
        out = out.reshape(shape)
    return (out, aux) if plan.returns_aux else out


def _call_original(block: nn.Module, state: _PatchState, *args: Any, **kwargs: Any) -> Any:
    if state.original_forward is _NO_FORWARD:
        return type(block).forward(block, *args, **kwargs)
    return state.original_forward(*args, **kwargs)


def is_patched(module: nn.Module) -> bool:
    """Whether ``module`` or any submodule runs a moe-core patched forward."""
    return any(hasattr(m, _STATE) for m in module.modules())


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Outermost modules that hold experts, in module order (children of a block are not blocks)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():       # pre-order: a block's descendants follow it
        if found and (found[-1][0] == "" or name.startswith(found[-1][0] + ".")):
            continue
        if looks_like_moe(module):
            found.append((name, module))
    return found


def patch_moe(model: nn.Module, backend: str | Backend | None = None, *, strict: bool = True) -> PatchReport:
    """Replace the forward of every MoE block of ``model`` with a moe-core runner.

    :param model: a loaded transformers model (``*ForCausalLM``, ``*Model``, or a bare block).
    :param backend: backend name or instance for every block; None: ``MOE_CORE_BACKEND``,
        else the available backend of highest priority (resolved here, so a bad name fails now).
    :param strict: with unsupported MoE blocks, raise (default) rather than patch the rest.
    :returns: a :class:`PatchReport`.
    :raises UnsupportedConfigError: no MoE block found, or (``strict``) unsupported blocks,
        each named with its class and the reason; nothing is patched then.
    :raises MoEInputError: the model is already patched.
    """
    if not isinstance(model, nn.Module):
        raise MoETypeError(f"model: expected a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if is_patched(model):
        raise MoEInputError("model: already patched by moe-core; call unpatch_moe(model) first")
    config = _text_config(model)
    blocks = _find_blocks(model)
    if not blocks:
        raise UnsupportedConfigError(f"model: no MoE block found in {type(model).__name__} "
                                     f"(supported blocks: {', '.join(SUPPORTED_BLOCKS)})")
    plans: list[tuple[str, nn.Module, BlockPlan]] = []
    unsupported: list[tuple[str, str, str]] = []
    for name, block in blocks:
        try:
            plans.append((name, block, plan_block(block, config)))
        except UnsupportedBlock as exc:
            unsupported.append((name or "<model>", type(block).__name__, str(exc)))
    if unsupported and (strict or not plans):
        listing = "\n".join(f"  {n}: {c}: {r}" for n, c, r in unsupported)
        raise UnsupportedConfigError(f"model: {len(unsupported)} MoE block(s) of {type(model).__name__} cannot run "
                                     f"through moe-core (nothing was patched):\n{listing}")
    runners = []
    for name, block, plan in plans:
        runner = MoERunner(plan.layer, backend=backend)
        runners.append(runner)
        runner.backend_for(plan.weights().quant)          # resolve now: a bad backend fails before patching
    patched = []
    for (name, block, plan), runner in zip(plans, runners):
        original = block.__dict__.get("forward", _NO_FORWARD)
        setattr(block, _STATE, _PatchState(plan, runner, original))
        block.forward = types.MethodType(_patched_forward, block)
        patched.append((name or "<model>", type(block).__name__, plan.arch, plan.layout))
    if unsupported:
        logger.warning("moe-core: %d MoE block(s) left unpatched: %s", len(unsupported),
                       "; ".join(f"{n} ({c}): {r}" for n, c, r in unsupported))
    if model.training:
        logger.warning("moe-core: %s is in training mode; patched blocks run their original forward until "
                       "model.eval()", type(model).__name__)
    report = PatchReport(patched=tuple(patched), unsupported=tuple(unsupported),
                         backend=tuple(dict.fromkeys(r.backend.name for r in runners)))
    logger.info("%s", report)
    return report


def unpatch_moe(model: nn.Module) -> int:
    """Restore the original forward of every block :func:`patch_moe` patched; drop its copies.

    :returns: the number of blocks restored (0 when nothing was patched).
    """
    restored = 0
    for module in model.modules():
        state = module.__dict__.get(_STATE)
        if state is None:
            continue
        if state.original_forward is _NO_FORWARD:
            module.__dict__.pop("forward", None)
        else:
            module.forward = state.original_forward
        delattr(module, _STATE)
        restored += 1
    return restored
