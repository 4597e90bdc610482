"""Where one forward's time goes, per kernel, on one CUDA GPU (evidence for issue 5's levers).

For each preset and M: the CUDA-graph replay time (as ``moe-core bench`` measures it), the
eager wall time per forward (launched back to back, so host cost shows), and the GPU time
of every kernel of one eager forward from ``torch.profiler``; up to M = 64 also the eager wall
time of a runner with ``cuda_graph_max_tokens=64`` (its captured forward replayed)::

    python benchmarks/profile_steps.py --models qwen3-30b-a3b --tokens 1,64,4096 --out prof.md
"""

from __future__ import annotations

import argparse
import collections
import logging
import time

import torch

logger = logging.getLogger("profile_steps")


def kernel_times(fn, reps: int = 5) -> dict[str, float]:
    """Mean GPU microseconds per forward of every kernel ``fn`` launches (by kernel name)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = collections.defaultdict(float)
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time_total > 0:
            totals[event.key[:60]] += event.device_time_total / reps
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def eager_wall(fn, reps: int = 100, rounds: int = 3) -> float:
    """Seconds per forward, ``reps`` forwards launched back to back, one sync at the end; the
    best of ``rounds`` (host-side timings catch other processes' noise)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / reps)
    return best


def main() -> None:
    import moe_core
    from moe_core.bench import fp8_block_weights, random_weights, time_graph
    from moe_core.presets import PRESETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen3-30b-a3b,mixtral-8x7b")
    p.add_argument("--tokens", default="1,64,4096")
    p.add_argument("--backend", default="cuda")
    p.add_argument("--dtype", choices=("bfloat16", "fp8"), default="bfloat16",
                   help="bf16 weights, or fp8 block [128,128] w8a8 (bf16 activations either way)")
    p.add_argument("--out", default=None, help="also write the Markdown here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    lines = [f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"triton {__import__('triton').__version__}, weights {args.dtype}", ""]
    gen = torch.Generator(device="cuda").manual_seed(0)
    for model in args.models.split(","):
        preset = PRESETS[model]
        layer = preset.layer()
        E, H = layer.num_local_experts, layer.hidden_size
        w1, w2 = random_weights(layer, gen)
        weights = fp8_block_weights(w1, w2) if args.dtype == "fp8" else moe_core.ExpertWeights(w1, w2)
        runner = moe_core.MoERunner(layer, backend=args.backend)
        graphed = moe_core.MoERunner(layer, backend=args.backend, cuda_graph_max_tokens=64)
        for M in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(M, H, device="cuda", generator=gen, dtype=torch.bfloat16) / 10
            logits = torch.randn(M, E, device="cuda", generator=gen)
            tw, ti = moe_core.select_experts(logits, layer.top_k, renormalize=preset.renormalize)
            fn = lambda: runner.run(x, weights, tw, ti)  # noqa: E731
            graph, eager = time_graph(fn), eager_wall(fn)
            cached = ""
            if M <= graphed.cuda_graph_max_tokens:         # the runner's own graph cache
                t = eager_wall(lambda: graphed.run(x, weights, tw, ti))
                cached = f", eager with cuda_graph_max_tokens {t * 1e6:.1f} µs ({t / graph:.2f})"
            kernels = kernel_times(fn)
            lines += [f"### {model} M={M}: graph {graph * 1e6:.1f} µs, eager {eager * 1e6:.1f} µs "
                      f"(eager/graph {eager / graph:.2f}){cached}, kernels sum {sum(kernels.values()):.1f} µs", "",
                      "| kernel | µs per forward |", "|---|---|"]
            lines += [f"| `{name}` | {us:.1f} |" for name, us in kernels.items()]
            lines.append("")
            logger.info("%s", "\n".join(lines[-len(kernels) - 5:]))
        del w1, w2, weights
        torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
