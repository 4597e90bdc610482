"""Tier G: every bad input of TESTING.md §9 raises the named error before any launch.

A spy replaces every step of the torch backend; a test fails if any step ran. Errors are
MoEInputError (a ValueError) or MoETypeError (a TypeError), and the message names the argument.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

import moe_core
from moe_core import ExpertWeights, MoELayer, MoERunner, QuantSpec
from moe_core.errors import ConfigError, MoEInputError, MoETypeError
from moe_core.reference import TorchBackend
from moe_core.testing import assert_close_normalized, oracle_moe, tolerance_for
from moe_core.testing.quantize_weights import quantize_layer
from moe_core.testing.strategies import single_torch_thread  # noqa: F401  (autouse)

M, H, I, E, K = 5, 32, 16, 4, 2
STEPS = ("align", "quantize_activation", "gemm", "activation", "combine")


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every step of the torch backend records its name here instead of running."""
    calls: list[str] = []
    for step in STEPS:
        def spy(*a, _step=step, **k):
            calls.append(_step)
            raise AssertionError(f"step {_step} launched although the input is invalid")
        monkeypatch.setattr(TorchBackend, step, spy)
    return calls


def _inputs(dtype=torch.float32, **layer_kw):
    g = torch.Generator().manual_seed(0)
    layer = MoELayer(num_local_experts=E, top_k=K, hidden_size=H, intermediate_size=I, **layer_kw)
    x = torch.randn(M, H, generator=g).to(dtype) / 10
    w1 = torch.randn(E, layer.gate_up_rows, H, generator=g).to(dtype) / 10
    w2 = torch.randn(E, H, I, generator=g).to(dtype) / 10
    tw = torch.full((M, K), 0.5)
    ids = (torch.arange(M * K, dtype=torch.int32) % E).view(M, K)
    return layer, x, w1, w2, tw, ids


def _call(layer, x, w1, w2, tw, ids, **kw):
    return moe_core.fused_experts(x, w1, w2, tw, ids, layer=layer, backend="torch", **kw)


def _expect(err: type, match: str, fn: Callable[[], object], launches: list[str]) -> None:
    with pytest.raises(err, match=match):
        fn()
    assert launches == [], f"launched {launches} before raising"


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device="meta")


# -- x ----------------------------------------------------------------------------------------
def test_x_not_2d(launches) -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    _expect(MoEInputError, r"^x: expected a 2-D", lambda: _call(layer, x.unsqueeze(0), w1, w2, tw, ids), launches)


def test_x_hidden_size(launches) -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    _expect(MoEInputError, r"^x: expected hidden size H = .*32, got 31",
            lambda: _call(layer, x[:, :31], w1, w2, tw, ids), launches)


def test_x_dtype_unsupported(launches) -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    _expect(MoETypeError, r"^x: .*float64", lambda: _call(layer, x.double(), w1.double(), w2.double(), tw, ids),
            launches)


def test_x_last_dim_strided(launches) -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    wide = torch.randn(M, 2 * H)
    _expect(MoEInputError, r"^x: the last dim must be contiguous", lambda: _call(layer, wide[:, ::2], w1, w2, tw, ids),
            launches)


def test_x_requires_grad_inplace(launches) -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    _expect(MoEInputError, r"^x: inplace=True", lambda: _call(layer, x.requires_grad_(), w1, w2, tw, ids, inplace=True),
            launches)


# -- weights ----------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["w1", "w2"])
def test_weights_not_3d(which: str, launches) -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    w1, w2 = (w1[0], w2) if which == "w1" else (w1, w2[0])
    _expect(MoEInputError, rf"^{which}: expected a 3-D", lambda: _call(layer, x, w1, w2, tw, ids), launches)


