"""LoRA hooks on experts (TESTING.md tier D; SEMANTICS §8): the whole forward with
adapters against an independent per-token float64 loop; neutrality (bitwise); mixed
batches; PEFT layout; fp32 intermediate; ``-1`` rows untouched; fp8 base weights; errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import moe_core
from moe_core import ExpertWeights, MoELayer, MoERunner, QuantSpec
from moe_core.errors import HookError, MoEInputError, MoETypeError
from moe_core.hooks.lora import LoRAHooks
from moe_core.testing import assert_close_normalized, tolerance_for
from moe_core.testing.tolerances import assert_close_quant


# -- the independent per-token oracle ----------------------------------------------------
def _act64(h: torch.Tensor, gated: bool, layout: str, activation: str) -> torch.Tensor:
    if not gated:
        return torch.clamp(h, min=0) ** 2 if activation == "relu2" else h / (1 + torch.exp(-h))
    n = h.shape[0] // 2
    g, u = (h[0::2], h[1::2]) if layout == "interleaved" else (h[:n], h[n:])
    return g / (1 + torch.exp(-g)) * u


def _cols(q: int, I: int, gated: bool, layout: str) -> list[int]:
    if not gated:
        return list(range(I))
    return [2 * c + q for c in range(I)] if layout == "interleaved" else [q * I + c for c in range(I)]


def lora_oracle(x, w1, w2, tw, ids, adapters, token_adapters, *, gated=True, layout="halves",
                activation="silu", on_input=False, scaling=None, no_combine=False,
                quantize_act=None) -> torch.Tensor:
    """float64 loop over tokens and slots: base expert MLP plus each token's adapter.

    :param w1: [E, N, H] dequantized weights; ``w2`` [E, H, I].
    :param adapters: list of dicts ``gu_a [E, S, r, H]``, ``gu_b [E, S, I, r]``,
        ``dn_a [E, r, I]``, ``dn_b [E, H, r]``, ``alpha``.
    :param quantize_act: optional function row -> quantized-dequantized row (base GEMM inputs only).
    """
    M, k = ids.shape
    H, I = w2.shape[1], w2.shape[2]
    out = torch.zeros(M, k, H, dtype=torch.float64)
    for m in range(M):
        xm = x[m].double()
        xq = quantize_act(x[m]) if quantize_act else xm
        a = int(token_adapters[m])
        for j in range(k):
            e = int(ids[m, j])
            if e < 0:
                continue
            w = float(tw[m, j])
            h = w1[e].double() @ xq
            if a >= 0:
                ad = adapters[a]
                r = ad["gu_a"].shape[2]
                for q in range(ad["gu_a"].shape[1]):
                    t = ad["gu_a"][e, q].double() @ xm
                    h[_cols(q, I, gated, layout)] += ad["alpha"] / r * (ad["gu_b"][e, q].double() @ t)
            if on_input:
                h = h * w
            act = _act64(h, gated, layout, activation)
            actq = quantize_act(act.to(x.dtype)) if quantize_act else act
            y = w2[e].double() @ actq
            if a >= 0:
                ad = adapters[a]
                r = ad["dn_a"].shape[1]
                y += ad["alpha"] / r * (ad["dn_b"][e].double() @ (ad["dn_a"][e].double() @ act))
            if not (on_input or no_combine):
                y = y * w
            out[m, j] = y
    if no_combine:
        return out
    return out.sum(1) * (1.0 if scaling is None else scaling)


# -- builders ------------------------------------------------------------------------------
def _adapter(E, S, r, H, I, dtype, g, alpha=None):
    rnd = lambda *s: (torch.randn(*s, generator=g) / math.sqrt(s[-1])).to(dtype)  # noqa: E731
    return {"gu_a": rnd(E, S, r, H), "gu_b": rnd(E, S, I, r) * 2, "dn_a": rnd(E, r, I), "dn_b": rnd(E, H, r) * 2,
            "alpha": float(alpha if alpha is not None else 2 * r)}


def _load(lora: LoRAHooks, name: str, ad: dict) -> int:
    return lora.add_adapter(name, gate_up_a=ad["gu_a"], gate_up_b=ad["gu_b"], down_a=ad["dn_a"],
                            down_b=ad["dn_b"], alpha=ad["alpha"])


def _problem(M, E, k, H, I, dtype, seed, *, gated=True, minus_one=False):
    g = torch.Generator().manual_seed(seed)
    N = 2 * I if gated else I
    x = (torch.randn(M, H, generator=g) / 3).to(dtype)
    w1 = (torch.randn(E, N, H, generator=g) / math.sqrt(H)).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / math.sqrt(I)).to(dtype)
    tw, ti = moe_core.select_experts(torch.randn(M, E, generator=g), top_k=k)
    if minus_one and M > 1:
        ti[1::3, 0] = -1
    return g, x, w1, w2, tw, ti


def _token_adapters(M, n_adapters, g):
    """Each adapter and "none" (-1) appear whenever M allows."""
    idx = torch.randint(-1, n_adapters, (M,), generator=g, dtype=torch.int32)
    for i, a in enumerate(range(-1, n_adapters)):
        if i < M:
            idx[i] = a
    return idx


_AXES = ([1, 7, 33], [1, 2], [4, 8], [1, 3], [1, 8, 16], [1, 2])
#: half fraction of the product (index sum even): every value, and every pair of values of two axes, appears
GRID = [tuple(ax[i] for ax, i in zip(_AXES, idx))
        for idx in itertools.product(*(range(len(ax)) for ax in _AXES)) if sum(idx) % 2 == 0]


@pytest.mark.parametrize("M,k,E,n_ad,r,slices", GRID)
def test_grid_vs_per_token_oracle(M, k, E, n_ad, r, slices):
    H, I = 24, 12
    gated = slices == 2
    g, x, w1, w2, tw, ti = _problem(M, E, k, H, I, torch.float32, seed=M * 100 + E * 10 + r,
                                    gated=gated, minus_one=True)
    layer = MoELayer(num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I,
                     activation="silu" if gated else "relu2", is_gated=gated, routed_scaling_factor=1.5)
    lora = LoRAHooks.for_layer(layer, max_loras=n_ad + 1, max_rank=16, max_num_tokens=64, dtype=torch.float32)
    adapters = [_adapter(E, slices, r, H, I, torch.float32, g) for _ in range(n_ad)]
    for i, ad in enumerate(adapters):
        assert _load(lora, f"ad{i}", ad) == i
    idx = _token_adapters(M, n_ad, g)
    lora.set_token_adapters(idx)
    runner = MoERunner(layer, backend="torch")
    runner.register(lora)
    out = runner.run(x, ExpertWeights(w1, w2), tw, ti)
    ref = lora_oracle(x, w1, w2, tw, ti, adapters, idx, gated=gated,
                      activation="silu" if gated else "relu2", scaling=1.5)
    assert_close_normalized(out, ref, *tolerance_for(torch.float32), M=M, k=k, E=E, r=r)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["halves", "interleaved"])
def test_half_precision_torch_path(dtype, layout):
    M, E, k, H, I = 17, 8, 2, 64, 32
    g, x, w1, w2, tw, ti = _problem(M, E, k, H, I, dtype, seed=5)
    layer = MoELayer(num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I, gate_up_layout=layout)
    lora = LoRAHooks.for_layer(layer, max_loras=2, max_rank=32, max_num_tokens=M, dtype=dtype)
    adapters = [_adapter(E, 2, r, H, I, dtype, g) for r in (8, 32)]
    for i, ad in enumerate(adapters):
        _load(lora, f"ad{i}", ad)
    idx = _token_adapters(M, 2, g)
    lora.set_token_adapters(idx)
    runner = MoERunner(layer, backend="torch")
    runner.register(lora)
    out = runner.run(x, ExpertWeights(w1, w2), tw, ti)
    ref = lora_oracle(x, w1, w2, tw, ti, adapters, idx, layout=layout)
    assert_close_normalized(out, ref, *tolerance_for(dtype), dtype=str(dtype), layout=layout)


def test_router_weight_on_input_weights_gate_up_delta():
    M, E, k, H, I = 7, 4, 1, 16, 8
    g, x, w1, w2, tw, ti = _problem(M, E, k, H, I, torch.float32, seed=3)
    tw = tw * 0.5 + 0.1                                   # k = 1: weights differ from 1
    layer = MoELayer(num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I,
                     apply_router_weight_on_input=True)
    lora = LoRAHooks.for_layer(layer, max_loras=1, max_rank=4, max_num_tokens=M, dtype=torch.float32)
    ad = _adapter(E, 2, 4, H, I, torch.float32, g)
    _load(lora, "a", ad)
    idx = torch.zeros(M, dtype=torch.int32)
    lora.set_token_adapters(idx)
    runner = MoERunner(layer, backend="torch")
    runner.register(lora)
    out = runner.run(x, ExpertWeights(w1, w2), tw, ti)
    ref = lora_oracle(x, w1, w2, tw, ti, [ad], idx, on_input=True)
    assert_close_normalized(out, ref, *tolerance_for(torch.float32))


def test_no_combine_with_unweighted_down_delta():
    M, E, k, H, I = 9, 4, 2, 16, 8
    g, x, w1, w2, tw, ti = _problem(M, E, k, H, I, torch.float32, seed=4, minus_one=True)
    layer = MoELayer(num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I)
    lora = LoRAHooks.for_layer(layer, max_loras=1, max_rank=4, max_num_tokens=M, dtype=torch.float32)
    ad = _adapter(E, 2, 4, H, I, torch.float32, g)
    _load(lora, "a", ad)
    idx = torch.zeros(M, dtype=torch.int32)
    lora.set_token_adapters(idx)
    runner = MoERunner(layer, backend="torch")
    runner.register(lora)
    out = runner.run(x, ExpertWeights(w1, w2), tw, ti, no_combine=True)
    ref = lora_oracle(x, w1, w2, tw, ti, [ad], idx, no_combine=True)
    assert_close_normalized(out, ref, *tolerance_for(torch.float32))
    dead = ti < 0
    assert dead.any() and torch.equal(out[dead], torch.zeros_like(out[dead]))   # -1 rows stay exactly zero


# -- neutrality ----------------------------------------------------------------------------
def _neutral_setup(dtype, M=17, E=8, k=2, H=64, I=32):
    g, x, w1, w2, tw, ti = _problem(M, E, k, H, I, dtype, seed=11, minus_one=True)
    layer = MoELayer(num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I, routed_scaling_factor=2.0)
    lora = LoRAHooks.for_layer(layer, max_loras=3, max_rank=16, max_num_tokens=64, dtype=dtype)
    for i in range(2):
        _load(lora, f"ad{i}", _adapter(E, 2, 16, H, I, dtype, g))
    return layer, lora, x, ExpertWeights(w1, w2), tw, ti


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neutrality_bitwise(dtype):
    layer, lora, x, weights, tw, ti = _neutral_setup(dtype)
    plain = MoERunner(layer, backend="torch").run(x, weights, tw, ti)
    runner = MoERunner(layer, backend="torch")
    runner.register(lora)
    lora.set_token_adapters(torch.full((x.shape[0],), -1, dtype=torch.int32))
    out = runner.run(x, weights, tw, ti)
    assert torch.equal(out.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       plain.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    # tokens pointing at a removed adapter's slot get no delta either
    lora.set_token_adapters(torch.full((x.shape[0],), 2, dtype=torch.int32))   # empty slot
    assert torch.equal(runner.run(x, weights, tw, ti), plain)
    lora.set_token_adapters(torch.zeros(x.shape[0], dtype=torch.int32))
    lora.remove_adapter("ad0")
    assert torch.equal(runner.run(x, weights, tw, ti), plain)


def test_add_and_remove_while_serving():
    layer, lora, x, weights, tw, ti = _neutral_setup(torch.float32)
    runner = MoERunner(layer, backend="torch")
    runner.register(lora)
    plain = MoERunner(layer, backend="torch").run(x, weights, tw, ti)
    lora.set_token_adapters(torch.ones(x.shape[0], dtype=torch.int32))
    with_1 = runner.run(x, weights, tw, ti)
    assert not torch.equal(with_1, plain)
    lora.remove_adapter("ad1")
    assert torch.equal(runner.run(x, weights, tw, ti), plain)
    g = torch.Generator().manual_seed(99)
    ad = _adapter(8, 2, 4, 64, 32, torch.float32, g)
    assert _load(lora, "new", ad) == 1                   # the freed slot is reused
    assert lora.adapters == {"ad0": 0, "new": 1}
    ref = lora_oracle(x, weights.w1, weights.w2, tw, ti, [None, ad], torch.ones(x.shape[0], dtype=torch.int32),
                      scaling=2.0)
    assert_close_normalized(runner.run(x, weights, tw, ti), ref, *tolerance_for(torch.float32))


# -- fp32 intermediate, -1 rows ------------------------------------------------------------
def _intermediate_probe(dtype, impl):
    """t = x·A = (1 + 2^-12, 1): a 16-bit intermediate rounds t0 to 1 and the delta to 0."""
    H, I, E = 16, 16, 1
    lora = LoRAHooks(num_experts=E, hidden_size=H, intermediate_size=I, is_gated=False, max_loras=1,
                     max_rank=16, max_num_tokens=4, dtype=dtype)
    lora.impl = impl
    gu_a = torch.zeros(E, 1, 2, H, dtype=dtype)
    gu_a[0, 0, 0, 0] = gu_a[0, 0, 0, 1] = 1.0
    gu_a[0, 0, 1, 0] = 1.0
    gu_b = torch.zeros(E, 1, I, 2, dtype=dtype)
    gu_b[0, 0, :, 0], gu_b[0, 0, :, 1] = 1.0, -1.0
    lora.add_adapter("probe", gate_up_a=gu_a, gate_up_b=gu_b, down_a=torch.zeros(E, 2, I, dtype=dtype),
                     down_b=torch.zeros(E, H, 2, dtype=dtype), alpha=2.0)       # scaling 1
    x = torch.zeros(1, H, dtype=dtype)
    x[0, 0], x[0, 1] = 1.0, 2.0 ** -12
    gate_up = torch.zeros(1, 1, I, dtype=dtype)
    lora.set_token_adapters(torch.zeros(1, dtype=torch.int32))
    layer = MoELayer(num_local_experts=E, top_k=1, hidden_size=H, intermediate_size=I, activation="relu2",
                     is_gated=False)
    lora.moe_core_after_gate_up(x=x, gate_up=gate_up, topk_weights=torch.ones(1, 1),
                                topk_ids=torch.zeros(1, 1, dtype=torch.int32), layer=layer)
    return gate_up


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_intermediate(dtype):
    assert torch.all(_intermediate_probe(dtype, "torch") == 2.0 ** -12)


def test_minus_one_rows_untouched():
    M, E, k, H, I = 7, 4, 2, 16, 8
    g, x, w1, w2, tw, ti = _problem(M, E, k, H, I, torch.float32, seed=8)
    ti[::2, 1] = -1
    lora = LoRAHooks(num_experts=E, hidden_size=H, intermediate_size=I, max_loras=1, max_rank=4,
                     max_num_tokens=M, dtype=torch.float32)
    _load(lora, "a", _adapter(E, 2, 4, H, I, torch.float32, g))
    lora.set_token_adapters(torch.zeros(M, dtype=torch.int32))
    layer = MoELayer(num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I)
    gate_up = torch.randn(M, k, 2 * I)
    down = torch.zeros(M, k, H)
    act = torch.full((M * k, I), float("nan"))                 # rows of -1 slots are unspecified
    act.view(M, k, I)[ti >= 0] = torch.randn(int((ti >= 0).sum()), I)
    before = gate_up.clone()
    lora.moe_core_after_gate_up(x=x, gate_up=gate_up, topk_weights=tw, topk_ids=ti, layer=layer)
    lora.moe_core_after_down(act=act, down=down, topk_weights=tw, topk_ids=ti, layer=layer, no_combine=False)
    dead = ti < 0
    assert torch.equal(gate_up[dead], before[dead]) and not torch.equal(gate_up[~dead], before[~dead])
    assert torch.equal(down[dead], torch.zeros_like(down[dead])) and torch.isfinite(down).all()


# -- the "done when" case: adapter 0 / adapter 1 / none, also over fp8 base weights --------
@pytest.mark.parametrize("scheme", ["none", "fp8_w8a8"])
def test_mixed_batch_two_adapters(scheme):
    from moe_core.testing.oracle import oracle_dequantize_weight, oracle_quantize_activation
    from moe_core.testing.quantize_weights import quantize_layer

    M, E, k, H, I = 33, 8, 2, 64, 32
    g, x, w1, w2, tw, ti = _problem(M, E, k, H, I, torch.float32, seed=21, minus_one=True)
    layer = MoELayer(num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I)
    lora = LoRAHooks.for_layer(layer, max_loras=2, max_rank=16, max_num_tokens=M, dtype=torch.float32)
    adapters = [_adapter(E, 2, r, H, I, torch.float32, g) for r in (8, 16)]
    for i, ad in enumerate(adapters):
        _load(lora, f"ad{i}", ad)
    idx = torch.tensor([0, 1, -1] * 11, dtype=torch.int32)
    lora.set_token_adapters(idx)
    runner = MoERunner(layer, backend="torch")
    runner.register(lora)
    if scheme == "none":
        out = runner.run(x, ExpertWeights(w1, w2), tw, ti)
        ref = lora_oracle(x, w1, w2, tw, ti, adapters, idx)
        assert_close_normalized(out, ref, *tolerance_for(torch.float32))
        return
    w1q, w2q, quant = quantize_layer(w1, w2, "fp8_w8a8", per_channel=True)
    out = runner.run(x, ExpertWeights(w1q, w2q, quant=quant), tw, ti)
    d1 = torch.stack([oracle_dequantize_weight(w1q, e, "fp8_w8a8", quant.w1_scale, None) for e in range(E)])
    d2 = torch.stack([oracle_dequantize_weight(w2q, e, "fp8_w8a8", quant.w2_scale, None) for e in range(E)])
    qa = lambda row: oracle_quantize_activation(row.reshape(1, -1), "fp8_w8a8", per_channel=True).reshape(-1)  # noqa
    ref = lora_oracle(x, d1, d2, tw, ti, adapters, idx, quantize_act=qa)
    assert_close_quant(out, ref, quant)
    # the adapters really contribute (delta far above the fp8 error)
    base = lora_oracle(x, d1, d2, tw, ti, adapters, torch.full((M,), -1), quantize_act=qa)
    assert (ref - base).abs().max() > 0.3 * ref.abs().max()


# -- PEFT layout -----------------------------------------------------------------------------
def test_peft_round_trip_and_layout():
    E, H, I, r = 4, 16, 8, 4
    g = torch.Generator().manual_seed(1)
    sd = {}
    for e in range(E):
        for proj, (i_f, o_f) in {"gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}.items():
            sd[f"base_model.model.layers.0.mlp.experts.{e}.{proj}.lora_A.weight"] = torch.randn(r, i_f, generator=g)
            sd[f"base_model.model.layers.0.mlp.experts.{e}.{proj}.lora_B.weight"] = torch.randn(o_f, r, generator=g)
    lora = LoRAHooks(num_experts=E, hidden_size=H, intermediate_size=I, max_loras=2, max_rank=8,
                     dtype=torch.float32)
    slot = lora.load_peft("p", sd, alpha=8.0)
    back = lora.export_peft("p", prefix="base_model.model.layers.0.mlp.")
    assert back.keys() == sd.keys() and all(torch.equal(back[key], sd[key]) for key in sd)
    assert float(lora.scaling[slot]) == 2.0 and int(lora.ranks[slot]) == r
    # gate_proj is slice 0 (gate columns), up_proj slice 1; A is [r, in], B is [out, r]
    pre = "base_model.model.layers.0.mlp.experts.2."
    assert torch.equal(lora.gate_up_a[slot, 2, 0, :r], sd[pre + "gate_proj.lora_A.weight"])
    assert torch.equal(lora.gate_up_b[slot, 2, 1, :, :r], sd[pre + "up_proj.lora_B.weight"])
    assert torch.equal(lora.down_b[slot, 2, :, :r], sd[pre + "down_proj.lora_B.weight"])
    assert lora.gate_up_a[slot, :, :, r:].abs().sum() == 0      # padded to max_rank with zeros
    # Mixtral names (w1 gate, w3 up, w2 down) load the same buffers
    names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    mix = {key.replace("mlp.", "block_sparse_moe.").replace(p, n): t for key, t in sd.items()
           for p, n in names.items() if f".{p}." in key}
    other = lora.load_peft("m", mix, alpha=8.0)
    for buf in (lora.gate_up_a, lora.gate_up_b, lora.down_a, lora.down_b):
        assert torch.equal(buf[other], buf[slot])


def test_peft_sharded_with_expert_parallelism():
    E_g, world, H, I, r = 8, 2, 16, 8, 2
    g = torch.Generator().manual_seed(2)
    sd = {f"experts.{e}.{p}.lora_{ab}.weight": torch.randn(*(s), generator=g)
          for e in range(E_g) for p, (i_f, o_f) in {"gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}.items()
          for ab, s in (("A", (r, i_f)), ("B", (o_f, r)))}
    for rank in range(world):
        layer = MoELayer(num_experts=E_g, num_local_experts=E_g // world, top_k=2, hidden_size=H,
                         intermediate_size=I, ep_rank=rank, ep_size=world)
        lora = LoRAHooks.for_layer(layer, max_loras=1, max_rank=4, dtype=torch.float32)
        lora.load_peft("p", sd, alpha=2.0)
        back = lora.export_peft("p")
        mine = {key: t for key, t in sd.items() if rank * 4 <= int(key.split(".")[1]) < rank * 4 + 4}
        assert back.keys() == mine.keys() and all(torch.equal(back[key], mine[key]) for key in mine)
        assert torch.equal(lora.down_a[0, 1, :r], sd[f"experts.{rank * 4 + 1}.down_proj.lora_A.weight"])


# -- errors (TESTING.md §9, LoRA row) ---------------------------------------------------------
def test_errors_name_the_argument():
    E, H, I = 4, 16, 8
    lora = LoRAHooks(num_experts=E, hidden_size=H, intermediate_size=I, max_loras=2, max_rank=8,
                     max_num_tokens=8, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    good = _adapter(E, 2, 4, H, I, torch.float32, g)
    with pytest.raises(MoEInputError, match=r"token_adapters: values must lie in \[-1, max_loras=2\), got 2"):
        lora.set_token_adapters(torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(MoEInputError, match=r"token_adapters.*got -2"):
        lora.set_token_adapters(torch.tensor([-2], dtype=torch.int32))
    with pytest.raises(MoETypeError, match="token_adapters: expected an integer dtype"):
        lora.set_token_adapters(torch.zeros(2))
    with pytest.raises(MoEInputError, match="token_adapters.*max_num_tokens=8"):
        lora.set_token_adapters(torch.zeros(9, dtype=torch.int32))
    big = _adapter(E, 2, 9, H, I, torch.float32, g)
    with pytest.raises(MoEInputError, match=r"gate_up_a: rank 9 outside \[1, max_rank=8\]"):
        _load(lora, "big", big)
    with pytest.raises(MoEInputError, match="max_rank"):
        LoRAHooks(num_experts=E, hidden_size=H, intermediate_size=I, max_rank=257)
    with pytest.raises(MoEInputError, match=r"gate_up_b: expected shape \[4, 2, 8, 4\], got \[4, 2, 8, 3\]"):
        lora.add_adapter("x", gate_up_a=good["gu_a"], gate_up_b=good["gu_b"][..., :3], down_a=good["dn_a"],
                         down_b=good["dn_b"], alpha=1.0)
    with pytest.raises(MoEInputError, match=r"down_b: expected shape"):
        lora.add_adapter("x", gate_up_a=good["gu_a"], gate_up_b=good["gu_b"], down_a=good["dn_a"],
                         down_b=good["dn_b"][:, :5], alpha=1.0)
    with pytest.raises(MoETypeError, match=r"down_a: expected dtype torch.float32.*got torch.float16"):
        lora.add_adapter("x", gate_up_a=good["gu_a"], gate_up_b=good["gu_b"], down_a=good["dn_a"].half(),
                         down_b=good["dn_b"], alpha=1.0)
    with pytest.raises(MoEInputError, match="gate_up_a: expected experts dim 4"):
        lora.add_adapter("x", gate_up_a=torch.zeros(3, 2, 4, H), gate_up_b=torch.zeros(3, 2, I, 4),
                         down_a=torch.zeros(3, 4, I), down_b=torch.zeros(3, H, 4), alpha=1.0)
    _load(lora, "a", good)
    with pytest.raises(MoEInputError, match="name: adapter 'a' is already loaded"):
        _load(lora, "a", good)
    _load(lora, "b", good)
    with pytest.raises(MoEInputError, match="slot: all 2 adapter slots are taken"):
        _load(lora, "c", good)
    with pytest.raises(MoEInputError, match="adapter: no adapter named 'zz'"):
        lora.remove_adapter("zz")
    # a forward in another dtype: the hook refuses, the runner aborts with HookError
    layer = MoELayer(num_local_experts=E, top_k=1, hidden_size=H, intermediate_size=I)
    runner = MoERunner(layer, backend="torch")
    runner.register(lora)
    x = torch.randn(2, H, dtype=torch.float16)
    w = ExpertWeights(torch.randn(E, 2 * I, H).half(), torch.randn(E, H, I).half())
    with pytest.raises(HookError, match="LoRA adapters are torch.float32") as err:
        runner.run(x, w, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int32))
    assert isinstance(err.value.__cause__, MoETypeError)


def test_entry_point_adds_no_forward_hook():
    """The ``lora`` entry point loads and puts no hook on layers that did not ask for one."""
    import importlib.metadata

    from moe_core import plugins

    names = {ep.name for ep in importlib.metadata.entry_points(group="moe_core.hooks")}
    if "lora" not in names:
        pytest.skip("entry point not installed yet (re-run pip install -e .)")
    hooks = plugins.global_hookset()
    assert not hooks.any
    report = {info.name: info for info in plugins.load_report()}
    assert report["lora"].error is None


# -- the Triton kernels under the interpreter (fp32, fp16) -------------------------------------
INTERP = [(7, 4, 2, 3, 8, True, "halves", torch.float32), (17, 8, 2, 2, 16, True, "interleaved", torch.float16),
          (5, 4, 1, 1, 1, False, "halves", torch.float16)]


@pytest.mark.interp
@pytest.mark.parametrize("M,E,k,n_ad,r,gated,layout,dtype", INTERP)
def test_triton_kernels_interpreted(M, E, k, n_ad, r, gated, layout, dtype):
    if torch.cuda.is_available():
        pytest.skip("interpreter tests run on CPU machines only")
    H, I = 40, 24
    g, x, w1, w2, tw, ti = _problem(M, E, k, H, I, dtype, seed=M + r, gated=gated, minus_one=True)
    layer = MoELayer(num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I,
                     activation="silu" if gated else "relu2", is_gated=gated, gate_up_layout=layout)
    lora = LoRAHooks.for_layer(layer, max_loras=n_ad + 1, max_rank=16, max_num_tokens=M, dtype=dtype)
    adapters = [_adapter(E, 2 if gated else 1, r, H, I, dtype, g) for _ in range(n_ad)]
    for i, ad in enumerate(adapters):
        _load(lora, f"ad{i}", ad)
    idx = _token_adapters(M, n_ad, g)
    lora.set_token_adapters(idx)
    lora.impl = "triton"
    N = 2 * I if gated else I
    gate_up = (torch.randn(M, k, N, generator=g) / 4).to(dtype)
    act = torch.full((M * k, I), float("nan"), dtype=dtype)
    act.view(M, k, I)[ti >= 0] = (torch.randn(int((ti >= 0).sum()), I, generator=g) / 4).to(dtype)
    down = (torch.randn(M, k, H, generator=g) / 4).to(dtype)
    down[ti < 0] = 0
    gu_ref, dn_ref = gate_up.clone(), down.clone()
    lora.moe_core_after_gate_up(x=x, gate_up=gate_up, topk_weights=tw, topk_ids=ti, layer=layer)
    lora.moe_core_after_down(act=act, down=down, topk_weights=tw, topk_ids=ti, layer=layer, no_combine=False)
    # float64 per-slot deltas
    for m, j in itertools.product(range(M), range(k)):
        e, a = int(ti[m, j]), int(idx[m])
        if e < 0 or a < 0:
            continue
        ad = adapters[a]
        gu = gu_ref[m, j].double()
        for q in range(ad["gu_a"].shape[1]):
            gu[_cols(q, I, gated, layout)] += ad["alpha"] / r * (ad["gu_b"][e, q].double()
                                                                  @ (ad["gu_a"][e, q].double() @ x[m].double()))
        gu_ref[m, j] = gu.to(dtype)
        dn = ad["alpha"] / r * (ad["dn_b"][e].double() @ (ad["dn_a"][e].double() @ act[m * k + j].double()))
        dn_ref[m, j] = (dn_ref[m, j].double() + dn * float(tw[m, j])).to(dtype)
    tol = tolerance_for(dtype)
    assert_close_normalized(gate_up, gu_ref, *tol)
    assert_close_normalized(down, dn_ref, *tol)
    dead = ti < 0
    assert torch.equal(down[dead], torch.zeros_like(down[dead]))


@pytest.mark.interp
@pytest.mark.parametrize("dtype", [torch.float16])
def test_triton_fp32_intermediate_and_neutrality_interpreted(dtype):
    if torch.cuda.is_available():
        pytest.skip("interpreter tests run on CPU machines only")
    assert torch.all(_intermediate_probe(dtype, "triton") == 2.0 ** -12)
    layer, lora, x, weights, tw, ti = _neutral_setup(dtype, M=5, E=4, H=32, I=16)
    lora.impl = "triton"
    lora.set_token_adapters(torch.full((5,), -1, dtype=torch.int32))
    gate_up = torch.randn(5, 2, 32).to(dtype)
    before = gate_up.clone()
    lora.moe_core_after_gate_up(x=x, gate_up=gate_up, topk_weights=tw, topk_ids=ti, layer=layer)
    assert torch.equal(gate_up.view(torch.int16), before.view(torch.int16))


def test_kernel_intermediate_is_fp32_static():
    """Tier I guard: the shrink result buffer is fp32 and no kernel rounds the intermediate."""
    import ast
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "moe_core" / "kernels"
    wrapper = (root / "lora.py").read_text()
    allocs = [n for n in ast.walk(ast.parse(wrapper)) if isinstance(n, ast.Assign)
              and getattr(n.targets[0], "id", "") == "t"]
    assert allocs and "dtype=torch.float32" in ast.unparse(allocs[0].value), "intermediate t must be fp32"
    kernels = (root / "_lora.py").read_text()
    for bad in (r"\bt\.to\(", r"\bacc\.to\(tl\.(bfloat16|float16)", r"\bt_ptr\.dtype\.element_ty"):
        assert not re.search(bad, kernels), f"moe_core/kernels/_lora.py rounds the intermediate: {bad!r}"
    assert "tl.store(t_ptrs, acc," in kernels


@pytest.mark.interp
def test_whole_forward_triton_backend_and_kernels_interpreted():
    """The Triton sequence (CUDA backend, platform probe overridden) with the Triton LoRA
    kernels, both under the interpreter, against the per-token oracle (fp16)."""
    if torch.cuda.is_available():
        pytest.skip("interpreter tests run on CPU machines only")
    from moe_core.backends.cuda import CudaBackend

    class InterpCuda(CudaBackend):
        def is_available(self):
            return True, "test: interpreter"

    M, E, k, H, I = 7, 4, 2, 32, 16
    g, x, w1, w2, tw, ti = _problem(M, E, k, H, I, torch.float16, seed=31, minus_one=True)
    layer = MoELayer(num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I, routed_scaling_factor=1.5)
    lora = LoRAHooks.for_layer(layer, max_loras=2, max_rank=8, max_num_tokens=M, dtype=torch.float16)
    lora.impl = "triton"
    adapters = [_adapter(E, 2, r, H, I, torch.float16, g) for r in (4, 8)]
    for i, ad in enumerate(adapters):
        _load(lora, f"ad{i}", ad)
    idx = torch.tensor([0, 1, -1, 1, 0, -1, 0], dtype=torch.int32)
    lora.set_token_adapters(idx)
    runner = MoERunner(layer, backend=InterpCuda())
    runner.register(lora)
    out = runner.run(x, ExpertWeights(w1, w2), tw, ti)
    ref = lora_oracle(x, w1, w2, tw, ti, adapters, idx, scaling=1.5)
    assert_close_normalized(out, ref, *tolerance_for(torch.float16))
