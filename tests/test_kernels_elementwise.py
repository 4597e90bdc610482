"""The elementwise kernels (activation, moe_sum, activation quantization) against their
torch definitions; interpreter on CPU (fp16/fp32, bf16 through the fp32 store path), and
the same checks on the GPU (marker ``gpu``). Outputs are NaN-filled before each launch."""

from __future__ import annotations

import pytest
import torch

from moe_core.errors import MoEInputError, MoETypeError
from moe_core.quant import quantize_activation as torch_quantize
from moe_core.reference import apply_activation
from moe_core.spec import MoELayer, QuantSpec
from moe_core.testing import assert_close_normalized, tolerance_for

pytestmark = pytest.mark.interp

ACTS = [  # activation, gated, layout, alpha, limit
    ("silu", True, "halves", None, None),
    ("gelu", True, "halves", None, None),
    ("silu", True, "halves", None, 7.0),
    ("swiglu_oai", True, "interleaved", 1.702, 7.0),
    ("silu", False, "halves", None, None),
    ("gelu", False, "halves", None, None),
    ("relu2", False, "halves", None, None),
]


def _devices() -> list:
    return [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def _layer(act: str, gated: bool, layout: str, alpha: float | None, limit: float | None, N: int) -> MoELayer:
    return MoELayer(num_local_experts=4, top_k=2, hidden_size=8, intermediate_size=N // 2 if gated else N,
                    activation=act, is_gated=gated, gate_up_layout=layout, gemm1_alpha=alpha, gemm1_limit=limit)


# -- activation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act,gated,layout,alpha,limit", ACTS)
def test_activation_matches_torch(device: str, dtype: torch.dtype, act: str, gated: bool, layout: str,
                                  alpha: float | None, limit: float | None) -> None:
    from moe_core.kernels.act import activation

    M, k, N = 9, 2, 70                       # width not a power of two; S = 18 rows
    g = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(M * k, N, generator=g) * 4).to(dtype).to(device)
    ids = torch.randint(0, 4, (M, k), generator=g, dtype=torch.int32)
    ids[1, 0] = ids[5, 1] = -1
    ids = ids.to(device)
    out = torch.full((M * k, N // 2 if gated else N), float("nan"), dtype=dtype, device=device)
    activation(gate_up, out, activation=act, is_gated=gated, layout=layout, alpha=alpha, limit=limit,
               topk_ids=ids)
    ref = apply_activation(gate_up.double(), _layer(act, gated, layout, alpha, limit, N))
    dead = (ids.reshape(-1) < 0)
    ref[dead] = 0
    assert torch.all(out[dead] == 0), "rows of -1 slots must be written as zeros"
    assert_close_normalized(out.double(), ref, *tolerance_for(dtype))
    # one cast from fp32: within one unit in the last place of torch's fp32 math cast once
    # (plus fp32 transcendental differences, which cancellation in gelu(x < -3) magnifies)
    if dtype != torch.float32:
        want = apply_activation(gate_up.float(), _layer(act, gated, layout, alpha, limit, N)).to(dtype)
        want[dead] = 0
        diff = (out.float() - want.float()).abs()
        ulp = want.float().abs() * (2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10)
        assert torch.all(diff <= ulp + 1e-4 * want.float().abs().max()), "not cast once from fp32"


@pytest.mark.parametrize("device", _devices())
def test_activation_without_ids_and_strided_rows(device: str) -> None:
    from moe_core.kernels.act import activation

    base = torch.randn(6, 100, device=device)
    gate_up = base[:, :64]                   # row stride 100
    out = torch.full((6, 32), float("nan"), device=device)
    activation(gate_up, out, activation="silu", is_gated=True)
    ref = apply_activation(gate_up.double(), _layer("silu", True, "halves", None, None, 64))
    assert_close_normalized(out.double(), ref, *tolerance_for(torch.float32))


def test_activation_rejects_bad_shapes() -> None:
    from moe_core.kernels.act import activation

    with pytest.raises(MoEInputError, match="out: expected"):
        activation(torch.zeros(4, 8), torch.zeros(4, 8), activation="silu", is_gated=True)
    with pytest.raises(MoEInputError, match="does not exist"):
        activation(torch.zeros(4, 8), torch.zeros(4, 4), activation="relu2", is_gated=True)
    with pytest.raises(MoEInputError, match="topk_ids"):
        activation(torch.zeros(4, 8), torch.zeros(4, 4), activation="silu", is_gated=True,
                   topk_ids=torch.zeros(3, 1, dtype=torch.int32))
    with pytest.raises(MoETypeError, match="float16"):
        activation(torch.zeros(4, 8, dtype=torch.int32), torch.zeros(4, 4), activation="silu", is_gated=True)


# -- moe_sum ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_moe_sum_matches_fp32_sum(device: str, dtype: torch.dtype, k: int) -> None:
    from moe_core.kernels.moe_sum import moe_sum

    M, H = 13, 75
    down = torch.randn(M, k, H, device=device).to(dtype)
    out = torch.full((M, H), float("nan"), dtype=dtype, device=device)
    moe_sum(down, out, 2.5)
    acc = torch.zeros(M, H, device=device)
    for j in range(k):                                       # fp32, ascending j
        acc = acc + down[:, j].float()
    assert torch.equal(out, (acc * 2.5).to(dtype)), "not an fp32 sum times scale, cast once"
    assert_close_normalized(out.double(), down.double().sum(1) * 2.5, *tolerance_for(dtype))


@pytest.mark.parametrize("device", _devices())
def test_moe_sum_same_rows_for_every_M_and_scale_applied(device: str) -> None:
    from moe_core.kernels.moe_sum import moe_sum

    down = torch.randn(40, 4, 96, device=device, dtype=torch.float16)
    full = moe_sum(down, torch.empty(40, 96, device=device, dtype=torch.float16), 0.5)
    for M in (1, 3, 17):
        part = moe_sum(down[:M], torch.full((M, 96), float("nan"), device=device, dtype=torch.float16), 0.5)
        assert torch.equal(part, full[:M]), f"result depends on M = {M}"
    unscaled = moe_sum(down, torch.empty(40, 96, device=device, dtype=torch.float16), 1.0)
    assert not torch.equal(unscaled, full), "scale was dropped"
    strided = torch.randn(5, 7, 96, device=device)[:, ::2]            # k = 4 with slot stride 2·H
    got = moe_sum(strided, torch.empty(5, 96, device=device), 1.0)
    assert_close_normalized(got.double(), strided.double().sum(dim=1), *tolerance_for(torch.float32))


def test_moe_sum_rejects_bad_shapes() -> None:
    from moe_core.kernels.moe_sum import moe_sum

    with pytest.raises(MoEInputError, match="out: expected shape"):
        moe_sum(torch.zeros(2, 3, 4), torch.zeros(2, 5), 1.0)
    with pytest.raises(MoEInputError, match="3-D"):
        moe_sum(torch.zeros(2, 4), torch.zeros(2, 4), 1.0)


# -- activation quantization -------------------------------------------------------------------------
def _spec(qdtype: torch.dtype, per_channel: bool, group_k: int | None) -> QuantSpec:
    w = torch.ones(2)
    make = QuantSpec.int8_w8a8 if qdtype == torch.int8 else QuantSpec.fp8_w8a8
    return make(w, w, per_channel=per_channel, block_shape=(128, group_k) if group_k else None)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int8 else t.view(torch.uint8)


QCASES = [(False, None, None), (True, None, None), (False, 64, None), (False, 128, None),
          (False, None, "tensor"), (False, None, "rows")]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_channel,group_k,static", QCASES)
def test_quantize_bitwise_equal_to_torch(device: str, qdtype: torch.dtype, dtype: torch.dtype,
                                          per_channel: bool, group_k: int | None, static: str | None) -> None:
    from moe_core.kernels.quantize import quantize_activation

    rows, K = 11, 200                         # K not a multiple of the group
    g = torch.Generator().manual_seed(1)
    a = (torch.randn(rows, K, generator=g) * 3)
    a[3, 5] = 0.5 * 127 / a.abs().max()       # a few exact .5 ties survive for int8
    a[4] = 0.0                                # all-zero row: EPS floor
    a = a.to(dtype).to(device)
    scale = None
    if static == "tensor":
        scale = torch.tensor([0.02], device=device)
    elif static == "rows":
        scale = (torch.rand(rows, 1, generator=g) / 10 + 0.01).to(device)
    q, s = quantize_activation(a, qdtype=qdtype, per_channel=per_channel, group_k=group_k, static_scale=scale)
    rq, rs = torch_quantize(a, _spec(qdtype, per_channel, group_k), scale, fp8_dtype=qdtype)
    assert q.dtype == qdtype and tuple(q.shape) == (rows, K)
    assert tuple(s.shape) == tuple(rs.shape) and s.dtype == torch.float32
    assert torch.equal(s, rs), "scales differ"
    assert torch.equal(_bits(q), _bits(rq)), "quantized values differ from moe_core.quant"


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("rows,K,per_channel,group_k", [
    (300, 192, False, 64),        # several row blocks of 64, the last one partial
    (37, 4500, True, None),       # a group wider than one 2048 block: the two-pass path
    (5, 5000, False, 2500),       # two-pass with a short last group
    (1, 128, False, 128),
])
def test_quantize_row_blocks_and_wide_groups(device: str, qdtype: torch.dtype, rows: int, K: int,
                                             per_channel: bool, group_k: int | None) -> None:
    """The per-token(-group) kernel quantizes several rows per program, and groups wider than
    its block in two passes; both bitwise equal to :mod:`moe_core.quant`."""
    from moe_core.kernels.quantize import quantize_activation

    g = torch.Generator().manual_seed(rows + K)
    a = (torch.randn(rows, K, generator=g) * 3).to(torch.float16)
    a[rows // 2] = 0.0
    a = a.to(device)
    q, s = quantize_activation(a, qdtype=qdtype, per_channel=per_channel, group_k=group_k)
    rq, rs = torch_quantize(a, _spec(qdtype, per_channel, group_k), None, fp8_dtype=qdtype)
    assert torch.equal(s, rs), "scales differ"
    assert torch.equal(_bits(q), _bits(rq)), "quantized values differ from moe_core.quant"


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("group_k,K", [(64, 192), (2500, 5000)])     # one-pass and two-pass groups
def test_quantize_groups_step_over_row_blocks(device: str, group_k: int, K: int,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """With more row blocks than the grid's axis 1 holds, each program steps over the row blocks
    by the grid's height: shrinking that bound to 3 still quantizes every row of 5-7 row blocks,
    bitwise :mod:`moe_core.quant`."""
    from moe_core.kernels import quantize

    monkeypatch.setattr(quantize, "_MAX_GRID_Y", 3)
    g = torch.Generator().manual_seed(K)
    rows = 300 if group_k == 64 else 13          # row blocks of 64 (5 of them) / of 2 (7)
    a = (torch.randn(rows, K, generator=g) * 3).to(torch.float16).to(device)
    q, s = quantize.quantize_activation(a, qdtype=torch.float8_e4m3fn, group_k=group_k)
    rq, rs = torch_quantize(a, _spec(torch.float8_e4m3fn, False, group_k), None, fp8_dtype=torch.float8_e4m3fn)
    assert torch.equal(s, rs), "scales differ"
    assert torch.equal(_bits(q), _bits(rq)), "quantized values differ from moe_core.quant"


def test_quantize_fnuz_and_empty() -> None:
    from moe_core.kernels.quantize import quantize_activation

    a = torch.randn(5, 40, dtype=torch.float16)
    q, s = quantize_activation(a, qdtype=torch.float8_e4m3fnuz, per_channel=True)
    rq, rs = torch_quantize(a, _spec(torch.float8_e4m3fn, True, None), None, fp8_dtype=torch.float8_e4m3fnuz)
    assert torch.equal(s, rs) and torch.equal(_bits(q), _bits(rq))
    q0, s0 = quantize_activation(a[:0], qdtype=torch.int8)
    rq0, rs0 = torch_quantize(a[:0], _spec(torch.int8, False, None), None)
    assert q0.shape == (0, 40) and torch.equal(s0, rs0)


def test_quantize_rejects_bad_arguments() -> None:
    from moe_core.kernels.quantize import quantize_activation

    with pytest.raises(MoETypeError, match="qdtype"):
        quantize_activation(torch.zeros(2, 4), qdtype=torch.float16)
    with pytest.raises(MoEInputError, match="static_scale"):
        quantize_activation(torch.zeros(2, 4), qdtype=torch.int8, static_scale=torch.ones(2))
    with pytest.raises(MoEInputError, match="group_k"):
        quantize_activation(torch.zeros(2, 4), qdtype=torch.int8, group_k=0)