def test_expert_count_differs(launches) -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    _expect(MoEInputError, r"^w2: expected E = w1.shape\[0\] = 4 experts, got 3",
            lambda: _call(layer, x, w1, w2[:3], tw, ids), launches)
    _expect(MoEInputError, r"^w1: expected E = layer.num_local_experts = 4, got 3",
            lambda: _call(layer, x, w1[:3], w2[:3], tw, ids), launches)


def test_gated_rows_not_2i(launches) -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    _expect(MoEInputError, r"^w1: expected 32 rows \(2·I", lambda: _call(layer, x, w1[:, :31], w2, tw, ids), launches)
    # inferred layer: neither I nor 2·I rows
    _expect(MoEInputError, r"^w1: cannot infer the layer",
            lambda: moe_core.fused_experts(x, w1[:, :31], w2, tw, ids, backend="torch"), launches)


def test_w2_hidden_differs(launches) -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    _expect(MoEInputError, r"^w2: expected shape \[4, 32, 16\]",
            lambda: _call(layer, x, w1, torch.randn(E, H + 1, I), tw, ids), launches)


def test_weight_dtype_not_the_schemes(launches) -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    _expect(MoETypeError, r"^w1: scheme 'none' with x of torch.float32 needs weights of torch.float32, got torch.float16",
            lambda: _call(layer, x, w1.half(), w2, tw, ids), launches)
    w1q, w2q, quant = quantize_layer(w1, w2, "int8_w8a8")
    _expect(MoETypeError, r"^w1: scheme 'fp8_w8a8'",
            lambda: _call(layer, x, w1q, w2q, tw, ids, quant=QuantSpec.fp8_w8a8(quant.w1_scale, quant.w2_scale)),
            launches)


def test_weight_device_differs(launches) -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    _expect(MoEInputError, r"^w2: expected device cpu \(the device of x\), got meta",
            lambda: _call(layer, x, w1, _meta_like(w2), tw, ids), launches)


def test_bias_checks(launches) -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    _expect(MoEInputError, r"^b1: expected shape \[E, 32\]",
            lambda: _call(layer, x, w1, w2, tw, ids, b1=torch.zeros(E, 31)), launches)
    _expect(MoETypeError, r"^b2: expected the compute dtype",
            lambda: _call(layer, x, w1, w2, tw, ids, b2=torch.zeros(E, H, dtype=torch.float16)), launches)
    w1q, w2q, quant = quantize_layer(w1, w2, "int4_w4a16", group_size=16)
    _expect(MoEInputError, r"^b1: biases are not supported with grouped int4_w4a16",
            lambda: _call(layer, x, w1q, w2q, tw, ids, quant=quant, b1=torch.zeros(E, 2 * I)), launches)


# -- topk_ids / topk_weights ------------------------------------------------------------------
def test_topk_shapes(launches) -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    _expect(MoEInputError, r"^topk_ids: expected shape \[M, k\] with M = 5",
            lambda: _call(layer, x, w1, w2, tw[:4], ids[:4]), launches)
    _expect(MoEInputError, r"^topk_weights: expected the shape of topk_ids",
            lambda: _call(layer, x, w1, w2, tw[:, :1], ids), launches)
    _expect(MoEInputError, r"^topk_ids: expected k = layer.top_k = 2 columns, got 1",
            lambda: _call(layer, x, w1, w2, tw[:, :1], ids[:, :1]), launches)


def test_k_out_of_range(launches) -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    with pytest.raises(MoEInputError, match=r"^top_k: expected <= num_experts=4, got 5"):
        MoELayer(num_local_experts=E, top_k=5, hidden_size=H, intermediate_size=I)
    wide = torch.zeros(M, 5, dtype=torch.int32)
    _expect(MoEInputError, r"^topk_ids: expected 1 <= k <= E = 4 columns, got 5",
            lambda: moe_core.fused_experts(x, w1, w2, torch.ones(M, 5), wide, backend="torch"), launches)
    _expect(MoEInputError, r"^topk_ids: expected 1 <= k <= E = 4 columns, got 0",
            lambda: moe_core.fused_experts(x, w1, w2, torch.ones(M, 0), wide[:, :0], backend="torch"), launches)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int16, torch.uint8, torch.bool])
