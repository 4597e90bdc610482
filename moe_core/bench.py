"""``moe-core bench``: our backend side by side with the peers a user would pick instead,
in one process on one GPU, against a roofline measured in the same run.

Per (preset shape, M), bf16 (or fp8 block [128, 128] against our own bf16 path):

- ceilings: device-to-device copy bandwidth (bytes read + written) and dense ``torch.mm`` at
  8192³ after a warm-up;
- times: median of CUDA-graph replays with L2 flushed between replays, for our backend
  (and, with ``compare_default``, the same backend without its shipped tuned tables; with
  ``compare_fused``, with the activation fused into gemm1 at no tile and at every tile; with
  ``compare_pdl``, without programmatic dependent launch), a
  ``torch._grouped_mm`` MoE (sort by expert, two grouped GEMMs, activation, weighted
  unsort) and the naive per-expert loop (eager, not capturable: data-dependent sizes);
  each implementation is first checked against the torch backend in fp32;
- roofline: bytes = weights of the experts actually hit + activations in and out,
  flops = 2·M·k·(H·N + I·H), time = max(bytes / bandwidth, flops / matmul rate).

Results: a JSON file, a Markdown table and (with matplotlib) one PNG per shape.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch

from moe_core.timing import median_event_time, time_eager, time_graph

__all__ = ["measure_ceilings", "time_graph", "grouped_mm_moe", "naive_moe", "random_weights", "fp8_block_weights",
           "table_file_names", "roofline", "roofline_bytes", "run_bench", "untuned", "with_fused_activation"]

logger = logging.getLogger(__name__)

DEFAULT_MODELS = ("mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v2-lite", "gpt-oss-20b")
DEFAULT_TOKENS = (1, 8, 64, 256, 1024, 4096, 16384)
IMPLS = ("ours", "ours_no_pdl", "ours_unfused", "ours_fused", "ours_default", "ours_bf16", "grouped_mm", "naive")   # column order of tables and plots
REGIMES = {"decode": (1, 8, 64), "middle": (256, 1024), "prefill": (4096, 16384)}


def measure_ceilings(reps: int = 20) -> dict[str, float]:
    """Copy bandwidth (bytes/s, read + written) and bf16 matmul rate (flop/s) of this GPU."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    t_copy = median_event_time(lambda: dst.copy_(src), reps, None)
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    for _ in range(5):
        torch.mm(a, b)
    t_mm = median_event_time(lambda: torch.mm(a, b), reps, None)
    del src, dst, a, b
    return {"copy_bytes_per_s": 2 * (1 << 30) / t_copy, "mm_flops_per_s": 2 * n ** 3 / t_mm}


def _act(h: torch.Tensor, layer: Any) -> torch.Tensor:
    from moe_core.reference import apply_activation

    return apply_activation(h.float(), layer).to(h.dtype)


def grouped_mm_moe(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, layer: Any) -> torch.Tensor:
    """The peer a PyTorch user would write: sort slots by expert, int32 offsets,
    ``torch._grouped_mm`` twice, activation, weighted unsort. No host sync."""
    M, k = topk_ids.shape
    E = w1.shape[0]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.int32))   # bincount would sync
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    tokens = order // k
    h = torch._grouped_mm(x[tokens], w1.transpose(1, 2), offs=offs)
    a = _act(h, layer)
    y = torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)
    y = y.float() * topk_weights.reshape(-1)[order].unsqueeze(1)
    out = torch.zeros(M, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, tokens, y)
    return (out * layer.scaling).to(x.dtype)


def naive_moe(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, layer: Any) -> torch.Tensor:
    """The per-expert loop in eager torch (host syncs; not capturable)."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e in range(w1.shape[0]):
        m_idx, j_idx = torch.nonzero(topk_ids == e, as_tuple=True)
        if m_idx.numel() == 0:
            continue
        h = x[m_idx] @ w1[e].T
        y = _act(h, layer) @ w2[e].T
        out.index_add_(0, m_idx, y.float() * topk_weights[m_idx, j_idx].unsqueeze(1))
    return (out * layer.scaling).to(x.dtype)


def random_weights(layer: Any, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 ``w1`` [E, N, H] and ``w2`` [E, H, I] of ``layer`` on the GPU, std 0.1."""
    E, H, I, N = layer.num_local_experts, layer.hidden_size, layer.intermediate_size, layer.gate_up_rows
    w1 = torch.randn(E, N, H, device="cuda", generator=gen, dtype=torch.bfloat16) / 10
    w2 = torch.randn(E, H, I, device="cuda", generator=gen, dtype=torch.bfloat16) / 10
    return w1, w2


