"""A/B of the grouped-GEMM kernel: an older copy of ``moe_core/kernels/_gemm.py`` against the
working tree's, whole forward, in one process on one CUDA GPU.

Each point times the forward (CUDA-graph replays, L2 flushed between, median, as ``moe-core
bench`` does) with each kernel in turn, ``--rounds`` times alternating, and keeps each side's
best round; both outputs must be bitwise equal, as a change to scheduling alone leaves them
(``--allow-diff`` reports the largest difference instead of failing). The GPU machine has no
git, so write the old kernel out first::

    git show HEAD:moe_core/kernels/_gemm.py > /tmp/gemm_old.py
    python benchmarks/kernel_ab.py --old /tmp/gemm_old.py --dtype fp8 --out ab.md

Output: a Markdown table (old µs, new µs, old/new: above 1 means the tree is faster) on
stdout and in ``--out``. Exit status 1 when any point's outputs differ (without
``--allow-diff``).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("kernel_ab")

#: the prefill and middle points where fp8 and bf16 kernel changes have mattered (NOTES.md)
DEFAULT_POINTS = ("gpt-oss-20b:1024,4096,16384", "qwen3-30b-a3b:256,4096,16384",
                  "deepseek-v2-lite:4096,16384", "mixtral-8x7b:4096")


def load_old_kernel(path: Path) -> Any:
    """The ``_grouped_gemm_kernel`` of the file at ``path`` (imported under a private name)."""
    spec = importlib.util.spec_from_file_location("moe_core.kernels._gemm_ab_old", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--old: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._grouped_gemm_kernel


def parse_points(specs: list[str]) -> list[tuple[str, tuple[int, ...]]]:
    """``["model:M1,M2", ...]`` -> ``[(model, (M1, M2)), ...]``, models checked against the presets."""
    from moe_core.presets import PRESETS

    points = []
    for spec in specs:
        model, _, tokens = spec.partition(":")
        if model not in PRESETS:
            raise SystemExit(f"--points: unknown model {model!r}; expected one of {sorted(PRESETS)}")
        try:
            Ms = tuple(int(t) for t in tokens.split(",") if t)
        except ValueError:
            raise SystemExit(f"--points: expected model:M1,M2,..., got {spec!r}") from None
        if not Ms or min(Ms) < 1:
            raise SystemExit(f"--points: expected positive token counts in {spec!r}")
        points.append((model, Ms))
    return points


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True, help="an older copy of moe_core/kernels/_gemm.py")
    parser.add_argument("--dtype", choices=("bfloat16", "fp8"), default="fp8",
                        help="bf16 weights, or fp8 block [128,128] w8a8 (default)")
    parser.add_argument("--points", nargs="+", default=list(DEFAULT_POINTS), help="model:M1,M2,... each")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per point (best kept)")
    parser.add_argument("--allow-diff", action="store_true", help="report, do not fail on, output differences")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("kernel_ab.py needs a CUDA GPU")
    if args.rounds < 1:
        raise SystemExit(f"--rounds: expected >= 1, got {args.rounds}")

    import moe_core
    import moe_core.kernels._gemm as gemm_module
    from moe_core.bench import fp8_block_weights, random_weights
    from moe_core.presets import PRESETS
    from moe_core.timing import time_graph
    from tqdm.auto import tqdm

    points = parse_points(args.points)
    kernels = {"old": load_old_kernel(args.old), "new": gemm_module._grouped_gemm_kernel}
    gen = torch.Generator(device="cuda").manual_seed(0)
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
             f"{__import__('triton').__version__}, {args.dtype}, best of {args.rounds} alternating rounds", "",
             "| model | M | old µs | new µs | old / new | outputs |", "|---|---|---|---|---|---|"]
    differ = False
    bar = tqdm(total=sum(len(Ms) for _, Ms in points), desc="kernel A/B", disable=None)
    try:
        for model, Ms in points:
            preset = PRESETS[model]
            layer = preset.layer()
            w1, w2 = random_weights(layer, gen)
            weights = fp8_block_weights(w1, w2) if args.dtype == "fp8" else moe_core.ExpertWeights(w1, w2)
            runner = moe_core.MoERunner(layer, backend="cuda")
            for M in Ms:
                x = torch.randn(M, layer.hidden_size, device="cuda", generator=gen, dtype=torch.bfloat16) / 10
                logits = torch.randn(M, layer.num_local_experts, device="cuda", generator=gen)
                tw, ti = moe_core.select_experts(logits, layer.top_k, renormalize=preset.renormalize)

                def forward() -> torch.Tensor:
                    return runner.run(x, weights, tw, ti)

                outs, best = {}, {}
                for name, kernel in kernels.items():
                    gemm_module._grouped_gemm_kernel = kernel
                    outs[name] = forward().clone()
                for _ in range(args.rounds):
                    for name, kernel in kernels.items():
                        gemm_module._grouped_gemm_kernel = kernel
                        best[name] = min(best.get(name, float("inf")), time_graph(forward))
                same = torch.equal(outs["old"], outs["new"])
                diff = "bitwise equal" if same else \
                    f"differ (max {(outs['old'].float() - outs['new'].float()).abs().max().item():.3g})"
                differ |= not same
                lines.append(f"| {model} | {M} | {best['old'] * 1e6:.1f} | {best['new'] * 1e6:.1f} | "
                             f"{best['old'] / best['new']:.3f} | {diff} |")
                logger.info(lines[-1])
                bar.update(1)
            del w1, w2, weights
            torch.cuda.empty_cache()
    finally:
        gemm_module._grouped_gemm_kernel = kernels["new"]
        bar.close()
    table = "\n".join(lines) + "\n"
    sys.stdout.write(table)
    if args.out is not None:
        args.out.write_text(table)
    return 1 if differ and not args.allow_diff else 0


if __name__ == "__main__":
    sys.exit(main())
