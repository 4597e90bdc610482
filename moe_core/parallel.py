"""Expert parallelism on ``torch.distributed`` (DESIGN "Beyond one GPU", SEMANTICS §7, §9).

Each rank of a process group holds ``E / world`` experts (plus any fused shared experts)
and runs the one sequence on them through a :class:`~moe_core.MoERunner`. Two modes:

- ``replicated``: every rank sees all tokens; the layer's ``filter_expert`` hook maps
  global ids to local ones (remote ones to ``-1``), each rank computes its partial
  ``s · Σ_j`` over the slots it owns, and an ``all_reduce`` sums the partials (so the
  scaling factor is applied once overall). No host sync: CUDA-graph capturable.
- ``all_to_all``: each rank has its own tokens; every token goes once to each rank that
  owns one of its experts (``all_to_all_single`` with split sizes from the routing; the
  ids travel already local, the other slots as ``-1``), is computed there by the same
  sequence, comes back with a second ``all_to_all_single``, and the partials are added in
  fp32 in the original token order, rank by rank (deterministic). The split sizes must be
  on the host, so this mode syncs once per call and is not graph-capturable.

An expert held by several ranks (fused shared experts) is computed by exactly one: the
holding rank itself in ``all_to_all`` mode, the lowest holding rank in ``replicated`` mode.
LoRA: build :class:`moe_core.hooks.lora.LoRAHooks` with ``for_layer(rank's layer)`` (it
keeps the adapters of the rank's experts) and :meth:`ExpertParallelRunner.register` it;
``run(..., token_adapters=...)`` moves the adapter index with the tokens (in
``all_to_all`` mode size the hooks' ``max_num_tokens`` for the rows a rank receives, up to
``world · M``).
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import torch
import torch.distributed as dist

from moe_core.errors import MoEInputError, MoETypeError
from moe_core.runner import MoERunner
from moe_core.spec import ExpertWeights, MoELayer

__all__ = ["MODES", "ExpertParallelRunner", "ep_layer", "local_expert_ids", "shard_weights"]

logger = logging.getLogger(__name__)

MODES = ("replicated", "all_to_all")


def ep_layer(layer: MoELayer, rank: int, world: int) -> MoELayer:
    """The layer as seen by ``rank`` of ``world``: ``num_experts = E_g``, ``num_local_experts
    = E_routed / world + S`` (S fused shared experts, held by every rank), ``ep_rank``, ``ep_size``.

    :param layer: the whole layer (``num_experts`` = ``num_local_experts`` = ``E_g``).
    """
    E_g = layer.num_experts if layer.num_experts is not None else layer.num_local_experts
    S = layer.num_fused_shared_experts
    if (E_g - S) % world:
        raise MoEInputError(f"world: {E_g - S} routed experts do not split evenly over {world} ranks; "
                            "pass an expert_map for uneven placements")
    return attrs.evolve(layer, num_experts=E_g, num_local_experts=(E_g - S) // world + S, ep_rank=rank,
                        ep_size=world, expert_map=None)


def _table(layer: MoELayer) -> torch.Tensor:
    """int32 [E_g] global -> local table of ``layer`` (CPU), asked of the registered
    ``moe_core_map_expert_ids`` hook (``filter_expert`` or a third-party placement plugin)
    by mapping every global id once."""
    from moe_core import plugins

    if layer.num_experts is None:
        raise MoEInputError("layer: expert parallelism needs num_experts (the global count), got None")
    every = torch.arange(layer.num_experts, dtype=torch.int32).unsqueeze(1)
    if not layer.filter_expert:
        return every.squeeze(1)
    mapper = plugins.hookset_for(plugins.new_plugin_manager()).map_expert_ids
    mapped = mapper(every, layer) if mapper is not None else None
    if mapped is None:
        raise MoEInputError("layer: no moe_core_map_expert_ids hook maps global ids to local ones; install or "
                            "register the 'filter_expert' hook plugin")
    return mapped.squeeze(1).to(torch.int32).cpu()


def local_expert_ids(layer: MoELayer) -> torch.Tensor:
    """int64 [E]: the global id of each local expert of ``layer`` (the inverse table)."""
    table = _table(layer)
    held = (table >= 0).nonzero().squeeze(1)
    inverse = torch.full((layer.num_local_experts,), -1, dtype=torch.int64)
    inverse[table[held].long()] = held
    if bool((inverse < 0).any()):
        raise MoEInputError(f"layer: local experts {(inverse < 0).nonzero().squeeze(1).tolist()} have no global id")
    return inverse


def shard_weights(weights: ExpertWeights, layer: MoELayer) -> ExpertWeights:
    """The rows of ``weights`` (all ``E_g`` experts) that ``layer``'s rank holds, in local order;
    per-expert biases, scales and zero points are sliced alike, per-tensor ones kept."""
    g = local_expert_ids(layer)
    E_g = weights.w1.shape[0]

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or t.dim() == 0 or t.shape[0] != E_g or t.numel() == 1:
            return t
        return t.index_select(0, g.to(t.device))

    q = weights.quant
    quant = q if q.scheme == "none" else attrs.evolve(
        q, w1_scale=pick(q.w1_scale), w2_scale=pick(q.w2_scale), w1_zp=pick(q.w1_zp), w2_zp=pick(q.w2_zp))
    return ExpertWeights(pick(weights.w1), pick(weights.w2), b1=pick(weights.b1), b2=pick(weights.b2), quant=quant)


@attrs.define(eq=False)
class ExpertParallelRunner:
    """One rank's part of an expert-parallel MoE layer.

    :param layer: this rank's layer (``num_experts = E_g``, ``num_local_experts``, ``ep_rank``,
        ``ep_size`` or ``expert_map``), e.g. from :func:`ep_layer`.
    :param weights: this rank's experts (``E = num_local_experts``), e.g. from :func:`shard_weights`.
    :param mode: ``replicated`` or ``all_to_all``.
    :param group: the process group (default: the world); its size must be ``layer.ep_size``
        unless the layer has an ``expert_map``.
    :param backend: backend name or instance for the local computation.
    :param reduce_dtype: dtype the partials are summed in (``replicated``); fp32 by default.

    Construction gathers every rank's expert table (one ``all_gather``): every rank of the
    group must construct its runner at the same point.
    """

    layer: MoELayer
    weights: ExpertWeights
    mode: str = attrs.field(default="replicated", validator=attrs.validators.in_(MODES))
    group: Any = None
    backend: Any = None
    reduce_dtype: torch.dtype | None = torch.float32
    rank: int = attrs.field(init=False)
    world: int = attrs.field(init=False)
    _runner: MoERunner = attrs.field(init=False)
    _tables: torch.Tensor = attrs.field(init=False)
    _dest: torch.Tensor = attrs.field(init=False)
    _computes: torch.Tensor = attrs.field(init=False)
    _lora: list[Any] = attrs.field(init=False, factory=list)

    def __attrs_post_init__(self) -> None:
        layer = self.layer
        if not dist.is_available() or not dist.is_initialized():
            raise MoEInputError("group: torch.distributed is not initialised; call init_process_group first")
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        if layer.expert_map is None and (layer.ep_size != self.world or layer.ep_rank != self.rank):
            raise MoEInputError(f"layer: ep_rank/ep_size = {layer.ep_rank}/{layer.ep_size} but this process is "
                                f"rank {self.rank} of {self.world} in the group")
        if self.weights.w1.shape[0] != layer.num_local_experts:
            raise MoEInputError(f"weights: expected {layer.num_local_experts} local experts (w1.shape[0]), "
                                f"got {self.weights.w1.shape[0]}; shard them with shard_weights")
        device = self.weights.w1.device
        mine = _table(layer).to(device)
        tables = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(tables, mine, group=self.group)
        self._tables = torch.stack(tables).long()                       # [world, E_g]
        held = self._tables >= 0
        ranks = torch.arange(self.world, device=device).unsqueeze(1).expand_as(held)
        first = torch.where(held, ranks, self.world).amin(0)            # lowest holding rank per expert
        if bool((first == self.world).any()):
            missing = (first == self.world).nonzero().squeeze(1).tolist()
            raise MoEInputError(f"layer: global experts {missing} are held by no rank of the group")
        #: [E_g] rank that computes expert g: this rank if it holds g (all_to_all), else the lowest holder
        self._dest = torch.where(held[self.rank], self.rank, first)
        #: [E_g] whether this rank computes g in replicated mode
        self._computes = first == self.rank
        if self.mode == "replicated":
            self._runner = MoERunner(layer, backend=self.backend)
        else:
            # received ids are local already; num_experts=None keeps only ids in [0, E)
            local = attrs.evolve(layer, num_experts=None, ep_rank=0, ep_size=1, expert_map=None)
            self._runner = MoERunner(local, backend=self.backend)

    # ------------------------------------------------------------------ hooks
    def register(self, plugin: Any, name: str | None = None) -> None:
        """Register a hook plugin (e.g. this rank's LoRA hooks) on the local runner."""
        self._runner.register(plugin, name)
        if hasattr(plugin, "set_token_adapters"):
            self._lora.append(plugin)

    def unregister(self, plugin: Any) -> None:
        """Remove a plugin registered with :meth:`register`."""
        self._runner.unregister(plugin)
        self._lora = [p for p in self._lora if p is not plugin]

    # ------------------------------------------------------------------ forward
    def run(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
            token_adapters: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's tokens through the expert-parallel layer; every rank must call it.

        :param x: [M, H] (``replicated``: the same tokens on every rank).
        :param topk_weights: [M, k] fp32.
        :param topk_ids: [M, k] *global* expert ids (``-1`` or out-of-range: no expert).
        :param token_adapters: optional [M] int32 LoRA adapter slot per token (``-1`` none),
            copied into every registered LoRA plugin.
        :returns: [M, H] combined output in ``x.dtype``.
        """
        if not isinstance(topk_ids, torch.Tensor) or topk_ids.dtype not in (torch.int32, torch.int64):
            raise MoETypeError(f"topk_ids: expected an int32 or int64 tensor, got "
                               f"{getattr(topk_ids, 'dtype', type(topk_ids).__name__)}")
        if topk_ids.dim() != 2 or x.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
            raise MoEInputError(f"topk_ids: expected [M, k] with M = x.shape[0] = {x.shape[0] if x.dim() else '?'}, "
                                f"got {list(topk_ids.shape)}")
        if self.mode == "replicated":
            return self._run_replicated(x, topk_weights, topk_ids, token_adapters)
        return self._run_all_to_all(x, topk_weights, topk_ids, token_adapters)

    def _valid(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        E_g = self._tables.shape[1]
        ids64 = ids.long()
        return (ids64 >= 0) & (ids64 < E_g), ids64.clamp(0, E_g - 1)

    def _run_replicated(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                        token_adapters: torch.Tensor | None) -> torch.Tensor:
        valid, ids_c = self._valid(topk_ids)
        # an expert held by several ranks counts once: only its lowest holder keeps the slot
        ids = torch.where(valid & self._computes[ids_c], topk_ids, torch.full_like(topk_ids, -1))
        if token_adapters is not None:
            for plugin in self._lora:
                plugin.set_token_adapters(token_adapters)
        out = self._runner.run(x, self.weights, topk_weights, ids)
        if self.reduce_dtype is None or self.reduce_dtype == out.dtype:
            dist.all_reduce(out, group=self.group)
            return out
        acc = out.to(self.reduce_dtype)
        dist.all_reduce(acc, group=self.group)
        return acc.to(out.dtype)

    def _run_all_to_all(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                        token_adapters: torch.Tensor | None) -> torch.Tensor:
        world, device = self.world, x.device
        M, k = topk_ids.shape
        H = x.shape[1]
        valid, ids_c = self._valid(topk_ids)
        dest = torch.where(valid, self._dest[ids_c], -1)                             # [M, k]
        ranks = torch.arange(world, device=device)
        goes = (dest.unsqueeze(-1) == ranks).any(1)                                  # [M, world]
        pairs = goes.t().nonzero()                                                   # (rank, token), rank-major
        to_rank, tok = pairs[:, 0], pairs[:, 1]
        send_counts = goes.sum(0)                                                    # [world] int64
        # per pair: the token's ids local to the destination (-1 for slots it does not own)
        mine = dest[tok] == to_rank.unsqueeze(1)
        local = self._tables[to_rank.unsqueeze(1), ids_c[tok]]
        meta_ids = torch.where(mine, local, -1).to(torch.int32)
        adapters = (token_adapters[tok].to(torch.int32) if token_adapters is not None
                    else torch.full((tok.shape[0],), -1, dtype=torch.int32, device=device))
        meta = torch.cat([meta_ids, topk_weights[tok].float().contiguous().view(torch.int32),
                          adapters.unsqueeze(1)], dim=1)                             # [P, 2k + 1] int32
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits = send_counts.tolist()                                          # the one host sync
        recv_splits = recv_counts.tolist()
        R = sum(recv_splits)
        recv_x = x.new_empty((R, H))
        dist.all_to_all_single(recv_x, x[tok].contiguous(), recv_splits, send_splits, group=self.group)
        recv_meta = meta.new_empty((R, 2 * k + 1))
        dist.all_to_all_single(recv_meta, meta, recv_splits, send_splits, group=self.group)
        r_ids = recv_meta[:, :k].contiguous()
        r_weights = recv_meta[:, k:2 * k].contiguous().view(torch.float32)
        for plugin in self._lora:
            plugin.set_token_adapters(recv_meta[:, 2 * k].contiguous())
        partial = self._runner.run(recv_x, self.weights, r_weights, r_ids)           # [R, H], scaled
        back = x.new_empty((tok.shape[0], H))
        dist.all_to_all_single(back, partial, send_splits, recv_splits, group=self.group)
        out = torch.zeros((M, H), dtype=torch.float32, device=device)
        start = 0
        for n in send_splits:                                                        # rank by rank: deterministic
            if n:
                out.index_add_(0, tok[start:start + n], back[start:start + n].float())
            start += n
        return out.to(x.dtype)
