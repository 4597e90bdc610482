"""GPU numerics of the ``cuda`` backend (TESTING.md §5, §7, §8; marker ``gpu``), every shipped
config forced once and deterministic mode included.

Two-level oracle (TESTING.md §1): the torch backend on the GPU (fp32 math) is first
checked against the float64 loop on small shapes; it then serves as the reference for
the large grids. Outputs are NaN-poisoned before every run (``nan_empty``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moe_core
from moe_core import ExpertWeights, MoELayer, MoERunner
from moe_core.testing import assert_close_normalized, oracle_moe, tolerance_for

pytestmark = pytest.mark.gpu

DEV = "cuda"
ROOT = Path(__file__).resolve().parents[1]


def _data(M: int, H: int, N: int, E: int, k: int, dtype: torch.dtype, seed: int, *,
          I: int | None = None) -> tuple[torch.Tensor, ...]:
    """randn/10 tokens and weights, softmax top-k routing; ``N = 2·I`` (gated)."""
    I = N // 2 if I is None else I
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = (torch.randn(M, H, generator=g, device=DEV) / 10).to(dtype)
    w1 = (torch.randn(E, 2 * I, H, generator=g, device=DEV) / 10).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g, device=DEV) / 10).to(dtype)
    logits = torch.randn(M, E, generator=g, device=DEV)
    tw, ti = moe_core.select_experts(logits, top_k=k)
    return x, w1, w2, tw, ti


def _torch_ref(x, w1, w2, tw, ti, **kw) -> torch.Tensor:
    """The torch backend on the GPU (fp32 GEMMs, intermediates stored in x's dtype)."""
    return moe_core.fused_experts(x, w1, w2, tw, ti, backend="torch", **kw)


# -- level 1: the torch backend on the GPU against the float64 oracle -------------------
@pytest.mark.parametrize("scheme", ["none", "fp8_block", "int4"])
def test_torch_backend_on_gpu_matches_oracle(scheme):
    from moe_core.testing.quantize_weights import quantize_layer
    from moe_core.testing.tolerances import assert_close_quant

    M, H, I, E, k = 37, 256, 128, 8, 2
    x, w1, w2, tw, ti = _data(M, H, 2 * I, E, k, torch.bfloat16, seed=1)
    if scheme == "none":
        out = _torch_ref(x, w1, w2, tw, ti)
        ref = oracle_moe(x.cpu(), w1.cpu(), w2.cpu(), tw.cpu(), ti.cpu(), round_intermediate=torch.bfloat16)
        assert_close_normalized(out, ref, *tolerance_for(torch.bfloat16))
        return
    x = x * 10
    opts = dict(block_shape=(128, 128)) if scheme == "fp8_block" else dict(group_size=64, zero_point=True)
    q1, q2, quant = quantize_layer(w1.float() * 10 / H ** 0.5, w2.float() * 10 / I ** 0.5,
                                   "fp8_w8a8" if scheme == "fp8_block" else "int4_w4a16", **opts)
    out = _torch_ref(x, q1, q2, tw, ti, quant=quant)
    ref = oracle_moe(x.cpu(), q1.cpu(), q2.cpu(), tw.cpu(), ti.cpu(), quant=quant,
                     round_intermediate=torch.bfloat16)
    assert_close_quant(out, ref, quant, scheme=scheme)


# -- core grid: bf16 / fp16 -------------------------------------------------------------
# (M, N, K, E, k, dtype, BLOCK_SIZE_M override or None)
CORE = [
    (1, 128, 128, 8, 1, torch.bfloat16, None),
    (2, 1024, 511, 16, 2, torch.float16, None),
    (7, 2048, 128, 60, 6, torch.bfloat16, None),
    (16, 1408, 2048, 64, 8, torch.bfloat16, 16),
    (33, 128, 128, 257, 8, torch.float16, None),
    (64, 4608, 7168, 8, 2, torch.bfloat16, None),
    (127, 1024, 511, 128, 6, torch.float16, 32),
    (129, 2048, 128, 256, 8, torch.bfloat16, None),
    (222, 1408, 2048, 60, 6, torch.bfloat16, 64),
    (1024, 1024, 511, 512, 8, torch.float16, None),
    (4096, 1408, 2048, 64, 6, torch.bfloat16, 128),
    (8192, 128, 128, 16, 2, torch.bfloat16, None),
]


@pytest.mark.parametrize("M,N,K,E,k,dtype,bm", CORE,
                         ids=[f"M{c[0]}-N{c[1]}-K{c[2]}-E{c[3]}-k{c[4]}-{str(c[5])[6:]}-bm{c[6]}" for c in CORE])
def test_core_grid(M, N, K, E, k, dtype, bm, nan_empty):
    x, w1, w2, tw, ti = _data(M, K, N, E, k, dtype, seed=M + N + E)
    if bm is None:
        out = moe_core.fused_experts(x, w1, w2, tw, ti, backend="cuda")
    else:
        cfg = {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 8,
               "num_warps": 4, "num_stages": 3}
        with moe_core.override_config(cfg):
            out = moe_core.fused_experts(x, w1, w2, tw, ti, backend="cuda")
    ref = _torch_ref(x, w1, w2, tw, ti)
    assert out.abs().max() > 0
    assert_close_normalized(out, ref, *tolerance_for(dtype), M=M, N=N, K=K, E=E, k=k, bm=bm)


def test_fp32_uses_ieee_dots(nan_empty):
    """fp32 computes and stores fp32 with IEEE dots (TF32 would miss 1e-4)."""
    x, w1, w2, tw, ti = _data(45, 512, 256, 8, 2, torch.float32, seed=3)
    out = moe_core.fused_experts(x, w1, w2, tw, ti, backend="cuda")
    assert out.dtype == torch.float32
    ref = oracle_moe(x.cpu(), w1.cpu(), w2.cpu(), tw.cpu(), ti.cpu())
    assert_close_normalized(out, ref, *tolerance_for(torch.float32))


def test_padded_weights_strided_x_bias_and_ep(nan_empty):
    """Padded (strided) weights, strided x rows, biases, EP mapping with -1 slots."""
    M, H, I, E, k = 300, 512, 384, 16, 4
    dtype = torch.bfloat16
    x0, w1_0, w2_0, tw, ti = _data(M, H, 2 * I, 32, k, dtype, seed=5)
    w1_0, w2_0 = w1_0[:E].contiguous(), w2_0[:E].contiguous()
    x = torch.empty(M, H + 64, dtype=dtype, device=DEV)[:, 32:32 + H]
    x.copy_(x0)
    w1 = torch.empty(E, 2 * I + 64, H + 128, dtype=dtype, device=DEV)[:, :2 * I, :H]
    w1.copy_(w1_0)
    w2 = torch.empty(E, H + 32, I + 64, dtype=dtype, device=DEV)[:, :H, 64:]
    w2.copy_(w2_0)
    b1 = (torch.randn(E, 2 * I, device=DEV) / 10).to(dtype)
    b2 = (torch.randn(E, H, device=DEV) / 10).to(dtype)
    layer = MoELayer(num_experts=32, num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I,
                     ep_rank=1, ep_size=2)
    out = MoERunner(layer, backend="cuda").run(x, ExpertWeights(w1, w2, b1=b1, b2=b2), tw, ti)
    ref = MoERunner(layer, backend="torch").run(x.contiguous(), ExpertWeights(w1_0, w2_0, b1=b1, b2=b2), tw, ti)
    assert_close_normalized(out, ref, *tolerance_for(dtype))


# -- quantized schemes --------------------------------------------------------------
# (scheme, options, M, N, K, E, k)
QUANT = [
    ("fp8_w8a8", {}, 1, 512, 512, 8, 2),
    ("fp8_w8a8", {}, 2048, 1024, 7168, 16, 6),
    ("fp8_w8a8", {"per_channel": True}, 83, 4608, 512, 8, 2),
    ("fp8_w8a8", {"per_channel": True}, 2048, 128, 128, 2, 1),
    ("fp8_w8a8", {"block_shape": (128, 128)}, 1, 1024, 7168, 16, 6),
    ("fp8_w8a8", {"block_shape": (128, 128)}, 128, 4608, 512, 8, 2),
    ("fp8_w8a8", {"block_shape": (128, 128)}, 8192, 512, 128, 8, 2),
    ("int8_w8a8", {"block_shape": (128, 128)}, 83, 1024, 512, 8, 2),
    ("int8_w8a8", {"per_channel": True}, 128, 512, 512, 8, 2),
    ("int8_w8a16", {}, 83, 1024, 512, 8, 2),
    ("int8_w8a16", {"group_size": 128, "zero_point": True}, 222, 1024, 1024, 8, 2),
    ("int4_w4a16", {"group_size": 64}, 1, 128, 128, 8, 2),
    ("int4_w4a16", {"group_size": 128, "zero_point": True}, 32, 1024, 1024, 8, 2),
    ("int4_w4a16", {"group_size": 64, "zero_point": True}, 222, 2048, 1024, 16, 4),
    ("int4_w4a16", {"group_size": 128}, 222, 1024, 1024, 8, 6),
]


@pytest.mark.parametrize("scheme,opts,M,N,K,E,k", QUANT,
                         ids=[f"{q[0]}-{'-'.join(f'{a}{b}' for a, b in q[1].items()) or 'tensor'}-M{q[2]}-N{q[3]}-K{q[4]}"
                              for q in QUANT])
def test_quantized(scheme, opts, M, N, K, E, k, nan_empty):
    from moe_core.testing.quantize_weights import quantize_layer
    from moe_core.testing.tolerances import assert_close_quant

    I = N // 2
    g = torch.Generator(device=DEV).manual_seed(M + N + K)
    x = torch.randn(M, K, generator=g, device=DEV).to(torch.bfloat16)
    w1 = torch.randn(E, N, K, generator=g, device=DEV) / K ** 0.5
    w2 = torch.randn(E, K, I, generator=g, device=DEV) / I ** 0.5
    tw, ti = moe_core.select_experts(torch.randn(M, E, generator=g, device=DEV), top_k=k)
    q1, q2, quant = quantize_layer(w1, w2, scheme, **opts)
    out = moe_core.fused_experts(x, q1, q2, tw, ti, quant=quant, backend="cuda")
    ref = _torch_ref(x, q1, q2, tw, ti, quant=quant)
    assert_close_quant(out, ref, quant, scheme=scheme, opts=opts, M=M, N=N, K=K)


def test_nan_poisoned_unused_expert_scales(nan_empty):
    """TESTING §8: all tokens to experts {0, 1}; scales of zero-token experts are NaN and never read."""
    from moe_core.testing.quantize_weights import quantize_layer

    M, H, I, E, k = 500, 512, 256, 64, 2
    g = torch.Generator(device=DEV).manual_seed(8)
    x = torch.randn(M, H, generator=g, device=DEV).to(torch.bfloat16)
    w1 = torch.randn(E, 2 * I, H, generator=g, device=DEV) / H ** 0.5
    w2 = torch.randn(E, H, I, generator=g, device=DEV) / I ** 0.5
    q1, q2, quant = quantize_layer(w1, w2, "fp8_w8a8", block_shape=(128, 128))
    quant.w1_scale[2:] = float("nan")
    quant.w2_scale[2:] = float("nan")
    ti = torch.stack([torch.zeros(M), torch.ones(M)], 1).to(torch.int32).to(DEV)
    tw = torch.rand(M, k, generator=g, device=DEV)
    out = moe_core.fused_experts(x, q1, q2, tw, ti, quant=quant, backend="cuda")
    assert torch.isfinite(out).all()
    ref = _torch_ref(x, q1, q2, tw, ti, quant=quant)
    from moe_core.testing.tolerances import assert_close_quant

    assert_close_quant(out, ref, quant)


def test_minus_one_rows_zero_and_entry_points_bit_identical(nan_empty):
    M, H, I, E, k = 257, 1024, 512, 32, 4
    x, w1, w2, tw, ti = _data(M, H, 2 * I, E, k, torch.bfloat16, seed=9)
    ti = ti.clone()
    ti[::5, 1] = -1
    ti[3] = -1
    layer = MoELayer(num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I)
    down = moe_core.fused_experts(x, w1, w2, tw, ti, layer=layer, backend="cuda", no_combine=True)
    assert torch.equal(down[ti == -1], torch.zeros_like(down[ti == -1]))
    a = moe_core.fused_experts(x, w1, w2, tw, ti, layer=layer, backend="cuda")
    b = MoERunner(layer, backend="cuda").run(x, ExpertWeights(w1, w2), tw, ti)
    assert torch.equal(a, b)
    assert torch.equal(a[3], torch.zeros_like(a[3]))
    assert_close_normalized(a, _torch_ref(x, w1, w2, tw, ti, layer=layer), *tolerance_for(torch.bfloat16))


def test_stale_ids_in_padded_rows(nan_empty):
    M, H, I, E, k, n_valid = 64, 256, 128, 16, 2, 50
    x, w1, w2, tw, ti = _data(M, H, 2 * I, E, k, torch.bfloat16, seed=10)
    ti = ti.clone()
    ti[n_valid:] = torch.tensor([2071690107, -99999], dtype=torch.int32, device=DEV)
    ti[-1] = E
    layer = MoELayer(num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I)
    out = MoERunner(layer, backend="cuda").run(x, ExpertWeights(w1, w2), tw, ti, n_valid=n_valid)
    ref = _torch_ref(x[:n_valid], w1, w2, tw[:n_valid], ti[:n_valid])
    assert_close_normalized(out[:n_valid], ref, *tolerance_for(torch.bfloat16))
    assert torch.equal(out[n_valid:], torch.zeros_like(out[n_valid:]))


def test_no_host_sync_in_eager_forward():
    x, w1, w2, tw, ti = _data(33, 256, 256, 8, 2, torch.bfloat16, seed=11)
    moe_core.fused_experts(x, w1, w2, tw, ti, backend="cuda")          # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moe_core.fused_experts(x, w1, w2, tw, ti, backend="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")


# -- overflow (TESTING §7) ----------------------------------------------------------
def _sampled_rows(M: int, n: int = 1024) -> torch.Tensor:
    g = torch.Generator().manual_seed(M)
    rows = torch.randperm(M, generator=g)[:n - 2]
    return torch.cat([torch.tensor([0, M - 1]), rows]).unique().to(DEV)


@pytest.mark.parametrize("M,H", [(65537, 4096), (70000, 4096), (131072, 4096), (40000, 7168)])
def test_overflow_activations(M, H):
    """M·k·N > 2^31: gate_up and down indices past int32 (int64 offsets); at H = 7168 ``down``
    itself holds more than 2^31 elements."""
    I, E, k = 2048, 8, 8
    assert max(M * k * 2 * I, M * k * H) > 2 ** 31                # the case is past int32 somewhere
    x, w1, w2, tw, ti = _data(M, H, 2 * I, E, k, torch.bfloat16, seed=12)
    out = moe_core.fused_experts(x, w1, w2, tw, ti, backend="cuda")
    assert torch.isfinite(out).all()
    rows = _sampled_rows(M)
    ref = _torch_ref(x[rows], w1, w2, tw[rows], ti[rows])
    assert_close_normalized(out[rows], ref, *tolerance_for(torch.bfloat16))


def test_overflow_expert_stride():
    """E·N·H > 2^31 through the expert stride: ids routed to experts >= 200."""
    M, H, I, E, k = 256, 4096, 2048, 256, 2
    g = torch.Generator(device=DEV).manual_seed(13)
    x = (torch.randn(M, H, generator=g, device=DEV) / 10).to(torch.bfloat16)
    w1 = torch.empty(E, 2 * I, H, dtype=torch.bfloat16, device=DEV).normal_(0, 0.1, generator=g)
    w2 = torch.empty(E, H, I, dtype=torch.bfloat16, device=DEV).normal_(0, 0.1, generator=g)
    ti = torch.randint(200, E, (M, k), generator=g, device=DEV, dtype=torch.int32)
    ti[:, 1] = torch.where(ti[:, 1] == ti[:, 0], (ti[:, 0] - 200 + 1) % (E - 200) + 200, ti[:, 1])
    tw = torch.rand(M, k, generator=g, device=DEV)
    out = moe_core.fused_experts(x, w1, w2, tw, ti, backend="cuda")
    ref = _torch_ref(x, w1, w2, tw, ti)
    assert_close_normalized(out, ref, *tolerance_for(torch.bfloat16))


# -- each shipped config once (TESTING §5 core; bug class 12) ------------------------------
def _shipped_entries() -> list[dict]:
    """Distinct entries of the shipped tables of the running Triton version (all versions if none)."""
    from moe_core.config_files import triton_folder

    root = ROOT / "backends" / "cuda" / "configs"
    folder = root / triton_folder()
    files = sorted(folder.glob("*.json")) if folder.is_dir() else sorted(root.glob("*/*.json"))
    seen: dict[str, dict] = {}
    for path in files:
        for key, entry in json.loads(path.read_text()).items():
            if key.isdigit():
                cfg = {k: v for k, v in entry.items() if k != "USE_TMA"}
                seen.setdefault(json.dumps(cfg, sort_keys=True), cfg)
    return list(seen.values())


@pytest.mark.parametrize("cfg", _shipped_entries(), ids=lambda c: "-".join(str(v) for v in c.values()))
def test_every_shipped_config_computes(cfg: dict, nan_empty) -> None:
    """A tile config that silently writes zeros (or garbage) fails against the torch backend."""
    x, w1, w2, tw, ti = _data(37, 320, 384, 8, 2, torch.bfloat16, seed=21)
    with moe_core.override_config(cfg):
        out = moe_core.fused_experts(x, w1, w2, tw, ti, backend="cuda")
    assert_close_normalized(out, _torch_ref(x, w1, w2, tw, ti), *tolerance_for(torch.bfloat16),
                            topk_ids=ti, config=cfg)


# -- deterministic mode (TESTING §5) --------------------------------------------------------
def test_deterministic_mode_bitwise_and_independent_of_M(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_CORE_DETERMINISTIC", "1")
    x, w1, w2, tw, ti = _data(4096, 512, 512, 16, 4, torch.bfloat16, seed=22)
    first_rows = []
    for M in (1, 33, 4096):
        outs = [moe_core.fused_experts(x[:M], w1, w2, tw[:M], ti[:M], backend="cuda") for _ in range(5)]
        for again in outs[1:]:
            assert torch.equal(outs[0], again), f"M={M}: repeats differ"
        first_rows.append(outs[0][:1])
    assert torch.equal(first_rows[0], first_rows[1]) and torch.equal(first_rows[0], first_rows[2]), \
        "token 0's output depends on the batch size in deterministic mode"


# -- fused activation (cuda fuses it into gemm1 at every tile) ----------------------------------
@pytest.mark.parametrize("cfg", [
    {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 3},
    {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 16, "num_warps": 4, "num_stages": 4},
    {"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 256, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 16, "num_warps": 8, "num_stages": 3},
], ids=["mma16x64", "wgmma64x128", "wgmma128x256"])
@pytest.mark.parametrize("activation", ["silu", "swiglu_oai"])
@pytest.mark.parametrize("scheme", ["bf16", "fp8_block"])
def test_fused_activation_is_bitwise_the_unfused_path(cfg, activation, scheme):
    """Fusing must change no bit: a registered hook turns fusing off (it needs gate_up), and
    hook neutrality (SEMANTICS §8) compares against the hook-free, fused forward. fp8 block: the
    gated dot over both halves with a weight scale per half (64x128) against the plain GEMM."""
    from moe_core.bench import fp8_block_weights, with_fused_activation
    from moe_core.backends.cuda import CudaBackend

    M, H, I, E, k = 300, 1024, 512, 8, 2
    x, w1, w2, tw, ti = _data(M, H, 2 * I, E, k, torch.bfloat16, seed=21)
    oai = dict(gemm1_alpha=1.702, gemm1_limit=7.0) if activation == "swiglu_oai" else {}
    layer = MoELayer(num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I, activation=activation,
                     **oai)
    weights = ExpertWeights(w1, w2) if scheme == "bf16" else fp8_block_weights(w1, w2)
    with moe_core.override_config(cfg):
        fused = MoERunner(layer, backend=with_fused_activation(CudaBackend())).run(x, weights, tw, ti)
        plain = MoERunner(layer, backend=with_fused_activation(CudaBackend(), False)).run(x, weights, tw, ti)
    assert torch.isfinite(fused).all() and fused.abs().max() > 0
    assert torch.equal(fused, plain)


# -- weight tiles through TMA (cuda on sm90+, per its tile rule) ---------------------------------
def _gated_case(M: int, H: int, I: int, layout: str, *, seed: int):
    """bf16 inputs of a gated layer with 8 experts, top-2, one filtered slot; ``interleaved`` is
    gpt-oss's clamped swiglu. Returns x, w1, w2, topk_weights, topk_ids, layer."""
    E, k = 8, 2
    x, w1, w2, tw, ti = _data(M, H, 2 * I, E, k, torch.bfloat16, seed=seed)
    ti[M // 2, 0] = -1
    oai = {"activation": "swiglu_oai", "gemm1_alpha": 1.702, "gemm1_limit": 7.0} if layout == "interleaved" else {}
    layer = MoELayer(num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I, gate_up_layout=layout, **oai)
    return x, w1, w2, tw, ti, layer


@pytest.mark.parametrize("cfg", [
    {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 3},
    {"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 256, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 16, "num_warps": 8, "num_stages": 4},
], ids=["decode16x64", "prefill128x256"])
@pytest.mark.parametrize("M,H,I", [(5, 1024, 512), (700, 1000, 328)])
@pytest.mark.parametrize("layout", ["halves", "interleaved"])
def test_weight_tma_is_bitwise_the_pointer_loads(cfg, M, H, I, layout):
    """TMA tiles (ragged N and K included: zero-filled past the end) change no bit; checked
    against the oracle too, so a descriptor reading the wrong rows cannot pass by agreeing."""
    from moe_core.backends.cuda import CudaBackend
    from moe_core.bench import _variant

    if not CudaBackend().has_tma():
        pytest.skip("tensor descriptors need sm90+")
    x, w1, w2, tw, ti, layer = _gated_case(M, H, I, layout, seed=24)
    weights = ExpertWeights(w1, w2)
    pointer = _variant(CudaBackend(), "Pointer", uses_weight_tma=lambda self, c, q, a: False)
    everywhere = _variant(CudaBackend(), "Tma", uses_weight_tma=lambda self, c, q, a: True)
    with moe_core.override_config(cfg):
        ruled = MoERunner(layer, backend=CudaBackend()).run(x, weights, tw, ti)
        tma = MoERunner(layer, backend=everywhere).run(x, weights, tw, ti)
        plain = MoERunner(layer, backend=pointer).run(x, weights, tw, ti)
    assert torch.equal(tma, plain) and torch.equal(ruled, plain)
    ref = _torch_ref(x, w1, w2, tw, ti, layer=layer)
    assert_close_normalized(tma, ref, *tolerance_for(torch.bfloat16), topk_ids=ti)


# -- sorted mode: USE_TMA in the down config (gemm2 reads act by position through TMA) -----------
@pytest.mark.parametrize("cfg", [
    {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 16, "num_warps": 4, "num_stages": 3},
    {"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 256, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1, "num_warps": 8, "num_stages": 3},
], ids=["64x128", "128x256"])
@pytest.mark.parametrize("M,H,I", [(7, 1024, 512), (900, 1024, 384)])
@pytest.mark.parametrize("layout", ["halves", "interleaved"])
@pytest.mark.parametrize("scheme", ["bf16", "fp8_block"])
def test_sorted_mode_is_bitwise_the_slot_major_path(cfg, M, H, I, layout, scheme):
    """USE_TMA changes no bit (bf16 and fp8 block), and the forward still meets the oracle."""
    from moe_core.backends.cuda import CudaBackend
    from moe_core.bench import fp8_block_weights

    cuda = CudaBackend()
    if not cuda.has_tma():
        pytest.skip("tensor descriptors need sm90+")
    x, w1, w2, tw, ti, layer = _gated_case(M, H, I, layout, seed=27)
    weights = ExpertWeights(w1, w2) if scheme == "bf16" else fp8_block_weights(w1, w2)
    runner = MoERunner(layer, backend=cuda)
    with moe_core.override_config({**cfg, "USE_TMA": True}):
        out = runner.run(x, weights, tw, ti)
        assert runner._last_plan.sorted_intermediate
    with moe_core.override_config(cfg):
        plain = MoERunner(layer, backend=CudaBackend()).run(x, weights, tw, ti)
    assert torch.isfinite(out).all() and out.abs().max() > 0
    assert torch.equal(out, plain)
    if scheme == "bf16":
        ref = _torch_ref(x, w1, w2, tw, ti, layer=layer)
        assert_close_normalized(out, ref, *tolerance_for(torch.bfloat16), topk_ids=ti)
