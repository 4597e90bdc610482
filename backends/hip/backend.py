"""``HipBackend``: AMD ROCm through the shared Triton kernels, as declared data and predicates.

Nothing here re-implements a step of the sequence. What differs from CUDA:

- **detection**: a ROCm build of torch (``torch.version.hip``) with a visible device; ROCm
  devices also answer ``torch.cuda.is_available()``, which is why ``cuda`` says no there;
- **fp8**: ``float8_e4m3fnuz`` on gfx94x (MI300 class), OCP ``float8_e4m3fn`` on gfx95x and
  RDNA4; checkpoints in e4m3fn are converted with :func:`e4m3fn_to_e4m3fnuz` (scales × 2);
- **config keys**: ``waves_per_eu``, ``matrix_instr_nonkdim``, ``kpack`` besides the base keys;
- **defaults**: SEMANTICS §5.5 with ``num_stages`` 2 on every fp8 row; no shared-memory clamp;
- **K padding** (:data:`K_PADDING`): fp8/int8 w8a8 weights without blocks may be stored with
  128 extra zero columns along K; the kernel reads the logical ``[E, N, K]`` view through its
  strides (:meth:`HipBackend.pad_weights`);
- **no TMA**; config files are named after torch's device name, with the gfx arch as alias.

The platform probe (:func:`probe`) is a plain function returning a frozen
:class:`HipPlatform`; ``HipBackend(probe=...)`` replaces it (tests run the whole forward of a
pretend MI300X on CPU under the Triton interpreter that way).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import TYPE_CHECKING, Any, Callable

import attrs
import torch

from moe_core.backend import BASE_CONFIG_KEYS, Backend, package_config_dirs
from moe_core.kernels.backend import TritonBackend, interpreting

if TYPE_CHECKING:
    from moe_core.spec import ExpertWeights, QuantSpec

__all__ = ["HipBackend", "HipPlatform", "probe", "e4m3fn_to_e4m3fnuz", "pad_weight_k", "AMD_CONFIG_KEYS",
           "K_PADDING", "FP8_FNUZ_ARCHS", "FP8_OCP_ARCHS"]

logger = logging.getLogger(__name__)

#: AMD-only Triton compile options a HIP config may carry (SEMANTICS §5.1)
AMD_CONFIG_KEYS = frozenset({"waves_per_eu", "matrix_instr_nonkdim", "kpack"})
#: gfx archs whose fp8 is e4m3fnuz (bias 8, no negative zero, max 240): MI300 class
FP8_FNUZ_ARCHS = ("gfx940", "gfx941", "gfx942")
#: gfx archs with OCP fp8 (e4m3fn, max 448): MI350 class and RDNA4
FP8_OCP_ARCHS = ("gfx950", "gfx1200", "gfx1201")
#: extra zero columns along K of fp8/int8 w8a8 weights without blocks (see :func:`pad_weight_k`)
K_PADDING = 128


@dataclasses.dataclass(frozen=True)
class HipPlatform:
    """What the HIP probe found. Frozen: one probe, one answer."""

    #: ``torch.version.hip`` ("6.4.43482" …); None when torch is not a ROCm build
    hip_version: str | None
    #: visible devices (0 without ROCm or with ``HIP_VISIBLE_DEVICES=``)
    device_count: int = 0
    #: ``torch.cuda.get_device_name()`` of the current device ("AMD Instinct MI300X")
    device_name: str = ""
    #: gfx architecture without feature flags ("gfx942" of "gfx942:sramecc+:xnack-")
    arch: str = ""
    #: why the probe says what it says (kept for ``moe-core backends``)
    note: str = ""


def probe() -> HipPlatform:
    """Look at the real platform. Never raises; a failure is recorded in ``note``."""
    hip = getattr(torch.version, "hip", None)
    if not hip:
        return HipPlatform(None, note="torch is not a ROCm build (torch.version.hip is None)")
    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return HipPlatform(hip, note="ROCm build of torch, but no visible device (HIP_VISIBLE_DEVICES?)")
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        arch = str(getattr(props, "gcnArchName", "")).split(":")[0]
        return HipPlatform(hip, count, torch.cuda.get_device_name(), arch, note="")
    except Exception as exc:  # noqa: BLE001 - the reason is kept, not swallowed
        return HipPlatform(hip, note=f"probing the ROCm device failed: {type(exc).__name__}: {exc}")


def e4m3fn_to_e4m3fnuz(weight: torch.Tensor, weight_scale: torch.Tensor,
                       input_scale: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Reinterpret e4m3fn weights as e4m3fnuz, adjusting the scales so values are unchanged.

    The two formats share the bit layout but e4m3fnuz has exponent bias 8 instead of 7, so
    the same bits mean **half** the value (normals and subnormals alike). Hence the bits are
    kept and every scale is doubled. Two patterns differ beyond that: ``0x80`` is −0 in
    e4m3fn but NaN in e4m3fnuz (it becomes ``0x00``), and ``0x7F``/``0xFF`` (NaN in e4m3fn)
    would read as ±240; saturating quantizers never produce them.

    :param weight: [...] ``float8_e4m3fn`` weights.
    :param weight_scale: fp32 scales in any layout (per tensor, channel or block).
    :param input_scale: optional static activation scale (doubled too: the activation is
        quantized to e4m3fnuz, whose range is 240, with the same rule).
    :returns: ``(weight as float8_e4m3fnuz, weight_scale · 2, input_scale · 2 or None)``;
        new tensors, the inputs are not mutated.
    """
    if weight.dtype != torch.float8_e4m3fn:
        from moe_core.errors import MoETypeError

        raise MoETypeError(f"e4m3fn_to_e4m3fnuz: weight: expected torch.float8_e4m3fn, got {weight.dtype}")
    bits = weight.view(torch.int8)
    bits = torch.where(bits == -128, torch.zeros_like(bits), bits)       # 0x80: −0 → +0
    converted = bits.view(torch.float8_e4m3fnuz)
    return converted, weight_scale * 2.0, None if input_scale is None else input_scale * 2.0