def test_ids_not_int32_or_int64(dtype: torch.dtype, launches) -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    _expect(MoETypeError, r"^topk_ids: expected an int32 \(or int64\) tensor", lambda: _call(layer, x, w1, w2, tw, ids.to(dtype)),
            launches)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float16, torch.bfloat16, torch.float64])
def test_weights_not_fp32(dtype: torch.dtype, launches) -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    _expect(MoETypeError, r"^topk_weights: expected float32", lambda: _call(layer, x, w1, w2, tw.to(dtype), ids),
            launches)


def test_weights_strided(launches) -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    _expect(MoEInputError, r"^topk_weights: expected stride\(1\) == 1",
            lambda: _call(layer, x, w1, w2, torch.ones(M, 2 * K)[:, ::2], ids), launches)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_weights_rejected_on_cpu(bad: float, launches) -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    tw[2, 1] = bad
    _expect(MoEInputError, r"^topk_weights: NaN or infinite", lambda: _call(layer, x, w1, w2, tw, ids), launches)


def test_nan_weight_of_a_minus_one_slot_is_accepted() -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    tw[2, 1], ids[2, 1] = float("nan"), -1
    out = _call(layer, x, w1, w2, tw, ids)
    assert torch.isfinite(out).all()
    assert_close_normalized(out, oracle_moe(x, w1, w2, tw, ids), *tolerance_for(torch.float32))


@pytest.mark.parametrize("bad", [-2, E, 2071690107, -99999])
def test_id_values_out_of_range(bad: int, launches) -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    ids[3, 0] = bad
    _expect(MoEInputError, rf"^topk_ids: values must lie in \[-1, 4\) .*got {bad} at row 3, column 0",
            lambda: _call(layer, x, w1, w2, tw, ids), launches)
    _expect(MoEInputError, r"^topk_ids: values must lie",
            lambda: MoERunner(layer, backend="torch").run(x, ExpertWeights(w1, w2), tw, ids), launches)


def test_id_values_past_n_valid_are_not_checked(launches) -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    ids[3:] = 2071690107
    tw[3:] = float("nan")
    runner = MoERunner(layer, backend="torch")
    _expect(MoEInputError, r"^topk_ids: values must lie", lambda: runner.run(x, ExpertWeights(w1, w2), tw, ids, n_valid=4),
            launches)
    _expect(MoEInputError, r"^n_valid: expected 0 <= n_valid <= M = 5, got 6",
            lambda: runner.run(x, ExpertWeights(w1, w2), tw, ids, n_valid=6), launches)
    _expect(MoETypeError, r"^n_valid: expected an int", lambda: runner.run(x, ExpertWeights(w1, w2), tw, ids, n_valid=2.5),
            launches)


def test_int64_ids_beyond_int32_are_rejected_not_wrapped(launches) -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    ids64 = ids.long()
    ids64[1, 1] = 2**32 + 1                                  # would wrap to 1 if truncated
    _expect(MoEInputError, r"^topk_ids: values must lie .*got 4294967297", lambda: _call(layer, x, w1, w2, tw, ids64),
            launches)


def test_int64_ids_are_converted_not_reinterpreted(monkeypatch: pytest.MonkeyPatch) -> None:
    """int32 buffers come pre-filled with -999999 (TESTING §8): a conversion that leaves any
    element unwritten, or reinterprets int64 memory, changes the result."""
    layer, x, w1, w2, tw, ids = _inputs()
    ids[1, 0] = -1
    want = _call(layer, x, w1, w2, tw, ids)
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.int32:
            t.fill_(-999999)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    ids64 = ids.long()
    before = ids64.clone()
    got = _call(layer, x, w1, w2, tw, ids64)
    assert torch.equal(got, want)
    assert torch.equal(ids64, before) and ids64.dtype == torch.int64          # caller's tensor untouched
    got = MoERunner(layer, backend="torch").run(x, ExpertWeights(w1, w2), tw, ids64)
    assert torch.equal(got, want)


