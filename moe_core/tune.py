"""The kernel-config tuner behind ``moe-core tune`` (issue 4).

For each batch size M it times candidate configs of one grouped GEMM in isolation, through
the backend's ``gemm`` step with aligned inputs (:func:`moe_core.moe_align_block_size`) and
the launch config the resolver makes of :func:`moe_core.override_config`. gemm1 is timed with
its activation, as the forward runs it for that config: one kernel where the backend fuses the
activation into gemm1 (:meth:`~moe_core.backend.Backend.fuses_activation`), else the GEMM and
the backend's ``activation`` step. gemm1 and gemm2 are tuned separately; gemm2 (the ``_down``
table) keeps gemm1's ``BLOCK_SIZE_M`` because both share one alignment. Each candidate's output is checked against the torch backend before it
is timed (CUDA-graph replays by default; the timer is injectable). Candidates that fail to
compile or run out of resources are skipped. The backend's default config is timed too and kept
when it beats every candidate, so a tuned table is never slower than the defaults. Results go to
``OUT/triton_X_Y_Z/<our file name>`` after every batch size, so a partial run resumes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import attrs
import torch

from moe_core import config as _config
from moe_core import config_files as files
from moe_core.errors import ConfigError, MoEInputError
from moe_core.spec import QuantSpec

if TYPE_CHECKING:
    from moe_core.backend import Backend
    from moe_core.presets import Preset
    from moe_core.spec import MoELayer

__all__ = ["DEFAULT_BATCH_SIZES", "ACT_DTYPES", "SCHEMES", "TuneSpec", "search_space", "tune",
           "cuda_graph_timer", "wall_timer", "GemmResult", "Timer"]

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
ACT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SCHEMES = ("fp8_w8a8", "int8_w8a8", "int8_w8a16", "int4_w4a16")
#: ``timer(fn) -> milliseconds per call of fn``
Timer = Callable[[Callable[[], Any]], float]


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


@attrs.frozen
class TuneSpec:
    """The layer and quantization one tuning run is for.

    :param E: local experts; :param I: intermediate size per partition (file ``N``);
    :param H: hidden size; :param top_k: ``k``; :param is_gated: ``w1`` has ``2·I`` rows.
    :param act_dtype: compute dtype; :param scheme: ``none`` or one of :data:`SCHEMES`.
    :param block_shape: ``(bn, bk)`` for block w8a8; :param per_channel: per-token × per-channel w8a8;
    :param group_size: group of weight-only schemes.
    :param activation: gemm1's activation (SEMANTICS §4.3), timed with it; :param gate_up_layout:
        ``halves`` or ``interleaved``; :param gemm1_alpha: / :param gemm1_limit: its constants.
    """

    E: int
    I: int
    H: int
    top_k: int
    is_gated: bool = True
    act_dtype: torch.dtype = torch.bfloat16
    scheme: str = "none"
    block_shape: tuple[int, int] | None = attrs.field(
        default=None, converter=lambda b: tuple(b) if b is not None and all(b) else None)
    per_channel: bool = False
    group_size: int | None = None
    activation: str = "silu"
    gate_up_layout: str = "halves"
    gemm1_alpha: float | None = None
    gemm1_limit: float | None = None

    @classmethod
    def from_preset(cls, preset: Preset, dtype: str, *, block_shape: Sequence[int] | None = None,
                    per_channel: bool = False, group_size: int | None = None, tp: int = 1,
                    act_dtype: str = "bfloat16") -> TuneSpec:
        """The spec of ``preset`` for ``dtype`` (an activation dtype name or a scheme of :data:`SCHEMES`)."""
        layer = preset.layer(tp=tp)
        if dtype in ACT_DTYPES:
            act, scheme = ACT_DTYPES[dtype], "none"
        elif dtype in SCHEMES:
            act, scheme = ACT_DTYPES[act_dtype], dtype
        else:
            raise MoEInputError(f"dtype: expected one of {sorted(ACT_DTYPES) + list(SCHEMES)}, got {dtype!r}")
        if scheme in ("int4_w4a16",) and group_size is None:
            group_size = 128
        return cls(E=layer.num_local_experts, I=layer.intermediate_size, H=layer.hidden_size,
                   top_k=layer.top_k, is_gated=layer.is_gated, act_dtype=act, scheme=scheme,
                   block_shape=tuple(block_shape) if block_shape else None, per_channel=per_channel,
                   group_size=group_size if scheme in ("int8_w8a16", "int4_w4a16") else None,
                   activation=layer.activation, gate_up_layout=layer.gate_up_layout,
                   gemm1_alpha=layer.gemm1_alpha, gemm1_limit=layer.gemm1_limit)

    def layer(self) -> MoELayer:
        """The :class:`~moe_core.spec.MoELayer` whose gemm1 (with its activation) is tuned."""
        from moe_core.spec import MoELayer

        return MoELayer(num_local_experts=self.E, top_k=self.top_k, hidden_size=self.H,
                        intermediate_size=self.I, activation=self.activation, is_gated=self.is_gated,
                        gate_up_layout=self.gate_up_layout, gemm1_alpha=self.gemm1_alpha,
                        gemm1_limit=self.gemm1_limit)

    def dims(self, gemm: str) -> tuple[int, int]:
        """``(N_out, K)`` of gemm1 (``up``) or gemm2 (``down``)."""
        if gemm == "up":
            return (2 * self.I if self.is_gated else self.I), self.H
        return self.H, self.I

    def quant(self, w1_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
              w1_zp: torch.Tensor | None = None, w2_zp: torch.Tensor | None = None) -> QuantSpec:
        """The :class:`QuantSpec` (placeholder scales when none are given)."""
        if self.scheme == "none":
            return QuantSpec.none()
        s1 = w1_scale if w1_scale is not None else torch.ones(1)
        s2 = w2_scale if w2_scale is not None else s1
        if self.scheme in ("fp8_w8a8", "int8_w8a8"):
            ctor = QuantSpec.fp8_w8a8 if self.scheme == "fp8_w8a8" else QuantSpec.int8_w8a8
            return ctor(s1, s2, per_channel=self.per_channel, block_shape=self.block_shape)
        if self.scheme == "int8_w8a16":
            return QuantSpec.int8_w8a16(s1, s2, group_size=self.group_size, w1_zp=w1_zp, w2_zp=w2_zp)
        return QuantSpec.int4_w4a16(s1, s2, group_size=self.group_size, w1_zp=w1_zp, w2_zp=w2_zp)

    def file_key(self, device_name: str, gemm: str) -> files.FileKey:
        """The config-file key of ``gemm`` on ``device_name``."""
        return files.FileKey(E=self.E, N=self.I, device_name=device_name,
                             dtype=self.quant().config_dtype(self.act_dtype), block_shape=self.block_shape,
                             per_channel=self.per_channel, down=gemm == "down")

    def operand_bytes(self) -> tuple[float, float]:
        """Bytes per input and per weight element (for the shared-memory estimate)."""
        act = float(torch.empty((), dtype=self.act_dtype).element_size())
        a = 1.0 if self.scheme in ("fp8_w8a8", "int8_w8a8") else act
        b = {"none": act, "int4_w4a16": 0.5}.get(self.scheme, 1.0)
        return a, b


def _fast_tiles(bm: int) -> list[tuple[int, int, int]]:
    """``(BLOCK_SIZE_N, BLOCK_SIZE_K, num_warps)`` of the fast space for one ``BLOCK_SIZE_M``.

    Small row tiles (decode) stream weights: wide K tiles, 4 warps, and narrow N tiles too, so
    that a few experts' weights still spread over every SM (qwen3-30b-a3b at M = 1 is 8 experts
    × 768 act columns: 48 programs at ``BLOCK_SIZE_N`` 128, 384 at 16). Large row tiles
    (prefill) are matrix-bound: wide N tiles, 8 warps once the accumulator passes 16K elements.
    """
    if bm <= 32:
        return [(bn, bk, 4) for bn in (16, 32, 64, 128) for bk in (64, 128, 256)]
    out = []
    for bn in (128, 256):
        size = bm * bn
        warps = (4,) if size < 16384 else ((4, 8) if size == 16384 else (8,))
        out += [(bn, bk, w) for bk in (64, 128) for w in warps]
    return out


def search_space(spec: TuneSpec, gemm: str, M: int, *, fast: bool = False, has_tma: bool = False,
                 smem_limit: int | None = None, block_m: int | None = None) -> list[dict[str, Any]]:
    """The pruned candidate configs of ``gemm`` at batch size ``M``.

    Pruning: ``BLOCK_SIZE_M`` up to twice the (power-of-two) mean slots per expert; ``BLOCK_SIZE_N``
    and ``BLOCK_SIZE_K`` no larger than the problem; ``BLOCK_SIZE_K`` dividing the quant
    block/group; ``GROUP_SIZE_M > 1`` only with more than one slot (16 covers every order up to
    16 row blocks); 8 warps only for large tiles; configs over the shared-memory limit dropped;
    ``USE_TMA`` variants only for gemm2 when ``has_tma``. ``block_m`` pins ``BLOCK_SIZE_M`` (gemm2 shares gemm1's). ``fast`` keeps the
    two largest allowed ``BLOCK_SIZE_M`` and the tile shapes of :func:`_fast_tiles`.
    """
    n_out, K = spec.dims(gemm)
    per_expert = math.ceil(M * spec.top_k / spec.E)
    # one size above the mean too: counts scatter around it, and a block that holds all of an
    # expert's rows streams its weights once (mixtral-8x7b M = 64: 16 ± 4 rows per expert)
    bm_cap = max(16, min(128, 2 * _pow2_at_least(per_expert)))
    bms = [block_m] if block_m is not None else [b for b in (16, 32, 64, 128) if b <= bm_cap]
    if fast and block_m is None:
        bms = bms[-2:]
    n_cap, k_cap = max(32, _pow2_at_least(n_out)), max(32, _pow2_at_least(K))
    divisor = spec.block_shape[1] if spec.block_shape else spec.group_size

    def fit_k(bks: Iterable[int]) -> list[int]:
        bks = [b for b in bks if b <= k_cap] or [min(bks)]
        if divisor:
            bks = [b for b in bks if divisor % b == 0] or [max((b for b in (32, 64, 128, 256) if divisor % b == 0),
                                                                default=16)]
        return bks

    def tiles(bm: int) -> list[tuple[int, int, int]]:
        if fast:
            shapes = [(min(bn, n_cap), bk, w) for bn, bk, w in _fast_tiles(bm)]
            out = []
            for bn, bk, w in shapes:
                for k in fit_k([bk]):
                    if (bn, k, w) not in out:
                        out.append((bn, k, w))
            return out
        bns = [b for b in ((16, 32, 64, 128, 256) if bm <= 32 else (32, 64, 128, 256)) if b <= n_cap] or [32]
        return [(bn, bk, w) for bn in bns for bk in fit_k((32, 64, 128, 256))
                for w in ((4, 8) if bm * bn >= 8192 else (4,))]

    stages = (3, 4) if fast else (2, 3, 4, 5)
    a_bytes, b_bytes = spec.operand_bytes()
    out: list[dict[str, Any]] = []
    for bm in bms:
        # GROUP_SIZE_M > 1 runs the row blocks of one column tile together, so an expert with
        # more rows than one block reads its weight tile once from HBM (then L2), not once per
        # block; with up to 16 blocks every value above 1 is that same order
        row_blocks = math.ceil(M * spec.top_k / bm) + min(M * spec.top_k, spec.E)
        gms = [1] if M * spec.top_k < 2 else ((1, 16) if fast or row_blocks <= 16 else (1, 16, 32, 64))
        for bn, bk, w in tiles(bm):
            for gm in gms:
                for s in stages:
                    cfg = {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk,
                           "GROUP_SIZE_M": gm, "num_warps": w, "num_stages": s}
                    if smem_limit and _config.estimate_shared_memory(cfg, a_bytes, b_bytes) > smem_limit:
                        continue
                    out.append(cfg)
                    if gemm == "down" and has_tma:
                        out.append({**cfg, "USE_TMA": True})
    return out


def wall_timer(fn: Callable[[], Any], *, reps: int = 3) -> float:
    """Mean wall-clock milliseconds of ``fn`` (CPU / interpreter runs)."""
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) * 1e3 / reps


def cuda_graph_timer(fn: Callable[[], Any], *, reps: int = 15) -> float:
    """Median milliseconds of ``fn`` as ``moe-core bench`` times a forward: CUDA-graph replays
    of one call, L2 flushed before each (:func:`moe_core.timing.time_graph`).

    Timed back to back instead, the weights of a few small experts (qwen3-30b-a3b at M = 1:
    50 MB) stay in L2 and the tuner preferred tiles that lose once they stream from HBM.
    """
    from moe_core.timing import time_graph

    return time_graph(fn, reps=reps, warm_s=0.002) * 1e3


def _precompile(bench: _Bench, candidates: Sequence[dict[str, Any]], workers: int | None = None) -> int:
    """Compile the Triton kernels of ``candidates`` on a thread pool before timing them.

    Each candidate is launched in warm-up mode (compile only) under Triton's
    ``AsyncCompileMode``; compile failures are ignored here (the timing loop skips them).
    :returns: the number of candidates submitted (0 when this Triton has no async compile or
        the backend's GEMM is not the shared Triton kernel).
    """
    try:
        from concurrent.futures import ThreadPoolExecutor

        from triton.runtime._async_compile import AsyncCompileMode

        from moe_core.kernels import _gemm
        from moe_core.kernels.backend import TritonBackend
    except ImportError as exc:
        logger.info("no parallel precompile: %s", exc)
        return 0
    if not isinstance(bench.backend, TritonBackend) or bench.device.type != "cuda":
        return 0
    real = _gemm._grouped_gemm_kernel

    class _WarmOnly:
        def __getitem__(self, grid: Any) -> Callable[..., Any]:
            return lambda *args, **kwargs: real.warmup(*args, grid=grid, **kwargs)

    submitted = 0
    workers = workers or max(1, (os.cpu_count() or 2))
    start = time.perf_counter()
    _gemm._grouped_gemm_kernel = _WarmOnly()
    try:
        with ThreadPoolExecutor(workers) as pool, AsyncCompileMode(pool, ignore_errors=True):
            for cand in candidates:
                try:
                    bench.launcher(bench.launch_config(cand), gemm_only=True)()
                    submitted += 1
                except Exception as exc:  # noqa: BLE001 - the timing loop reports real failures
                    (logger.warning if submitted == 0 else logger.debug)(
                        "precompile of %s failed: %s: %s", cand, type(exc).__name__, exc)
    finally:
        _gemm._grouped_gemm_kernel = real
    logger.info("precompiled %d candidates on %d threads in %.1f s", submitted, workers,
                time.perf_counter() - start)
    return submitted


@attrs.define
class GemmResult:
    """Outcome of tuning one GEMM at one batch size."""

    M: int
    config: dict[str, Any] | None
    time_ms: float | None
    default_config: dict[str, Any] | None = None
    default_ms: float | None = None
    tried: int = 0
    skipped: int = 0
    wrong: int = 0
    #: the backend's default config ran faster than every candidate and was kept
    default_won: bool = False


class _Bench:
    """Random weights for one GEMM, per-M inputs, alignments and the torch-backend reference.

    gemm1 (``up``) runs with its activation and ``out`` is ``act``: what the forward computes
    in steps 4-6 for a config, fused or not (``gate_up`` is then a scratch buffer).
    """

    def __init__(self, backend: Backend, spec: TuneSpec, gemm: str, device: torch.device, seed: int) -> None:
        self.backend, self.spec, self.gemm, self.device = backend, spec, gemm, device
        self.layer = spec.layer() if gemm == "up" else None
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.n_out, self.K = spec.dims(gemm)
        self.w, self.w_scale, self.w_zp = self._weights()
        self.quant = spec.quant(self.w_scale, self.w_scale, self.w_zp, self.w_zp)
        self._M: int | None = None

    def _randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, device=self.device) * 0.1

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """[E, N_out, K] weights, built in chunks of experts to bound peak memory."""
        from moe_core.testing import quantize_weights as qw

        spec, E = self.spec, self.spec.E
        chunk = max(1, (1 << 26) // max(1, self.n_out * self.K))
        weight: torch.Tensor | None = None
        scales: list[torch.Tensor] = []
        zps: list[torch.Tensor] = []
        for start in range(0, E, chunk):
            stop = min(E, start + chunk)
            w = self._randn(stop - start, self.n_out, self.K)
            if spec.scheme == "none":
                q, s, z = w.to(spec.act_dtype), None, None
            elif spec.scheme in ("fp8_w8a8", "int8_w8a8"):
                qdtype = self.backend.fp8_dtype if spec.scheme == "fp8_w8a8" else torch.int8
                q, s = qw.quantize_w8a8(w, qdtype, per_channel=spec.per_channel, block_shape=spec.block_shape)
                z = None
            elif spec.scheme == "int8_w8a16":
                q, s, z = qw.quantize_int8_w8a16(w, group_size=spec.group_size)
            else:
                q, s, z = qw.quantize_int4_w4a16(w, group_size=spec.group_size)
            if weight is None:                 # preallocate: peak memory = weights + one chunk
                weight = torch.empty((E, *q.shape[1:]), dtype=q.dtype, device=self.device)
            weight[start:stop] = q
            scales += [s] if s is not None else []
            zps += [z] if z is not None else []
        return weight, (torch.cat(scales) if scales else None), (torch.cat(zps) if zps else None)

    def set_batch(self, M: int) -> None:
        """Fresh routing, input, output buffer, alignments and reference for ``M`` tokens."""
        from moe_core.reference import TorchBackend

        spec, k = self.spec, self.spec.top_k
        self._M = M
        rows = M if self.gemm == "up" else M * k
        logits = torch.rand(M, spec.E, generator=self.gen, device=self.device)
        self.topk_weights, ids = torch.softmax(logits, dim=-1).topk(k, dim=-1)
        self.topk_ids = ids.to(torch.int32)
        a = self._randn(rows, self.K).to(spec.act_dtype)
        self.a, self.a_scale = a, None
        if self.quant.is_w8a8:
            self.a, self.a_scale = self.backend.quantize_activation(a, self.quant, None)
        self.top_k = k if self.gemm == "up" else 1
        self.mul = self.gemm == "down"
        self.gate_up = torch.empty((M * k, self.n_out), dtype=spec.act_dtype, device=self.device)
        self._aligned: dict[int, tuple[torch.Tensor, ...]] = {}
        self._sorted: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        ref = torch.empty_like(self.gate_up)
        torch_backend = TorchBackend()
        torch_backend.gemm(self.a, self.w, ref, config={"BLOCK_SIZE_M": 16}, **self._common(16))
        if self.layer is None:
            self.out = self.gate_up
        else:
            width = self.n_out // 2 if spec.is_gated else self.n_out
            self.out = torch.empty((M * k, width), dtype=spec.act_dtype, device=self.device)
            ref = torch_backend.activation(ref, torch.empty_like(self.out), self.layer, self.topk_ids)
        self.ref32 = ref.float()
        self.ref_scale = max(float(self.ref32.abs().max()), 1e-30)

    def _common(self, block_m: int) -> dict[str, Any]:
        from moe_core.align import moe_align_block_size

        if block_m not in self._aligned:
            self._aligned[block_m] = moe_align_block_size(self.topk_ids, block_m, self.spec.E)
        sorted_ids, expert_ids, n_post = self._aligned[block_m]
        return dict(a_scale=self.a_scale, w_scale=self.w_scale, w_zp=self.w_zp, bias=None,
                    topk_weights=self.topk_weights, sorted_token_ids=sorted_ids, expert_ids=expert_ids,
                    num_tokens_post_padded=n_post, top_k=self.top_k, mul_routed_weight=self.mul,
                    quant=self.quant)

    def _sorted_input(self, block_m: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """gemm2's input (and block/token scale) in sorted mode for ``block_m``'s alignment: row
        ``p`` is slot ``sorted_ids[p]``, padding rows zero, as the sorted-mode gemm1 would have
        stored them; gathered once per alignment."""
        if block_m in self._sorted:
            return self._sorted[block_m]
        sorted_ids = self._common(block_m)["sorted_token_ids"]
        rows = sorted_ids.long().clamp(max=self.a.shape[0] - 1)
        valid = (sorted_ids < self.a.shape[0]).unsqueeze(1)

        def gather(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None or t.dim() != 2 or t.shape[0] != self.a.shape[0]:
                return t                       # per-tensor scale: no rows
            raw = t.view(torch.uint8) if t.element_size() == 1 else t     # fp8 has no where()
            return torch.where(valid, raw[rows], torch.zeros((), dtype=raw.dtype, device=t.device)).view(t.dtype)

        self._sorted[block_m] = gather(self.a), gather(self.a_scale)
        return self._sorted[block_m]

    def launcher(self, config: dict[str, Any], *, gemm_only: bool = False) -> Callable[[], Any]:
        """One call of the tuned step(s) with ``config``: gemm2, or gemm1 with its activation
        (``gemm_only``: without an unfused activation step, for the precompile)."""
        kwargs = self._common(config["BLOCK_SIZE_M"])
        backend, a, w, out, layer = self.backend, self.a, self.w, self.out, self.layer
        if layer is None and config.get("USE_TMA"):
            # sorted mode: gemm2 reads the input row of each position of sorted_token_ids
            a, kwargs["a_scale"] = self._sorted_input(config["BLOCK_SIZE_M"])
            return lambda: backend.gemm(a, w, out, config=config, sorted_in=True, **kwargs)
        if layer is None:
            return lambda: backend.gemm(a, w, out, config=config, **kwargs)
        if backend.fuses_activation(layer, self.quant, config):
            return lambda: backend.gemm(a, w, out, config=config, activation=layer, **kwargs)
        gate_up, ids = self.gate_up, self.topk_ids

        def unfused() -> None:
            backend.gemm(a, w, gate_up, config=config, **kwargs)
            if not gemm_only:
                backend.activation(gate_up, out, layer, ids)

        return unfused

    def launch_config(self, candidate: dict[str, Any]) -> dict[str, Any]:
        """What the resolver launches for ``candidate`` given through ``override_config``."""
        spec = self.spec
        with _config.override_config(candidate):
            r = _config.resolve_configs(self.backend, M=self._M, E=spec.E, I=spec.I, H=spec.H,
                                        top_k=spec.top_k, act_dtype=spec.act_dtype, quant=self.quant,
                                        has_hooks=False)
        return r.config if self.gemm == "up" else r.down_config

    def check(self) -> bool:
        """Whether ``out`` matches the torch backend within the dtype's normalised tolerance.

        Computed on the device in fp32 (the metric of TESTING.md §2 without the host copy that
        :func:`moe_core.testing.normalized_errors` makes, which is too slow for M·k·N ~ 5e8).
        """
        from moe_core.testing import tolerance_for

        diff = self.out.float().sub_(self.ref32).abs_()
        if not bool(torch.isfinite(diff).all()):
            return False
        maxtol, rmstol = tolerance_for(self.spec.act_dtype)
        max_err = float(diff.max()) / self.ref_scale
        rms_err = float(diff.square_().mean().sqrt()) / self.ref_scale
        return max_err <= maxtol and rms_err <= rmstol


def _fatal(exc: BaseException) -> bool:
    """A CUDA error poisons the context: stop instead of skipping."""
    text = str(exc)
    return "illegal memory access" in text or ("CUDA error" in text and "out of resource" not in text)


def _try(bench: _Bench, candidate: dict[str, Any], timer: Timer, *, exact: bool = True) -> tuple[str, float | None]:
    """``("ok", ms)``, ``("skipped", None)`` (fails to compile/launch or, with ``exact``, the
    resolver changed it) or ``("wrong", None)`` (output differs from the torch backend)."""
    try:
        launch = bench.launch_config(candidate)
    except ConfigError as exc:
        logger.debug("candidate %s rejected: %s", candidate, exc)
        return "skipped", None
    if exact and launch != candidate:
        logger.debug("candidate %s launches as %s; skipped", candidate, launch)
        return "skipped", None
    fn = bench.launcher(launch)
    try:
        bench.out.fill_(float("nan"))
        fn()
        if not bench.check():
            logger.info("candidate %s gives a wrong result; skipped", candidate)
            return "wrong", None
        return "ok", float(timer(fn))
    except Exception as exc:  # compile errors, out of resources, unsupported combinations
        if _fatal(exc):
            raise
        logger.debug("candidate %s failed: %s: %s", candidate, type(exc).__name__, exc)
        return "skipped", None


def _read_partial(path: Path) -> dict[int, dict[str, Any]]:
    if not path.exists():
        return {}
    return files.load_table(path)


def tune(backend: Backend, spec: TuneSpec, *, out_dir: str | Path,
         batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES, gemms: Sequence[str] = ("up", "down"),
         fast: bool = False, timer: Timer | None = None, device_name: str | None = None, seed: int = 0,
         progress: bool = True) -> dict[str, dict[int, GemmResult]]:
    """Tune ``gemms`` of ``spec`` on ``backend`` for every batch size; write our JSON files.

    :param out_dir: results go to ``out_dir/triton_X_Y_Z/<file name>``; batch sizes already
        in such a file are kept (resume). Timings go to ``out_dir/timings/...``.
    :param timer: ``timer(fn) -> ms``; default CUDA-graph replays on a GPU, wall clock otherwise.
    :returns: ``{gemm: {M: GemmResult}}`` for the batch sizes tuned in this call.
    """
    from tqdm.auto import tqdm

    device = backend.device()
    timer = timer or (cuda_graph_timer if device.type == "cuda" else wall_timer)
    name = device_name or backend.device_name()
    folder = Path(out_dir) / files.triton_folder()
    smem = _config._safe(backend.shared_memory_limit, None)
    tma = bool(_config._safe(backend.has_tma, False)) and _gemm_reads_tma(backend)
    batch_sizes = sorted(set(int(m) for m in batch_sizes))
    results: dict[str, dict[int, GemmResult]] = {}
    up_table = _read_partial(folder / files.config_file_name(spec.file_key(name, "up")))
    for gemm in gemms:
        if gemm not in ("up", "down"):
            raise MoEInputError(f"gemms: expected 'up' and/or 'down', got {gemm!r}")
        path = folder / files.config_file_name(spec.file_key(name, gemm))
        log_path = Path(out_dir) / "timings" / files.triton_folder() / path.name
        table = _read_partial(path)
        log = json.loads(log_path.read_text()) if log_path.exists() else {}
        todo = [m for m in batch_sizes if m not in table]
        if len(todo) < len(batch_sizes):
            logger.info("%s: resuming, %d of %d batch sizes already tuned", path, len(batch_sizes) - len(todo),
                        len(batch_sizes))
        results[gemm] = {}
        if not todo:
            continue
        bench = _Bench(backend, spec, gemm, device, seed)

        def block_m_of(M: int) -> int | None:
            if gemm == "down" and up_table:
                return up_table[_config.nearest_key(up_table, M)]["BLOCK_SIZE_M"]
            return None

        if device.type == "cuda":
            union: dict[str, dict[str, Any]] = {}
            for M in todo:
                for c in search_space(spec, gemm, M, fast=fast, has_tma=tma, smem_limit=smem,
                                      block_m=block_m_of(M)):
                    union.setdefault(json.dumps(c, sort_keys=True), c)
            bench.set_batch(todo[0])
            _precompile(bench, list(union.values()))
        for M in todo:
            block_m = block_m_of(M)
            cands = search_space(spec, gemm, M, fast=fast, has_tma=tma, smem_limit=smem, block_m=block_m)
            bench.set_batch(M)
            res = GemmResult(M=M, config=None, time_ms=None)
            bar = tqdm(cands, desc=f"{gemm} M={M}", unit="cfg", disable=None if progress else True, leave=False)
            for cand in bar:
                status, ms = _try(bench, cand, timer)
                res.tried += 1
                if status == "wrong":
                    res.wrong += 1
                elif status == "skipped":
                    res.skipped += 1
                elif res.time_ms is None or ms < res.time_ms:
                    res.config, res.time_ms = dict(cand), ms
                    bar.set_postfix(best=f"{ms:.4f}ms")
            bar.close()
            default = _default_config(backend, spec, gemm, M, block_m)
            status, default_ms = _try(bench, default, timer, exact=False)
            res.default_config, res.default_ms = default, default_ms
            if default_ms is not None and (res.time_ms is None or default_ms < res.time_ms):
                # the fast space can miss what the defaults pick: a table is never slower than them
                res.config, res.time_ms, res.default_won = bench.launch_config(default), default_ms, True
            if res.config is None:
                raise ConfigError(f"tune: no candidate of {gemm} at M={M} ran correctly on backend "
                                  f"{backend.name!r} ({res.tried} tried, {res.skipped} failed, {res.wrong} wrong)")
            logger.info("%s M=%d: best %.4f ms %s; default %s ms", gemm, M, res.time_ms, res.config,
                        "n/a" if default_ms is None else f"{default_ms:.4f}")
            table[M] = dict(res.config)
            if gemm == "up":
                up_table = table
            files.write_table(path, table)
            log[str(M)] = attrs.asdict(res)
            files.write_json(log_path, {k: log[k] for k in sorted(log, key=int)})
            results[gemm][M] = res
        del bench                              # free this GEMM's weights before the next
    return results


def _gemm_reads_tma(backend: Backend) -> bool:
    """Whether ``USE_TMA`` changes the backend's GEMM launch: a backend that takes the key
    implements sorted mode (gemm2 reading its input by position, through TMA)."""
    return "USE_TMA" in backend.config_keys


def _default_config(backend: Backend, spec: TuneSpec, gemm: str, M: int, block_m: int | None) -> dict[str, Any]:
    """The backend's default config for ``gemm`` at ``M`` (gemm2 with gemm1's ``BLOCK_SIZE_M``)."""
    n_out, K = spec.dims(gemm)
    dtype = spec.quant().config_dtype(spec.act_dtype)
    cfg = dict(backend.default_config(M, spec.E, n_out, K, spec.top_k, dtype, spec.block_shape))
    if block_m is not None:
        cfg["BLOCK_SIZE_M"] = block_m
    return cfg
