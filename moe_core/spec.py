"""Value types of moe-core: the layer (:class:`MoELayer`), the quantization
(:class:`QuantSpec`), the weights (:class:`ExpertWeights`) and the resolved
:class:`Plan` of one forward pass.

Everything here is an ``@attrs.frozen`` value: validated at construction, changed
with ``attrs.evolve``. Checks that need the weights' shapes (scale layouts against
``E``, ``N``, ``K``) live in :mod:`moe_core.validate`.
"""

from __future__ import annotations

import math
import types
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import attrs
import torch
from attrs import validators as v

from moe_core.errors import MoEInputError, MoETypeError

if TYPE_CHECKING:
    from moe_core.backend import Backend
    from moe_core.plugins import HookSet

__all__ = ["ACTIVATIONS", "GATE_UP_LAYOUTS", "QUANT_SCHEMES", "MoELayer", "QuantSpec",
           "ExpertWeights", "Plan"]

#: activation name -> whether it may be gated / non-gated (SEMANTICS §4.3)
ACTIVATIONS: Mapping[str, tuple[bool, bool]] = types.MappingProxyType({
    "silu": (True, True),
    "gelu": (True, True),
    "relu2": (False, True),
    "swiglu_oai": (True, False),
})
GATE_UP_LAYOUTS = ("halves", "interleaved")
QUANT_SCHEMES = ("none", "fp8_w8a8", "int8_w8a8", "int8_w8a16", "int4_w4a16")


def _optional_positive_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    _positive_int(instance, attribute, value)


