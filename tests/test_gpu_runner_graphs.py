"""``MoERunner(..., cuda_graph_max_tokens=N)`` on the GPU: the first call captures, later calls
with fresh inputs replay, and every result equals a plain runner's bit for bit (and the float64
oracle within tolerance), for plain / ``out=`` / ``inplace`` / ``no_combine`` calls. New weight
tensors recapture; hooks, a caller's own capture and M above the bound take the plain path."""

from __future__ import annotations

import pytest
import torch

import moe_core
from moe_core.graphs import MAX_GRAPHS
from moe_core.spec import ExpertWeights, MoELayer
from moe_core.testing import assert_close_normalized, oracle_moe, tolerance_for
from tests.graph_replay import replay_fresh

pytestmark = pytest.mark.gpu

E, K, H, I = 16, 4, 512, 256           # a small preset-like layer (qwen3-style routing)
DTYPE = torch.bfloat16
LAYER = MoELayer(num_local_experts=E, top_k=K, hidden_size=H, intermediate_size=I, routed_scaling_factor=1.5)


@pytest.fixture
def cuda_backend() -> str:
    from moe_core import plugins

    try:
        plugins.get_backend("cuda")
    except Exception as exc:  # noqa: BLE001 - the reason is the skip message
        pytest.skip(f"cuda backend unavailable: {exc}")
    return "cuda"


def _weights(seed: int) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(E, 2 * I, H, generator=g) / 10
    w2 = torch.randn(E, H, I, generator=g) / 10
    return ExpertWeights(w1.to(DTYPE).cuda(), w2.to(DTYPE).cuda())


def _inputs(M: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, H, generator=g) / 10).to(DTYPE)
    tw, ti = moe_core.select_experts(torch.randn(M, E, generator=g), top_k=K)
    return x.cuda(), tw.cuda(), ti.cuda()


def _check_oracle(got: torch.Tensor, x, weights: ExpertWeights, tw, ti, *, no_combine: bool = False) -> None:
    ref = oracle_moe(x.cpu(), weights.w1.cpu(), weights.w2.cpu(), tw.cpu(), ti.cpu(),
                     routed_scaling_factor=LAYER.routed_scaling_factor, no_combine=no_combine)
    assert_close_normalized(got.double().cpu(), ref, *tolerance_for(DTYPE))


def _runners(backend: str, max_tokens: int = 64) -> tuple[moe_core.MoERunner, moe_core.MoERunner]:
    return (moe_core.MoERunner(LAYER, backend=backend, cuda_graph_max_tokens=max_tokens),
            moe_core.MoERunner(LAYER, backend=backend))


@pytest.mark.parametrize("M", [1, 5, 64])
@pytest.mark.parametrize("mode", ["plain", "out", "inplace", "no_combine"])
def test_capture_then_replay_equals_plain_runner(cuda_backend: str, nan_empty: None, M: int, mode: str) -> None:
    graphed, plain = _runners(cuda_backend)
    weights = _weights(0)
    for call in range(4):                   # call 0 captures, the others replay with fresh inputs
        x, tw, ti = _inputs(M, seed=100 * M + call)
        want = plain.run(x, weights, tw, ti, no_combine=mode == "no_combine")
        if mode == "out":
            out = torch.full_like(x, float("nan"))
            got = graphed.run(x, weights, tw, ti, out=out)
            assert got is out
        elif mode == "inplace":
            x_in = x.clone()
            got = graphed.run(x_in, weights, tw, ti, inplace=True)
            assert got is x_in
        else:
            got = graphed.run(x, weights, tw, ti, no_combine=mode == "no_combine")
        torch.cuda.synchronize()
        assert graphed.num_cached_graphs == 1, f"call {call}"
        assert torch.isfinite(got).all(), f"M={M} {mode} call {call}: unwritten (NaN) rows"
        assert torch.equal(got, want), f"M={M} {mode} call {call}: differs from the plain runner"
        _check_oracle(got, x, weights, tw, ti, no_combine=mode == "no_combine")
    if mode == "plain":                     # the result is a copy: the next replay must not change it
        kept = got.clone()
        x, tw, ti = _inputs(M, seed=7)
        graphed.run(x, weights, tw, ti)
        torch.cuda.synchronize()
        assert torch.equal(got, kept)


def test_new_weight_tensors_recapture(cuda_backend: str) -> None:
    graphed, plain = _runners(cuda_backend)
    for n, seed in enumerate((0, 1, 2), start=1):
        weights = _weights(seed)
        for call in range(2):
            x, tw, ti = _inputs(8, seed=10 * seed + call)
            got = graphed.run(x, weights, tw, ti)
            assert graphed.num_cached_graphs == n
            assert torch.equal(got, plain.run(x, weights, tw, ti))
            _check_oracle(got, x, weights, tw, ti)
    weights.w2.copy_(_weights(5).w2)           # same tensor, new values: the graph reads them
    x, tw, ti = _inputs(8, seed=99)
    got = graphed.run(x, weights, tw, ti)
    assert graphed.num_cached_graphs == 3
    assert torch.equal(got, plain.run(x, weights, tw, ti))
    graphed.clear_graphs()
    assert graphed.num_cached_graphs == 0


