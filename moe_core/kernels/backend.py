"""``TritonBackend``: the shared Triton implementation of every step of the sequence.

The CUDA, HIP and XPU backends subclass it and declare data and predicates only (name,
platform, config keys, fp8 dtype, device facts); none re-implements a step. Import-light:
Triton and the kernel modules are imported when a step first runs, so entry-point
targets that subclass this stay cheap. Under ``TRITON_INTERPRET=1`` the same code runs on
CPU tensors (tests).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import TYPE_CHECKING, Any, Callable

import torch

from moe_core.backend import BASE_CONFIG_KEYS, Backend

if TYPE_CHECKING:
    from moe_core.spec import MoELayer, QuantSpec

__all__ = ["TritonBackend", "interpreting"]

logger = logging.getLogger(__name__)


def interpreting() -> bool:
    """Whether Triton kernels run under the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _kernel_function(module: str, attr: str) -> Callable[..., Any] | None:
    """``module.attr`` when that kernel module exists, else None (torch fallback).

    Only a missing module counts as "not there yet"; any other import error propagates.
    """
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            logger.debug("kernel module %s not present; using the torch fallback", module)
            return None
        raise
    return getattr(mod, attr)


@functools.lru_cache(maxsize=None)
def _device_properties(index: int) -> dict[str, Any]:
    from triton.runtime import driver

    return dict(driver.active.utils.get_device_properties(index))


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))  # type: ignore[return-value]


