"""Hook plugin ``filter_expert``: global -> local expert ids (SEMANTICS §7).

Active exactly when ``layer.filter_expert`` (``num_experts != num_local_experts`` or
unknown). The table is int32 [E_g] filled with ``-1``: global ``[rank·L, (rank+1)·L)``
maps to ``0 … L−1`` (L local routed experts), the last S global ids (fused shared
experts) to ``L … L+S−1``; an explicit ``layer.expert_map`` replaces it. Ids outside
``[0, E_g)`` — stale values in padded rows of a CUDA-graph batch — become ``-1``
*before* the gather, so the table is never indexed with ``-1``. Rows at or past the
caller's ``n_valid`` are set to ``-1`` by the sequence after this hook (SEMANTICS §7).

The table is built (and checked) once per layer and device; the mapping itself makes no
host sync and allocates only [M, k] tensors, so it survives CUDA-graph capture.
"""

from __future__ import annotations

import threading
import weakref

import torch

from moe_core import hookimpl
from moe_core.spec import MoELayer

_TABLES: weakref.WeakKeyDictionary[MoELayer, dict[torch.device, torch.Tensor]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def build_table(layer: MoELayer) -> torch.Tensor:
    """The int32 [E_g] global -> local table of ``layer`` on the CPU: :meth:`MoELayer.expert_table`."""
    return layer.expert_table()


def _table_on(layer: MoELayer, device: torch.device) -> torch.Tensor:
    with _LOCK:
        per_device = _TABLES.setdefault(layer, {})
        if device not in per_device:
            per_device[device] = build_table(layer).to(device)
        return per_device[device]


@hookimpl
def moe_core_map_expert_ids(topk_ids: torch.Tensor, layer: MoELayer) -> torch.Tensor | None:
    """Map ``topk_ids`` [M, k] int32 global ids to local ids in ``[-1, E)``.

    :returns: a new [M, k] int32 tensor, or None when ``layer.filter_expert`` is off.
    """
    if not layer.filter_expert:
        return None
    E = layer.num_local_experts
    if layer.num_experts is None:   # global count unknown: ids are local already; drop the rest
        valid = (topk_ids >= 0) & (topk_ids < E)
        return torch.where(valid, topk_ids, torch.full_like(topk_ids, -1))
    E_g = layer.num_experts
    table = _table_on(layer, topk_ids.device)
    valid = (topk_ids >= 0) & (topk_ids < E_g)
    gathered = table[topk_ids.clamp(0, E_g - 1).long()]
    return torch.where(valid, gathered, torch.full_like(gathered, -1))