def fp8_block_weights(w1: torch.Tensor, w2: torch.Tensor, *, chunk_elems: int = 1 << 28) -> Any:
    """``ExpertWeights`` of ``w1``/``w2`` quantized to fp8 e4m3 w8a8 with [128, 128] weight blocks.

    Quantized a few experts at a time (about ``chunk_elems`` elements): the fp32 temporaries of
    the whole of deepseek-v3's ``w1`` (7.5e9 elements) do not fit next to its weights.
    """
    import moe_core
    from moe_core.testing.quantize_weights import quantize_w8a8

    def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        step = max(1, chunk_elems // max(1, w[0].numel()))
        q = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=w.device)
        scales = []
        for start in range(0, w.shape[0], step):
            q[start:start + step], s = quantize_w8a8(w[start:start + step], torch.float8_e4m3fn, block_shape=(128, 128))
            scales.append(s)
        return q, torch.cat(scales)

    (q1, s1), (q2, s2) = quantize(w1), quantize(w2)
    return moe_core.ExpertWeights(q1, q2, quant=moe_core.QuantSpec.fp8_w8a8(s1, s2, block_shape=(128, 128)))


def table_file_names(layer: Any, device_name: str, dtype: str = "bfloat16") -> list[str]:
    """The gemm1 and gemm2 (``_down``) table file names the bench's weights of ``layer`` read on
    ``device_name``: bf16, or (``dtype="fp8"``) :func:`fp8_block_weights`' block [128, 128] w8a8."""
    from moe_core import config_files

    quant = {"dtype": "fp8_w8a8", "block_shape": (128, 128)} if dtype == "fp8" else {}
    return [config_files.config_file_name(config_files.FileKey(layer.num_local_experts, layer.intermediate_size,
                                                               device_name, **quant, down=down))
            for down in (False, True)]


def _variant(backend: Any, prefix: str, **overrides: Any) -> Any:
    """A fresh instance of a subclass of ``backend``'s class with ``overrides`` as class attributes."""
    cls = type(backend)
    return type(f"{prefix}{cls.__name__}", (cls,), overrides)()


def untuned(backend: Any) -> Any:
    """``backend`` searching no shipped tables: every config comes from ``$MOE_CORE_CONFIG_DIR``
    or the backend's default heuristics (tuned vs default)."""
    return _variant(backend, "Untuned", config_dirs=lambda self: [])


def with_fused_activation(backend: Any, fused: bool = True) -> Any:
    """``backend`` with the activation fused into gemm1's epilogue at every tile (``fused``) or
    at none (see :meth:`moe_core.Backend.fuses_activation`); ``backend`` itself may fuse at
    some tiles only (``fuse_activation_max_tile``)."""
    if fused:
        return _variant(backend, "Fused", fuse_activation=True, fuse_activation_max_tile=None)
    return _variant(backend, "Unfused", fuse_activation=False)


