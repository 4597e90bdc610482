"""moe_core.quant (the rounding the kernels must match) against hand values and the oracle;
the weight quantizers of moe_core.testing.quantize_weights against their layouts."""

from __future__ import annotations

import pytest
import torch

from moe_core import QuantSpec
from moe_core.quant import EPS, dequantize_activation, dequantize_weight, qmax_of, quantize_activation, unpack_int4
from moe_core.testing.oracle import oracle_dequantize_weight, oracle_quantize_activation
from moe_core.testing.quantize_weights import pack_int4_k, pack_int4_n, quantize_layer
from moe_core.testing.strategies import single_torch_thread  # noqa: F401  (autouse)

FP8 = torch.float8_e4m3fn


def _spec(scheme: str, *, per_channel: bool = False, block_shape=None) -> QuantSpec:
    one = torch.ones(1)
    ctor = QuantSpec.fp8_w8a8 if scheme == "fp8_w8a8" else QuantSpec.int8_w8a8
    return ctor(one, one, per_channel=per_channel, block_shape=block_shape)


def test_constants() -> None:
    assert EPS == 1e-10
    assert qmax_of(torch.int8) == 127.0
    assert qmax_of(torch.float8_e4m3fn) == 448.0
    assert qmax_of(torch.float8_e4m3fnuz) == 240.0


def test_int8_round_half_to_even_and_clamp() -> None:
    a = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, 126.5, 127.0]])
    q, s = quantize_activation(a, _spec("int8_w8a8"), None)
    assert q.dtype == torch.int8 and s.shape == (1,) and s.item() == pytest.approx(1.0)
    assert q.tolist() == [[0, 2, 2, 0, -2, 126, 127]]
    q, s = quantize_activation(a * 4, _spec("int8_w8a8"), torch.tensor([1.0]))     # static: clamp
    assert q.tolist() == [[2, 6, 10, -2, -6, 127, 127]] and s.tolist() == [1.0]
    q, _ = quantize_activation(-a * 4, _spec("int8_w8a8"), torch.tensor([1.0]))
    assert q[0, -1].item() == -128                                                  # static lower clamp


def test_fp8_cast_is_round_to_nearest_even() -> None:
    # 448 = qmax → scale 1. Between 1 and 2 fp8 e4m3 steps by 1/8: 1.0625 is a tie -> 1.0;
    # 1.1875 is a tie between 1.125 and 1.25 -> 1.25 (even mantissa)
    a = torch.tensor([[1.0625, 1.1875, 1.07, 448.0]])
    q, s = quantize_activation(a, _spec("fp8_w8a8"), None)
    assert q.dtype == FP8 and s.item() == 1.0
    assert q.float().tolist() == [[1.0, 1.25, 1.125, 448.0]]
    q, _ = quantize_activation(a * 10, _spec("fp8_w8a8"), torch.tensor([1.0]))     # static: saturate
    assert q.float()[0, -1].item() == 448.0 and torch.isfinite(q.float()).all()


def test_all_zero_rows_get_eps_scale() -> None:
    a = torch.zeros(3, 5)
    a[1] = 0.25
    q, s = quantize_activation(a, _spec("int8_w8a8", per_channel=True), None)
    assert s.shape == (3, 1)
    assert s[0].item() == pytest.approx(EPS / 127) and s[1].item() == pytest.approx(0.25 / 127)
    assert q[0].eq(0).all() and q[1].eq(127).all()
    q, s = quantize_activation(a, _spec("fp8_w8a8", block_shape=(16, 2)), None)
    assert s.shape == (3, 3)                                # ⌈5/2⌉ groups, last one partial
    assert torch.isfinite(s).all() and (s > 0).all()


@pytest.mark.parametrize("scheme", ["fp8_w8a8", "int8_w8a8"])
@pytest.mark.parametrize("mode", ["tensor", "token", "block", "static", "static_token"])
def test_activation_quant_matches_oracle(scheme: str, mode: str) -> None:
    g = torch.Generator().manual_seed(3)
    a = (torch.randn(7, 37, generator=g) * torch.logspace(-2, 1, 7).unsqueeze(1)).to(torch.bfloat16)
    qmax = qmax_of(FP8 if scheme == "fp8_w8a8" else torch.int8)
    static = None
    if mode == "static":
        static = torch.tensor([0.5 * a.float().abs().max().item() / qmax])        # half the range: clamps
    elif mode == "static_token":
        static = (a.float().abs().amax(dim=1, keepdim=True) / qmax).contiguous()
    spec = _spec(scheme, per_channel=mode in ("token", "static_token"),
                 block_shape=(16, 8) if mode == "block" else None)
    q, s = quantize_activation(a, spec, static)
    want = oracle_quantize_activation(a, scheme, static_scale=static, per_channel=spec.per_channel,
                                      block_k=8 if mode == "block" else None)
    got = dequantize_activation(q, s, spec)
    assert got.dtype == torch.float32
    # q·s in fp32 is the correctly rounded float64 product
    assert torch.equal(got, want.float()), (got - want.float()).abs().max()
    assert not torch.equal(got, a.float())                    # quantization did something


