"""TESTING §6 on the GPU: CUDA-graph capture and replay (padded rows with stale ids,
NaN-filled outputs, fresh inputs in static buffers), no host sync in an eager forward,
``torch.compile(fullgraph=True)`` with a dynamic M, ``opcheck`` with the cuda backend,
and the elementwise kernels captured on their own."""

from __future__ import annotations

import contextlib

import pytest
import torch

from moe_core import ops
from moe_core.spec import ExpertWeights, MoELayer, QuantSpec
from moe_core.testing import assert_close_normalized, oracle_moe, tolerance_for
from tests.graph_replay import replay_fresh

pytestmark = pytest.mark.gpu

E, H, I, K = 8, 256, 128, 2
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STALE = (2071690107, -99999, E)              # leftovers of torch.empty; E is one past the end


@pytest.fixture
def cuda_backend():
    from moe_core import plugins

    try:
        plugins.get_backend("cuda")
    except Exception as exc:  # noqa: BLE001 - the reason is the skip message
        pytest.skip(f"cuda backend unavailable: {exc}")
    return "cuda"


def _layer(**kw) -> MoELayer:
    return MoELayer(num_local_experts=E, top_k=K, hidden_size=H, intermediate_size=I, **kw)


def _weights(dtype: torch.dtype, scheme: str = "none", seed: int = 0) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(E, 2 * I, H, generator=g) / 10
    w2 = torch.randn(E, H, I, generator=g) / 10
    if scheme == "none":
        return ExpertWeights(w1.to(dtype).cuda(), w2.to(dtype).cuda())
    fp8 = torch.float8_e4m3fn
    s1 = w1.abs().amax(dim=(1, 2)) / 448
    s2 = w2.abs().amax(dim=(1, 2)) / 448
    q1 = (w1 / s1[:, None, None]).to(fp8)
    q2 = (w2 / s2[:, None, None]).to(fp8)
    quant = QuantSpec.fp8_w8a8(s1.float().cuda(), s2.float().cuda())
    return ExpertWeights(q1.cuda(), q2.cuda(), quant=quant)


def _inputs(M: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, H, generator=g) / 10).to(dtype)
    tw = torch.rand(M, K, generator=g)
    ti = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(M)]).to(torch.int32)
    return x.cuda(), tw.cuda(), ti.cuda()


def _oracle(x, weights: ExpertWeights, tw, ti, layer: MoELayer) -> torch.Tensor:
    q = weights.quant
    return oracle_moe(x.cpu(), weights.w1.cpu(), weights.w2.cpu(), tw.cpu(), ti.cpu(),
                      quant=None if q.scheme == "none" else _cpu_quant(q),
                      routed_scaling_factor=layer.routed_scaling_factor)


def _cpu_quant(q: QuantSpec) -> QuantSpec:
    return QuantSpec.fp8_w8a8(q.w1_scale.cpu(), q.w2_scale.cpu())


def _check_valid_rows(out: torch.Tensor, x, weights, tw, ti, layer: MoELayer, n: int) -> None:
    if n == 0:
        return
    ref = _oracle(x[:n], weights, tw[:n], ti[:n], layer)
    if weights.quant.scheme == "none":
        assert_close_normalized(out[:n].double().cpu(), ref, *tolerance_for(out.dtype))
    else:
        err = (out[:n].double().cpu() - ref).abs().max() / ref.abs().max()
        assert err < 1e-1, f"fp8 max normalised error {err}"


@contextlib.contextmanager
def _side_stream():
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)


@pytest.mark.parametrize("dtype,scheme,batches", [(torch.bfloat16, "none", BATCHES),
                                                  (torch.float16, "none", (1, 17, 64)),
                                                  (torch.bfloat16, "fp8", (1, 8, 64, 256))])