def without_pdl(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run (and so captured) with ``MOE_CORE_PDL=0``: no programmatic dependent launch."""
    def call() -> Any:
        old = os.environ.get("MOE_CORE_PDL")
        os.environ["MOE_CORE_PDL"] = "0"
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["MOE_CORE_PDL"]
            else:
                os.environ["MOE_CORE_PDL"] = old

    return call


def roofline_bytes(M: int, layer: Any, experts_hit: int, weight_bytes_per_elem: float, act_bytes: int) -> float:
    """Bytes one forward must move: the weights of the experts hit, the activations in and out."""
    H, I, N = layer.hidden_size, layer.intermediate_size, layer.gate_up_rows
    return experts_hit * (N * H + H * I) * weight_bytes_per_elem + 2 * M * H * act_bytes


def roofline(M: int, layer: Any, experts_hit: int, weight_bytes_per_elem: float, act_bytes: int,
             ceilings: dict[str, float]) -> float:
    """Lower bound in seconds of one forward (see the module docstring)."""
    H, I, N, k = layer.hidden_size, layer.intermediate_size, layer.gate_up_rows, layer.top_k
    bytes_moved = roofline_bytes(M, layer, experts_hit, weight_bytes_per_elem, act_bytes)
    flops = 2 * M * k * (H * N + I * H)
    return max(bytes_moved / ceilings["copy_bytes_per_s"], flops / ceilings["mm_flops_per_s"])


def run_bench(models: tuple[str, ...] = DEFAULT_MODELS, tokens: tuple[int, ...] = DEFAULT_TOKENS, *,
              dtype: str = "bfloat16", out_dir: Path = Path("bench_out"), backend: str = "cuda",
              peers: tuple[str, ...] = ("grouped_mm", "naive"), seed: int = 0,
              compare_default: bool = False, compare_fused: bool = False,
              compare_pdl: bool = False) -> dict[str, Any]:
    """Run the side-by-side benchmark; returns (and writes) the results.

    :param compare_default: also time ``ours_default``, our backend without its shipped
        tuned tables, to show what the tables buy.
    :param compare_fused: also time ``ours_unfused`` and ``ours_fused``, our backend with the
        activation fused into gemm1 at no tile and at every tile (same tables), checked
        against the oracle like the others.
    :param compare_pdl: also time ``ours_no_pdl``, our backend launched and captured with
        ``MOE_CORE_PDL=0``.
    """
    import moe_core
    from moe_core.presets import PRESETS
    from moe_core.testing import normalized_errors
    from tqdm.auto import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    ceilings = measure_ceilings()
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "dtype": dtype, **ceilings}
    logger.info("ceilings: copy %.0f GB/s, bf16 mm %.0f TFLOP/s", ceilings["copy_bytes_per_s"] / 1e9,
                ceilings["mm_flops_per_s"] / 1e12)
    rows: list[dict[str, Any]] = []
    gen = torch.Generator(device="cuda").manual_seed(seed)
    bar = tqdm(total=len(models) * len(tokens), desc="bench", disable=None)
    for model in models:
        preset = PRESETS[model]
        layer = preset.layer()
        E, H = layer.num_local_experts, layer.hidden_size
        w1, w2 = random_weights(layer, gen)
        weights = moe_core.ExpertWeights(w1, w2)
        wbytes = 1.0 if dtype == "fp8" else 2.0
        if dtype == "fp8":
            weights = fp8_block_weights(w1, w2)
        runner = moe_core.MoERunner(layer, backend=backend)
        bf16_runner = moe_core.MoERunner(layer, backend=backend)
        ours = runner.backend_for(weights.quant)
        default_runner = moe_core.MoERunner(layer, backend=untuned(ours))
        unfused_runner = moe_core.MoERunner(layer, backend=with_fused_activation(ours, False))
        fused_runner = moe_core.MoERunner(layer, backend=with_fused_activation(ours))
        bf16_weights = moe_core.ExpertWeights(w1, w2)
        for M in tokens:
            x = torch.randn(M, H, device="cuda", generator=gen, dtype=torch.bfloat16) / 10
            logits = torch.randn(M, E, device="cuda", generator=gen)
            tw, ti = moe_core.select_experts(logits, layer.top_k, renormalize=preset.renormalize)
            # correctness first (fp32 torch backend; large M is covered by the GPU test suite)
            ref = moe_core.fused_experts(x.float(), w1.float(), w2.float(), tw, ti, layer=layer,
                                         backend="torch") if M <= 1024 else None
            impls: dict[str, Callable[[], torch.Tensor]] = {
                "ours": lambda: runner.run(x, weights, tw, ti)}
            if compare_default:
                impls["ours_default"] = lambda: default_runner.run(x, weights, tw, ti)
            if compare_fused:
                impls["ours_unfused"] = lambda: unfused_runner.run(x, weights, tw, ti)
                impls["ours_fused"] = lambda: fused_runner.run(x, weights, tw, ti)
            if compare_pdl:
                impls["ours_no_pdl"] = without_pdl(lambda: runner.run(x, weights, tw, ti))
            if dtype == "fp8":
                impls["ours_bf16"] = lambda: bf16_runner.run(x, bf16_weights, tw, ti)
            if "grouped_mm" in peers and dtype != "fp8":
                impls["grouped_mm"] = lambda: grouped_mm_moe(x, w1, w2, tw, ti, layer)
            if "naive" in peers and dtype != "fp8":
                impls["naive"] = lambda: naive_moe(x, w1, w2, tw, ti, layer)
            hit = int(torch.unique(ti).numel())
            floor = roofline(M, layer, hit, wbytes, 2, ceilings)
            row: dict[str, Any] = {"model": model, "M": M, "experts_hit": hit, "roofline_s": floor}
            for name, fn in impls.items():
                try:
                    got = fn()
                    err = normalized_errors(got, ref)[0] if ref is not None else float("nan")
                    t = time_eager(fn) if name == "naive" else time_graph(fn)
                except Exception as exc:  # record and go on: one broken peer must not hide the others
                    logger.warning("%s %s M=%d failed: %s", name, model, M, exc)
                    row[name] = {"error": f"{type(exc).__name__}: {exc}"}
                    continue
                row[name] = {"time_s": t, "pct_roofline": 100 * floor / t, "max_err": err}
            rows.append(row)
            bar.update(1)
        del w1, w2, weights, bf16_weights
        torch.cuda.empty_cache()
    bar.close()
    result = {"info": info, "rows": rows}
    (out_dir / f"bench_{dtype}.json").write_text(json.dumps(result, indent=1))
    (out_dir / f"bench_{dtype}.md").write_text(markdown_table(result))
    _plot(result, out_dir)
    return result


def summarize(result: dict[str, Any], impl: str = "ours") -> dict[str, float]:
    """Geometric mean of % of roofline per regime for ``impl``."""
    summary = {}
    for regime, Ms in REGIMES.items():
        vals = [r[impl]["pct_roofline"] for r in result["rows"]
                if r["M"] in Ms and impl in r and "pct_roofline" in r[impl]]
        if vals:
            summary[regime] = math.exp(sum(math.log(v) for v in vals) / len(vals))
    return summary


def markdown_table(result: dict[str, Any]) -> str:
    """The results as a Markdown table (time, % of roofline, ratio to the peer)."""
    info = result["info"]
    impls = [k for k in IMPLS if any(k in r for r in result["rows"])]
    peer = "grouped_mm" if "grouped_mm" in impls else "ours_bf16" if "ours_bf16" in impls else None
    lines = [f"device {info['device']}, torch {info['torch']}, triton {info['triton']}, dtype {info['dtype']}; "
             f"copy {info['copy_bytes_per_s'] / 1e9:.0f} GB/s, mm {info['mm_flops_per_s'] / 1e12:.0f} TFLOP/s", "",
             "| model | M | roofline µs | " + " | ".join(f"{i} µs (% roof)" for i in impls)
             + (f" | {peer} / ours |" if peer else " |"),
             "|---|---|---|" + "---|" * len(impls) + ("---|" if peer else "")]
    for r in result["rows"]:
        cells = []
        for i in impls:
            v = r.get(i, {})
            cells.append(f"{v['time_s'] * 1e6:.1f} ({v['pct_roofline']:.0f}%)" if "time_s" in v else "err")
        ratio = ""
        if peer:
            a, b = r.get(peer, {}), r.get("ours", {})
            ratio = f" {a['time_s'] / b['time_s']:.2f} |" if "time_s" in a and "time_s" in b else " - |"
        lines.append(f"| {r['model']} | {r['M']} | {r['roofline_s'] * 1e6:.1f} | " + " | ".join(cells) + " |" + ratio)
    lines.append("")
    for impl in impls:
        s = summarize(result, impl)
        lines.append(f"{impl}: " + ", ".join(f"{k} {v:.0f}%" for k, v in s.items()) + " of roofline (geomean)")
    return "\n".join(lines) + "\n"


def _plot(result: dict[str, Any], out_dir: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib not installed (pip install moe-core[bench]); no plots")
        return
    for model in sorted({r["model"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["model"] == model]
        fig, ax = plt.subplots(figsize=(6, 4))
        for impl in IMPLS:
            pts = [(r["M"], r[impl]["pct_roofline"]) for r in rows if "pct_roofline" in r.get(impl, {})]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens M")
        ax.set_ylabel("% of roofline")
        ax.set_title(f"{model} ({result['info']['dtype']}, {result['info']['device']})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / f"bench_{result['info']['dtype']}_{model}.png", dpi=100)
        plt.close(fig)
