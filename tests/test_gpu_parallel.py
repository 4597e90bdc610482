"""Expert parallelism over NCCL on 2 GPUs (TESTING.md §5; markers ``gpu``, ``dist``):
E 64, k 6, M {1, 128, 4096}, bf16, both modes, against one GPU holding every expert; plus
LoRA adapters sharded with their experts (M 128, both modes)."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.dist]

E, K, H, I = 64, 6, 2048, 704


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    import moe_core
    from moe_core import ExpertWeights, MoELayer, MoERunner
    from moe_core.hooks.lora import LoRAHooks
    from moe_core.parallel import ExpertParallelRunner, ep_layer, shard_weights
    from moe_core.testing import assert_close_normalized, tolerance_for

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=dev)
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    w1 = (torch.randn(E, 2 * I, H, generator=g) / math.sqrt(H)).to(dtype).to(dev)
    w2 = (torch.randn(E, H, I, generator=g) / math.sqrt(I)).to(dtype).to(dev)
    adapters = [dict(gate_up_a=(torch.randn(E, 2, r, H, generator=g) / math.sqrt(H)).to(dtype).to(dev),
                     gate_up_b=(torch.randn(E, 2, I, r, generator=g) / math.sqrt(r)).to(dtype).to(dev),
                     down_a=(torch.randn(E, r, I, generator=g) / math.sqrt(I)).to(dtype).to(dev),
                     down_b=(torch.randn(E, H, r, generator=g) / math.sqrt(r)).to(dtype).to(dev), alpha=float(r))
                for r in (16, 64)]
    full = MoELayer(num_local_experts=E, top_k=K, hidden_size=H, intermediate_size=I, routed_scaling_factor=2.5)
    layer = ep_layer(full, rank, world)
    local = shard_weights(ExpertWeights(w1, w2), layer)
    tol = tolerance_for(dtype)
    try:
        for mode in ("replicated", "all_to_all"):
            for M, with_lora in ((1, False), (128, False), (4096, False), (128, True)):
                seed = M * 10 + (0 if mode == "replicated" else rank + 1)
                gg = torch.Generator().manual_seed(seed)
                x = (torch.randn(M, H, generator=gg) / 3).to(dtype).to(dev)
                tw, ti = moe_core.select_experts(torch.randn(M, E, generator=gg).to(dev), top_k=K)
                ta = (torch.arange(M, device=dev, dtype=torch.int32) % 3) - 1
                ep = ExpertParallelRunner(layer, local, mode=mode, backend="cuda")
                one = MoERunner(full, backend="cuda")
                if with_lora:
                    mine = LoRAHooks.for_layer(layer, max_loras=2, max_rank=64, max_num_tokens=world * M,
                                               dtype=dtype, device=dev)
                    ref_lora = LoRAHooks.for_layer(full, max_loras=2, max_rank=64, max_num_tokens=M,
                                                   dtype=dtype, device=dev)
                    for i, ad in enumerate(adapters):
                        mine.add_adapter(f"a{i}", **ad)
                        ref_lora.add_adapter(f"a{i}", **ad)
                    ref_lora.set_token_adapters(ta)
                    ep.register(mine)
                    one.register(ref_lora)
                out = ep.run(x, tw, ti, token_adapters=ta if with_lora else None)
                ref = one.run(x, ExpertWeights(w1, w2), tw, ti)
                torch.cuda.synchronize()
                assert_close_normalized(out, ref, *tol, rank=rank, mode=mode, M=M, lora=with_lora)
                print(f"rank {rank} {mode} M={M} lora={with_lora}: ok", flush=True)
    finally:
        dist.destroy_process_group()


def test_expert_parallel_nccl_two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    import torch.multiprocessing as mp

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    mp.spawn(_worker, args=(2, _free_port()), nprocs=2, join=True)
