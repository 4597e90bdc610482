"""Expert parallelism over gloo on CPU (TESTING.md tier J; marker ``dist``): 2 and 4
processes, both modes, E = 8, k = 2, M {0, 1, 17}, fp32, equal to the single-process
result; LoRA adapters sharded with their experts; fused shared experts counted once."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch

pytestmark = pytest.mark.dist

E, K, H, I = 8, 2, 32, 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_problem(seed: int, dtype=torch.float32, E_total=E, S=0):
    g = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(E_total, 2 * I, H, generator=g) / math.sqrt(H)).to(dtype)
    w2 = (torch.randn(E_total, H, I, generator=g) / math.sqrt(I)).to(dtype)
    adapters = []
    for r in (4, 8):
        adapters.append(dict(gate_up_a=torch.randn(E_total, 2, r, H, generator=g).to(dtype) / math.sqrt(H),
                             gate_up_b=torch.randn(E_total, 2, I, r, generator=g).to(dtype) / math.sqrt(r),
                             down_a=torch.randn(E_total, r, I, generator=g).to(dtype) / math.sqrt(I),
                             down_b=torch.randn(E_total, H, r, generator=g).to(dtype) / math.sqrt(r),
                             alpha=float(r)))
    return w1, w2, adapters


def _tokens(M: int, seed: int, E_total=E, S=0):
    import moe_core

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, H, generator=g) / 3
    tw, ti = moe_core.select_experts(torch.randn(M, E_total - S, generator=g), top_k=K)
    if M > 2:
        ti[2, 1] = -1                                        # a slot without expert
        ti[M - 1, 0] = 2071690107                            # a stale huge id (CUDA-graph padding)
    if S:                                                   # fused shared experts: weight-1 extra slots
        ti = torch.cat([ti, torch.arange(E_total - S, E_total, dtype=ti.dtype).expand(M, S)], 1)
        tw = torch.cat([tw, torch.ones(M, S)], 1)
    adapters = (torch.arange(M, dtype=torch.int32) % 3) - 1  # none, adapter 0, adapter 1, ...
    return x, tw, ti, adapters


def _single(layer, w1, w2, ad, x, tw, ti, token_adapters):
    """One process, all experts: the reference."""
    from moe_core import ExpertWeights, MoERunner
    from moe_core.hooks.lora import LoRAHooks

    runner = MoERunner(layer, backend="torch")
    if ad:
        lora = LoRAHooks.for_layer(layer, max_loras=len(ad), max_rank=8, max_num_tokens=max(1, x.shape[0]),
                                   dtype=x.dtype)
        for i, a in enumerate(ad):
            lora.add_adapter(f"a{i}", **a)
        lora.set_token_adapters(token_adapters)
        runner.register(lora)
    ids = torch.where((ti >= 0) & (ti < w1.shape[0]), ti, -1).to(torch.int32)
    return runner.run(x, ExpertWeights(w1, w2), tw, ids)


def _worker(rank: int, world: int, port: int) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch.distributed as dist

    from moe_core import ExpertWeights, MoELayer
    from moe_core.hooks.lora import LoRAHooks
    from moe_core.parallel import ExpertParallelRunner, ep_layer, shard_weights
    from moe_core.testing import assert_close_normalized, tolerance_for

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    tol = tolerance_for(torch.float32)
    try:
        for S, with_lora in ((0, False), (0, True), (1, False)):
            E_total = E + S
            full = MoELayer(num_local_experts=E_total, top_k=K + S, hidden_size=H, intermediate_size=I,
                            routed_scaling_factor=1.5, num_fused_shared_experts=S)
            w1, w2, ad = _global_problem(7 + S, E_total=E_total, S=S)
            ad = ad if with_lora else []
            layer = ep_layer(full, rank, world)
            local = shard_weights(ExpertWeights(w1, w2), layer)
            for mode in ("replicated", "all_to_all"):
                ep = ExpertParallelRunner(layer, local, mode=mode, backend="torch")
                if ad:
                    lora = LoRAHooks.for_layer(layer, max_loras=2, max_rank=8, max_num_tokens=64, dtype=torch.float32)
                    for i, a in enumerate(ad):
                        lora.add_adapter(f"a{i}", **a)          # global tensors: this rank keeps its experts
                    ep.register(lora)
                for M in (0, 1, 17):
                    # replicated: the same tokens everywhere; all_to_all: each rank its own batch
                    # (rank 0 of the 17-token round has none: a rank with M = 0 still takes part)
                    m = M if mode == "replicated" or not (M == 17 and rank == 0) else 0
                    seed = 100 * M + (0 if mode == "replicated" else rank)
                    x, tw, ti, ta = _tokens(m, seed, E_total, S)
                    out = ep.run(x, tw, ti, token_adapters=ta if ad else None)
                    ref = _single(full, w1, w2, ad, x, tw, ti, ta)
                    assert out.shape == ref.shape == (m, H)
                    if m:
                        assert_close_normalized(out, ref, *tol, rank=rank, world=world, mode=mode, M=m, S=S,
                                                lora=bool(ad))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_matches_one_process(world):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(world, _free_port()), nprocs=world, join=True)


def test_ep_layer_and_shard_weights():
    from moe_core import ExpertWeights, MoELayer, QuantSpec
    from moe_core.errors import MoEInputError
    from moe_core.parallel import ep_layer, local_expert_ids, shard_weights

    full = MoELayer(num_local_experts=9, top_k=2, hidden_size=H, intermediate_size=I, num_fused_shared_experts=1)
    layer = ep_layer(full, 1, 4)
    assert (layer.num_experts, layer.num_local_experts, layer.ep_rank, layer.ep_size) == (9, 3, 1, 4)
    assert local_expert_ids(layer).tolist() == [2, 3, 8]
    w1, w2 = torch.randn(9, 2 * I, H), torch.randn(9, H, I)
    scale1, scale2 = torch.rand(9), torch.rand(9)
    quant = QuantSpec(scheme="fp8_w8a8", w1_scale=scale1, w2_scale=scale2)
    part = shard_weights(ExpertWeights(w1, w2, b1=torch.randn(9, 2 * I), quant=quant), layer)
    assert torch.equal(part.w1, w1[[2, 3, 8]]) and torch.equal(part.w2, w2[[2, 3, 8]])
    assert torch.equal(part.quant.w1_scale, scale1[[2, 3, 8]]) and part.b1.shape == (3, 2 * I)
    with pytest.raises(MoEInputError, match="do not split evenly"):
        ep_layer(full, 0, 3)


def test_runner_needs_an_initialised_group():
    from moe_core import ExpertWeights, MoELayer
    from moe_core.errors import MoEInputError
    from moe_core.parallel import ExpertParallelRunner, ep_layer

    layer = ep_layer(MoELayer(num_local_experts=8, top_k=2, hidden_size=H, intermediate_size=I), 0, 2)
    with pytest.raises(MoEInputError, match="init_process_group"):
        ExpertParallelRunner(layer, ExpertWeights(torch.randn(4, 2 * I, H), torch.randn(4, H, I)))
