"""The :class:`Backend` base class: what a platform plugin declares and which steps
of the forward pass it may replace.

The one orchestration lives in :mod:`moe_core.sequence`; it calls the step methods
below in order. A backend overrides steps (a vendor GEMM, say) and declares data
(config keys, config dirs, default heuristics, device facts); it never re-implements
the sequence.

Step contract (shapes per SEMANTICS §1; ``slot = m·k + j``)::

    align(topk_ids [M, k] int32, block_m, E)   -> sorted_token_ids [P], expert_ids [cdiv(P, block_m)],
                                                  num_tokens_post_padded [1]            (SEMANTICS §6)
    quantize_activation(a [rows, K], quant, scale, gemm) -> a_q [rows, K], a_scale       (w8a8 only)
    gemm(a, w, out [S, N_out], ...)             -> out  (grouped GEMM of SEMANTICS §3; with
                                                  activation=layer when fuses_activation: out = act)
    activation(gate_up [S, N], out [S, N'], layer, topk_ids) -> out                    (SEMANTICS §4.3)
    combine(down [M, k, H], out [M, H], scale)  -> out                                  (SEMANTICS §9)
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

import torch

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

    from moe_core.spec import MoELayer, QuantSpec

__all__ = ["Backend", "BASE_CONFIG_KEYS", "PLUGIN_API_VERSION", "package_config_dirs"]

#: Version of the plugin contract (this class and the hookspecs). A plugin declares the
#: version it was written for; a mismatch is a :class:`PluginRegistrationError`.
PLUGIN_API_VERSION = 1


@functools.lru_cache(maxsize=None)
def package_config_dirs(package: str) -> tuple[Traversable, ...]:
    """The ``configs/`` folder shipped inside ``package`` (a backend's own tuned tables), or
    nothing. Cached: a backend's :meth:`Backend.config_dirs` is asked on every forward."""
    root = resources.files(package) / "configs"
    return (root,) if root.is_dir() else ()


#: Launch keys every Triton-style backend takes (SEMANTICS §5.1).
BASE_CONFIG_KEYS = frozenset({"BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M",
                              "num_warps", "num_stages"})


class Backend:
    """Base class of every platform backend.

    Subclasses set the class attributes and override what differs. The registry
    instantiates a subclass with no arguments, so ``__init__`` must be cheap: no
    device work, no kernel compile.
    """

    #: unique backend name, the id users select (``cuda``, ``hip``, ``torch``)
    name: ClassVar[str] = ""
    #: platform the backend runs on (``cuda``, ``rocm``, ``xpu``, ``cpu``)
    platform: ClassVar[str] = ""
    #: higher wins in automatic selection; ties between available backends are an error
    priority: ClassVar[int] = 0
    #: the plugin API version this backend was written for
    api_version: ClassVar[int] = PLUGIN_API_VERSION
    #: launch keys this backend's GEMM takes; other config keys are dropped with a warning.
    #: Taking ``USE_TMA`` means :meth:`gemm` implements sorted mode (``sorted_out`` /
    #: ``sorted_in``, SEMANTICS §3 step 10), which a ``_down`` entry with ``USE_TMA`` selects
    config_keys: ClassVar[frozenset[str]] = BASE_CONFIG_KEYS
    #: fp8 dtype used for fp8 w8a8 activations (``float8_e4m3fnuz`` on gfx942)
    fp8_dtype: ClassVar[torch.dtype] = torch.float8_e4m3fn
    #: device aliases tried after the exact device name when looking up config files
    device_aliases: ClassVar[tuple[str, ...]] = ()
    #: whether hooks may be registered on a runner using this backend
    accepts_hooks: ClassVar[bool] = True

    # -- capability ------------------------------------------------------------------
    def is_available(self) -> tuple[bool, str]:
        """Whether this backend can run in this process, and why not. Must not raise."""
        return True, ""

    def supports(self, layer: MoELayer, quant: QuantSpec) -> tuple[bool, str]:
        """Whether this backend runs ``layer`` with ``quant``; the string is the reason when not."""
        return True, ""

    def supports_dtype(self, dtype: torch.dtype) -> tuple[bool, str]:
        """Whether activations of ``dtype`` can be computed; the reason when not."""
        if dtype in (torch.float16, torch.bfloat16, torch.float32):
            return True, ""
        return False, f"activation dtype {dtype} is not supported (float16, bfloat16, float32 are)"

    def device(self) -> torch.device:
        """The torch device this backend computes on by default."""
        return torch.device("cpu")

    # -- config data -----------------------------------------------------------------
    def device_name(self) -> str:
        """The device name used in config file names (spaces replaced by ``_``)."""
        return ""

    def config_dirs(self) -> list[Path | Traversable]:
        """Directories of shipped tuned configs, searched in order after ``$MOE_CORE_CONFIG_DIR``."""
        return []

    def default_config(self, M: int, E: int, N: int, K: int, top_k: int, dtype: str | None,
                       block_shape: tuple[int, int] | None, *, deterministic: bool = False) -> dict[str, Any]:
        """Default kernel config when no tuned file matches (SEMANTICS §5.5)."""
        from moe_core.config import default_heuristics

        return default_heuristics(M, E, dtype, block_shape, deterministic=deterministic)

    def has_tma(self) -> bool:
        """Whether the GEMM may read weight tiles through tensor descriptors (TMA)."""
        return False

    def shared_memory_limit(self) -> int | None:
        """Opt-in shared memory per block in bytes, or None when unknown / irrelevant."""
        return None

    def fuses_activation(self, layer: MoELayer, quant: QuantSpec, config: dict[str, Any]) -> bool:
        """Whether gemm1 applies the activation itself (step 6 inside step 4).

        :param config: gemm1's resolved launch config for this forward (the tile decides
            whether fusing pays on some devices).

        Asked only when no ``moe_core_after_gate_up`` hook is registered (a hook must see
        ``gate_up``). When True, the sequence calls ``gemm(..., activation=layer)`` with
        ``w = w1`` and ``out = act`` ([M·k, N/2] gated, [M·k, N] otherwise) and skips
        :meth:`activation`; a backend answering True must accept that keyword.
        """
        return False

    # -- steps of the forward pass -----------------------------------------------------
    def align(self, topk_ids: torch.Tensor, block_m: int,
              num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step 3: group slots by expert, padded per expert to ``block_m`` (SEMANTICS §6)."""
        from moe_core.align import moe_align_block_size_torch

        return moe_align_block_size_torch(topk_ids, block_m, num_experts)

    def quantize_activation(self, a: torch.Tensor, quant: QuantSpec, scale: torch.Tensor | None,
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize gemm input ``a`` [rows, K] for w8a8: static per-tensor when ``scale``
        is given, else dynamic per tensor / per token / per token group of ``bk``.
        Returns a new buffer and its fp32 scale in the layout of SEMANTICS §4.1."""
        from moe_core.quant import quantize_activation

        return quantize_activation(a, quant, scale, fp8_dtype=self.fp8_dtype)

    def gemm(self, a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, *,
             a_scale: torch.Tensor | None, w_scale: torch.Tensor | None, w_zp: torch.Tensor | None,
             bias: torch.Tensor | None, topk_weights: torch.Tensor, sorted_token_ids: torch.Tensor,
             expert_ids: torch.Tensor, num_tokens_post_padded: torch.Tensor, top_k: int,
             mul_routed_weight: bool, quant: QuantSpec, config: dict[str, Any]) -> torch.Tensor:
        """Steps 4 and 7: ``out[s] = (a[s // top_k] @ w[e]ᵀ) · scales + bias (· topk_weights[s])``
        for every slot ``s`` routed to expert ``e``, rows of ``-1`` slots zero.

        :param a: [rows, K] input (x for gemm1 with ``top_k = k``; act for gemm2 with ``top_k = 1``),
            possibly quantized.
        :param w: [E, N_out, K] weights (packed K for int4).
        :param out: [M·k, N_out] output, written in place (every valid slot row).
        """
        raise NotImplementedError(f"backend {self.name!r} does not implement gemm")

    def activation(self, gate_up: torch.Tensor, out: torch.Tensor, layer: MoELayer,
                   topk_ids: torch.Tensor) -> torch.Tensor:
        """Step 6: ``out = act(gate_up)`` per SEMANTICS §4.3; rows of ``-1`` slots may be skipped."""
        raise NotImplementedError(f"backend {self.name!r} does not implement activation")

    def combine(self, down: torch.Tensor, out: torch.Tensor, scale: float) -> torch.Tensor:
        """Step 9: ``out[m] = scale · Σ_j down[m, j]`` summed in fp32, cast once."""
        out.copy_(torch.sum(down, dim=1, dtype=torch.float32).mul_(scale))
        return out

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} platform={self.platform!r} priority={self.priority}>"

    @classmethod
    def step_names(cls) -> Iterable[str]:
        """The overridable steps, in sequence order."""
        return ("align", "quantize_activation", "gemm", "activation", "combine")
