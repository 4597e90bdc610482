"""How each supported transformers MoE block stores its experts and routes its tokens.

One reader per architecture turns a block into a :class:`BlockPlan`: the
:class:`~moe_core.MoELayer`, a function returning the block's :class:`~moe_core.ExpertWeights`,
the routing (router logits → :func:`moe_core.select_experts` with the model's scoring,
grouping, correction bias and scaling; gpt-oss reuses its router's own top-k), the shared experts (kept as the model computes
them) and the shape of the block's return value.

Two storage layouts exist across transformers versions, and both are read:

- **fused** (transformers 5): ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj``
  [E, H, I] (gpt-oss, and any block whose experts say ``is_transposed``: [E, H, 2I] and
  [E, I, H]). These are handed to moe-core as they are, or as transposed *views*: no copy.
- **per-expert ``nn.Linear``** (transformers 4): an ``nn.ModuleList`` of small MLPs. Their
  weights are stacked once into [E, 2I, H] and [E, H, I] tensors (one copy per block, kept
  until :func:`unpatch_moe`); the copy is rebuilt if the model's weights move to another
  device or dtype, and must be redone (re-patch) after editing the weights in place.

Known difference: transformers 4's DeepSeek-V3 router masks the experts of dropped groups
with 0 rather than -inf, so with negative correction biases it can pick a masked expert;
``select_experts`` (and transformers 5) never do.

Nothing here imports transformers: blocks are recognised by class name and read through
their attributes, so one reader covers every version that keeps the same attributes.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from moe_core.routing import select_experts
from moe_core.spec import ExpertWeights, MoELayer

__all__ = ["BlockPlan", "UnsupportedBlock", "SUPPORTED_BLOCKS", "plan_block", "looks_like_moe"]

logger = logging.getLogger(__name__)

#: routing: hidden [M, H] -> (what the block returns beside its output or None,
#: topk_weights [M, k] fp32, topk_ids [M, k] int32)
RouteFn = Callable[[torch.Tensor], tuple[Any, torch.Tensor, torch.Tensor]]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu"}


class UnsupportedBlock(Exception):
    """A block moe-core cannot run exactly; the message says why (internal to this package)."""


@attrs.frozen(eq=False)
class BlockPlan:
    """Everything the patched forward of one block needs.

    :param arch: the architecture's short name (``mixtral``, ``qwen3_moe``, ...).
    :param layer: the moe-core layer of the routed experts.
    :param weights: returns the current :class:`ExpertWeights` (views, or the stacked copy).
    :param route: hidden [M, H] -> (aux, topk_weights [M, k], topk_ids [M, k]).
    :param shared: hidden [M, H] -> the shared experts' output [M, H] (already gated), or None.
    :param returns_aux: the original block returns ``(hidden, aux)`` rather than ``hidden``.
    :param layout: ``fused`` (no copy) or ``stacked copy`` (per-expert Linear layers copied once).
    """

    arch: str
    layer: MoELayer
    weights: Callable[[], ExpertWeights]
    route: RouteFn
    shared: Callable[[torch.Tensor], torch.Tensor] | None
    returns_aux: bool
    layout: str


def _attr(name: str, *objs: Any) -> Any:
    """The first of ``objs`` that has attribute ``name`` gives it; none -> UnsupportedBlock."""
    for obj in objs:
        if obj is not None and hasattr(obj, name):
            return getattr(obj, name)
    raise UnsupportedBlock(f"no attribute {name!r} on {', '.join(type(o).__name__ for o in objs if o is not None)}")


def _float_weight(name: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise UnsupportedBlock(f"{name} is {type(t).__name__}, expected a tensor")
    if t.dtype not in _FLOAT_DTYPES:
        raise UnsupportedBlock(f"{name} has dtype {t.dtype}; only unquantized fp16/bf16/fp32 experts are mapped "
                               "(quantized transformers expert formats are not)")
    if t.device.type == "meta":
        raise UnsupportedBlock(f"{name} is on the meta device (offloaded or not loaded)")
    return t


def _activation(config: Any, arch: str) -> str:
    act = getattr(config, "hidden_act", None)
    if act not in _ACTIVATIONS:
        raise UnsupportedBlock(f"{arch}: hidden_act={act!r} is not one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[act]


# -- expert weights -------------------------------------------------------------------

def _fused_weights(experts: nn.Module, *, transposed: bool, has_bias: bool
                   ) -> tuple[Callable[[], ExpertWeights], int, int, int]:
    """Zero-copy reader of 3-D expert parameters; returns (getter, E, H, I)."""
    if getattr(experts, "_is_expert_parallel", False):
        raise UnsupportedBlock("experts are sharded by transformers' expert parallelism")
    if not getattr(experts, "has_gate", True):
        raise UnsupportedBlock("experts have no gate projection (non-gated experts are not mapped)")
    gu = _float_weight("experts.gate_up_proj", getattr(experts, "gate_up_proj", None))
    dn = _float_weight("experts.down_proj", getattr(experts, "down_proj", None))
    if gu.dim() != 3 or dn.dim() != 3:
        raise UnsupportedBlock(f"experts.gate_up_proj {list(gu.shape)} / down_proj {list(dn.shape)} are not 3-D")
    if transposed:
        E, H, N = gu.shape
    else:
        E, N, H = gu.shape
    I = N // 2
    want_dn = (E, I, H) if transposed else (E, H, I)
    if N % 2 or tuple(dn.shape) != want_dn:
        raise UnsupportedBlock(f"experts.gate_up_proj {list(gu.shape)} and down_proj {list(dn.shape)} do not form "
                               f"gated experts (expected down_proj {list(want_dn)}, transposed={transposed})")
    if has_bias:
        for name, rows in (("gate_up_proj_bias", N), ("down_proj_bias", H)):
            b = _float_weight(f"experts.{name}", getattr(experts, name, None))
            if tuple(b.shape) != (E, rows):
                raise UnsupportedBlock(f"experts.{name} has shape {list(b.shape)}, expected [{E}, {rows}]")

    def get() -> ExpertWeights:
        w1, w2 = experts.gate_up_proj, experts.down_proj
        if transposed:                        # [E, H, 2I] -> [E, 2I, H] view; [E, I, H] -> [E, H, I] view
            w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)
        if has_bias:
            return ExpertWeights(w1, w2, b1=experts.gate_up_proj_bias, b2=experts.down_proj_bias)
        return ExpertWeights(w1, w2)

    return get, E, H, I


class _StackedWeights:
    """One stacked copy of per-expert ``nn.Linear`` weights: w1 = [gate; up] [E, 2I, H], w2 [E, H, I].

    Rebuilt (and logged) when the first or last expert's weights change storage, device or
    dtype, e.g. after ``model.to(...)``.
    """

    def __init__(self, experts: nn.ModuleList, names: tuple[str, str, str]) -> None:
        self._experts = experts
        self._names = names
        linears = [[getattr(mlp, n, None) for n in names] for mlp in experts]
        for e, trio in enumerate(linears):
            for n, lin in zip(names, trio):
                if not isinstance(lin, nn.Linear):
                    raise UnsupportedBlock(f"experts[{e}].{n} is {type(lin).__name__}, expected nn.Linear")
                if lin.bias is not None:
                    raise UnsupportedBlock(f"experts[{e}].{n} has a bias (not mapped for per-expert MLPs)")
                _float_weight(f"experts[{e}].{n}.weight", lin.weight)
        g0 = linears[0][0].weight
        self.I, self.H = g0.shape
        for e, (g, u, d) in enumerate(linears):
            for n, w, shape in ((names[0], g.weight, (self.I, self.H)), (names[1], u.weight, (self.I, self.H)),
                                (names[2], d.weight, (self.H, self.I))):
                if tuple(w.shape) != shape or w.dtype != g0.dtype or w.device != g0.device:
                    raise UnsupportedBlock(f"experts[{e}].{n}.weight is {list(w.shape)} {w.dtype} on {w.device}; "
                                           f"expected {list(shape)} {g0.dtype} on {g0.device} like experts[0]")
        self.E = len(linears)
        self._signature: tuple[Any, ...] | None = None
        self._weights: ExpertWeights | None = None
        self._build()

    def _current_signature(self) -> tuple[Any, ...]:
        first = getattr(self._experts[0], self._names[0]).weight
        last = getattr(self._experts[-1], self._names[2]).weight
        return tuple((w.data_ptr(), w.device, w.dtype, w._version) for w in (first, last))

    @torch.no_grad()
    def _build(self) -> None:
        E, I, H = self.E, self.I, self.H
        gate0 = getattr(self._experts[0], self._names[0]).weight
        w1 = torch.empty((E, 2 * I, H), dtype=gate0.dtype, device=gate0.device)
        w2 = torch.empty((E, H, I), dtype=gate0.dtype, device=gate0.device)
        for e, mlp in enumerate(self._experts):
            g, u, d = (getattr(mlp, n).weight for n in self._names)
            w1[e, :I].copy_(g)
            w1[e, I:].copy_(u)
            w2[e].copy_(d)
        self._weights = ExpertWeights(w1, w2)
        self._signature = self._current_signature()

    def __call__(self) -> ExpertWeights:
        if self._current_signature() != self._signature:
            logger.info("moe-core: expert weights changed (storage, device or dtype); restacking %d experts",
                        self.E)
            self._weights = None
            self._build()
        assert self._weights is not None
        return self._weights


def _read_experts(experts: Any, linear_names: tuple[str, str, str], *, transposed: bool = False,
                  has_bias: bool = False) -> tuple[Callable[[], ExpertWeights], int, int, int, str, bool]:
    """(getter, E, H, I, layout, interleaved) for either storage layout."""
    if isinstance(experts, nn.ModuleList):
        if has_bias:
            raise UnsupportedBlock("per-expert MLPs with biases are not mapped")
        if len(experts) == 0:
            raise UnsupportedBlock("experts is an empty ModuleList")
        stacked = _StackedWeights(experts, linear_names)
        return stacked, stacked.E, stacked.H, stacked.I, "stacked copy", False
    if isinstance(experts, nn.Module) and hasattr(experts, "gate_up_proj"):
        transposed = bool(getattr(experts, "is_transposed", transposed))
        has_bias = bool(getattr(experts, "has_bias", has_bias))
        interleaved = not bool(getattr(experts, "is_concatenated", True))
        get, E, H, I = _fused_weights(experts, transposed=transposed, has_bias=has_bias)
        return get, E, H, I, "fused", interleaved
    raise UnsupportedBlock(f"experts is {type(experts).__name__}: neither an nn.ModuleList of MLPs nor a module "
                           "with 3-D gate_up_proj/down_proj parameters")


# -- routing ----------------------------------------------------------------------------

def _router_logits(gate: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Logits from a router module returning ``(logits, scores, ids)`` (transformers 5)."""
    out = gate(h)
    if not (isinstance(out, tuple) and len(out) == 3):
        raise TypeError(f"{type(gate).__name__} returned {type(out).__name__}"
                        f"{f' of {len(out)}' if isinstance(out, tuple) else ''}; expected (logits, scores, ids)")
    return out[0]


