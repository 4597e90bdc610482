"""How much of the bench's roofline a kernel of each point's size can reach at all (one GPU).

The roofline of ``moe-core bench`` divides the bytes of a forward by the copy bandwidth of a
1 GiB copy. A short kernel cannot stream at that rate: its loads take a while to ramp up, its
last ones drain with nothing behind them, and every timed CUDA-graph replay carries a fixed
launch cost. This script measures that bound directly. For each preset and batch size it draws
the bench's own routing (same seed, same order of draws, so the same experts are hit), counts
the roofline's bytes, and times the fastest pure read of that many bytes: a streaming-sum kernel
over a sweep of grid sizes, tile sizes and pipeline depths, timed like the bench (graph replay,
L2 flushed, median). Beside it, our forward::

    python benchmarks/read_ceiling.py --tokens 1,8,64 --out read_ceiling.md

A forward cannot beat the read of its own weights, so ``read % of roofline`` is the most any
kernel (or sequence of kernels) can score at that point, and ``ours % of read`` is how close
ours comes to it.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
from pathlib import Path

import torch
import triton
import triton.language as tl

logger = logging.getLogger("read_ceiling")


@triton.jit
def _read_kernel(src, dst, n_per, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """Sum ``n_per`` contiguous bf16 values per program (a pure stream of reads)."""
    base = src + tl.program_id(0).to(tl.int64) * n_per
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in tl.range(0, n_per, BLOCK, num_stages=STAGES):
        acc += tl.load(base + i + offs).to(tl.float32)
    tl.store(dst + tl.program_id(0), tl.sum(acc))


_PROGRAMS, _BLOCKS, _STAGES = (132, 264, 528, 1056, 2112), (1024, 2048, 4096), (3, 4, 6)


def fastest_read(n_bytes: float) -> tuple[float, str]:
    """Seconds of the fastest streaming read of ``n_bytes`` (bf16 values) and its launch."""
    from moe_core.timing import time_graph

    n = int(n_bytes) // 2
    pool = torch.empty(n + 2 * max(_PROGRAMS) * max(_BLOCKS), dtype=torch.bfloat16, device="cuda")  # + rounding
    best = (math.inf, "")
    for programs, block, stages in itertools.product(_PROGRAMS, _BLOCKS, _STAGES):
        per = -(-n // programs)
        per = -(-per // block) * block
        src = pool[: per * programs]
        dst = torch.empty(programs, device=pool.device)
        t = time_graph(lambda: _read_kernel[(programs,)](src, dst, per, BLOCK=block, STAGES=stages,  # noqa: B023
                                                        num_warps=4), warm_s=0.01, reps=15)
        if t < best[0]:
            best = (t, f"{programs} programs × {block}, {stages} stages")
    return best


def main() -> None:
    from tqdm.auto import tqdm

    import moe_core
    from moe_core.bench import DEFAULT_MODELS, DEFAULT_TOKENS, measure_ceilings, random_weights, roofline, roofline_bytes
    from moe_core.presets import PRESETS
    from moe_core.timing import time_graph

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--tokens", default="1,8,64", help="batch sizes among the bench's (its decode regime by default)")
    p.add_argument("--seed", type=int, default=0, help="the bench's routing seed")
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    ceilings = measure_ceilings()
    lines = [f"Device {torch.cuda.get_device_name()}, copy {ceilings['copy_bytes_per_s'] / 1e9:.0f} GB/s.", "",
             "| model | M | MB | roofline µs | fastest read µs (% of roofline) | read launch | "
             "ours µs (% of roofline) | ours % of read |", "|---|---|---|---|---|---|---|---|"]
    read_pct, ours_pct = [], []
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    tokens = [int(m) for m in args.tokens.split(",")]
    models = args.models.split(",")
    bar = tqdm(total=len(models) * len(tokens), desc="read ceiling", disable=None)
    for model in models:
        preset = PRESETS[model]
        layer = preset.layer()
        w1, w2 = random_weights(layer, gen)          # the bench's draws, in its order
        weights = moe_core.ExpertWeights(w1, w2)
        runner = moe_core.MoERunner(layer, backend="cuda")
        for M in DEFAULT_TOKENS:     # every size the bench draws a routing for, so the draws match
            x = torch.randn(M, layer.hidden_size, device="cuda", generator=gen, dtype=torch.bfloat16) / 10
            logits = torch.randn(M, layer.num_local_experts, device="cuda", generator=gen)
            if M not in tokens:
                continue
            tw, ti = moe_core.select_experts(logits, layer.top_k, renormalize=preset.renormalize)
            hit = int(torch.unique(ti).numel())
            roof = roofline(M, layer, hit, 2.0, 2, ceilings)
            n_bytes = roofline_bytes(M, layer, hit, 2.0, 2)
            read, launch = fastest_read(n_bytes)
            ours = time_graph(lambda: runner.run(x, weights, tw, ti))     # noqa: B023
            read_pct.append(roof / read)
            ours_pct.append(roof / ours)
            lines.append(f"| {model} | {M} | {n_bytes / 1e6:.1f} | {roof * 1e6:.1f} | {read * 1e6:.1f} "
                         f"({100 * roof / read:.0f}%) | {launch} | {ours * 1e6:.1f} ({100 * roof / ours:.0f}%) | "
                         f"{100 * read / ours:.0f}% |")
            bar.update(1)
        del w1, w2, weights
        torch.cuda.empty_cache()
    bar.close()

    def geomean(values: list[float]) -> float:
        return 100 * math.exp(sum(map(math.log, values)) / len(values))

    lines += ["", f"Geomean of % of roofline: fastest read {geomean(read_pct):.0f}%, ours {geomean(ours_pct):.0f}%."]
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
