"""``MoERunner(..., cuda_graph_max_tokens=N)`` without a GPU: argument validation, CPU tensors
take the plain path, :func:`moe_core.graphs.graph_key` tells weights and flags apart, and the
cache's hit / miss / eviction / failed-capture logic with capture replaced by a stand-in.
The captures themselves are tested on the GPU (``test_gpu_runner_graphs.py``)."""

from __future__ import annotations

import logging

import pytest
import torch

import moe_core
from moe_core import graphs, sequence
from moe_core.errors import MoECoreError, MoEInputError, MoETypeError
from moe_core.graphs import GraphCache, graph_key

E, K, H, I = 4, 2, 16, 8
LAYER = moe_core.MoELayer(num_local_experts=E, top_k=K, hidden_size=H, intermediate_size=I)


def _problem(M: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, H, generator=g) / 10
    weights = moe_core.ExpertWeights(torch.randn(E, 2 * I, H, generator=g) / 10,
                                     torch.randn(E, H, I, generator=g) / 10)
    tw, ti = moe_core.select_experts(torch.randn(M, E, generator=g), top_k=K)
    return x, weights, tw, ti


def _plan(x, weights, tw, ti, **flags):
    runner = moe_core.MoERunner(LAYER, backend="torch")
    return sequence.prepare(x, weights, tw, ti, LAYER, runner.backend_for(weights.quant), runner.hooks, **flags)


@pytest.mark.parametrize("bad,error", [(-1, MoEInputError), (True, MoETypeError), (2.0, MoETypeError),
                                       ("8", MoETypeError), (None, MoETypeError)])
def test_bad_max_tokens_names_the_argument(bad: object, error: type) -> None:
    with pytest.raises(error, match=r"cuda_graph_max_tokens: expected an int >= 0.*got"):
        moe_core.MoERunner(LAYER, cuda_graph_max_tokens=bad)
    runner = moe_core.MoERunner(LAYER)
    with pytest.raises(MoECoreError, match="cuda_graph_max_tokens"):   # validated on assignment too
        runner.cuda_graph_max_tokens = bad
    assert runner.cuda_graph_max_tokens == 0


def test_cpu_tensors_take_the_plain_path() -> None:
    plain = moe_core.MoERunner(LAYER, backend="torch")
    graphed = moe_core.MoERunner(LAYER, backend="torch", cuda_graph_max_tokens=64)
    for M in (1, 5):
        x, w, tw, ti = _problem(M, seed=M)
        assert torch.equal(graphed.run(x, w, tw, ti), plain.run(x, w, tw, ti))
        out = torch.full_like(x, float("nan"))
        assert graphed.run(x, w, tw, ti, out=out) is out and torch.equal(out, plain.run(x, w, tw, ti))
        assert torch.equal(graphed.run(x, w, tw, ti, no_combine=True), plain.run(x, w, tw, ti, no_combine=True))
    assert graphed.num_cached_graphs == 0
    assert "cuda graphs: forwards of 1..64 tokens" in graphed.explain()
    assert "cuda graphs: off" in plain.explain()


