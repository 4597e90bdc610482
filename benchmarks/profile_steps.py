"""Where one forward's time goes, per kernel, on one CUDA GPU (evidence for issue 5's levers).

For each preset and M: the CUDA-graph replay time (as ``moe-core bench`` measures it), the
eager wall time per forward (launched back to back, so host cost shows), and the GPU time
of every kernel of one eager forward from ``torch.profiler``; up to M = 64 also the eager wall
time of a runner with ``cuda_graph_max_tokens=64`` (its captured forward replayed)::

    python benchmarks/profile_steps.py --models qwen3-30b-a3b --tokens 1,64,4096 --out prof.md

``--graph-steps`` instead times each step of the forward alone as ``moe-core bench`` times the
whole forward (a CUDA graph of that one step, L2 flushed before each replay, median), with the
runner's own plan and the sequence's own step calls, beside the forward and a trivial kernel
(the replay floor every row includes): a forward close to the sum of its steps less the floors
has no bubbles between kernels to remove, and the GB/s of each GEMM (weights of the experts hit
over its time) says how far it is from the copy bandwidth.
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


def step_graph_times(runner, x, weights, tw, ti) -> dict[str, float]:
    """Microseconds of the forward and of each of its steps alone (align, gemm1 with its input
    quantization and, when fused, its activation; the activation step when not; gemm2, combine)
    as CUDA-graph replays with L2 flushed,
    with the plan ``runner`` resolved for this call; ``floor`` is one trivial kernel's replay."""
    from moe_core import sequence
    from moe_core.timing import time_graph

    runner.run(x, weights, tw, ti)
    plan = runner._last_plan
    layer, backend = plan.layer, plan.backend
    M, k, E = x.shape[0], ti.shape[1], weights.w2.shape[0]
    ids = ti.to(torch.int32)
    aligned = backend.align(ids, plan.block_m, E)
    rows = aligned[0].shape[0] if plan.sorted_intermediate else M * k
    act = torch.empty((rows, layer.intermediate_size), dtype=x.dtype, device=x.device)
    gate_up = act if plan.fused_activation else torch.empty((M * k, weights.w1.shape[1]), dtype=x.dtype,
                                                            device=x.device)
    down = torch.empty((M * k, x.shape[1]), dtype=x.dtype, device=x.device)
    out = torch.empty_like(x)
    ticker = torch.zeros(1, device=x.device)
    on_input = layer.apply_router_weight_on_input
    steps = {
        "forward": lambda: runner.run(x, weights, tw, ti),
        "align": lambda: backend.align(ids, plan.block_m, E),
        "gemm1": lambda: sequence._gemm(plan, 1, x, weights.w1, gate_up, bias=weights.b1, topk_weights=tw,
                                        aligned=aligned, top_k=k, mul_routed_weight=on_input, config=plan.config,
                                        activation=layer if plan.fused_activation else None),
        "activation": lambda: None if plan.fused_activation else backend.activation(gate_up, act, layer, ids),
        "gemm2": lambda: sequence._gemm(plan, 2, act, weights.w2, down, bias=weights.b2, topk_weights=tw,
                                        aligned=aligned, top_k=1, mul_routed_weight=not on_input,
                                        config=plan.down_config),
        "combine": lambda: backend.combine(down.view(M, k, -1), out, layer.scaling),
        "floor": lambda: ticker.add_(1),
    }
    if plan.fused_activation:
        del steps["activation"]
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(3):                      # interleaved rounds, median
        for name, fn in steps.items():
            times[name].append(time_graph(fn, warm_s=0.02) * 1e6)
    return {name: sorted(v)[1] for name, v in times.items()}


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
    p.add_argument("--graph-steps", action="store_true",
                   help="time each step alone in a CUDA graph with L2 flushed, beside the forward")
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
            if args.graph_steps:
                lines += _graph_steps_rows(model, M, step_graph_times(runner, x, weights, tw, ti), weights, ti,
                                           header=not any(line.startswith("| model |") for line in lines))
                logger.info("%s", lines[-1])
                continue
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


def _graph_steps_rows(model: str, M: int, t: dict[str, float], weights, ti, *, header: bool) -> list[str]:
    """Markdown row(s) of :func:`step_graph_times`: µs per step, and each GEMM's weight GB/s with
    the replay floor taken off."""
    hit = int(torch.unique(ti).numel())
    gbps = {}
    for name, w in (("gemm1", weights.w1), ("gemm2", weights.w2)):
        body = max(t[name] - t["floor"], 1e-3)
        gbps[name] = hit * w[0].numel() * w.element_size() / body / 1e3
    rows = ["| model | M | forward µs | align | gemm1 | activation | gemm2 | combine | floor | gemm1 GB/s | gemm2 GB/s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"] if header else []
    act = f"{t['activation']:.1f}" if "activation" in t else "fused"
    rows.append(f"| {model} | {M} | {t['forward']:.1f} | {t['align']:.1f} | {t['gemm1']:.1f} | {act} "
                f"| {t['gemm2']:.1f} | {t['combine']:.1f} | {t['floor']:.1f} | {gbps['gemm1']:.0f} "
                f"| {gbps['gemm2']:.0f} |")
    return rows


if __name__ == "__main__":
    main()