def test_ids_and_weights_device(launches) -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    _expect(MoEInputError, r"^topk_ids: expected device cpu", lambda: _call(layer, x, w1, w2, tw, _meta_like(ids)),
            launches)
    _expect(MoEInputError, r"^topk_weights: expected device cpu", lambda: _call(layer, x, w1, w2, _meta_like(tw), ids),
            launches)


# -- expert_map -------------------------------------------------------------------------------
@pytest.mark.parametrize("table,err,match", [
    (torch.tensor([0, 1, 2, 3, -1, -1, -1], dtype=torch.int32), MoEInputError, r"^expert_map: expected a 1-D table of length num_experts = 8"),
    (torch.tensor([[0, 1, 2, 3, -1, -1, -1, -1]], dtype=torch.int32), MoEInputError, r"^expert_map: expected a 1-D"),
    (torch.tensor([0, 1, 2, 3, -1, -1, -1, -1]), MoETypeError, r"^expert_map: expected dtype torch.int32"),
    (torch.tensor([0, 1, 2, 4, -1, -1, -1, -1], dtype=torch.int32), MoEInputError, r"^expert_map: values must lie in \[-1, 4\)"),
    (torch.tensor([0, 1, 2, 3, -2, -1, -1, -1], dtype=torch.int32), MoEInputError, r"^expert_map: values must lie"),
    (torch.tensor([0, 1, 2, 2, -1, -1, -1, -1], dtype=torch.int32), MoEInputError, r"^expert_map: two global ids map to the same"),
])
def test_expert_map(table: torch.Tensor, err: type, match: str, launches) -> None:
    layer, x, w1, w2, tw, ids = _inputs(num_experts=8, expert_map=table)
    _expect(err, match, lambda: MoERunner(layer, backend="torch").run(x, ExpertWeights(w1, w2), tw, ids), launches)


# -- scales -----------------------------------------------------------------------------------
def _q(scheme: str, **kw):
    layer, x, w1, w2, tw, ids = _inputs()
    w1q, w2q, quant = quantize_layer(w1, w2, scheme, **kw)
    return layer, x, w1q, w2q, tw, ids, quant


def test_scale_layouts(launches) -> None:
    layer, x, w1q, w2q, tw, ids, q = _q("fp8_w8a8")
    cases = [
        # per-tensor given a per-channel layout, and the [1, E] transpose of [E]
        (QuantSpec.fp8_w8a8(torch.ones(E, 2 * I), q.w2_scale), r"^w1_scale: per-tensor scales must be \[E\] = \[4\]"),
        (QuantSpec.fp8_w8a8(q.w1_scale.view(1, E), q.w2_scale), r"^w1_scale: per-tensor scales must be \[E\]"),
        # per-channel given [E] or [N_out]
        (QuantSpec.fp8_w8a8(q.w1_scale, q.w2_scale, per_channel=True), r"^w1_scale: per-channel scales must be \[E, N_out\]"),
        (QuantSpec.fp8_w8a8(torch.ones(E, 2 * I), torch.ones(E, I), per_channel=True),
         r"^w2_scale: per-channel scales must be \[E, N_out\] = \[4, 32\]"),
        # block scales of the wrong tile count
        (QuantSpec.fp8_w8a8(torch.ones(E, 2, 2), torch.ones(E, 1, 2), block_shape=(16, 16)),
         r"^w2_scale: block \[16, 16\] scales must be \[E, ⌈N_out/bn⌉, ⌈K/bk⌉\] = \[4, 2, 1\], got \[4, 1, 2\]"),
        # static per-token scale of the wrong row count
        (QuantSpec.fp8_w8a8(q.w1_scale, q.w2_scale, a1_scale=torch.ones(M + 1, 1)),
         r"^a1_scale: expected numel 1 or \[rows, 1\] = \[5, 1\]"),
    ]
    for quant, match in cases:
        _expect(MoEInputError, match, lambda: _call(layer, x, w1q, w2q, tw, ids, quant=quant), launches)