class TritonBackend(Backend):
    """Every step of the forward pass through the shared Triton kernels.

    Subclasses set ``name``/``platform``/``priority`` and override ``is_available`` and
    the device predicates; they never re-implement a step.
    """

    name = "triton"
    platform = "triton"
    priority = 0
    #: ``USE_TMA`` (a ``_down`` entry): sorted mode, gemm2 reading ``act`` through TMA
    config_keys = BASE_CONFIG_KEYS | {"USE_TMA"}
    #: minimum (major, minor) compute capability for fp8 w8a8 on this platform; None: no fp8
    fp8_min_capability: tuple[int, int] | None = (8, 9)
    #: gemm1 applies the activation in its epilogue when no hook needs ``gate_up``. Off here;
    #: a backend turns it on once measured on its hardware (benchmarks/NOTES.md, attempt 6).
    fuse_activation: bool = False
    #: with ``fuse_activation``, fuse only where gemm1's ``BLOCK_SIZE_M · BLOCK_SIZE_N`` is at
    #: most this (None: every tile)
    fuse_activation_max_tile: int | None = None

    # -- capability ------------------------------------------------------------------
    def is_available(self) -> tuple[bool, str]:
        if interpreting():
            return True, "TRITON_INTERPRET=1: kernels run on CPU tensors under the interpreter"
        if not torch.cuda.is_available():
            return False, "torch sees no GPU and the Triton interpreter is off"
        return True, ""

    def device(self) -> torch.device:
        if not interpreting() and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _on_gpu(self) -> bool:
        return self.device().type != "cpu"

    def capability(self) -> tuple[int, int] | None:
        """Compute capability of the current device, None under the interpreter."""
        if not self._on_gpu():
            return None
        return _capability(torch.cuda.current_device())     # asked per GEMM (uses_weight_tma)

    def supports_fp8(self) -> tuple[bool, str]:
        """Whether fp8 w8a8 runs here, and why not."""
        if self.fp8_min_capability is None:
            return False, f"backend {self.name!r} has no fp8 support"
        cap = self.capability()
        if cap is None:
            return True, "Triton interpreter: fp8 loads are cast to fp32 before the dot"
        if cap < self.fp8_min_capability:
            want = ".".join(map(str, self.fp8_min_capability))
            return False, f"fp8 w8a8 needs compute capability >= {want}, device has {cap[0]}.{cap[1]}"
        return True, ""

    def supports(self, layer: MoELayer, quant: QuantSpec) -> tuple[bool, str]:
        if quant.scheme == "fp8_w8a8":
            ok, reason = self.supports_fp8()
            if not ok:
                return False, reason
        if quant.is_block:
            bn, bk = quant.block_shape
            if bk % 16:
                return False, f"block quantization needs bk divisible by 16 (BLOCK_SIZE_K), got bk = {bk}"
        return True, ""

    # -- device facts ------------------------------------------------------------------
    def device_name(self) -> str:
        if not self._on_gpu():
            return "cpu"
        return torch.cuda.get_device_name().replace(" ", "_")

    def has_tma(self) -> bool:
        """Tensor descriptors (TMA) need sm90+ on a real device."""
        cap = self.capability()
        return cap is not None and cap >= (9, 0)

    def shared_memory_limit(self) -> int | None:
        if not self._on_gpu():
            return None
        try:
            return int(_device_properties(torch.cuda.current_device())["max_shared_mem"])
        except Exception as exc:  # noqa: BLE001 - a missing property only disables the clamp
            logger.debug("could not read the shared-memory limit: %s", exc)
            return None

    def default_config(self, M: int, E: int, N: int, K: int, top_k: int, dtype: str | None,
                       block_shape: tuple[int, int] | None, *, deterministic: bool = False) -> dict[str, Any]:
        config = super().default_config(M, E, N, K, top_k, dtype, block_shape, deterministic=deterministic)
        smem = self.shared_memory_limit()
        is_block = block_shape is not None and all(block_shape)
        if not deterministic and dtype == "fp8_w8a8" and not is_block and smem is not None and smem < 128 * 1024:
            # SEMANTICS §5.5: devices with < 128 KiB opt-in shared memory
            if M <= E:
                config = {"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 256, "GROUP_SIZE_M": 1,
                          "num_warps": 4, "num_stages": 4}
            else:
                config = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 256, "GROUP_SIZE_M": 64,
                          "num_warps": 4, "num_stages": 2}
        return config

    def fuses_activation(self, layer: MoELayer, quant: QuantSpec, config: dict[str, Any]) -> bool:
        if not self.fuse_activation:
            return False
        limit = self.fuse_activation_max_tile
        return limit is None or config["BLOCK_SIZE_M"] * config["BLOCK_SIZE_N"] <= limit

    def uses_weight_tma(self, config: dict[str, Any], quant: QuantSpec, activation: MoELayer | None) -> bool:
        """Whether a GEMM with launch ``config`` reads its weight tiles through tensor descriptors
        (TMA; the kernel still falls back to pointer loads where the weights do not allow it, see
        :func:`moe_core.kernels.gemm.weight_descriptor_ok`). Results are bitwise the same either
        way; only speed differs, so a backend opts in per tile once measured. Never here.

        :param activation: gemm1's layer when its activation is fused (a gated program's tile
            is then ``BLOCK_SIZE_N / 2`` rows of gate and as many of up), else None.
        """
        return False

    # -- steps -----------------------------------------------------------------------
    def align(self, topk_ids: torch.Tensor, block_m: int,
              num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step 3 in Triton (SEMANTICS §6); a single token (M = 1) takes one block per slot in
        slot order without a kernel (:func:`moe_core.kernels.align.one_token_blocks`), which our
        grouped GEMM reads like the sorted layout. A subclass with its own ``gemm`` that needs
        the sorted layout overrides this."""
        if topk_ids.shape[0] == 1:
            one = _kernel_function("moe_core.kernels.align", "one_token_blocks")
            got = one(topk_ids, block_m) if one is not None else None
            if got is not None:
                return got
        fn = _kernel_function("moe_core.kernels.align", "moe_align_block_size_triton")
        if fn is None:
            return super().align(topk_ids, block_m, num_experts)
        return fn(topk_ids, block_m, num_experts)

    def quantize_activation(self, a: torch.Tensor, quant: QuantSpec, scale: torch.Tensor | None,
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        fn = _kernel_function("moe_core.kernels.quantize", "quantize_activation")
        if fn is None:
            return super().quantize_activation(a, quant, scale)
        qdtype = self.fp8_dtype if quant.scheme == "fp8_w8a8" else torch.int8
        return fn(a, qdtype=qdtype, per_channel=quant.per_channel,
                  group_k=quant.block_shape[1] if quant.is_block else None, static_scale=scale)

    def gemm(self, a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, *,
             a_scale: torch.Tensor | None, w_scale: torch.Tensor | None, w_zp: torch.Tensor | None,
             bias: torch.Tensor | None, topk_weights: torch.Tensor, sorted_token_ids: torch.Tensor,
             expert_ids: torch.Tensor, num_tokens_post_padded: torch.Tensor, top_k: int,
             mul_routed_weight: bool, quant: QuantSpec, config: dict[str, Any],
             activation: MoELayer | None = None, sorted_out: bool = False,
             sorted_in: bool = False) -> torch.Tensor:
        """The shared grouped GEMM; ``sorted_out`` / ``sorted_in`` are sorted mode's gemm1 and
        gemm2 (:func:`moe_core.kernels.gemm.grouped_gemm`), gemm2 reading ``a`` through TMA when
        ``config`` has ``USE_TMA``."""
        from moe_core.kernels.gemm import grouped_gemm

        weight_tma = self.uses_weight_tma(config, quant, activation)
        a_tma = sorted_in and bool(config.get("USE_TMA")) and self.has_tma()
        return grouped_gemm(a, w, out, a_scale=a_scale, w_scale=w_scale, w_zp=w_zp, bias=bias,
                            topk_weights=topk_weights, sorted_token_ids=sorted_token_ids,
                            expert_ids=expert_ids, num_tokens_post_padded=num_tokens_post_padded,
                            top_k=top_k, mul_routed_weight=mul_routed_weight, quant=quant, config=config,
                            activation=activation, weight_tma=weight_tma, sorted_out=sorted_out,
                            sorted_in=sorted_in, a_tma=a_tma)

    def activation(self, gate_up: torch.Tensor, out: torch.Tensor, layer: MoELayer,
                   topk_ids: torch.Tensor) -> torch.Tensor:
        fn = _kernel_function("moe_core.kernels.act", "activation")
        if fn is None:
            from moe_core.reference import apply_activation

            out.copy_(apply_activation(gate_up.float(), layer))
            return out
        return fn(gate_up, out, activation=layer.activation, is_gated=layer.is_gated,
                  layout=layer.gate_up_layout, alpha=layer.gemm1_alpha, limit=layer.gemm1_limit,
                  topk_ids=topk_ids)

    def combine(self, down: torch.Tensor, out: torch.Tensor, scale: float) -> torch.Tensor:
        fn = _kernel_function("moe_core.kernels.moe_sum", "moe_sum")
        if fn is None:
            return super().combine(down, out, scale)
        return fn(down, out, scale)