def test_hooks_take_the_plain_path(cuda_backend: str) -> None:
    class Noop:
        @moe_core.hookimpl
        def moe_core_after_down(self, down: torch.Tensor) -> None:
            pass

    graphed, plain = _runners(cuda_backend)
    weights = _weights(0)
    x, tw, ti = _inputs(4, seed=1)
    graphed.run(x, weights, tw, ti)
    assert graphed.num_cached_graphs == 1
    hook = Noop()
    graphed.register(hook)
    assert graphed.num_cached_graphs == 0                # registering drops what was captured
    for seed in (2, 3):
        x, tw, ti = _inputs(4, seed=seed)
        assert torch.equal(graphed.run(x, weights, tw, ti), plain.run(x, weights, tw, ti))
        assert graphed.num_cached_graphs == 0
    graphed.unregister(hook)
    graphed.run(x, weights, tw, ti)
    assert graphed.num_cached_graphs == 1


def test_inside_a_callers_capture_nothing_is_cached(cuda_backend: str) -> None:
    graphed, plain = _runners(cuda_backend)
    weights = _weights(0)
    x_s, tw_s, ti_s = _inputs(8, seed=1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):                      # warm up (compile) with the plain runner
        plain.run(x_s, weights, tw_s, ti_s)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_s = graphed.run(x_s, weights, tw_s, ti_s)
    assert graphed.num_cached_graphs == 0
    for seed in (2, 3):
        x, tw, ti = _inputs(8, seed=seed)
        replay_fresh(graph, (x_s, tw_s, ti_s), (x, tw, ti), out_s)
        assert torch.equal(out_s, plain.run(x, weights, tw, ti))
    assert graphed.num_cached_graphs == 0


def test_only_small_batches_are_cached_and_the_cache_is_bounded(cuda_backend: str) -> None:
    graphed, plain = _runners(cuda_backend, max_tokens=MAX_GRAPHS + 1)
    weights = _weights(0)
    x, tw, ti = _inputs(MAX_GRAPHS + 2, seed=1)            # above the bound: plain path
    assert torch.equal(graphed.run(x, weights, tw, ti), plain.run(x, weights, tw, ti))
    assert graphed.num_cached_graphs == 0
    for M in range(1, MAX_GRAPHS + 2):                    # one more size than the cache holds
        x, tw, ti = _inputs(M, seed=M)
        assert torch.equal(graphed.run(x, weights, tw, ti), plain.run(x, weights, tw, ti))
    assert graphed.num_cached_graphs == MAX_GRAPHS
    assert "held: M=2, M=3," in graphed.explain()          # M=1, the least recently used, was dropped
    x, tw, ti = _inputs(1, seed=5)
    assert torch.equal(graphed.run(x, weights, tw, ti), plain.run(x, weights, tw, ti))
    assert graphed.num_cached_graphs == MAX_GRAPHS
    assert "held: M=3," in graphed.explain() and f"M={MAX_GRAPHS + 1}, M=1\n" in graphed.explain()


def test_first_call_under_inference_mode(cuda_backend: str) -> None:
    graphed, plain = _runners(cuda_backend)
    weights = _weights(0)
    x, tw, ti = _inputs(3, seed=1)
    with torch.inference_mode():
        got = graphed.run(x, weights, tw, ti)
    assert torch.equal(got, plain.run(x, weights, tw, ti))
    for seed in (2, 3):                                   # replays outside and inside inference mode
        x, tw, ti = _inputs(3, seed=seed)
        assert torch.equal(graphed.run(x, weights, tw, ti), plain.run(x, weights, tw, ti))
        with torch.inference_mode():
            assert torch.equal(graphed.run(x, weights, tw, ti), plain.run(x, weights, tw, ti))
    assert graphed.num_cached_graphs == 1


def test_repeated_call_replays_without_prepare(cuda_backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a call is validated and captured, a call with the same signature replays directly
    (``prepare`` not called) and still equals the plain runner; a new weights object does not."""
    from moe_core import sequence

    graphed, plain = _runners(cuda_backend)
    weights = _weights(0)
    x, tw, ti = _inputs(1, seed=7)
    graphed.run(x, weights, tw, ti)
    prepared = []
    real_prepare = sequence.prepare
    monkeypatch.setattr(sequence, "prepare", lambda *a, **kw: prepared.append(1) or real_prepare(*a, **kw))
    for seed in range(3):
        x, tw, ti = _inputs(1, seed=seed)
        assert torch.equal(graphed.run(x, weights, tw, ti), plain.run(x, weights, tw, ti))
    assert len(prepared) == 3                       # the plain runner's three; none for the graphed one
    again = ExpertWeights(weights.w1, weights.w2)
    assert torch.equal(graphed.run(x, again, tw, ti), plain.run(x, again, tw, ti))
    assert len(prepared) == 5 and graphed.num_cached_graphs == 1
