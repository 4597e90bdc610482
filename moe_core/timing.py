"""GPU timing shared by ``moe-core bench`` and ``moe-core tune``: CUDA-graph replays with L2
flushed before each one, so a kernel is timed streaming its weights from HBM as in a real
forward (a small expert set fits in L2 and, timed back to back, looks up to 1.5× faster)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

__all__ = ["median_event_time", "l2_flush_buffer", "warm_up", "time_graph", "time_eager"]

# larger than the L2 of any GPU we tune on (H100/H200: 50 MB, MI300X: 256 MB of Infinity Cache)
_FLUSH_BYTES = 256 << 20


def median_event_time(fn: Callable[[], Any], reps: int, flush: torch.Tensor | None) -> float:
    """Median seconds of ``fn`` over ``reps`` runs, L2 flushed (outside the timed region) before each."""
    times = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(times)


def l2_flush_buffer() -> torch.Tensor:
    """A device buffer whose ``zero_()`` evicts the whole L2."""
    return torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device="cuda")


def warm_up(fn: Callable[[], Any], seconds: float = 0.05) -> None:
    """Run ``fn`` back to back for about ``seconds`` so the GPU's clocks are up before timing:
    the first point of a bench run measured 10% slow after the host-side setup let them drop."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    runs = 0
    while runs < 3 or time.perf_counter() - start < seconds:
        fn()
        runs += 1
        if runs % 8 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()


def time_graph(fn: Callable[[], Any], reps: int = 30, warm_s: float = 0.05) -> float:
    """Median seconds of CUDA-graph replays of ``fn`` (captured after a warm-up), L2 flushed between.

    :param warm_s: seconds of back-to-back replays before timing (clocks up).
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    flush = l2_flush_buffer()
    warm_up(graph.replay, warm_s)
    return median_event_time(graph.replay, reps, flush)


def time_eager(fn: Callable[[], Any], reps: int = 10) -> float:
    """Median seconds of eager calls, L2 flushed between."""
    fn()
    return median_event_time(fn, reps, l2_flush_buffer())