def test_per_channel_scale_with_trailing_one_is_accepted() -> None:
    layer, x, w1q, w2q, tw, ids, q = _q("int8_w8a8", per_channel=True)
    quant = QuantSpec.int8_w8a8(q.w1_scale.unsqueeze(-1), q.w2_scale.unsqueeze(-1), per_channel=True)
    a = _call(layer, x, w1q, w2q, tw, ids, quant=quant)
    b = _call(layer, x, w1q, w2q, tw, ids, quant=q)
    assert torch.equal(a, b)


def test_scale_constructor_checks() -> None:
    ones = torch.ones(E)
    with pytest.raises(MoEInputError, match=r"^a1_scale: a 1-D activation scale must have numel 1"):
        QuantSpec.fp8_w8a8(ones, ones, a1_scale=torch.ones(M))
    with pytest.raises(MoETypeError, match=r"^w1_scale: expected dtype torch.float32, got torch.float16"):
        QuantSpec.fp8_w8a8(ones.half(), ones)
    with pytest.raises(MoEInputError, match=r"^w2_scale: this scheme needs a scale tensor"):
        QuantSpec.int8_w8a8(ones, None)
    with pytest.raises(MoEInputError, match=r"per_channel=True and block_shape are two schemes"):
        QuantSpec.fp8_w8a8(ones, ones, per_channel=True, block_shape=(16, 16))


def test_scale_without_scheme_and_scheme_without_scale(launches) -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    _expect(MoEInputError, r"^w1_scale: a scale was given but the quantization scheme is 'none'",
            lambda: _call(layer, x, w1, w2, tw, ids, quant=QuantSpec(w1_scale=torch.ones(E))), launches)
    _expect(MoEInputError, r"^quant: per_channel / block_shape / group_size given but the quantization scheme is 'none'",
            lambda: _call(layer, x, w1, w2, tw, ids, quant=QuantSpec(per_channel=True)), launches)
    layer, x, w1q, w2q, tw, ids, q = _q("fp8_w8a8")
    _expect(MoEInputError, r"^w1_scale: scheme 'fp8_w8a8' needs a weight scale tensor, got None",
            lambda: _call(layer, x, w1q, w2q, tw, ids, quant=QuantSpec(scheme="fp8_w8a8", w2_scale=q.w2_scale)),
            launches)
    _expect(MoEInputError, r"^quant: per_channel=True and block_shape are two schemes",
            lambda: _call(layer, x, w1q, w2q, tw, ids, quant=QuantSpec(scheme="fp8_w8a8", w1_scale=q.w1_scale,
                                                                       w2_scale=q.w2_scale, per_channel=True,
                                                                       block_shape=(16, 16))), launches)
    _expect(MoEInputError, r"^a1_scale: block-wise quantization computes activation scales per token group",
            lambda: _call(layer, x, w1q, w2q, tw, ids, quant=QuantSpec(scheme="fp8_w8a8", w1_scale=torch.ones(E, 2, 2),
                                                                       w2_scale=torch.ones(E, 2, 1),
                                                                       block_shape=(16, 16),
                                                                       a1_scale=torch.ones(1))), launches)
    _expect(MoETypeError, r"^w2_scale: expected dtype torch.float32, got torch.float64",
            lambda: _call(layer, x, w1q, w2q, tw, ids, quant=QuantSpec(scheme="fp8_w8a8", w1_scale=q.w1_scale,
                                                                       w2_scale=q.w2_scale.double())), launches)