def test_quantize_activation_returns_new_buffer() -> None:
    a = torch.randn(4, 8)
    before = a.clone()
    q, _ = quantize_activation(a, _spec("int8_w8a8"), None)
    assert q.data_ptr() != a.data_ptr() and torch.equal(a, before)


def test_unpack_int4_low_nibble_first() -> None:
    packed = torch.tensor([[0x21, 0xF0, 0x7A]], dtype=torch.uint8)
    assert unpack_int4(packed).tolist() == [[1, 2, 0, 15, 10, 7]]
    q = torch.randint(0, 16, (3, 4, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_int4(pack_int4_k(q)), q.to(torch.int32))
    assert torch.equal(unpack_int4(pack_int4_n(q).transpose(1, 2)).transpose(1, 2), q.to(torch.int32))


WEIGHT_CASES = [
    ("fp8_w8a8", {}),
    ("fp8_w8a8", {"per_channel": True}),
    ("fp8_w8a8", {"block_shape": (128, 128)}),
    ("fp8_w8a8", {"block_shape": (16, 16)}),
    ("int8_w8a8", {}),
    ("int8_w8a8", {"per_channel": True}),
    ("int8_w8a8", {"block_shape": (16, 16)}),
    ("int8_w8a16", {}),
    ("int8_w8a16", {"group_size": 16}),
    ("int8_w8a16", {"group_size": 16, "zero_point": True}),
    ("int4_w4a16", {"group_size": 16}),
    ("int4_w4a16", {"group_size": 8, "zero_point": True}),
]


@pytest.mark.parametrize("scheme,kw", WEIGHT_CASES, ids=[f"{s}-{'-'.join(map(str, k.values()))}" for s, k in WEIGHT_CASES])
def test_dequantize_weight_matches_oracle_exactly(scheme: str, kw: dict) -> None:
    g = torch.Generator().manual_seed(5)
    w1 = torch.randn(3, 96, 32, generator=g) / 10
    w2 = torch.randn(3, 32, 48, generator=g) / 10
    w1q, w2q, spec = quantize_layer(w1, w2, scheme, **kw)
    for w, wq, which in ((w1, w1q, 1), (w2, w2q, 2)):
        scale, zp = getattr(spec, f"w{which}_scale"), getattr(spec, f"w{which}_zp")
        for e in range(3):
            got = dequantize_weight(wq, e, spec, scale, zp)
            want = oracle_dequantize_weight(wq, e, scheme, scale, zp, block_shape=spec.block_shape,
                                            group_size=spec.group_size)
            assert got.shape == w[e].shape
            assert torch.equal(got, want.float()), (scheme, kw, e, (got - want.float()).abs().max())
            # the quantizer is sane: the dequantized weight is close to the float one
            rel = ((want - w[e].double()).abs().max() / w[e].abs().max()).item()
            assert rel < (0.15 if scheme in ("int4_w4a16", "fp8_w8a8") else 0.02), rel


def test_weight_layouts() -> None:
    w1, w2 = torch.randn(2, 64, 32), torch.randn(2, 32, 32)
    _, _, s = quantize_layer(w1, w2, "fp8_w8a8")
    assert s.w1_scale.shape == (2,)
    _, _, s = quantize_layer(w1, w2, "int8_w8a8", per_channel=True)
    assert s.w1_scale.shape == (2, 64) and s.w2_scale.shape == (2, 32)
    _, _, s = quantize_layer(w1, w2, "fp8_w8a8", block_shape=(16, 24))
    assert s.w1_scale.shape == (2, 4, 2) and s.w2_scale.shape == (2, 2, 2)
    a, b, s = quantize_layer(w1, w2, "int4_w4a16", group_size=8, zero_point=True)
    assert a.shape == (2, 64, 16) and a.dtype == torch.uint8 and b.shape == (2, 32, 16)
    assert s.w1_scale.shape == (2, 64, 4) and s.w1_zp.shape == (2, 32, 4)
    a, _, s = quantize_layer(w1, w2, "int8_w8a16")
    assert a.dtype == torch.int8 and s.w1_zp is None and s.w1_scale.shape == (2, 64)
    a, _, s = quantize_layer(w1, w2, "int8_w8a16", group_size=16, zero_point=True)
    assert a.dtype == torch.uint8 and s.w1_zp.shape == (2, 64, 2)