def pad_weight_k(w: torch.Tensor, pad: int = K_PADDING) -> torch.Tensor:
    """``w`` [E, N_out, K] stored with ``pad`` extra zero columns: a [E, N_out, K] view whose
    row stride is ``K + pad``.

    The rule (ROCm, fp8/int8 w8a8 without blocks): rows of ``K`` bytes with ``K`` a large
    power of two put the same column of every row on the same memory channel; 128 more
    bytes per row spread them. The logical shape is unchanged; the kernel reads it through
    its strides (SEMANTICS §1: padded weights work through strides).
    """
    K = w.shape[-1]
    return torch.nn.functional.pad(w, (0, pad))[..., :K]


class HipBackend(TritonBackend):
    """AMD ROCm through the shared Triton kernels (fp8 e4m3fnuz on gfx94x, AMD config keys, no TMA)."""

    name = "hip"
    platform = "rocm"
    priority = 100
    config_keys = BASE_CONFIG_KEYS | AMD_CONFIG_KEYS
    #: fp8 rows of SEMANTICS §5.5 use this many stages on HIP
    fp8_num_stages = 2
    fp8_min_capability = None        # fp8 is decided by the gfx arch, not a capability number

    def __init__(self, probe: Callable[[], HipPlatform] | None = None) -> None:
        self._probe = probe if probe is not None else globals()["probe"]

    @functools.cached_property
    def platform_info(self) -> HipPlatform:
        """The probe's answer, asked once per instance."""
        return self._probe()

    # -- capability ------------------------------------------------------------------
    def is_available(self) -> tuple[bool, str]:
        info = self.platform_info
        if info.hip_version is None or info.device_count == 0:
            return False, info.note
        where = "under the Triton interpreter (CPU tensors)" if interpreting() else f"{info.device_count} device(s)"
        return True, f"ROCm {info.hip_version}, {info.device_name or 'AMD GPU'} ({info.arch or 'gfx?'}), {where}"

    @property
    def fp8_dtype(self) -> torch.dtype:  # type: ignore[override]
        """``float8_e4m3fnuz`` on gfx94x, ``float8_e4m3fn`` elsewhere."""
        return torch.float8_e4m3fnuz if self.platform_info.arch in FP8_FNUZ_ARCHS else torch.float8_e4m3fn

    def supports_fp8(self) -> tuple[bool, str]:
        arch = self.platform_info.arch
        if arch in FP8_FNUZ_ARCHS or arch in FP8_OCP_ARCHS:
            return True, ""
        return False, (f"fp8 w8a8 needs a gfx arch with fp8 ({', '.join(FP8_FNUZ_ARCHS + FP8_OCP_ARCHS)}), "
                       f"device is {arch or 'unknown'}")

    # -- device facts ------------------------------------------------------------------
    def device_name(self) -> str:
        info = self.platform_info
        return (info.device_name or info.arch).replace(" ", "_")

    @property
    def device_aliases(self) -> tuple[str, ...]:  # type: ignore[override]
        """The gfx arch (``gfx942``): files tuned for one chip of an arch serve its siblings."""
        arch = self.platform_info.arch
        return (arch,) if arch and arch != self.device_name() else ()

    def config_dirs(self) -> list[Any]:
        return list(package_config_dirs("moe_core.backends.hip"))

    def has_tma(self) -> bool:
        return False

    def shared_memory_limit(self) -> int | None:
        """None: the §5.4 clamp models NVIDIA's multi-buffered shared-memory pipeline; AMD's
        stream pipeliner with ``num_stages`` 2 runs the §5.5 defaults on 64 KiB of LDS."""
        return None

    def default_config(self, M: int, E: int, N: int, K: int, top_k: int, dtype: str | None,
                       block_shape: tuple[int, int] | None, *, deterministic: bool = False) -> dict[str, Any]:
        """SEMANTICS §5.5, HIP column: the shared table with ``num_stages`` 2 on fp8 rows
        (never the CUDA low-shared-memory rows)."""
        config = Backend.default_config(self, M, E, N, K, top_k, dtype, block_shape, deterministic=deterministic)
        if not deterministic and dtype == "fp8_w8a8":
            config["num_stages"] = self.fp8_num_stages
        return config

    # -- weight preparation (done once at load time by the caller) --------------------------
    def needs_k_padding(self, quant: QuantSpec) -> bool:
        """The K-padding rule: fp8/int8 w8a8 without blocks."""
        return quant.is_w8a8 and not quant.is_block

    def pad_weights(self, weights: ExpertWeights, pad: int = K_PADDING) -> ExpertWeights:
        """``weights`` with ``w1``/``w2`` re-stored per :func:`pad_weight_k` when
        :meth:`needs_k_padding`; otherwise returned unchanged."""
        if not self.needs_k_padding(weights.quant):
            return weights
        return attrs.evolve(weights, w1=pad_weight_k(weights.w1, pad), w2=pad_weight_k(weights.w2, pad))

    def convert_fp8_weights(self, weights: ExpertWeights) -> ExpertWeights:
        """e4m3fn fp8 weights → this device's fp8 (:func:`e4m3fn_to_e4m3fnuz` on gfx94x).

        Static activation scales are doubled with the weight scales. Other weights are
        returned unchanged.
        """
        quant = weights.quant
        if (quant.scheme != "fp8_w8a8" or self.fp8_dtype != torch.float8_e4m3fnuz
                or weights.w1.dtype != torch.float8_e4m3fn):
            return weights
        w1, s1, a1 = e4m3fn_to_e4m3fnuz(weights.w1, quant.w1_scale, quant.a1_scale)
        w2, s2, a2 = e4m3fn_to_e4m3fnuz(weights.w2, quant.w2_scale, quant.a2_scale)
        new_quant = attrs.evolve(quant, w1_scale=s1, w2_scale=s2, a1_scale=a1, a2_scale=a2)
        return attrs.evolve(weights, w1=w1, w2=w2, quant=new_quant)