def test_scale_device(launches) -> None:
    layer, x, w1q, w2q, tw, ids, q = _q("int8_w8a8")
    quant = QuantSpec.int8_w8a8(q.w1_scale, _meta_like(q.w2_scale))
    _expect(MoEInputError, r"^w2_scale: expected device cpu", lambda: _call(layer, x, w1q, w2q, tw, ids, quant=quant),
            launches)


# -- packed weights ---------------------------------------------------------------------------
def test_packed_weights(launches) -> None:
    layer, x, w1q, w2q, tw, ids, q = _q("int4_w4a16", group_size=8, zero_point=True)
    unpacked = torch.zeros(E, 2 * I, H, dtype=torch.uint8)
    _expect(MoEInputError, r"^w1: expected last dim 16 \(H = 32, packed two per byte\)",
            lambda: _call(layer, x, unpacked, w2q, tw, ids, quant=q), launches)
    bad_group = QuantSpec.int4_w4a16(torch.ones(E, 2 * I, 3), torch.ones(E, H, 2), group_size=12)
    _expect(MoEInputError, r"^group_size: K = 32 of gemm1 is not a multiple of group_size 12",
            lambda: _call(layer, x, w1q, w2q, tw, ids, quant=bad_group), launches)
    bad_zp = QuantSpec.int4_w4a16(q.w1_scale, q.w2_scale, group_size=8, w1_zp=torch.zeros(E, 2 * I, 4, dtype=torch.uint8),
                                  w2_zp=q.w2_zp)
    _expect(MoEInputError, r"^w1_zp: zero points must be \[4, 16, 4\]",
            lambda: _call(layer, x, w1q, w2q, tw, ids, quant=bad_zp), launches)
    layer, x, w1q, w2q, tw, ids, q = _q("int8_w8a16", group_size=8, zero_point=True)
    bad_scale = QuantSpec.int8_w8a16(q.w1_scale[:, :, :2], q.w2_scale, group_size=8, w1_zp=q.w1_zp, w2_zp=q.w2_zp)
    _expect(MoEInputError, r"^w1_scale: group scales must be \[E, N_out, K/g\] = \[4, 32, 4\]",
            lambda: _call(layer, x, w1q, w2q, tw, ids, quant=bad_scale), launches)


# -- activation, config, flags, out= ------------------------------------------------------------
def test_unknown_activation_lists_known() -> None:
    with pytest.raises(MoEInputError, match=r"^activation: expected one of \['gelu', 'relu2', 'silu', 'swiglu_oai'\]"):
        MoELayer(num_local_experts=E, top_k=K, hidden_size=H, intermediate_size=I, activation="swish")


@pytest.mark.parametrize("bad", [24, 8, 0])
def test_block_size_not_power_of_two(bad: int) -> None:
    cfg = {"BLOCK_SIZE_M": bad, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1}
    with pytest.raises(ConfigError, match="BLOCK_SIZE_M"):
        with moe_core.override_config(cfg):
            pass


def test_flags(launches) -> None:
    with pytest.raises(MoEInputError, match=r"^apply_router_weight_on_input needs top_k == 1"):
        MoELayer(num_local_experts=E, top_k=2, hidden_size=H, intermediate_size=I, apply_router_weight_on_input=True)
    layer, x, w1, w2, tw, ids = _inputs()
    _expect(MoEInputError, r"^inplace=True and no_combine=True",
            lambda: _call(layer, x, w1, w2, tw, ids, inplace=True, no_combine=True), launches)


def test_out_checks(launches) -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    _expect(MoEInputError, r"^out: expected \[5, 32\] torch.float32 on cpu, got \[5, 31\]",
            lambda: _call(layer, x, w1, w2, tw, ids, out=torch.empty(M, H - 1)), launches)
    _expect(MoEInputError, r"^out: expected .*got \[5, 32\] torch.float16",
            lambda: _call(layer, x, w1, w2, tw, ids, out=torch.empty(M, H, dtype=torch.float16)), launches)
    _expect(MoEInputError, r"^out: shares memory with x; .*inplace=True",
            lambda: _call(layer, x, w1, w2, tw, ids, out=x), launches)
    _expect(MoEInputError, r"^out: no_combine returns",
            lambda: _call(layer, x, w1, w2, tw, ids, out=torch.empty(M, H), no_combine=True), launches)
    # out overlapping the weights' memory
    _expect(MoEInputError, r"^out: shares memory with w1",
            lambda: _call(layer, x, w1, w2, tw, ids, out=w1[0, :M]), launches)


