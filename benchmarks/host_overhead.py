"""Host cost of one eager forward through the Triton sequence, without a GPU.

Every Triton kernel launch is replaced by a no-op, so what is left is moe-core's own Python
on the hot path (validation, config resolution, hooks, allocation, the kernel wrappers'
argument handling). Runs on the CPU under ``TRITON_INTERPRET=1``; the Triton launch cost
itself is measured on the GPU by ``benchmarks/profile_steps.py`` (eager vs graph)::

    python benchmarks/host_overhead.py                 # qwen3-30b-a3b shape, M = 1
    python benchmarks/host_overhead.py --profile       # plus the top functions by own time
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from _kernels import replace_kernels  # noqa: E402 - benchmarks/ is the script's folder


def main() -> None:
    import moe_core
    from moe_core.presets import PRESETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-30b-a3b")
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--reps", type=int, default=3000)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    replace_kernels(lambda name, kernel, args, kwargs: None)    # every launch a no-op

    from moe_core.kernels.backend import TritonBackend

    class HostOnly(TritonBackend):
        name = "host-only"

    preset = PRESETS[args.model]
    layer = preset.layer()
    E, H, I, N = layer.num_local_experts, layer.hidden_size, layer.intermediate_size, layer.gate_up_rows
    w1 = torch.empty(E, N, H, dtype=torch.float16)
    w2 = torch.empty(E, H, I, dtype=torch.float16)
    x = torch.randn(args.tokens, H, dtype=torch.float16)
    tw, ti = moe_core.select_experts(torch.randn(args.tokens, E), top_k=layer.top_k)
    runner = moe_core.MoERunner(layer, backend=HostOnly())
    weights = moe_core.ExpertWeights(w1, w2)
    fn = lambda: runner.run(x, weights, tw, ti)  # noqa: E731
    for _ in range(100):
        fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(args.reps):
            fn()
        best = min(best, (time.perf_counter() - start) / args.reps)
    print(f"{args.model} M={args.tokens}: {best * 1e6:.1f} µs host per forward without kernel launches "
          f"(best of 3 × {args.reps})")
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(lambda: [fn() for _ in range(500)])
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