def test_key_tells_weights_and_flags_apart() -> None:
    x, w, tw, ti = _problem()
    plan = _plan(x, w, tw, ti)
    flags = {"inplace": False, "no_combine": False, "out": None}
    base = graph_key(plan, x, w, ti, **flags)
    same = moe_core.ExpertWeights(w.w1, w.w2)                     # same tensors, new wrapper
    assert graph_key(plan, x.clone(), same, ti.clone(), **flags) == base
    others = {
        "new w1 storage": moe_core.ExpertWeights(w.w1.clone(), w.w2),
        "w2 view, other shape": moe_core.ExpertWeights(w.w1, w.w2[:, :, : I - 1]),
        "w2 view, other stride": moe_core.ExpertWeights(w.w1, w.w2.as_strided(w.w2.shape, (H * I, 1, H))),
        "b1 given": moe_core.ExpertWeights(w.w1, w.w2, b1=torch.zeros(E, 2 * I)),
    }
    for what, other in others.items():
        assert graph_key(plan, x, other, ti, **flags) != base, what
    assert graph_key(plan, x[:2], w, ti[:2], **flags) != base, "M"
    assert graph_key(plan, x.double(), w, ti, **flags) != base, "x dtype"
    assert graph_key(plan, x, w, ti.long(), **flags) != base, "ids dtype"
    for flag in ({"inplace": True}, {"no_combine": True}, {"out": torch.empty_like(x)}):
        assert graph_key(plan, x, w, ti, **{**flags, **flag}) != base, flag
    other_plan = sequence.prepare(x, w, tw, ti, LAYER, plan.backend, plan.hooks)
    assert graph_key(other_plan, x, w, ti, **flags) == base           # same backend and configs
    with moe_core.override_config({"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1}):
        retuned = sequence.prepare(x, w, tw, ti, LAYER, plan.backend, plan.hooks)
    assert graph_key(retuned, x, w, ti, **flags) != base, "configs"


def test_key_covers_scales() -> None:
    x, w, tw, ti = _problem()
    s1, s2 = torch.ones(E), torch.ones(E)
    q = moe_core.ExpertWeights(w.w1.to(torch.float8_e4m3fn), w.w2.to(torch.float8_e4m3fn),
                               quant=moe_core.QuantSpec.fp8_w8a8(s1, s2))
    plan = _plan(x, q, tw, ti)
    flags = {"inplace": False, "no_combine": False, "out": None}
    key = graph_key(plan, x, q, ti, **flags)
    q_same = moe_core.ExpertWeights(q.w1, q.w2, quant=moe_core.QuantSpec.fp8_w8a8(s1, s2))
    assert graph_key(plan, x, q_same, ti, **flags) == key
    q_new_scale = moe_core.ExpertWeights(q.w1, q.w2, quant=moe_core.QuantSpec.fp8_w8a8(s1, s2.clone()))
    assert graph_key(plan, x, q_new_scale, ti, **flags) != key


class _FakeGraph:
    """Stands in for a captured graph: counts replays, answers like the eager forward."""

    def __init__(self, plan, weights) -> None:
        self.plan, self.weights, self.replays = plan, weights, 0

    def replay(self, x, topk_weights, topk_ids, *, inplace, out):
        self.replays += 1
        return sequence.run(self.plan, x, self.weights, topk_weights, topk_ids, inplace=inplace, out=out)


def test_cache_hits_misses_and_evicts_least_recently_used(monkeypatch: pytest.MonkeyPatch) -> None:
    captured: list[_FakeGraph] = []

    def fake_capture(plan, x, weights, *args, **kw):
        captured.append(_FakeGraph(plan, weights))
        return captured[-1]

    monkeypatch.setattr(graphs, "_capture", fake_capture)
    cache = GraphCache(max_graphs=2)
    problems = {M: _problem(M, seed=M) for M in (1, 2, 3)}

    def call(M: int) -> torch.Tensor:
        x, w, tw, ti = problems[M]
        got = cache.run(_plan(x, w, tw, ti), x, w, tw, ti)
        assert torch.equal(got, sequence.run(_plan(x, w, tw, ti), x, w, tw, ti))
        return got

    call(1)
    call(2)
    assert len(cache) == 2 and [g.replays for g in captured] == [0, 0]
    call(1)                                        # hit: M=1 becomes the most recently used
    assert len(captured) == 2 and captured[0].replays == 1
    call(3)                                        # miss: evicts M=2
    assert cache.token_counts() == [1, 3]
    call(2)                                        # recaptured
    assert len(captured) == 4 and cache.token_counts() == [3, 2]
    cache.clear()
    assert len(cache) == 0


def test_failed_capture_keeps_the_eager_result_and_stops_capturing(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def broken_capture(*args, **kw):
        calls.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_capture", broken_capture)
    cache = GraphCache()
    x, w, tw, ti = _problem()
    want = sequence.run(_plan(x, w, tw, ti), x, w, tw, ti)
    with caplog.at_level(logging.WARNING, logger="moe_core.graphs"):
        for _ in range(3):
            assert torch.equal(cache.run(_plan(x, w, tw, ti), x, w, tw, ti), want)
    assert len(calls) == 1 and len(cache) == 0
    assert "not permitted" in cache.failed
    assert "capture of the 'torch' forward failed" in caplog.text


def test_known_signature_replays_without_prepare(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a validated, captured call, a call with the same signature replays directly; any
    property the checks read, a new weights object, ``out=``, an env setting or
    ``override_config`` sends the call back through ``prepare`` (it finds the graph by key)."""
    captured: list[_FakeGraph] = []

    def fake_capture(plan, x, weights, *args, **kw):
        captured.append(_FakeGraph(plan, weights))
        return captured[-1]

    monkeypatch.setattr(graphs, "_capture", fake_capture)
    cache = GraphCache()
    x, w, tw, ti = _problem(M=2)
    flags = {"inplace": False, "no_combine": False}
    assert cache.replay_known(x, w, tw, ti, **flags) is None          # nothing known yet
    cache.run(_plan(x, w, tw, ti), x, w, tw, ti)
    x2, _, tw2, ti2 = _problem(M=2, seed=9)                           # new values, same signature
    got = cache.replay_known(x2, w, tw2, ti2, **flags)
    assert captured[0].replays == 1 and torch.equal(got, sequence.run(_plan(x2, w, tw2, ti2), x2, w, tw2, ti2))
    misses = {
        "x strided": (torch.zeros(2, 2 * H)[:, ::2].copy_(x2), w, tw2, ti2, flags),
        "x requires grad": (x2.clone().requires_grad_(), w, tw2, ti2, flags),
        "ids int64": (x2, w, tw2, ti2.long(), flags),
        "new weights object": (x2, moe_core.ExpertWeights(w.w1, w.w2), tw2, ti2, flags),
        "inplace": (x2, w, tw2, ti2, {**flags, "inplace": True}),
        "M": (x2[:1], w, tw2[:1], ti2[:1], flags),
    }
    for what, (xx, ww, tww, tii, ff) in misses.items():
        assert cache.replay_known(xx, ww, tww, tii, **ff) is None, what
    monkeypatch.setenv("MOE_CORE_CONFIG_DIR", "/nonexistent")
    assert cache.replay_known(x2, w, tw2, ti2, **flags) is None, "env"
    monkeypatch.delenv("MOE_CORE_CONFIG_DIR")
    monkeypatch.setenv("MOE_CORE_DEBUG", "1")          # value checks on every call: never skip prepare
    cache._remember(next(iter(cache._graphs)), x2, w, tw2, ti2, inplace=False, no_combine=False, out=None)
    assert cache.replay_known(x2, w, tw2, ti2, **flags) is None, "MOE_CORE_DEBUG"
    monkeypatch.delenv("MOE_CORE_DEBUG")
    with moe_core.override_config({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1}):
        assert cache.replay_known(x2, w, tw2, ti2, **flags) is None, "override_config"
    assert cache.replay_known(x2, w, tw2, ti2, **flags) is not None
    assert cache.replay_known(x2, [w], tw2, ti2, **flags) is None      # garbage: prepare reports it
    # a new wrapper of the same tensors finds the graph by key, then becomes known too
    w_new = moe_core.ExpertWeights(w.w1, w.w2)
    cache.run(_plan(x2, w_new, tw2, ti2), x2, w_new, tw2, ti2)
    assert len(captured) == 1 and cache.replay_known(x2, w_new, tw2, ti2, **flags) is not None
    cache.clear()
    assert cache.replay_known(x2, w, tw2, ti2, **flags) is None


def test_known_signatures_stay_bounded_and_follow_evictions(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new ``ExpertWeights`` wrapper every call adds a signature each time: the map of known
    signatures stays bounded, and an evicted graph takes its signatures (and the weights objects
    they hold) with it."""
    monkeypatch.setattr(graphs, "_capture", lambda plan, x, weights, *a, **kw: _FakeGraph(plan, weights))
    cache = GraphCache(max_graphs=2)
    x, w, tw, ti = _problem(M=2)
    for _ in range(20):
        wrapper = moe_core.ExpertWeights(w.w1, w.w2)
        cache.run(_plan(x, wrapper, tw, ti), x, wrapper, tw, ti)
    assert len(cache) == 1 and len(cache._known) <= 4 * cache.max_graphs
    for M in (1, 3):                                   # two more shapes evict the M=2 graph
        xm, wm, twm, tim = _problem(M=M, seed=M)
        cache.run(_plan(xm, wm, twm, tim), xm, wm, twm, tim)
    assert cache.token_counts() == [1, 3]
    assert all(key in cache._graphs for key, _ in cache._known.values())
    assert cache.replay_known(x, moe_core.ExpertWeights(w.w1, w.w2), tw, ti, inplace=False, no_combine=False) is None