def test_out_next_to_x_in_one_buffer_is_not_aliasing() -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    buf = torch.zeros(2 * M, H)
    buf[:M] = x
    got = moe_core.fused_experts(buf[:M], w1, w2, tw, ids, layer=layer, backend="torch", out=buf[M:])
    assert got.data_ptr() == buf[M:].data_ptr()


def test_spy_sees_a_valid_launch(launches) -> None:
    """The spy is live: a valid call reaches the backend's first step."""
    from moe_core.errors import BackendExecutionError

    layer, x, w1, w2, tw, ids = _inputs()
    with pytest.raises(BackendExecutionError, match="launched although"):
        _call(layer, x, w1, w2, tw, ids)
    assert launches == ["align"]


@pytest.mark.parametrize("up,down,match", [
    ({"BLOCK_SIZE_M": 24}, {}, r"^gemm1 config: BLOCK_SIZE_M must be a power of two >= 16, got 24"),
    ({}, {"BLOCK_SIZE_K": 8}, r"^gemm2 config: BLOCK_SIZE_K must be a power of two >= 16, got 8"),
    ({}, {"BLOCK_SIZE_M": 32}, r"^gemm2 config: BLOCK_SIZE_M = 32 differs from gemm1's 16"),
])
def test_resolved_configs_checked_before_launch(up: dict, down: dict, match: str, monkeypatch: pytest.MonkeyPatch,
                                                launches) -> None:
    from moe_core import config as config_mod

    base = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1}
    real = config_mod.resolve_configs

    def fake(*a, **k):
        r = real(*a, **k)
        return type(r)(config={**base, **up}, down_config={**base, **down}, why=r.why)

    monkeypatch.setattr(config_mod, "resolve_configs", fake)
    layer, x, w1, w2, tw, ids = _inputs()
    _expect(ConfigError, match, lambda: _call(layer, x, w1, w2, tw, ids), launches)


def test_hooks_on_a_backend_that_takes_none(launches) -> None:
    class NoHooks(TorchBackend):
        name = "torch-no-hooks"
        accepts_hooks = False

    class Recorder:
        @moe_core.hookimpl
        def moe_core_after_down(self, act, down, topk_weights, topk_ids, layer):
            raise AssertionError("hook ran")

    layer, x, w1, w2, tw, ids = _inputs()
    runner = MoERunner(layer, backend=NoHooks())
    runner.register(Recorder())
    _expect(MoEInputError, r"^hooks: backend 'torch-no-hooks' takes no hooks",
            lambda: runner.run(x, ExpertWeights(w1, w2), tw, ids), launches)


def test_non_tensor_inputs(launches) -> None:
    layer, x, w1, w2, tw, ids = _inputs()
    _expect(MoETypeError, r"^x: expected a torch.Tensor, got list", lambda: _call(layer, x.tolist(), w1, w2, tw, ids),
            launches)
    _expect(MoETypeError, r"^topk_ids: expected a torch.Tensor, got list",
            lambda: _call(layer, x, w1, w2, tw, ids.tolist()), launches)
    _expect(MoETypeError, r"^topk_weights: expected a torch.Tensor, got list",
            lambda: _call(layer, x, w1, w2, tw.tolist(), ids), launches)
    _expect(MoETypeError, r"^w1: expected a torch.Tensor, got list",
            lambda: _call(layer, x, w1.tolist(), w2, tw, ids), launches)