def test_graph_capture_replay_with_padding(cuda_backend: str, dtype: torch.dtype, scheme: str,
                                           batches: tuple[int, ...]) -> None:
    layer = _layer(routed_scaling_factor=2.0)
    handle = ops.handle_for_layer(layer, backend=cuda_backend)
    weights = _weights(dtype, scheme)
    try:
        for bs in batches:
            x_s = torch.zeros(bs, H, dtype=dtype, device="cuda")
            tw_s = torch.zeros(bs, K, device="cuda")
            ti_s = torch.zeros(bs, K, dtype=torch.int32, device="cuda")
            nv_s = torch.full((), bs, dtype=torch.int64, device="cuda")
            with _side_stream():                               # warm up: compile every kernel
                for _ in range(2):
                    ops.fused_experts_op(x_s, weights, tw_s, ti_s, handle=handle, n_valid=nv_s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out_s = ops.fused_experts_op(x_s, weights, tw_s, ti_s, handle=handle, n_valid=nv_s)
            for rep, n in enumerate(sorted({bs, max(bs - 1, 0), 1, 0}, reverse=True)):
                x, tw, ti = _inputs(bs, dtype, seed=bs * 10 + rep)
                for row in range(n, bs):                       # padded rows: stale ids, junk weights
                    ti[row] = STALE[row % len(STALE)]
                    tw[row] = float("nan")
                nv_s.fill_(n)
                replay_fresh(graph, (x_s, tw_s, ti_s), (x, tw, ti), out_s)
                eager = ops.fused_experts_op(x, weights, tw, ti, handle=handle, n_valid=n)
                torch.cuda.synchronize()
                assert torch.isfinite(out_s).all(), f"bs={bs} n_valid={n}: non-finite rows after replay"
                assert torch.equal(out_s, eager), f"bs={bs} n_valid={n}: replay differs from eager"
                assert torch.all(out_s[n:] == 0), f"bs={bs} n_valid={n}: padded rows not zero"
                _check_valid_rows(out_s, x, weights, tw, ti, layer, n)
            del graph
    finally:
        ops.release(handle)


def test_two_layers_in_one_graph(cuda_backend: str) -> None:
    dtype = torch.bfloat16
    h1 = ops.handle_for_layer(_layer(), backend=cuda_backend)
    h2 = ops.handle_for_layer(_layer(routed_scaling_factor=0.5), backend=cuda_backend)
    w_a, w_b = _weights(dtype, seed=1), _weights(dtype, seed=2)
    x_s, tw_s, ti_s = _inputs(16, dtype, seed=3)

    def two(x):
        y = ops.fused_experts_op(x, w_a, tw_s, ti_s, handle=h1)
        return ops.fused_experts_op(y, w_b, tw_s, ti_s, handle=h2)

    try:
        with _side_stream():
            two(x_s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_s = two(x_s)
        replay_fresh(graph, (x_s, tw_s, ti_s), _inputs(16, dtype, seed=4), out_s)
        assert torch.equal(out_s, two(x_s))
    finally:
        ops.release(h1)
        ops.release(h2)


def test_eager_forward_makes_no_host_sync(cuda_backend: str) -> None:
    dtype = torch.bfloat16
    handle = ops.handle_for_layer(_layer(routed_scaling_factor=1.5), backend=cuda_backend)
    weights = _weights(dtype)
    x, tw, ti = _inputs(33, dtype, seed=5)
    n_valid = torch.full((), 30, dtype=torch.int64, device="cuda")
    try:
        want = ops.fused_experts_op(x, weights, tw, ti, handle=handle, n_valid=n_valid)   # warm up
        xi = x.clone()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = ops.fused_experts_op(x, weights, tw, ti, handle=handle, n_valid=n_valid)
            ops.fused_experts_inplace_op(xi, weights, tw, ti, handle=handle, n_valid=n_valid)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(got, want) and torch.equal(xi, want)
    finally:
        ops.release(handle)


def test_compile_fullgraph_dynamic_M(cuda_backend: str) -> None:
    torch._dynamo.reset()
    dtype = torch.bfloat16
    handle = ops.handle_for_layer(_layer(routed_scaling_factor=1.5), backend=cuda_backend)
    weights = _weights(dtype)

    def forward(x, tw, ti):
        return ops.fused_experts_op(x, weights, tw, ti, handle=handle) + x

    compiled = torch.compile(forward, fullgraph=True)
    try:
        for M in (17, 256, 1):
            x, tw, ti = _inputs(M, dtype, seed=M)
            if M > 1:
                for t in (x, tw, ti):
                    torch._dynamo.mark_dynamic(t, 0)
            got = compiled(x, tw, ti)
            want = forward(x, tw, ti)
            assert_close_normalized(got.double().cpu(), want.double().cpu(), *tolerance_for(dtype))
            assert torch.equal(got, want)
        overhead = torch.compile(forward, fullgraph=True, mode="reduce-overhead")
        x, tw, ti = _inputs(16, dtype, seed=99)
        for _ in range(3):
            got = overhead(x, tw, ti).clone()
        assert torch.equal(got, forward(x, tw, ti))
    finally:
        ops.release(handle)


def test_opcheck_cuda_backend(cuda_backend: str) -> None:
    handle = ops.handle_for_layer(_layer(), backend=cuda_backend)
    weights = _weights(torch.bfloat16)
    x, tw, ti = _inputs(9, torch.bfloat16, seed=6)
    try:
        args = (x, weights.w1, weights.w2, tw, ti, handle)
        torch.library.opcheck(torch.ops.moe_core.fused_experts.default, args)
        torch.library.opcheck(torch.ops.moe_core.fused_experts_inplace.default, (x.clone(),) + args[1:])
    finally:
        ops.release(handle)


def test_elementwise_kernels_capture_alone() -> None:
    """align + activation + quantization + moe_sum captured without the GEMM: replay with
    fresh ids and data equals eager, bitwise."""
    from moe_core.kernels.act import activation
    from moe_core.kernels.align import moe_align_block_size_triton
    from moe_core.kernels.moe_sum import moe_sum
    from moe_core.kernels.quantize import quantize_activation

    M, E_, N = 64, 300, 256
    ids_s = torch.randint(-1, E_, (M, K), dtype=torch.int32, device="cuda")
    gu_s = torch.randn(M * K, N, device="cuda", dtype=torch.bfloat16)
    down_s = torch.randn(M, K, H, device="cuda", dtype=torch.bfloat16)

    def step():
        aligned = moe_align_block_size_triton(ids_s, 16, E_)
        act = activation(gu_s, torch.empty(M * K, N // 2, device="cuda", dtype=torch.bfloat16),
                         activation="silu", is_gated=True, topk_ids=ids_s)
        q_t = quantize_activation(act, qdtype=torch.float8_e4m3fn)
        q_g = quantize_activation(act, qdtype=torch.int8, group_k=64)
        out = moe_sum(down_s, torch.empty(M, H, device="cuda", dtype=torch.bfloat16), 2.5)
        return (*aligned, act, *q_t, *q_g, out)

    with _side_stream():
        step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    for seed in range(3):
        torch.manual_seed(seed)
        ids_s.copy_(torch.randint(-1, E_, (M, K), dtype=torch.int32))
        gu_s.copy_(torch.randn(M * K, N, dtype=torch.bfloat16))
        down_s.copy_(torch.randn(M, K, H, dtype=torch.bfloat16))
        for t in static:
            if t.dtype in (torch.bfloat16, torch.float32):
                t.fill_(float("nan"))
        graph.replay()
        eager = step()
        torch.cuda.synchronize()
        for i, (a, b) in enumerate(zip(static, eager)):
            a_bits = a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a
            b_bits = b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b
            assert torch.equal(a_bits, b_bits), f"output {i} differs after replay (seed {seed})"


def test_pdl_changes_no_bit(cuda_backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Programmatic dependent launch overlaps launches only: forwards with it on equal the ones
    with it off (``MOE_CORE_PDL=0``) bit for bit, eager, inplace and replayed from a CUDA
    graph, at decode sizes and at a multi-wave size (thousands of GEMM programs)."""
    import moe_core
    from moe_core.kernels._launch import pdl_args

    if not pdl_args(torch.empty(1, device="cuda")):
        pytest.skip("programmatic dependent launch needs an NVIDIA sm_90+ GPU")
    layer = MoELayer(num_local_experts=E, top_k=K, hidden_size=1024, intermediate_size=512)
    g = torch.Generator(device="cuda").manual_seed(0)
    w1 = torch.randn(E, 1024, 1024, device="cuda", generator=g, dtype=torch.bfloat16) / 30
    w2 = torch.randn(E, 1024, 512, device="cuda", generator=g, dtype=torch.bfloat16) / 30
    weights = ExpertWeights(w1, w2)
    for M in (1, 8, 4096):
        x = torch.randn(M, 1024, device="cuda", generator=g, dtype=torch.bfloat16)
        tw, ti = moe_core.select_experts(torch.randn(M, E, device="cuda", generator=g), top_k=K)
        got = {}
        for flag in ("1", "0"):
            monkeypatch.setenv("MOE_CORE_PDL", flag)
            assert bool(pdl_args(x)) == (flag == "1")
            runner = moe_core.MoERunner(layer, backend=cuda_backend)
            eager = runner.run(x, weights, tw, ti)
            x_in = x.clone()
            runner.run(x_in, weights, tw, ti, inplace=True)
            with _side_stream():
                runner.run(x, weights, tw, ti)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out_s = runner.run(x, weights, tw, ti)
            out_s.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            got[flag] = (eager, x_in, out_s.clone())
            del graph
        for name, on, off in zip(("eager", "inplace", "graph"), got["1"], got["0"]):
            assert torch.isfinite(on).all(), f"M={M} {name}: non-finite rows with PDL"
            assert torch.equal(on, off), f"M={M} {name}: PDL changed the result"
        ref = oracle_moe(x.cpu(), w1.cpu(), w2.cpu(), tw.cpu(), ti.cpu())
        assert_close_normalized(got["1"][0].double().cpu(), ref, *tolerance_for(torch.bfloat16))


def test_one_token_layout_inside_a_capture(cuda_backend: str) -> None:
    """M = 1 takes the one-token layout (no align kernel). Its constant buffers cannot be made
    inside a capture (the kernels would never run outside the graph), so a capture that finds them
    missing aligns with kernels instead; both replay correctly, and an id outside ``[0, E)`` that
    reaches the GEMM unmasked gives zero rows, never a read of ``w[E]``."""
    import moe_core
    from moe_core.kernels import align as kalign

    layer = _layer()
    weights = _weights(torch.bfloat16)
    runner = moe_core.MoERunner(layer, backend=cuda_backend)
    x_s, tw_s, ti_s = _inputs(1, torch.bfloat16, seed=1)
    for cached in (False, True):
        with _side_stream():                                   # warm up: compile, make the constants
            runner.run(x_s, weights, tw_s, ti_s)
        if not cached:
            kalign._ONE_TOKEN.clear()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_s = runner.run(x_s, weights, tw_s, ti_s)
        assert bool(kalign._ONE_TOKEN) is cached               # no constants made during capture
        for seed in range(3):
            x, tw, ti = _inputs(1, torch.bfloat16, seed=100 + seed)
            if seed == 2:
                ti[0, 1] = E                                   # one past the last expert
            replay_fresh(graph, (x_s, tw_s, ti_s), (x, tw, ti), out_s)
            eager = runner.run(x, weights, tw, ti)
            assert torch.equal(out_s, eager), f"cached={cached} seed={seed}: replay differs from eager"
            keep = ti.clone()
            if seed == 2:
                keep[0, 1] = -1                                # the oracle's filtered slot: zero
            ref = oracle_moe(x.cpu(), weights.w1.cpu(), weights.w2.cpu(), tw.cpu(), keep.cpu())
            assert_close_normalized(out_s.double().cpu(), ref, *tolerance_for(torch.bfloat16))
        del graph
