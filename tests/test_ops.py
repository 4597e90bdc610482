"""The torch custom ops (tier I ``opcheck``; TESTING §6 on CPU with the torch backend):
schema / fake / AOT dispatch, bit-identity with the runner and the functional path, the
in-place op's mutation contract, ``torch.compile(fullgraph=True)`` with a dynamic M."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import moe_core
from moe_core import ops, sequence
from moe_core.errors import MoEInputError
from moe_core.runner import MoERunner
from moe_core.spec import ExpertWeights, MoELayer, QuantSpec
from moe_core.testing import assert_close_normalized, oracle_moe, tolerance_for

E, H, I, K = 4, 32, 16, 2


def _layer(**kw) -> MoELayer:
    return MoELayer(num_local_experts=E, top_k=K, hidden_size=H, intermediate_size=I, **kw)


def _inputs(M: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, H, generator=g) / 10).to(dtype)
    w1 = (torch.randn(E, 2 * I, H, generator=g) / 10).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / 10).to(dtype)
    tw = torch.rand(M, K, generator=g)
    ti = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(M)]).to(torch.int32) if M else \
        torch.zeros(0, K, dtype=torch.int32)
    return x, w1, w2, tw, ti


@pytest.fixture
def handle():
    h = ops.handle_for_layer(_layer(routed_scaling_factor=1.5), backend="torch")
    yield h
    ops.release(h)


def test_ops_registered_once_with_exact_schemas() -> None:
    schema = torch.ops.moe_core.fused_experts.default._schema
    inplace = torch.ops.moe_core.fused_experts_inplace.default._schema
    assert not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
    written = [a.name for a in inplace.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert written == ["x"], written
    assert len(inplace.returns) == 0
    # a second copy of the module (another import name) reuses the registration
    spec = importlib.util.spec_from_file_location("moe_core_ops_copy", ops.__file__)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert copy._state() is ops._state()


@pytest.mark.parametrize("no_combine", [False, True])
def test_opcheck_out_of_place(handle: int, no_combine: bool) -> None:
    x, w1, w2, tw, ti = _inputs(5)
    torch.library.opcheck(torch.ops.moe_core.fused_experts.default, (x, w1, w2, tw, ti, handle),
                          {"no_combine": no_combine})


def test_opcheck_inplace_and_n_valid(handle: int) -> None:
    x, w1, w2, tw, ti = _inputs(6)
    n_valid = torch.tensor(4)
    torch.library.opcheck(torch.ops.moe_core.fused_experts_inplace.default, (x, w1, w2, tw, ti, handle),
                          {"n_valid": n_valid})


def test_opcheck_quantized_int8_w8a16() -> None:
    x, w1, w2, tw, ti = _inputs(3)
    q1 = torch.randint(-127, 128, (E, 2 * I, H), dtype=torch.int8)
    q2 = torch.randint(-127, 128, (E, H, I), dtype=torch.int8)
    quant = QuantSpec.int8_w8a16(torch.rand(E, 2 * I) / 100, torch.rand(E, H) / 100)
    h = ops.handle_for_layer(_layer(), backend="torch")
    try:
        args = ops.quant_args(quant)
        torch.library.opcheck(torch.ops.moe_core.fused_experts.default, (x, q1, q2, tw, ti, h), args)
        got = ops.fused_experts_op(x, ExpertWeights(q1, q2, quant=quant), tw, ti, handle=h)
        want = moe_core.fused_experts(x, q1, q2, tw, ti, layer=_layer(), quant=quant, backend="torch")
        assert torch.equal(got, want)
    finally:
        ops.release(h)


def test_op_is_bit_identical_to_runner_and_functional(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _layer(routed_scaling_factor=1.5)
    runner = MoERunner(layer, backend="torch")
    h = ops.register_runner(runner)
    assert ops.register_runner(runner) == h
    x, w1, w2, tw, ti = _inputs(9)
    weights = ExpertWeights(w1, w2)
    calls = []
    real_run = sequence.run
    monkeypatch.setattr(sequence, "run", lambda *a, **k: calls.append(1) or real_run(*a, **k))
    got = ops.fused_experts_op(x, weights, tw, ti, handle=h)
    assert calls == [1], "the op must run the one sequence exactly once"
    assert torch.equal(got, runner.run(x, weights, tw, ti))
    assert torch.equal(got, moe_core.fused_experts(x, w1, w2, tw, ti, layer=layer, backend="torch"))
    ref = oracle_moe(x, w1, w2, tw, ti, routed_scaling_factor=1.5)
    assert_close_normalized(got.double(), ref, *tolerance_for(torch.float32))
    ops.release(h)
    with pytest.raises(MoEInputError, match="no runner registered"):
        ops.fused_experts_op(x, weights, tw, ti, handle=h)


def test_inplace_mutates_only_x_and_out_of_place_mutates_nothing(handle: int) -> None:
    x, w1, w2, tw, ti = _inputs(7)
    weights = ExpertWeights(w1, w2)
    before = [t.clone() for t in (x, w1, w2, tw, ti)]
    out = ops.fused_experts_op(x, weights, tw, ti, handle=handle)
    for t, b in zip((x, w1, w2, tw, ti), before):
        assert torch.equal(t, b), "out-of-place op changed an input"
    xi = x.clone()
    assert ops.fused_experts_inplace_op(xi, weights, tw, ti, handle=handle) is None
    assert torch.equal(xi, out)
    for t, b in zip((w1, w2, tw, ti), before[1:]):
        assert torch.equal(t, b)


def test_n_valid_rows_are_padding(handle: int) -> None:
    x, w1, w2, tw, ti = _inputs(6)
    ti[4:] = 2071690107                       # stale ids in padded rows never reach a table
    tw[4:] = float("nan")
    out = ops.fused_experts_op(x, ExpertWeights(w1, w2), tw, ti, handle=handle, n_valid=4)
    want = ops.fused_experts_op(x[:4], ExpertWeights(w1, w2), tw[:4], ti[:4], handle=handle)
    assert torch.equal(out[:4], want)
    assert torch.all(out[4:] == 0)


def test_compile_fullgraph_dynamic_M(handle: int) -> None:
    torch._dynamo.reset()
    _, w1, w2, _, _ = _inputs(1)
    weights = ExpertWeights(w1, w2)

    def forward(x: torch.Tensor, tw: torch.Tensor, ti: torch.Tensor) -> torch.Tensor:
        y = ops.fused_experts_op(x, weights, tw, ti, handle=handle)
        return y + x

    def forward_inplace(x: torch.Tensor, tw: torch.Tensor, ti: torch.Tensor) -> torch.Tensor:
        ops.fused_experts_inplace_op(x, weights, tw, ti, handle=handle)
        return x

    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    compiled_inplace = torch.compile(forward_inplace, fullgraph=True, backend="aot_eager")
    for M in (17, 256, 1):                    # size 1 is never marked dynamic (0/1 specialisation)
        x, _, _, tw, ti = _inputs(M, seed=M)
        if M > 1:
            for t in (x, tw, ti):
                torch._dynamo.mark_dynamic(t, 0)
        assert torch.equal(compiled(x, tw, ti), forward(x, tw, ti))
        xa, xb = x.clone(), x.clone()
        compiled_inplace(xa, tw, ti)
        forward_inplace(xb, tw, ti)
        assert torch.equal(xa, xb), "compiled in-place differs from eager in-place"
        assert not torch.equal(xa, x)
