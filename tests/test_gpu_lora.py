"""LoRA hooks on the GPU (TESTING.md §5 LoRA row; marker ``gpu``): the Triton shrink/expand
path inside the ``cuda`` backend's forward against the torch backend + the torch LoRA path
in fp32 (the fast oracle, itself checked against the float64 per-token loop in
``test_lora.py`` and here on one small case); neutrality bitwise; mixed batches; fp8 base
weights; adapters switched between CUDA-graph replays by in-place updates only."""

from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path

import pytest
import torch

import moe_core
from moe_core import ExpertWeights, MoELayer, MoERunner
from moe_core.hooks.lora import LoRAHooks
from moe_core.testing import assert_close_normalized, tolerance_for
from moe_core.testing.tolerances import TOLERANCES, assert_close_quant

pytestmark = pytest.mark.gpu

DEV = "cuda"


def _oracle_module():
    spec = importlib.util.spec_from_file_location("_lora_cpu_tests", Path(__file__).with_name("test_lora.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _setup(M, E, k, H, I, n_ad, rank, dtype, seed, *, max_rank=None):
    g = torch.Generator(device=DEV).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device=DEV)   # noqa: E731
    x = (rnd(M, H) / 3).to(dtype)
    w1 = (rnd(E, 2 * I, H) / math.sqrt(H)).to(dtype)
    w2 = (rnd(E, H, I) / math.sqrt(I)).to(dtype)
    tw, ti = moe_core.select_experts(rnd(M, E), top_k=k)
    ti[1::7, 0] = -1                                            # filtered slots
    layer = MoELayer(num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I, routed_scaling_factor=1.25)
    adapters = []
    for _ in range(n_ad):
        adapters.append(dict(gate_up_a=(rnd(E, 2, rank, H) / math.sqrt(H)).to(dtype),
                             gate_up_b=(rnd(E, 2, I, rank) / math.sqrt(rank)).to(dtype),
                             down_a=(rnd(E, rank, I) / math.sqrt(I)).to(dtype),
                             down_b=(rnd(E, H, rank) / math.sqrt(rank)).to(dtype), alpha=float(rank)))
    idx = torch.arange(M, device=DEV, dtype=torch.int32) % (n_ad + 1) - 1        # -1, 0, 1, ... mixed
    return layer, ExpertWeights(w1, w2), x, tw, ti, adapters, idx


def _hooks(layer, adapters, idx, dtype, max_rank, impl="auto"):
    lora = LoRAHooks.for_layer(layer, max_loras=max(1, len(adapters)), max_rank=max_rank,
                               max_num_tokens=max(1, idx.shape[0]), dtype=dtype, device=DEV)
    lora.impl = impl
    for i, ad in enumerate(adapters):
        lora.add_adapter(f"ad{i}", **{key: (v.to(dtype) if torch.is_tensor(v) else v) for key, v in ad.items()})
    lora.set_token_adapters(idx)
    return lora


def _run(layer, weights, x, tw, ti, lora, backend):
    runner = MoERunner(layer, backend=backend)
    if lora is not None:
        runner.register(lora)
    return runner.run(x, weights, tw, ti)


def _reference(layer, weights, x, tw, ti, adapters, idx, max_rank):
    """torch backend + torch LoRA path, all in fp32 on the GPU."""
    w32 = ExpertWeights(weights.w1.float(), weights.w2.float())
    lora = _hooks(layer, adapters, idx, torch.float32, max_rank, impl="torch")
    return _run(layer, w32, x.float(), tw, ti, lora, "torch"), _run(layer, w32, x.float(), tw, ti, None, "torch")


# TESTING.md §5: 100 tokens, k {6, 12}, E 64, adapters {4, 16}, rank {16, 64, 128, 256}, N 1408, K 2048
GRID = list(itertools.product([6, 12], [4, 16], [16, 64, 128, 256], [torch.bfloat16, torch.float16]))


@pytest.mark.parametrize("k,n_ad,rank,dtype", GRID)
def test_lora_grid_vs_fp32_reference(k, n_ad, rank, dtype):
    M, E, H, I = 100, 64, 2048, 704
    layer, weights, x, tw, ti, adapters, idx = _setup(M, E, k, H, I, n_ad, rank, dtype, seed=k * 1000 + rank)
    lora = _hooks(layer, adapters, idx, dtype, max_rank=rank)
    out = torch.full_like(x, float("nan"))
    out.copy_(_run(layer, weights, x, tw, ti, lora, "cuda"))
    plain = _run(layer, weights, x, tw, ti, None, "cuda")
    ref, ref_plain = _reference(layer, weights, x, tw, ti, adapters, idx, rank)
    assert_close_normalized(out, ref, *tolerance_for(dtype), k=k, adapters=n_ad, rank=rank)
    # the delta alone, against the fp32 delta (LoRA tolerance of TESTING.md §2)
    maxtol, _ = TOLERANCES["lora_rank128" if rank >= 128 else "lora"]
    delta, ref_delta = out.float() - plain.float(), ref - ref_plain
    assert ref_delta.abs().max() > 0.2 * ref.abs().max()
    assert_close_normalized(delta, ref_delta, maxtol, math.inf, k=k, rank=rank)
    # tokens without an adapter are untouched (bitwise equal to the plain path)
    none = idx < 0
    assert torch.equal(out[none], plain[none])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_neutrality_bitwise_on_gpu(dtype):
    M, E, k, H, I = 64, 16, 6, 512, 256
    layer, weights, x, tw, ti, adapters, idx = _setup(M, E, k, H, I, 4, 64, dtype, seed=3)
    plain = _run(layer, weights, x, tw, ti, None, "cuda")
    lora = _hooks(layer, adapters, torch.full_like(idx, -1), dtype, 64)
    out = _run(layer, weights, x, tw, ti, lora, "cuda")
    assert torch.equal(out.view(torch.int16), plain.view(torch.int16))


def test_small_case_matches_per_token_oracle():
    """Level 1 on the GPU: mixed adapter 0 / adapter 1 / none vs the float64 loop."""
    oracle = _oracle_module()
    M, E, k, H, I = 33, 8, 2, 128, 64
    layer, weights, x, tw, ti, adapters, _ = _setup(M, E, k, H, I, 2, 16, torch.bfloat16, seed=9)
    idx = torch.tensor([0, 1, -1] * 11, dtype=torch.int32, device=DEV)
    lora = _hooks(layer, adapters, idx, torch.bfloat16, 16)
    out = _run(layer, weights, x, tw, ti, lora, "cuda")
    ads = [{"gu_a": a["gate_up_a"].cpu(), "gu_b": a["gate_up_b"].cpu(), "dn_a": a["down_a"].cpu(),
            "dn_b": a["down_b"].cpu(), "alpha": a["alpha"]} for a in adapters]
    ref = oracle.lora_oracle(x.cpu(), weights.w1.cpu(), weights.w2.cpu(), tw.cpu(), ti.cpu(), ads, idx.cpu(),
                             scaling=1.25)
    assert_close_normalized(out, ref, *tolerance_for(torch.bfloat16))


def test_mixed_batch_fp8_base_weights():
    from moe_core.testing.quantize_weights import quantize_layer

    M, E, k, H, I = 100, 16, 6, 1024, 512
    layer, weights, x, tw, ti, adapters, idx = _setup(M, E, k, H, I, 2, 32, torch.bfloat16, seed=4)
    q1, q2, quant = quantize_layer(weights.w1.float(), weights.w2.float(), "fp8_w8a8", per_channel=True)
    fp8 = ExpertWeights(q1, q2, quant=quant)
    lora = _hooks(layer, adapters, idx, torch.bfloat16, 32)
    out = _run(layer, fp8, x, tw, ti, lora, "cuda")
    ref_lora = _hooks(layer, adapters, idx, torch.bfloat16, 32, impl="torch")
    ref = _run(layer, fp8, x, tw, ti, ref_lora, "torch")                 # same quantization in torch
    assert_close_quant(out, ref.float(), quant)
    plain = _run(layer, fp8, x, tw, ti, None, "cuda")
    assert torch.equal(out[idx < 0], plain[idx < 0])


def test_adapters_switched_between_graph_replays():
    M, E, k, H, I = 32, 16, 6, 512, 256
    dtype = torch.bfloat16
    layer, weights, x, tw, ti, adapters, idx = _setup(M, E, k, H, I, 3, 32, dtype, seed=5)
    lora = _hooks(layer, adapters, idx, dtype, 32)
    runner = MoERunner(layer, backend="cuda")
    runner.register(lora)
    static = [t.clone() for t in (x, tw, ti)]
    runner.run(*static[:1], weights, *static[1:])                        # warm-up: compile every kernel
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = runner.run(static[0], weights, static[1], static[2])
    for choice in (idx, torch.full_like(idx, -1), (idx + 1) % 3):
        lora.token_adapters[:M].copy_(choice)                            # in-place switch only
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        eager = MoERunner(layer, backend="cuda")
        eager.register(lora)
        assert torch.equal(out, eager.run(x, weights, tw, ti))
