"""Preset MoE layer shapes of public models (/work/shared/MODELS.md), one layer each.

Used by ``moe-core run``, ``configs``, ``tune`` and ``bench``. Facts only: sizes, routing
and activation as the models' public configuration files give them.
"""

from __future__ import annotations

import types
from typing import Any, Mapping

import attrs

from moe_core.errors import MoEInputError
from moe_core.spec import MoELayer

__all__ = ["Preset", "PRESETS", "get_preset"]


@attrs.frozen
class Preset:
    """One model's MoE layer shape and routing.

    :param name: preset id (``qwen3-30b-a3b``).
    :param num_experts: routed experts ``E``.
    :param top_k: experts per token ``k``.
    :param hidden_size: ``H``.
    :param intermediate_size: ``I`` per expert (before tensor parallelism).
    :param num_shared_experts: dense shared experts every token passes through (same ``I``).
    :param scoring_func: router scoring, ``softmax`` or ``sigmoid``.
    :param renormalize: whether the top-k weights are renormalised to sum to 1.
    :param num_expert_group: expert groups of grouped routing (None: not grouped).
    :param topk_group: groups kept per token under grouped routing.
    :param routed_scaling_factor: the combine factor ``s`` (None means 1).
    :param activation: ``silu`` or ``swiglu_oai`` (all presets are gated).
    :param gate_up_layout: ``halves`` or ``interleaved`` (gpt-oss).
    :param gemm1_alpha: ``alpha`` of ``swiglu_oai``.
    :param gemm1_limit: clamp ``limit`` of ``swiglu_oai``.
    :param has_bias: whether the experts carry biases ``b1`` and ``b2``.
    :param weight_block_shape: ``[bn, bk]`` of the shipped fp8 block weights, if any.
    """

    name: str
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    num_shared_experts: int = 0
    scoring_func: str = "softmax"
    renormalize: bool = True
    num_expert_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float | None = None
    activation: str = "silu"
    gate_up_layout: str = "halves"
    gemm1_alpha: float | None = None
    gemm1_limit: float | None = None
    has_bias: bool = False
    weight_block_shape: tuple[int, int] | None = None

    def layer(self, **overrides: Any) -> MoELayer:
        """The :class:`MoELayer` of this preset (all experts local, gated).

        :param overrides: any :class:`MoELayer` field (``num_local_experts``, ``ep_rank``,
            ``intermediate_size`` per TP partition, ...); ``tp=n`` divides ``I`` by ``n``.
        """
        tp = overrides.pop("tp", 1)
        if not isinstance(tp, int) or tp < 1 or self.intermediate_size % tp:
            raise MoEInputError(f"tp: expected a positive divisor of intermediate_size="
                                f"{self.intermediate_size}, got {tp!r}")
        kw: dict[str, Any] = dict(
            num_experts=self.num_experts, num_local_experts=self.num_experts, top_k=self.top_k,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size // tp,
            activation=self.activation, is_gated=True, gate_up_layout=self.gate_up_layout,
            routed_scaling_factor=self.routed_scaling_factor, gemm1_alpha=self.gemm1_alpha,
            gemm1_limit=self.gemm1_limit)
        kw.update(overrides)
        return MoELayer(**kw)


_GPT_OSS = dict(top_k=4, hidden_size=2880, intermediate_size=2880, renormalize=True,
                activation="swiglu_oai", gate_up_layout="interleaved", gemm1_alpha=1.702,
                gemm1_limit=7.0, has_bias=True)

#: preset name -> :class:`Preset` (read-only)
PRESETS: Mapping[str, Preset] = types.MappingProxyType({p.name: p for p in (
    Preset("mixtral-8x7b", num_experts=8, top_k=2, hidden_size=4096, intermediate_size=14336),
    Preset("qwen3-30b-a3b", num_experts=128, top_k=8, hidden_size=2048, intermediate_size=768),
    Preset("qwen3-235b-a22b", num_experts=128, top_k=8, hidden_size=4096, intermediate_size=1536),
    Preset("deepseek-v2-lite", num_experts=64, top_k=6, hidden_size=2048, intermediate_size=1408,
           num_shared_experts=2, renormalize=False, routed_scaling_factor=1.0),
    Preset("deepseek-v3", num_experts=256, top_k=8, hidden_size=7168, intermediate_size=2048,
           num_shared_experts=1, scoring_func="sigmoid", renormalize=True, num_expert_group=8,
           topk_group=4, routed_scaling_factor=2.5, weight_block_shape=(128, 128)),
    Preset("gpt-oss-20b", num_experts=32, **_GPT_OSS),
    Preset("gpt-oss-120b", num_experts=128, **_GPT_OSS),
)})


def get_preset(name: str) -> Preset:
    """The preset called ``name``; :class:`MoEInputError` listing the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise MoEInputError(f"model: expected one of {sorted(PRESETS)}, got {name!r}") from None