def _positive_int(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MoETypeError(f"{attribute.name}: expected an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise MoEInputError(f"{attribute.name}: expected an int >= 1, got {value}")


def _optional_finite_float(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MoETypeError(f"{attribute.name}: expected a float or None, got {type(value).__name__}")
    if not math.isfinite(value):
        raise MoEInputError(f"{attribute.name}: expected a finite number, got {value}")


def _default_layout(self: MoELayer) -> str:
    return "interleaved" if self.activation == "swiglu_oai" else "halves"


@attrs.frozen(eq=False)
class MoELayer:
    """The static description of one MoE layer.

    :param num_experts: global routed experts ``E_g`` (fused shared experts included);
        ``None`` when unknown, which turns ``filter_expert`` on.
    :param num_local_experts: experts held by this rank (``E`` of the weights).
    :param top_k: experts per token ``k``.
    :param hidden_size: ``H``.
    :param intermediate_size: ``I`` per expert and per tensor-parallel partition.
    :param activation: ``silu``, ``gelu``, ``relu2`` (non-gated only) or ``swiglu_oai``.
    :param is_gated: gated activations read ``w1`` as ``N = 2·I`` rows (gate then up).
    :param gate_up_layout: ``halves`` (gate rows ``[0, I)``, up rows ``[I, 2I)``) or
        ``interleaved`` (even rows gate, odd rows up; gpt-oss). Default: ``interleaved``
        for ``swiglu_oai``, else ``halves``.
    :param apply_router_weight_on_input: multiply the routed weight in gemm1 (needs ``k == 1``).
    :param routed_scaling_factor: ``s`` of the combine; ``None`` means 1.
    :param gemm1_alpha: ``alpha`` of ``swiglu_oai``.
    :param gemm1_limit: clamp ``limit`` of ``swiglu_oai`` / limited ``silu``.
    :param ep_rank: this rank's index under expert parallelism.
    :param ep_size: ranks sharing the experts.
    :param expert_map: optional explicit int32 table [E_g] global -> local id (``-1`` remote).
    :param num_fused_shared_experts: ``S`` shared experts fused as the last ``S`` ids.
    """

    num_local_experts: int = attrs.field(validator=_positive_int)
    top_k: int = attrs.field(validator=_positive_int)
    hidden_size: int = attrs.field(validator=_positive_int)
    intermediate_size: int = attrs.field(validator=_positive_int)
    num_experts: int | None = attrs.field(default=attrs.Factory(lambda s: s.num_local_experts, takes_self=True),
                                          validator=_optional_positive_int)
    activation: str = attrs.field(default="silu", validator=v.instance_of(str))
    is_gated: bool = attrs.field(default=True, validator=v.instance_of(bool))
    gate_up_layout: str = attrs.field(default=attrs.Factory(_default_layout, takes_self=True))
    apply_router_weight_on_input: bool = attrs.field(default=False, validator=v.instance_of(bool))
    routed_scaling_factor: float | None = attrs.field(default=None, validator=_optional_finite_float)
    gemm1_alpha: float | None = attrs.field(default=None, validator=_optional_finite_float)
    gemm1_limit: float | None = attrs.field(default=None, validator=_optional_finite_float)
    ep_rank: int = attrs.field(default=0, validator=[v.instance_of(int), v.ge(0)])
    ep_size: int = attrs.field(default=1, validator=_positive_int)
    expert_map: torch.Tensor | None = attrs.field(default=None, repr=False)
    num_fused_shared_experts: int = attrs.field(default=0, validator=[v.instance_of(int), v.ge(0)])

    def __attrs_post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise MoEInputError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        gated_ok, plain_ok = ACTIVATIONS[self.activation]
        if self.is_gated and not gated_ok:
            raise MoEInputError(f"activation: {self.activation!r} exists only non-gated; pass is_gated=False")
        if not self.is_gated and not plain_ok:
            raise MoEInputError(f"activation: {self.activation!r} exists only gated; pass is_gated=True")
        if self.gate_up_layout not in GATE_UP_LAYOUTS:
            raise MoEInputError(f"gate_up_layout: expected one of {GATE_UP_LAYOUTS}, got {self.gate_up_layout!r}")
        if self.activation == "swiglu_oai" and (self.gemm1_alpha is None or self.gemm1_limit is None):
            raise MoEInputError("activation='swiglu_oai' needs gemm1_alpha and gemm1_limit "
                                f"(gpt-oss: 1.702 and 7.0), got alpha={self.gemm1_alpha}, limit={self.gemm1_limit}")
        if self.gemm1_alpha is not None and self.activation != "swiglu_oai":
            raise MoEInputError(f"gemm1_alpha is only used by activation='swiglu_oai', got activation={self.activation!r}")
        if self.gemm1_limit is not None and not (self.activation in ("silu", "swiglu_oai") and self.is_gated):
            raise MoEInputError("gemm1_limit applies to gated 'silu' or 'swiglu_oai' only, "
                                f"got activation={self.activation!r}, is_gated={self.is_gated}")
        if self.gemm1_limit is not None and self.gemm1_limit <= 0:
            raise MoEInputError(f"gemm1_limit: expected > 0, got {self.gemm1_limit}")
        if self.apply_router_weight_on_input and self.top_k != 1:
            raise MoEInputError("apply_router_weight_on_input needs top_k == 1 "
                                f"(a nonlinearity lies between the GEMMs), got top_k={self.top_k}")
        if self.num_experts is not None and self.top_k > self.num_experts:
            raise MoEInputError(f"top_k: expected <= num_experts={self.num_experts}, got {self.top_k}")
        if self.ep_rank >= self.ep_size:
            raise MoEInputError(f"ep_rank: expected < ep_size={self.ep_size}, got {self.ep_rank}")
        if self.num_fused_shared_experts > self.num_local_experts:
            raise MoEInputError(f"num_fused_shared_experts: expected <= num_local_experts="
                                f"{self.num_local_experts}, got {self.num_fused_shared_experts}")
        if self.expert_map is not None:
            if not isinstance(self.expert_map, torch.Tensor):
                raise MoETypeError(f"expert_map: expected an int32 tensor, got {type(self.expert_map).__name__}")
            if self.num_experts is None:
                raise MoEInputError("expert_map needs num_experts (its length), got num_experts=None")

    @property
    def filter_expert(self) -> bool:
        """Whether ids need the global -> local mapping of step 1 (SEMANTICS §7)."""
        return self.num_experts is None or self.num_experts != self.num_local_experts

    def expert_table(self) -> torch.Tensor:
        """The int32 [E_g] global -> local expert-id table on the CPU (SEMANTICS §7).

        Filled with ``-1``; global ``[rank·L, (rank+1)·L)`` maps to ``0 … L−1`` (L local routed
        experts), the last S global ids (fused shared experts) to ``L … L+S−1``; an explicit
        ``expert_map`` replaces it after its checks.

        :raises MoEInputError: ``num_experts`` unknown; an ``expert_map`` that is not int32
            [E_g] with values in ``[-1, E)`` and distinct local ids; an uneven placement
            without ``expert_map``.
        """
        E_g = self.num_experts
        E = self.num_local_experts
        if E_g is None:
            raise MoEInputError("num_experts: the global expert count is needed for an id table, got None")
        if self.expert_map is not None:
            table = self.expert_map
            if table.dim() != 1 or table.shape[0] != E_g:
                raise MoEInputError(f"expert_map: expected a 1-D table of length num_experts = {E_g}, "
                                    f"got shape {list(table.shape)}")
            if table.dtype != torch.int32:
                raise MoEInputError(f"expert_map: expected dtype torch.int32, got {table.dtype}")
            cpu = table.cpu()
            if bool(((cpu < -1) | (cpu >= E)).any()):
                raise MoEInputError(f"expert_map: values must lie in [-1, {E}) (num_local_experts)")
            used = cpu[cpu >= 0]
            if used.unique().numel() != used.numel():
                raise MoEInputError("expert_map: two global ids map to the same local id")
            return cpu
        S = self.num_fused_shared_experts
        L = E - S
        routed_global = E_g - S
        if self.ep_size * L != routed_global:
            raise MoEInputError(f"layer: ep_size·local routed experts = {self.ep_size}·{L} must equal the global "
                                f"routed experts {routed_global}; pass expert_map for uneven placements")
        table = torch.full((E_g,), -1, dtype=torch.int32)
        start = self.ep_rank * L
        table[start:start + L] = torch.arange(L, dtype=torch.int32)
        if S:
            table[routed_global:] = torch.arange(L, L + S, dtype=torch.int32)
        return table

    @property
    def gate_up_rows(self) -> int:
        """``N``: rows of ``w1`` (``2·I`` gated, ``I`` otherwise)."""
        return 2 * self.intermediate_size if self.is_gated else self.intermediate_size

    @property
    def scaling(self) -> float:
        """The combine factor ``s`` (1.0 when ``routed_scaling_factor`` is None)."""
        return 1.0 if self.routed_scaling_factor is None else float(self.routed_scaling_factor)


def _check_scale(name: str, t: Any, *, required: bool = True) -> None:
    if t is None:
        if required:
            raise MoEInputError(f"{name}: this scheme needs a scale tensor, got None")
        return
    if not isinstance(t, torch.Tensor):
        raise MoETypeError(f"{name}: expected a float32 tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise MoETypeError(f"{name}: expected dtype torch.float32, got {t.dtype}")


def _tensor_field(**kw: Any) -> Any:
    return attrs.field(default=None, repr=lambda t: "None" if t is None else f"Tensor{tuple(t.shape)}", **kw)


@attrs.frozen(eq=False)
class QuantSpec:
    """How the expert weights are quantized; build it with a named constructor.

    ``scheme`` is one of ``none``, ``fp8_w8a8``, ``int8_w8a8``, ``int8_w8a16``,
    ``int4_w4a16``. Scale layouts (SEMANTICS §4.1) are checked against the weights
    when the forward is prepared; here only types and self-consistency.
    ``a1_scale``/``a2_scale`` given means static activation quantization, absent dynamic.
    """

    scheme: str = attrs.field(default="none", validator=v.in_(QUANT_SCHEMES))
    w1_scale: torch.Tensor | None = _tensor_field()
    w2_scale: torch.Tensor | None = _tensor_field()
    a1_scale: torch.Tensor | None = _tensor_field()
    a2_scale: torch.Tensor | None = _tensor_field()
    per_channel: bool = False
    block_shape: tuple[int, int] | None = None
    group_size: int | None = None
    w1_zp: torch.Tensor | None = _tensor_field()
    w2_zp: torch.Tensor | None = _tensor_field()

    #: names of the tensor fields (scales and zero points), in declaration order
    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("w1_scale", "w2_scale", "a1_scale", "a2_scale", "w1_zp", "w2_zp")

    @classmethod
    def none(cls) -> QuantSpec:
        """Unquantized weights in the activation dtype."""
        return cls()

    @classmethod
    def _w8a8(cls, scheme: str, w1_scale: torch.Tensor, w2_scale: torch.Tensor, *,
              a1_scale: torch.Tensor | None, a2_scale: torch.Tensor | None,
              per_channel: bool, block_shape: tuple[int, int] | list[int] | None) -> QuantSpec:
        for name, t, req in (("w1_scale", w1_scale, True), ("w2_scale", w2_scale, True),
                             ("a1_scale", a1_scale, False), ("a2_scale", a2_scale, False)):
            _check_scale(name, t, required=req)
        if block_shape is not None:
            block_shape = tuple(block_shape)
            if len(block_shape) != 2 or not all(isinstance(b, int) and b > 0 for b in block_shape):
                raise MoEInputError(f"block_shape: expected two positive ints [bn, bk], got {block_shape!r}")
            if per_channel:
                raise MoEInputError("per_channel=True and block_shape are two schemes; pass one of them")
            if a1_scale is not None or a2_scale is not None:
                raise MoEInputError("block-wise quantization computes activation scales per token group; "
                                    "a1_scale/a2_scale must be None")
        for name, t in (("a1_scale", a1_scale), ("a2_scale", a2_scale)):
            if t is not None and t.dim() == 1 and t.numel() != 1:
                raise MoEInputError(f"{name}: a 1-D activation scale must have numel 1 (per-tensor); "
                                    f"per-token scales are [rows, 1], got shape {tuple(t.shape)}")
        return cls(scheme=scheme, w1_scale=w1_scale, w2_scale=w2_scale, a1_scale=a1_scale,
                   a2_scale=a2_scale, per_channel=bool(per_channel), block_shape=block_shape)

    @classmethod
    def fp8_w8a8(cls, w1_scale: torch.Tensor, w2_scale: torch.Tensor, *,
                 a1_scale: torch.Tensor | None = None, a2_scale: torch.Tensor | None = None,
                 per_channel: bool = False, block_shape: tuple[int, int] | None = None) -> QuantSpec:
        """fp8 weights and activations: per-tensor (w scale [E]), per-token × per-channel
        (``per_channel=True``, w scale [E, N_out(, 1)]) or block-wise
        (``block_shape=(bn, bk)``, w scale [E, ⌈N_out/bn⌉, ⌈K/bk⌉])."""
        return cls._w8a8("fp8_w8a8", w1_scale, w2_scale, a1_scale=a1_scale, a2_scale=a2_scale,
                         per_channel=per_channel, block_shape=block_shape)

    @classmethod
    def int8_w8a8(cls, w1_scale: torch.Tensor, w2_scale: torch.Tensor, *,
                  a1_scale: torch.Tensor | None = None, a2_scale: torch.Tensor | None = None,
                  per_channel: bool = False, block_shape: tuple[int, int] | None = None) -> QuantSpec:
        """int8 weights and activations, with the same three layouts as :meth:`fp8_w8a8`."""
        return cls._w8a8("int8_w8a8", w1_scale, w2_scale, a1_scale=a1_scale, a2_scale=a2_scale,
                         per_channel=per_channel, block_shape=block_shape)

    @classmethod
    def int8_w8a16(cls, w1_scale: torch.Tensor, w2_scale: torch.Tensor, *,
                   group_size: int | None = None, w1_zp: torch.Tensor | None = None,
                   w2_zp: torch.Tensor | None = None) -> QuantSpec:
        """int8 weights, 16-bit activations. Per-channel (``group_size=None``: signed int8
        weights, scale [E, N_out], no zero point) or grouped (uint8 weights, scale
        [E, N_out, K/g], zero points [E, N_out, K/g], default 128)."""
        _check_scale("w1_scale", w1_scale)
        _check_scale("w2_scale", w2_scale)
        if group_size is None and (w1_zp is not None or w2_zp is not None):
            raise MoEInputError("int8_w8a16 per-channel has no zero points; pass group_size for grouped weights")
        return cls._weight_only("int8_w8a16", w1_scale, w2_scale, group_size, w1_zp, w2_zp)

    @classmethod
    def int4_w4a16(cls, w1_scale: torch.Tensor, w2_scale: torch.Tensor, *, group_size: int,
                   w1_zp: torch.Tensor | None = None, w2_zp: torch.Tensor | None = None) -> QuantSpec:
        """int4 weights packed two per byte along K (uint8, low nibble first), group
        scales [E, N_out, K/g], optional zero points packed along N [E, N_out/2, K/g]
        (default 8). Value = ``(q − zp)·scale``."""
        _check_scale("w1_scale", w1_scale)
        _check_scale("w2_scale", w2_scale)
        if group_size is None:
            raise MoEInputError("int4_w4a16: group_size is required, got None")
        return cls._weight_only("int4_w4a16", w1_scale, w2_scale, group_size, w1_zp, w2_zp)

    @classmethod
    def _weight_only(cls, scheme: str, w1_scale: torch.Tensor, w2_scale: torch.Tensor,
                     group_size: int | None, w1_zp: torch.Tensor | None, w2_zp: torch.Tensor | None) -> QuantSpec:
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                       or group_size < 1):
            raise MoEInputError(f"group_size: expected a positive int, got {group_size!r}")
        if (w1_zp is None) != (w2_zp is None):
            raise MoEInputError("w1_zp and w2_zp: pass both zero-point tensors or neither")
        for name, t in (("w1_zp", w1_zp), ("w2_zp", w2_zp)):
            if t is not None and (not isinstance(t, torch.Tensor) or t.dtype not in (torch.uint8, torch.int8, torch.int32)):
                raise MoETypeError(f"{name}: expected a uint8 tensor, got "
                                   f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        return cls(scheme=scheme, w1_scale=w1_scale, w2_scale=w2_scale, group_size=group_size,
                   w1_zp=w1_zp, w2_zp=w2_zp)

    # -- derived facts -------------------------------------------------------------
    @property
    def is_quantized(self) -> bool:
        """Whether the weights are anything but the activation dtype."""
        return self.scheme != "none"

    @property
    def is_w8a8(self) -> bool:
        """Whether activations are quantized too (fp8 or int8 w8a8)."""
        return self.scheme in ("fp8_w8a8", "int8_w8a8")

    @property
    def is_weight_only(self) -> bool:
        """int8 w8a16 or int4 w4a16: weights dequantized inside the GEMM."""
        return self.scheme in ("int8_w8a16", "int4_w4a16")

    @property
    def is_block(self) -> bool:
        """Block-wise w8a8 with a non-zero ``[bn, bk]``."""
        return self.block_shape is not None and all(self.block_shape)

    @property
    def has_zero_points(self) -> bool:
        """Whether explicit zero points were given (grouped weight-only schemes)."""
        return self.w1_zp is not None

    def config_dtype(self, act_dtype: torch.dtype) -> str | None:
        """The ``dtype=`` part of config file names (SEMANTICS §4.2)."""
        if self.scheme != "none":
            return self.scheme
        return "float32" if act_dtype == torch.float32 else None


@attrs.frozen(eq=False)
class ExpertWeights:
    """The weights of one MoE layer, as the runner takes them.

    :param w1: [E, N, H] (int4: [E, N, H/2] packed) gate/up weights.
    :param w2: [E, H, I] (int4: [E, H, I/2]) down weights.
    :param b1: optional [E, N] bias of gemm1 (compute dtype).
    :param b2: optional [E, H] bias of gemm2.
    :param quant: the :class:`QuantSpec` (default: unquantized).
    """

    w1: torch.Tensor
    w2: torch.Tensor
    b1: torch.Tensor | None = attrs.field(default=None, repr=False)
    b2: torch.Tensor | None = attrs.field(default=None, repr=False)
    quant: QuantSpec = attrs.field(factory=QuantSpec.none, validator=v.instance_of(QuantSpec))

    def __attrs_post_init__(self) -> None:
        for name in ("w1", "w2"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise MoETypeError(f"{name}: expected a torch.Tensor, got {type(getattr(self, name)).__name__}")


@attrs.frozen(eq=False)
class Plan:
    """Everything resolved before the kernels run (steps 0–2): backend, configs, hooks.

    Built by :func:`moe_core.sequence.prepare`; read by :func:`moe_core.sequence.run`.
    Plain data, so a compiled or graph-captured region never looks anything up.
    """

    backend: Backend
    layer: MoELayer
    quant: QuantSpec
    #: gemm1 launch config (whitelisted keys only)
    config: Mapping[str, Any] = attrs.field(converter=lambda d: types.MappingProxyType(dict(d)))
    #: gemm2 launch config; shares BLOCK_SIZE_M with ``config``
    down_config: Mapping[str, Any] = attrs.field(converter=lambda d: types.MappingProxyType(dict(d)))
    #: the hooks of this forward (None-valued callers when nothing is registered)
    hooks: HookSet
    #: why each config was chosen (source, key, dropped keys), for ``explain()``
    why: Mapping[str, Any] = attrs.field(factory=dict, converter=lambda d: types.MappingProxyType(dict(d)))
    #: gemm1 writes ``act`` directly (the backend fuses the activation; no after_gate_up hook)
    fused_activation: bool = False
    #: sorted mode (SEMANTICS §3 step 10): the fused gemm1 stores ``act`` by position in
    #: ``sorted_token_ids`` and gemm2 reads it so (``USE_TMA`` kept in ``down_config``)
    sorted_intermediate: bool = False

    @property
    def block_m(self) -> int:
        """``BLOCK_SIZE_M`` shared by both GEMMs and the alignment."""
        return int(self.config["BLOCK_SIZE_M"])