def _softmax_router(block: nn.Module, gate: Any, k: int, renormalize: bool) -> tuple[RouteFn, bool]:
    """Routing of Mixtral / Qwen-MoE: softmax over all experts, top-k, optional renormalize.

    A plain ``nn.Linear`` gate (transformers 4) makes the block return ``(hidden, logits)``.
    """
    if isinstance(gate, nn.Linear):
        def route_linear(h: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
            logits = gate(h)
            w, ids = select_experts(logits, k, renormalize=renormalize)
            return logits, w, ids
        return route_linear, True
    if isinstance(gate, nn.Module) and hasattr(gate, "weight"):
        def route_module(h: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
            logits = _router_logits(gate, h)           # call the module: output recorders still see it
            w, ids = select_experts(logits, k, renormalize=renormalize)
            return None, w, ids
        return route_module, False
    raise UnsupportedBlock(f"gate is {type(gate).__name__}, expected nn.Linear or a router module with .weight")


# -- architectures ----------------------------------------------------------------------

def _mixtral(block: nn.Module, config: Any) -> BlockPlan:
    get, E, H, I, layout, interleaved = _read_experts(block.experts, ("w1", "w3", "w2"))
    k = int(_attr("top_k", block, block.gate))
    route, returns_aux = _softmax_router(block, block.gate, k, renormalize=True)
    layer = MoELayer(num_local_experts=E, num_experts=E, top_k=k, hidden_size=H, intermediate_size=I,
                     activation=_activation(config, "mixtral"),
                     gate_up_layout="interleaved" if interleaved else "halves")
    return BlockPlan("mixtral", layer, get, route, None, returns_aux, layout)


def _qwen_moe(arch: str, with_shared: bool) -> Callable[[nn.Module, Any], BlockPlan]:
    def plan(block: nn.Module, config: Any) -> BlockPlan:
        get, E, H, I, layout, interleaved = _read_experts(block.experts, ("gate_proj", "up_proj", "down_proj"))
        k = int(_attr("top_k", block, block.gate))
        renorm = bool(_attr("norm_topk_prob", block, block.gate))
        route, returns_aux = _softmax_router(block, block.gate, k, renormalize=renorm)
        shared = None
        if with_shared:
            expert, expert_gate = block.shared_expert, block.shared_expert_gate

            def shared(h: torch.Tensor) -> torch.Tensor:
                return F.sigmoid(expert_gate(h)) * expert(h)
        layer = MoELayer(num_local_experts=E, num_experts=E, top_k=k, hidden_size=H, intermediate_size=I,
                         activation=_activation(config, arch),
                         gate_up_layout="interleaved" if interleaved else "halves")
        return BlockPlan(arch, layer, get, route, shared, returns_aux, layout)
    return plan


def _deepseek_v3(block: nn.Module, config: Any) -> BlockPlan:
    get, E, H, I, layout, interleaved = _read_experts(block.experts, ("gate_proj", "up_proj", "down_proj"))
    gate = block.gate
    k = int(_attr("top_k", gate))
    n_group = int(_attr("num_group", gate) if hasattr(gate, "num_group") else _attr("n_group", gate))
    topk_group = int(_attr("topk_group", gate))
    renorm = bool(_attr("norm_topk_prob", gate))
    scaling = float(_attr("routed_scaling_factor", gate))
    bias = _attr("e_score_correction_bias", gate)
    weight = _attr("weight", gate)
    if tuple(weight.shape) != (E, H):
        raise UnsupportedBlock(f"gate.weight has shape {list(weight.shape)}, expected [{E}, {H}]")
    legacy_router = hasattr(gate, "get_topk_indices")    # transformers 4: returns (ids, weights), no logits

    def route(h: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
        if legacy_router:
            logits = F.linear(h.float(), gate.weight.float())      # exactly as the router computes them
        else:
            logits = _router_logits(gate, h)
        w, ids = select_experts(logits, k, renormalize=renorm, scoring_func="sigmoid",
                                num_expert_group=n_group, topk_group=topk_group,
                                correction_bias=gate.e_score_correction_bias)
        return None, w, ids

    if bias is None or tuple(bias.shape) != (E,):
        raise UnsupportedBlock(f"gate.e_score_correction_bias is {None if bias is None else list(bias.shape)}, "
                               f"expected [{E}]")
    layer = MoELayer(num_local_experts=E, num_experts=E, top_k=k, hidden_size=H, intermediate_size=I,
                     activation=_activation(config, "deepseek_v3"), routed_scaling_factor=scaling,
                     gate_up_layout="interleaved" if interleaved else "halves")
    return BlockPlan("deepseek_v3", layer, get, route, block.shared_experts, False, layout)


def _gpt_oss(block: nn.Module, config: Any) -> BlockPlan:
    experts, router = block.experts, block.router
    # transformers 4 and 5 both store [E, H, 2I] (interleaved gate/up) and [E, I, H], with biases
    get, E, H, I, layout, interleaved = _read_experts(experts, ("gate_proj", "up_proj", "down_proj"),
                                                      transposed=True, has_bias=True)
    if not hasattr(experts, "is_concatenated"):
        interleaved = True
    if not interleaved:
        raise UnsupportedBlock("gpt-oss experts with concatenated gate/up halves are not mapped")
    k = int(_attr("top_k", router))
    alpha, limit = float(_attr("alpha", experts)), float(_attr("limit", experts))

    # gpt-oss routing is "top-k of the logits, softmax over the k", i.e. select_experts(softmax,
    # renormalize=True) -- but on bf16 logits ties are common, and a top-k of the fp32 softmax may break
    # them differently from the router's top-k of the logits. The router runs anyway (the block returns
    # its scores), so its own choice is reused: exact by construction.
    def route(h: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
        out = router(h)
        if isinstance(out, tuple) and len(out) == 3:      # transformers 5: (logits, top-k scores [M, k], ids)
            aux, ids = out[1], out[2]
            w = out[1]
        elif isinstance(out, tuple) and len(out) == 2:    # transformers 4: (dense scores [M, E], ids)
            aux, ids = out[0], out[1]
            w = out[0].gather(1, ids)
        else:
            raise TypeError(f"{type(router).__name__} returned {type(out).__name__}; expected a 2- or 3-tuple")
        return aux, w.float().contiguous(), ids.to(torch.int32).contiguous()

    layer = MoELayer(num_local_experts=E, num_experts=E, top_k=k, hidden_size=H, intermediate_size=I,
                     activation="swiglu_oai", gemm1_alpha=alpha, gemm1_limit=limit, gate_up_layout="interleaved")
    return BlockPlan("gpt_oss", layer, get, route, None, True, layout)


#: block class name -> reader; a block is matched by the name of its class or a base class
SUPPORTED_BLOCKS: dict[str, Callable[[nn.Module, Any], BlockPlan]] = {
    "MixtralSparseMoeBlock": _mixtral,
    "Qwen2MoeSparseMoeBlock": _qwen_moe("qwen2_moe", with_shared=True),
    "Qwen3MoeSparseMoeBlock": _qwen_moe("qwen3_moe", with_shared=False),
    "DeepseekV3MoE": _deepseek_v3,
    "GptOssMLP": _gpt_oss,
}


def supported_name(block: nn.Module) -> str | None:
    """The :data:`SUPPORTED_BLOCKS` key matching ``block``'s class or a base class, else None."""
    for cls in type(block).__mro__:
        if cls.__name__ in SUPPORTED_BLOCKS:
            return cls.__name__
    return None


def looks_like_moe(module: nn.Module) -> bool:
    """A module that holds experts (an ``experts`` submodule) or is a supported block class."""
    return supported_name(module) is not None or isinstance(getattr(module, "experts", None), nn.Module)


def plan_block(block: nn.Module, config: Any) -> BlockPlan:
    """The :class:`BlockPlan` of a supported block; :class:`UnsupportedBlock` says why not."""
    name = supported_name(block)
    if name is None:
        raise UnsupportedBlock(f"{type(block).__name__} is not a supported MoE block "
                               f"(supported: {', '.join(SUPPORTED_BLOCKS)})")
    block_config = config
    for owner in (block, getattr(block, "experts", None)):
        if getattr(owner, "config", None) is not None:
            block_config = owner.config
            break
    try:
        return SUPPORTED_BLOCKS[name](block, block_config)
    except AttributeError as exc:           # a version of the block without an expected attribute
        raise UnsupportedBlock(f"{type(block).__name__}: {exc}") from exc
