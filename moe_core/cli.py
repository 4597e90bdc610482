"""The ``moe-core`` command (also ``python -m moe_core``): backends, run, configs, tune, bench.

``main(argv) -> int`` is testable without a subprocess. The CLI is the only place that
configures logging or prints.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Sequence

import torch

__all__ = ["main", "build_parser", "make_weights"]

logger = logging.getLogger("moe_core.cli")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: above this many bytes per weight tensor, experts share one buffer through overlapping strides
_FULL_WEIGHTS_LIMIT = 2 << 30


# -------------------------------------------------------------------------------------
# backends
# -------------------------------------------------------------------------------------


def _cmd_backends(args: argparse.Namespace) -> int:
    from moe_core import plugins

    rows = [("name", "group", "platform", "priority", "state", "available / why not", "distribution")]
    for info in plugins.load_report():
        if info.group == plugins.BACKENDS_GROUP:
            ok, reason = info.available
            avail = ("yes" if ok else "no") + (f": {reason}" if reason else "")
        else:
            avail = "-"
        rows.append((info.name, "hook" if info.group == plugins.HOOKS_GROUP else "backend", info.platform or "-",
                     "-" if info.priority is None else str(info.priority), info.state, avail,
                     f"{info.distribution} {info.version}".strip()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    failed = [i for i in plugins.load_report() if i.error is not None]
    for info in failed:
        print(f"\nload error of {info.name!r} ({info.distribution} {info.version}):\n{info.traceback.rstrip()}")
    return 0


# -------------------------------------------------------------------------------------
# run
# -------------------------------------------------------------------------------------


def make_weights(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device,
                 generator: torch.Generator, std: float = 0.1) -> torch.Tensor:
    """Random weights [E, rows, K]. When the full tensor would exceed ~2 GiB, experts are
    overlapping windows of one buffer (expert stride smaller than rows·K): every expert
    still has its own values, and the kernels read them through strides."""
    E, rows, K = shape
    per_expert = rows * K
    if E * per_expert * torch.tensor([], dtype=dtype).element_size() <= _FULL_WEIGHTS_LIMIT:
        return (torch.randn(shape, generator=generator, device="cpu") * std).to(dtype).to(device)
    expert_stride = 4099 if per_expert > 4099 else per_expert // 2 + 1   # any shift works; not a multiple of K
    base = (torch.randn(per_expert + (E - 1) * expert_stride, generator=generator) * std).to(dtype).to(device)
    logger.info("weights %s share one buffer (expert stride %d) to fit memory", list(shape), expert_stride)
    return base.as_strided(shape, (expert_stride, K, 1))


def _cmd_run(args: argparse.Namespace) -> int:
    import moe_core
    from moe_core.presets import PRESETS
    from moe_core.testing import assert_close_normalized, normalized_errors, oracle_moe, tolerance_for

    preset = PRESETS[args.model]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    gen = torch.Generator().manual_seed(args.seed)
    layer = preset.layer()
    runner = moe_core.MoERunner(layer, backend=args.backend)
    logger.info("backend %s", runner.backend.name)              # fail fast on a bad --backend
    E, H, I, N = layer.num_local_experts, layer.hidden_size, layer.intermediate_size, layer.gate_up_rows
    M = args.tokens
    w1 = make_weights((E, N, H), dtype, device, gen)
    w2 = make_weights((E, H, I), dtype, device, gen)
    b1 = b2 = None
    if preset.has_bias:
        b1 = (torch.randn(E, N, generator=gen) * 0.1).to(dtype).to(device)
        b2 = (torch.randn(E, H, generator=gen) * 0.1).to(dtype).to(device)
    x = (torch.randn(M, H, generator=gen) * 0.1).to(dtype).to(device)
    logits = torch.randn(M, preset.num_experts, generator=gen).to(device)
    bias = None
    if preset.num_expert_group is not None:
        bias = (torch.randn(preset.num_experts, generator=gen) * 0.01).to(device)
    topk_weights, topk_ids = moe_core.select_experts(
        logits, preset.top_k, renormalize=preset.renormalize, scoring_func=preset.scoring_func,
        num_expert_group=preset.num_expert_group, topk_group=preset.topk_group, correction_bias=bias)
    weights = moe_core.ExpertWeights(w1, w2, b1=b1, b2=b2)
    out = runner.run(x, weights, topk_weights, topk_ids)          # warm-up (compiles kernels)
    _sync(device)
    reps = max(1, args.repeat)
    start = time.perf_counter()
    for _ in range(reps):
        out = runner.run(x, weights, topk_weights, topk_ids)
    _sync(device)
    elapsed = (time.perf_counter() - start) / reps
    ref = oracle_moe(x, w1, w2, topk_weights, topk_ids, activation=layer.activation, is_gated=layer.is_gated,
                     gate_up_layout=layer.gate_up_layout, alpha=layer.gemm1_alpha, limit=layer.gemm1_limit,
                     b1=b1, b2=b2, routed_scaling_factor=layer.routed_scaling_factor,
                     round_intermediate=None if dtype == torch.float32 else dtype)
    max_err, rms_err = normalized_errors(out, ref)
    maxtol, rmstol = tolerance_for(dtype)
    print(f"model {preset.name}: E={E} k={layer.top_k} H={H} I={I} tokens={M} dtype={str(dtype)[6:]} device={device}")
    print(f"backend {runner.backend.name}; forward {elapsed * 1e3:.3f} ms (mean of {reps})")
    print(f"normalised error vs float64 oracle: max {max_err:.3e} (tol {maxtol:.0e}), rms {rms_err:.3e} "
          f"(tol {rmstol:.0e})")
    try:
        assert_close_normalized(out, ref, maxtol, rmstol)
    except AssertionError as exc:
        print(f"FAIL: {exc}")
        return 1
    print("PASS")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moe_core import bench

    if not torch.cuda.is_available():
        print("moe-core bench: needs a CUDA GPU (times CUDA-graph replays against measured ceilings)",
              file=sys.stderr)
        return 2
    result = bench.run_bench(tuple(args.models.split(",")), tuple(int(t) for t in args.tokens.split(",")),
                             dtype=args.dtype, out_dir=Path(args.out), backend=args.backend,
                             compare_default=args.compare_default, compare_fused=args.compare_fused,
                             compare_pdl=args.compare_pdl)
    print(bench.markdown_table(result))
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -------------------------------------------------------------------------------------
# parser
# -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every sub-command."""
    from moe_core import envs

    epilog = "environment variables:\n" + "\n".join(f"  {k}: {v}" for k, v in envs.ENV_VARS.items())
    parser = argparse.ArgumentParser(prog="moe-core", description="moe-core: the MoE layer of LLM inference",
                                     epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("backends", help="list installed backends and hook plugins, their state and why")
    p.set_defaults(func=_cmd_backends)

    try:
        from moe_core.presets import PRESETS
        models = sorted(PRESETS)
    except ImportError:  # presets arrive with the config module
        models = None
    p = sub.add_parser("run", help="run one MoE layer of a preset model's shape and check it against the oracle")
    p.add_argument("--model", required=True, choices=models, help="preset model shape (MODELS.md)")
    p.add_argument("--tokens", type=int, default=16, help="tokens M in the batch (default 16)")
    p.add_argument("--backend", default=None, help="backend name (default: MOE_CORE_BACKEND, else automatic)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="compute dtype (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--repeat", type=int, default=3, help="timed forwards after one warm-up (default 3)")
    p.set_defaults(func=_cmd_run)

    from moe_core import bench

    p = sub.add_parser("bench", help="side-by-side benchmark against torch._grouped_mm and a naive loop (GPU)")
    p.add_argument("--models", default=",".join(bench.DEFAULT_MODELS), help="comma-separated presets")
    p.add_argument("--tokens", default=",".join(map(str, bench.DEFAULT_TOKENS)), help="comma-separated M values")
    p.add_argument("--dtype", choices=("bfloat16", "fp8"), default="bfloat16",
                   help="bfloat16, or fp8 block [128,128] w8a8 against our own bf16 path")
    p.add_argument("--backend", default="cuda", help="our backend to time (default cuda)")
    p.add_argument("--out", default="bench_out", help="folder for JSON, Markdown and PNG results")
    p.add_argument("--compare-default", action="store_true",
                   help="also time our backend without its shipped tuned tables (column ours_default)")
    p.add_argument("--compare-fused", action="store_true",
                   help="also time our backend with the activation fused into gemm1 at no tile and at "
                        "every tile (columns ours_unfused, ours_fused)")
    p.add_argument("--compare-pdl", action="store_true",
                   help="also time our backend without programmatic dependent launch (column ours_no_pdl)")
    p.set_defaults(func=_cmd_bench)

    try:
        from moe_core import cli_configs
    except ImportError:
        cli_configs = None
    if cli_configs is not None:
        cli_configs.add_configs_parser(sub)
        cli_configs.add_tune_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``moe-core``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "run" and args.tokens < 0:
        parser.error(f"--tokens: expected >= 0, got {args.tokens}")
    try:
        return int(args.func(args) or 0)
    except Exception as exc:  # a clean message for users; -vv shows the traceback
        from moe_core.errors import MoECoreError

        if isinstance(exc, MoECoreError) and args.verbose < 2:
            print(f"moe-core {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
