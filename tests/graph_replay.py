"""Replaying a captured CUDA graph on fresh inputs, the way the GPU graph tests all do it."""

from __future__ import annotations

from typing import Sequence

import torch


def replay_fresh(graph: torch.cuda.CUDAGraph, statics: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                 out: torch.Tensor) -> torch.Tensor:
    """Copy ``inputs`` into the graph's static buffers, poison its output ``out`` with NaN (rows
    the replay does not write then show up), replay and wait; returns ``out``."""
    for static, fresh in zip(statics, inputs, strict=True):
        static.copy_(fresh)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    return out
