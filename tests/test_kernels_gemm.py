"""The Triton grouped GEMM and the shared TritonBackend under the interpreter (TESTING.md
tiers C, C-special, C-bf16): the whole forward through ``fused_experts`` with the CUDA
backend's platform probe overridden, on CPU tensors, against the float64 oracle."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import moe_core
from moe_core import ExpertWeights, MoELayer, MoERunner, QuantSpec
from moe_core.backends.cuda import CudaBackend
from moe_core.kernels.backend import TritonBackend
from moe_core.testing import assert_close_normalized, oracle_moe, tolerance_for

pytestmark = pytest.mark.interp

triton = pytest.importorskip("triton")


class InterpCuda(CudaBackend):
    """The CUDA backend with its platform probe overridden: runs under the interpreter."""

    def is_available(self) -> tuple[bool, str]:
        return True, "test: interpreter"


def _needs_interpreter() -> None:
    if torch.cuda.is_available():
        pytest.skip("interpreter tests run on CPU machines only")


def _make(M: int, H: int, I: int, E: int, k: int, dtype: torch.dtype, seed: int, *,
          scale: float = 0.1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, H, generator=g) * scale).to(dtype)
    w1 = (torch.randn(E, 2 * I, H, generator=g) * scale).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) * scale).to(dtype)
    logits = torch.randn(M, E, generator=g)
    tw, ti = moe_core.select_experts(logits, top_k=k)
    return x, w1, w2, tw, ti


def _cfg(bm: int, bn: int = 32, bk: int = 32) -> dict[str, int]:
    return {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "GROUP_SIZE_M": 2}


# -- tier C: shapes x dtypes x BLOCK_SIZE_M ----------------------------------------------
# (M, N, K, E, k, BLOCK_SIZE_M, dtype) with N = 2·I (gated) and K = H
C_CASES = [
    (1, 32, 32, 1, 1, 16, torch.float32),
    (3, 32, 32, 3, 2, 16, torch.float16),
    (17, 48, 72, 8, 2, 16, torch.float32),
    (17, 48, 72, 8, 3, 32, torch.float16),
    (33, 64, 130, 8, 2, 16, torch.float16),
    (33, 64, 130, 3, 3, 32, torch.float32),
    (3, 64, 130, 8, 1, 32, torch.float16),
    (17, 32, 32, 1, 1, 32, torch.float16),
    (33, 48, 72, 3, 1, 16, torch.float32),
    (1, 48, 72, 8, 3, 16, torch.float16),
    (17, 64, 130, 3, 2, 16, torch.float32),
    (33, 32, 32, 8, 3, 32, torch.float32),
    (3, 48, 72, 1, 1, 32, torch.float32),
    (17, 32, 32, 3, 3, 16, torch.float16),
    (33, 48, 72, 8, 2, 32, torch.float16),
    (1, 64, 130, 3, 2, 32, torch.float16),
    (3, 64, 130, 1, 1, 16, torch.float32),
    (17, 48, 72, 3, 1, 32, torch.float32),
    (33, 64, 130, 8, 1, 16, torch.float16),
    (1, 32, 32, 8, 2, 32, torch.float32),
]


@pytest.mark.parametrize("M,N,K,E,k,bm,dtype", C_CASES)
def test_fused_vs_oracle(M, N, K, E, k, bm, dtype, nan_empty):
    _needs_interpreter()
    x, w1, w2, tw, ti = _make(M, K, N // 2, E, k, dtype, seed=M * 131 + N + E * 7 + k)
    with moe_core.override_config(_cfg(bm, bk=64 if K > 64 else 32)):
        out = moe_core.fused_experts(x, w1, w2, tw, ti, backend=InterpCuda())
    ref = oracle_moe(x, w1, w2, tw, ti, round_intermediate=None if dtype == torch.float32 else dtype)
    assert out.dtype == dtype
    assert_close_normalized(out, ref, *tolerance_for(dtype), M=M, N=N, K=K, E=E, k=k, bm=bm)


@pytest.mark.parametrize("activation,gated", [("gelu", True), ("relu2", False), ("swiglu_oai", True)])
def test_activations_and_scaling(activation, gated, nan_empty):
    _needs_interpreter()
    M, H, I, E, k = 9, 48, 32, 4, 2
    x, w1, w2, tw, ti = _make(M, H, I, E, k, torch.float32, seed=5)
    if not gated:
        w1 = w1[:, :I].contiguous()
    extra = {"gemm1_alpha": 1.702, "gemm1_limit": 7.0} if activation == "swiglu_oai" else {}
    layer = MoELayer(num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I, activation=activation,
                     is_gated=gated, routed_scaling_factor=2.5, **extra)
    out = moe_core.fused_experts(x, w1, w2, tw, ti, layer=layer, backend=InterpCuda())
    ref = oracle_moe(x, w1, w2, tw, ti, activation=activation, is_gated=gated,
                     gate_up_layout=layer.gate_up_layout, alpha=layer.gemm1_alpha, limit=layer.gemm1_limit,
                     routed_scaling_factor=2.5)
    assert_close_normalized(out, ref, *tolerance_for(torch.float32), activation=activation)


def test_bias_strided_padded_inputs_no_combine(nan_empty):
    """Biases; x rows strided; padded weights (stride ≠ shape); K not a multiple of BLOCK_SIZE_K."""
    _needs_interpreter()
    M, H, I, E, k = 11, 40, 24, 4, 2
    dtype = torch.float16
    x0, w1_0, w2_0, tw, ti = _make(M, H, I, E, k, dtype, seed=11)
    x = torch.zeros(M, H + 24, dtype=dtype)[:, 3:3 + H]
    x.copy_(x0)
    w1 = torch.zeros(E, 2 * I + 8, H + 8, dtype=dtype)[:, :2 * I, :H]
    w1.copy_(w1_0)
    w2 = torch.zeros(E, H + 16, I + 16, dtype=dtype)[:, 8:8 + H, :I]
    w2.copy_(w2_0)
    b1 = (torch.randn(E, 2 * I) * 0.1).to(dtype)
    b2 = (torch.randn(E, H) * 0.1).to(dtype)
    with moe_core.override_config(_cfg(16, bn=16, bk=16)):
        out = moe_core.fused_experts(x, w1, w2, tw, ti, b1=b1, b2=b2, backend=InterpCuda())
        down = moe_core.fused_experts(x, w1, w2, tw, ti, b1=b1, b2=b2, backend=InterpCuda(), no_combine=True)
    ref = oracle_moe(x, w1, w2, tw, ti, b1=b1, b2=b2, round_intermediate=dtype)
    ref_down = oracle_moe(x, w1, w2, tw, ti, b1=b1, b2=b2, no_combine=True, round_intermediate=dtype)
    assert_close_normalized(out, ref, *tolerance_for(dtype))
    assert_close_normalized(down, ref_down, *tolerance_for(dtype))


# -- quantization schemes ---------------------------------------------------------------
QUANT_CASES = [
    ("fp8_w8a8", dict(), torch.float16),
    ("fp8_w8a8", dict(per_channel=True), torch.float32),
    ("fp8_w8a8", dict(block_shape=(32, 64)), torch.float16),
    ("int8_w8a8", dict(), torch.float16),
    ("int8_w8a8", dict(per_channel=True), torch.float16),
    ("int8_w8a8", dict(block_shape=(32, 64)), torch.float32),
    ("int8_w8a8", dict(static=True), torch.float16),
    ("int8_w8a16", dict(), torch.float16),
    ("int8_w8a16", dict(group_size=32), torch.float32),
    ("int8_w8a16", dict(group_size=64, zero_point=True), torch.float16),
    ("int4_w4a16", dict(group_size=32), torch.float16),
    ("int4_w4a16", dict(group_size=64, zero_point=True), torch.float32),
]


@pytest.mark.parametrize("scheme,opts,dtype", QUANT_CASES,
                         ids=[f"{s}-{'-'.join(map(str, o.items())) or 'tensor'}-{str(d)[6:]}"
                              for s, o, d in QUANT_CASES])
def test_quantized_vs_oracle(scheme, opts, dtype, nan_empty):
    _needs_interpreter()
    from moe_core.testing.quantize_weights import quantize_layer
    from moe_core.testing.tolerances import assert_close_quant

    M, H, I, E, k = 13, 128, 64, 4, 2
    g = torch.Generator().manual_seed(len(scheme) * 17 + len(opts))
    x = torch.randn(M, H, generator=g).to(dtype)
    w1 = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    w2 = torch.randn(E, H, I, generator=g) / I ** 0.5
    tw, ti = moe_core.select_experts(torch.randn(M, E, generator=g), top_k=k)
    opts = dict(opts)
    if opts.pop("static", False):
        opts.update(a1_scale=torch.tensor([x.float().abs().max().item() / 127]),
                    a2_scale=torch.tensor([0.02]))
    w1q, w2q, quant = quantize_layer(w1, w2, scheme, **opts)
    with moe_core.override_config(_cfg(16, bn=32, bk=32)):
        out = moe_core.fused_experts(x, w1q, w2q, tw, ti, quant=quant, backend=InterpCuda())
    ref = oracle_moe(x, w1q, w2q, tw, ti, quant=quant, round_intermediate=dtype)
    assert_close_quant(out, ref, quant, scheme=scheme, opts=opts)


@pytest.mark.parametrize("bn", [16, 32, 64])
@pytest.mark.parametrize("activation", ["silu", "swiglu_oai"])
@pytest.mark.parametrize("fuse", [False, True])
def test_block_fp8_weight_scale_per_program_and_per_column(bn, activation, fuse, nan_empty):
    """Block w8a8 with [bn_q, bk] = [32, 64]: tiles inside one scale block load one weight scale
    per K block (``W_SCALE_UNIFORM``), wider ones one per column; gated fused programs need
    both halves (or both interleaved rows) inside a block. Every combination matches the oracle."""
    _needs_interpreter()
    from moe_core.kernels.gemm import _block_scale_uniform
    from moe_core.testing.quantize_weights import quantize_layer
    from moe_core.testing.tolerances import assert_close_quant

    M, H, I, E, k = 11, 128, 96, 4, 2
    g = torch.Generator().manual_seed(bn + 7 * fuse + len(activation))
    x = torch.randn(M, H, generator=g).to(torch.float16)
    w1 = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    w2 = torch.randn(E, H, I, generator=g) / I ** 0.5
    tw, ti = moe_core.select_experts(torch.randn(M, E, generator=g), top_k=k)
    w1q, w2q, quant = quantize_layer(w1, w2, "fp8_w8a8", block_shape=(32, 64))
    oai = dict(gemm1_alpha=1.702, gemm1_limit=7.0) if activation == "swiglu_oai" else {}
    layer = MoELayer(num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I, activation=activation,
                     **oai)

    class Backend(InterpCuda):
        fuse_activation = fuse
        fuse_activation_max_tile = None

    runner = MoERunner(layer, backend=Backend())
    with moe_core.override_config(_cfg(16, bn=bn, bk=32)):
        out = runner.run(x, ExpertWeights(w1q, w2q, quant=quant), tw, ti)
    assert runner._last_plan.fused_activation is fuse
    ref = oracle_moe(x, w1q, w2q, tw, ti, quant=quant, activation=activation,
                     gate_up_layout=layer.gate_up_layout, alpha=layer.gemm1_alpha, limit=layer.gemm1_limit,
                     round_intermediate=torch.float16)
    assert_close_quant(out, ref, quant, scheme="fp8_w8a8", opts={"block_shape": (32, 64)})
    # which path ran: gemm1 (fused programs cover bn / 2 act columns) and gemm2
    act = layer if fuse else None
    bn1 = max(16, bn // 2) if fuse else bn
    expect1 = {16: True, 32: True, 64: False}[bn] if not fuse else (
        32 % (2 * bn1) == 0 if activation == "swiglu_oai" else 32 % bn1 == 0 and I % 32 == 0)
    assert _block_scale_uniform(32, bn1, I if fuse else 2 * I, act) is expect1
    assert _block_scale_uniform(32, bn, H, None) is (bn <= 32)


# -- C-special: routings -------------------------------------------------------------
def test_m1_k1(nan_empty):
    _needs_interpreter()
    x, w1, w2, tw, ti = _make(1, 32, 16, 3, 1, torch.float32, seed=1)
    out = moe_core.fused_experts(x, w1, w2, tw, ti, backend=InterpCuda())
    assert_close_normalized(out, oracle_moe(x, w1, w2, tw, ti), *tolerance_for(torch.float32))


@pytest.mark.parametrize("routing", ["one_expert", "six_of_eight_empty"])
def test_skewed_routing(routing, nan_empty):
    _needs_interpreter()
    M, E = 19, 8
    k = 1 if routing == "one_expert" else 2
    x, w1, w2, tw, _ = _make(M, 48, 16, E, k, torch.float16, seed=3)
    if routing == "one_expert":
        ti = torch.full((M, 1), 5, dtype=torch.int32)
    else:
        ti = torch.stack([torch.full((M,), 2), torch.full((M,), 5)], 1).to(torch.int32)
        ti[::2] = ti[::2].flip(1)
    with moe_core.override_config(_cfg(16)):
        out = moe_core.fused_experts(x, w1, w2, tw, ti, backend=InterpCuda())
    ref = oracle_moe(x, w1, w2, tw, ti, round_intermediate=torch.float16)
    assert_close_normalized(out, ref, *tolerance_for(torch.float16), routing=routing)


def test_router_weight_on_input(nan_empty):
    _needs_interpreter()
    M, H, I, E = 7, 32, 16, 4
    x, w1, w2, tw, ti = _make(M, H, I, E, 1, torch.float32, seed=9)
    tw = tw * torch.linspace(0.2, 1.5, M).unsqueeze(1)           # weights != 1
    layer = MoELayer(num_local_experts=E, top_k=1, hidden_size=H, intermediate_size=I,
                     apply_router_weight_on_input=True)
    out = moe_core.fused_experts(x, w1, w2, tw, ti, layer=layer, backend=InterpCuda())
    ref = oracle_moe(x, w1, w2, tw, ti, apply_router_weight_on_input=True)
    assert_close_normalized(out, ref, *tolerance_for(torch.float32))


def test_minus_one_slots_give_exact_zero_rows(nan_empty):
    """-1 blocks: gemm1 and gemm2 write exact zeros; a row of only -1 slots outputs 0."""
    _needs_interpreter()
    M, H, I, E, k = 10, 32, 16, 4, 2
    x, w1, w2, tw, ti = _make(M, H, I, E, k, torch.float16, seed=21)
    ti = ti.clone()
    ti[::3, 1] = -1
    ti[4] = -1
    tw = tw.clone()
    tw[4] = float("nan")                                      # never read for -1 slots
    down = moe_core.fused_experts(x, w1, w2, tw, ti, backend=InterpCuda(), no_combine=True)
    assert torch.equal(down[ti == -1], torch.zeros_like(down[ti == -1]))
    out = moe_core.fused_experts(x, w1, w2, tw, ti, backend=InterpCuda())
    assert torch.equal(out[4], torch.zeros_like(out[4]))
    tw_ref = torch.where(ti == -1, 0.0, tw)
    ref = oracle_moe(x, w1, w2, tw_ref, ti, round_intermediate=torch.float16)
    assert_close_normalized(out, ref, *tolerance_for(torch.float16))


def test_grouped_gemm_minus_one_blocks_and_sentinels():
    """Direct kernel call: -1 blocks zero their rows, sentinel rows are never written."""
    _needs_interpreter()
    from moe_core.align import moe_align_block_size_torch
    from moe_core.kernels.gemm import grouped_gemm

    M, K, N, E, k, bm = 6, 40, 24, 3, 2, 16
    g = torch.Generator().manual_seed(2)
    a = torch.randn(M, K, generator=g)
    w = torch.randn(E, N, K, generator=g)
    ids = torch.tensor([[0, -1], [2, 0], [-1, -1], [1, 2], [0, 1], [2, -1]], dtype=torch.int32)
    tw = torch.rand(M, k, generator=g)
    sorted_ids, expert_ids, n_post = moe_align_block_size_torch(ids, bm, E)
    out = torch.full((M * k, N), float("nan"))
    grouped_gemm(a, w, out, a_scale=None, w_scale=None, w_zp=None, bias=None, topk_weights=tw,
                 sorted_token_ids=sorted_ids, expert_ids=expert_ids, num_tokens_post_padded=n_post,
                 top_k=k, mul_routed_weight=True, quant=QuantSpec.none(), config=_cfg(bm, 16, 32))
    flat = ids.reshape(-1)
    assert torch.equal(out[flat == -1], torch.zeros(int((flat == -1).sum()), N))
    for s in torch.nonzero(flat >= 0).flatten().tolist():
        e = int(flat[s])
        want = (a[s // k].double() @ w[e].double().T) * tw.reshape(-1)[s].double()
        torch.testing.assert_close(out[s].double(), want, atol=1e-4, rtol=1e-4)


def test_expert_parallel_mapping(nan_empty):
    """EP rank 1 of 2: global ids 8..15 are local 0..7, the rest -1 (filter_expert hook)."""
    _needs_interpreter()
    M, H, I, k = 9, 32, 16, 3
    layer = MoELayer(num_experts=16, num_local_experts=8, top_k=k, hidden_size=H, intermediate_size=I,
                     ep_rank=1, ep_size=2)
    x, w1, w2, _, _ = _make(M, H, I, 8, k, torch.float32, seed=4)
    tw, ti = moe_core.select_experts(torch.randn(M, 16, generator=torch.Generator().manual_seed(8)), top_k=k)
    table = torch.full((16,), -1, dtype=torch.int32)
    table[8:] = torch.arange(8, dtype=torch.int32)
    assert ((ti >= 8).any() and (ti < 8).any())
    runner = MoERunner(layer, backend=InterpCuda())
    out = runner.run(x, ExpertWeights(w1, w2), tw, ti)
    ref = oracle_moe(x, w1, w2, tw, ti, expert_map=table)
    assert_close_normalized(out, ref, *tolerance_for(torch.float32))


def test_stale_huge_ids_in_padded_rows_are_masked(nan_empty):
    """Padded rows (>= n_valid) hold stale ids; valid rows unchanged, padded rows give 0."""
    _needs_interpreter()
    M, H, I, E, k, n_valid = 8, 32, 16, 4, 2, 5
    x, w1, w2, tw, ti = _make(M, H, I, E, k, torch.float16, seed=6)
    ti = ti.clone()
    ti[5] = torch.tensor([2071690107, -99999], dtype=torch.int32)
    ti[6] = torch.tensor([E, 2071690107], dtype=torch.int32)
    ti[7] = torch.tensor([-99999, E], dtype=torch.int32)
    layer = MoELayer(num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I)
    out = MoERunner(layer, backend=InterpCuda()).run(x, ExpertWeights(w1, w2), tw, ti, n_valid=n_valid)
    ref = oracle_moe(x[:n_valid], w1, w2, tw[:n_valid], ti[:n_valid], round_intermediate=torch.float16)
    assert_close_normalized(out[:n_valid], ref, *tolerance_for(torch.float16))
    assert torch.equal(out[n_valid:], torch.zeros_like(out[n_valid:]))


def test_degenerate_router_rows(nan_empty):
    """Zero routed weights and a row routed twice to the same expert."""
    _needs_interpreter()
    M, H, I, E, k = 6, 32, 16, 4, 2
    x, w1, w2, tw, ti = _make(M, H, I, E, k, torch.float32, seed=12)
    tw, ti = tw.clone(), ti.clone()
    tw[1] = 0.0
    ti[2] = torch.tensor([3, 3], dtype=torch.int32)
    out = moe_core.fused_experts(x, w1, w2, tw, ti, backend=InterpCuda())
    ref = oracle_moe(x, w1, w2, tw, ti)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_close_normalized(out, ref, *tolerance_for(torch.float32))


def test_entry_points_bit_identical():
    _needs_interpreter()
    M, H, I, E, k = 9, 32, 16, 4, 2
    x, w1, w2, tw, ti = _make(M, H, I, E, k, torch.float16, seed=13)
    layer = MoELayer(num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I)
    a = moe_core.fused_experts(x, w1, w2, tw, ti, layer=layer, backend=InterpCuda())
    b = MoERunner(layer, backend=InterpCuda()).run(x, ExpertWeights(w1, w2), tw, ti)
    assert torch.equal(a, b)


# -- C-bf16 --------------------------------------------------------------------------
def test_bf16_on_interpreter_is_correct(nan_empty):
    """bf16 under the interpreter takes the fp32-cast path: correct, never garbage."""
    _needs_interpreter()
    x, w1, w2, tw, ti = _make(9, 48, 16, 4, 2, torch.bfloat16, seed=14)
    out = moe_core.fused_experts(x, w1, w2, tw, ti, backend=InterpCuda())
    assert out.dtype == torch.bfloat16
    ref = oracle_moe(x, w1, w2, tw, ti, round_intermediate=torch.bfloat16)
    assert_close_normalized(out, ref, *tolerance_for(torch.bfloat16))


# -- backend facts ---------------------------------------------------------------------
def test_cuda_backend_unavailable_on_cpu_or_rocm(monkeypatch):
    if not torch.cuda.is_available():
        ok, reason = CudaBackend().is_available()
        assert not ok and "no CUDA device" in reason
    monkeypatch.setattr(torch.version, "hip", "6.2.0", raising=False)
    ok, reason = CudaBackend().is_available()
    assert not ok and "ROCm" in reason


def test_triton_backend_facts():
    _needs_interpreter()
    b = InterpCuda()
    assert b.name == "cuda" and b.priority == 100
    assert b.device().type == "cpu" and b.device_name() == "cpu"
    assert not b.has_tma()
    assert b.config_keys == moe_core.backend.BASE_CONFIG_KEYS | {"USE_TMA"}     # sorted mode
    layer = MoELayer(num_local_experts=2, top_k=1, hidden_size=32, intermediate_size=16)
    ok, reason = b.supports(layer, QuantSpec.fp8_w8a8(torch.ones(2), torch.ones(2), block_shape=(128, 8)))
    assert not ok and "bk" in reason
    assert issubclass(CudaBackend, TritonBackend)
    for step in CudaBackend.step_names():   # platform subclasses add data, never steps
        assert step not in vars(CudaBackend)


def test_kernel_offsets_are_int64():
    """Tier I: token, slot, expert and program offsets are cast to int64 in the kernel source."""
    src = Path(moe_core.kernels.__file__).with_name("_gemm.py").read_text()
    for pattern in (r"offs_token = tl\.load\([^;]*?other=num_valid_tokens\)\.to\(tl\.int64\)", r"off_expert = .*\.to\(tl\.int64\)",
                    r"offs_tid = pid_m\.to\(tl\.int64\)", r"offs_cn = pid_n\.to\(tl\.int64\)"):
        assert re.search(pattern, src, re.DOTALL), f"_gemm.py: no match for {pattern!r}"
    assert "tl.bfloat16" not in src


# -- the one-token layout (M = 1: one block per slot, no align kernel) --------------------
def test_one_token_layout_shape_and_fallbacks():
    from moe_core.kernels.align import one_token_blocks

    ids = torch.tensor([[5, -1, 2]], dtype=torch.int32)
    sorted_ids, expert_ids, n_post = one_token_blocks(ids, 16)
    assert sorted_ids.tolist() == sum(([b] + [3] * 15 for b in range(3)), [])   # slot b, then sentinel k
    assert expert_ids.data_ptr() == ids.data_ptr() and expert_ids.tolist() == [5, -1, 2]
    assert n_post.tolist() == [48]
    assert one_token_blocks(torch.zeros(2, 3, dtype=torch.int32), 16) is None          # two tokens
    assert one_token_blocks(torch.zeros(1, 3, dtype=torch.int64), 16) is None          # not int32
    from torch._subclasses.fake_tensor import FakeTensorMode

    from moe_core.kernels import align as kalign

    before = dict(kalign._ONE_TOKEN)
    with FakeTensorMode() as mode:                                                      # a tracer's tensors
        assert one_token_blocks(mode.from_tensor(torch.zeros(1, 5, dtype=torch.int32)), 32) is None
    assert kalign._ONE_TOKEN == before


@pytest.mark.parametrize("fused", [False, True])
def test_one_token_forward_is_bitwise_the_sorted_layout(fused, nan_empty):
    """A single token through the Triton backend (one block per slot) gives exactly the output of
    the same kernels over the sorted alignment; filtered (-1) and out-of-range ids give zero rows."""
    _needs_interpreter()
    from moe_core.kernels.align import moe_align_block_size_triton, one_token_blocks
    from moe_core.kernels.gemm import grouped_gemm

    H, I, E, k = 48, 32, 6, 4
    x, w1, w2, tw, _ = _make(1, H, I, E, k, torch.float16, seed=3)
    layer = MoELayer(num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I)

    class Fused(InterpCuda):
        fuse_activation = fused

    cfg = _cfg(16, bn=16, bk=16)
    with moe_core.override_config(cfg):
        ids = torch.tensor([[4, 0, 5, 2]], dtype=torch.int32)
        out = moe_core.fused_experts(x, w1, w2, tw, ids, backend=Fused())
    ref = oracle_moe(x, w1, w2, tw, ids, round_intermediate=torch.float16)
    assert_close_normalized(out, ref, *tolerance_for(torch.float16))

    # gemm1 on both layouts, bitwise; ids -1 and E (outside [0, E): never read w[E]) give zero rows
    ids = torch.tensor([[3, -1, E, 1]], dtype=torch.int32)
    got = {}
    for name, aligned in (("one", one_token_blocks(ids, 16)),
                          ("sorted", moe_align_block_size_triton(ids, 16, E))):
        out1 = torch.full((k, I if fused else 2 * I), float("nan"), dtype=torch.float16)
        grouped_gemm(x, w1, out1, a_scale=None, w_scale=None, w_zp=None, bias=None, topk_weights=tw,
                     sorted_token_ids=aligned[0], expert_ids=aligned[1], num_tokens_post_padded=aligned[2],
                     top_k=k, mul_routed_weight=False, quant=QuantSpec.none(), config=cfg,
                     activation=layer if fused else None)
        got[name] = out1
    assert torch.equal(got["one"], got["sorted"])
    assert not got["one"][[1, 2]].any() and got["one"][[0, 3]].abs().sum() > 0
