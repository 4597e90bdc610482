"""Hooks around the one sequence (SEMANTICS §8, TESTING.md §11, tier F): order, scope
(global entry point vs one runner), firstresult id mapping, errors, the zero-cost path,
and what a hook sees. Each test defines its own hook classes (pluggy style)."""

from __future__ import annotations

import importlib

import pluggy
import pytest
import torch

import moe_core
from moe_core import hookimpl
from moe_core.errors import HookError, PluginRegistrationError
from moe_core.testing import assert_close_normalized, oracle_moe, tolerance_for
from tests.plugin_fixtures import DistFactory, dists  # noqa: F401  (fixture)

M, K, E, H, I = 6, 2, 4, 16, 8
LAYER = moe_core.MoELayer(num_local_experts=E, top_k=K, hidden_size=H, intermediate_size=I)
TOL = tolerance_for(torch.float32)


def problem(seed: int = 0, k: int = K, ids: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, H, generator=g) / 10
    w1 = torch.randn(E, 2 * I, H, generator=g) / 10
    w2 = torch.randn(E, H, I, generator=g) / 10
    weights = torch.rand(M, k, generator=g)
    if ids is None:
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(M)]).to(torch.int32)
    return x, moe_core.ExpertWeights(w1, w2), weights, ids


def run(runner: moe_core.MoERunner, seed: int = 0) -> torch.Tensor:
    x, w, tw, ids = problem(seed)
    return runner.run(x, w, tw, ids)


def test_order_is_pluggys_tryfirst_trylast_lifo_and_wrappers() -> None:
    calls: list[str] = []

    class Plain:
        def __init__(self, tag: str) -> None:
            self.tag = tag

        @hookimpl
        def moe_core_after_down(self, down: torch.Tensor) -> None:
            calls.append(self.tag)

    class First:
        @hookimpl(tryfirst=True)
        def moe_core_after_down(self) -> None:
            calls.append("first")

    class Last:
        @hookimpl(trylast=True)
        def moe_core_after_down(self) -> None:
            calls.append("last")

    class Around:
        @hookimpl(wrapper=True)
        def moe_core_after_down(self, down: torch.Tensor):
            calls.append("wrap<")
            result = yield
            calls.append("wrap>")
            return result

    runner = moe_core.MoERunner(LAYER, backend="torch")
    for plugin in (Last(), First(), Plain("a"), Around(), Plain("b")):
        runner.register(plugin)
    run(runner)
    assert calls == ["wrap<", "first", "b", "a", "last", "wrap>"]
    calls.clear()
    run(runner, seed=1)                                    # fixed per runner
    assert calls == ["wrap<", "first", "b", "a", "last", "wrap>"]


def test_global_hooks_apply_everywhere_runner_hooks_to_their_runner(dists: DistFactory) -> None:
    dists.add("moe-core-ghook", hooks={"ghook": "ghook_mod"}, modules={"ghook_mod": """
        from moe_core import hookimpl, plugins
        CALLS = []
        @hookimpl
        def moe_core_after_gate_up(gate_up):
            CALLS.append("global")
        """})
    calls = importlib.import_module("ghook_mod").CALLS

    class Local:
        @hookimpl
        def moe_core_after_gate_up(self, gate_up: torch.Tensor) -> None:
            calls.append("local")

    mine, other = moe_core.MoERunner(LAYER, backend="torch"), moe_core.MoERunner(LAYER, backend="torch")
    local = Local()
    mine.register(local, name="lora-layer-3")
    run(mine)
    assert calls == ["local", "global"]                 # a runner's own hooks run before the global ones
    calls.clear()
    run(other)
    x, w, tw, ids = problem()
    moe_core.fused_experts(x, w.w1, w.w2, tw, ids, backend="torch")
    assert calls == ["global", "global"]
    calls.clear()
    mine.unregister(local)
    run(mine)
    assert calls == ["global"]


def test_map_expert_ids_is_firstresult() -> None:
    ep_layer = moe_core.MoELayer(num_experts=2 * E, num_local_experts=E, top_k=K, hidden_size=H,
                                 intermediate_size=I, ep_rank=1, ep_size=2)
    g = torch.Generator().manual_seed(3)
    x, w, tw, _ = problem()
    global_ids = torch.randint(0, 2 * E, (M, K), generator=g, dtype=torch.int32)
    seen: list[str] = []

    class Abstain:
        @hookimpl
        def moe_core_map_expert_ids(self, topk_ids: torch.Tensor) -> None:
            seen.append("abstain")
            return None

    class AllToZero:
        @hookimpl
        def moe_core_map_expert_ids(self, topk_ids: torch.Tensor) -> torch.Tensor:
            seen.append("zero")
            return torch.zeros_like(topk_ids)

    runner = moe_core.MoERunner(ep_layer, backend="torch")
    runner.register(Abstain())
    out = runner.run(x, w, tw, global_ids)            # Abstain defers to the global filter_expert hook
    table = torch.full((2 * E,), -1, dtype=torch.int32)
    table[E:] = torch.arange(E, dtype=torch.int32)
    assert seen == ["abstain"]
    assert_close_normalized(out, oracle_moe(x, w.w1, w.w2, tw, global_ids, expert_map=table), *TOL)

    seen.clear()
    runner.register(AllToZero())
    out = runner.run(x, w, tw, global_ids)
    assert seen == ["zero"]                            # stops at the first non-None result
    assert_close_normalized(out, oracle_moe(x, w.w1, w.w2, tw, torch.zeros_like(global_ids)), *TOL)


@pytest.mark.parametrize("hook", ["moe_core_after_gate_up", "moe_core_after_down"])
def test_raising_hook_aborts_with_hook_error(hook: str) -> None:
    class Fine:
        @hookimpl
        def moe_core_after_gate_up(self) -> None:
            pass

        @hookimpl
        def moe_core_after_down(self) -> None:
            pass

    class Broken:
        @hookimpl(trylast=True)
        def moe_core_after_gate_up(self) -> None:
            raise ValueError("adapter 7 has rank 9 > max rank 8")

        @hookimpl(trylast=True)
        def moe_core_after_down(self) -> None:
            raise ValueError("adapter 7 has rank 9 > max rank 8")

    only = type("Only", (), {hook: getattr(Broken, hook)})
    runner = moe_core.MoERunner(LAYER, backend="torch")
    runner.register(only(), name="lora-7")
    runner.register(Fine(), name="fine")
    x, w, tw, ids = problem()
    x_before = x.clone()
    with pytest.raises(HookError, match=rf"hook {hook} of plugin 'lora-7' raised ValueError: adapter 7") as err:
        runner.run(x, w, tw, ids, inplace=True)
    assert isinstance(err.value.__cause__, ValueError)
    assert torch.equal(x, x_before)                    # in-place output never written
    out = torch.full((M, H), float("nan"))
    with pytest.raises(HookError):
        runner.run(x, w, tw, ids, out=out)
    assert out.isnan().all()                           # no partial output


@pytest.mark.parametrize("junk, match", [
    (lambda ids: ids.long(), "torch.int64"),
    (lambda ids: ids[:, :1].contiguous(), r"\[6, 1\]"),
    (lambda ids: torch.full_like(ids, E), r"outside \[-1, 4\)"),
    (lambda ids: torch.full_like(ids, -2), r"outside \[-1, 4\)"),
    (lambda ids: ids.tolist(), "returned list"),
])
def test_map_hook_returning_junk_is_a_hook_error(junk, match: str) -> None:
    ep_layer = moe_core.MoELayer(num_experts=2 * E, num_local_experts=E, top_k=K, hidden_size=H,
                                 intermediate_size=I, ep_size=2)

    class Junk:
        @hookimpl
        def moe_core_map_expert_ids(self, topk_ids: torch.Tensor):
            return junk(topk_ids)

    class Abstain:
        @hookimpl
        def moe_core_map_expert_ids(self) -> None:
            return None

    runner = moe_core.MoERunner(ep_layer, backend="torch")
    runner.register(Junk(), name="junk-mapper")
    runner.register(Abstain(), name="abstain")          # called first, returns None
    x, w, tw, ids = problem()
    with pytest.raises(HookError, match=match) as err:
        runner.run(x, w, tw, ids)
    assert "moe_core_map_expert_ids of plugin 'junk-mapper'" in str(err.value)


def test_unnamed_plugin_is_named_by_its_class() -> None:
    class AdapterHooks:
        @hookimpl
        def moe_core_after_down(self) -> None:
            raise RuntimeError("no adapter slot")

    runner = moe_core.MoERunner(LAYER, backend="torch")
    runner.register(AdapterHooks())
    with pytest.raises(HookError, match=r"of plugin '.*AdapterHooks@0x[0-9a-f]+' raised RuntimeError"):
        run(runner)


def test_raising_map_hook_names_the_plugin() -> None:
    ep_layer = moe_core.MoELayer(num_experts=2 * E, num_local_experts=E, top_k=K, hidden_size=H,
                                 intermediate_size=I, ep_size=2)

    class Broken:
        @hookimpl
        def moe_core_map_expert_ids(self, topk_ids: torch.Tensor):
            raise KeyError("rank table missing")

    runner = moe_core.MoERunner(ep_layer, backend="torch")
    runner.register(Broken(), name="ep-table")
    x, w, tw, ids = problem()
    with pytest.raises(HookError, match="moe_core_map_expert_ids of plugin 'ep-table' raised KeyError"):
        runner.run(x, w, tw, ids)


def test_no_hook_registered_calls_no_pluggy_machinery(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = moe_core.MoERunner(LAYER, backend="torch")
    x, w, tw, ids = problem()
    run(runner)                                                  # resolve once: backend, hooks
    moe_core.fused_experts(x, w.w1, w.w2, tw, ids, backend="torch")
    calls: list[str] = []
    real_call, real_impls = pluggy.HookCaller.__call__, pluggy.HookCaller.get_hookimpls

    def spy_call(self, *args, **kwargs):
        calls.append(self.name)
        return real_call(self, *args, **kwargs)

    def spy_impls(self):
        calls.append("get_hookimpls")
        return real_impls(self)

    monkeypatch.setattr(pluggy.HookCaller, "__call__", spy_call)
    monkeypatch.setattr(pluggy.HookCaller, "get_hookimpls", spy_impls)
    for seed in range(2):
        run(runner, seed)
        x, w, tw, ids = problem(seed)
        moe_core.fused_experts(x, w.w1, w.w2, tw, ids, backend="torch")
    assert calls == []
    assert runner.hooks.after_gate_up is None and runner.hooks.after_down is None

    class Noop:
        @hookimpl
        def moe_core_after_down(self) -> None:
            pass

    runner.register(Noop())                                      # the spy does see hook calls
    run(runner)
    assert "moe_core_after_down" in calls


def test_hooks_see_token_major_rows_and_zero_rows_for_filtered_slots(nan_empty) -> None:
    k = 3
    ids = torch.tensor([[0, -1, 2], [3, 3, -1], [-1, -1, -1], [1, 0, 2], [2, -1, 1], [0, 1, 3]],
                       dtype=torch.int32)
    layer = moe_core.MoELayer(num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I,
                              routed_scaling_factor=1.5)
    x, w, tw, ids = problem(5, k=k, ids=ids)
    seen: dict[str, torch.Tensor] = {}

    class Recorder:
        @hookimpl
        def moe_core_after_gate_up(self, x, gate_up, topk_weights, topk_ids, layer) -> None:
            seen.update(x=x.clone(), gate_up=gate_up.clone(), ids=topk_ids.clone())

        @hookimpl
        def moe_core_after_down(self, act, down, topk_ids) -> None:
            seen.update(act=act.clone(), down=down.clone())
            down[topk_ids >= 0] += 0.25                 # a delta on valid rows only

    runner = moe_core.MoERunner(layer, backend="torch")
    runner.register(Recorder())
    out = runner.run(x, w, tw, ids)

    assert seen["gate_up"].shape == (M, k, 2 * I) and seen["down"].shape == (M, k, H)
    assert seen["act"].shape == (M * k, I)
    assert torch.equal(seen["x"], x) and torch.equal(seen["ids"], ids) and seen["ids"].dtype == torch.int32
    valid = ids >= 0
    for m in range(M):
        for j in range(k):
            if valid[m, j]:                                  # row [m, j] is slot m·k + j
                ref = x[m].double() @ w.w1[ids[m, j]].double().T
                assert_close_normalized(seen["gate_up"][m, j], ref, *TOL)
    ref_down = oracle_moe(x, w.w1, w.w2, tw, ids, no_combine=True) * tw.double().unsqueeze(-1)
    assert_close_normalized(seen["down"][valid], ref_down[valid], *TOL)
    assert torch.equal(seen["down"][~valid], torch.zeros_like(seen["down"][~valid]))   # exactly zero
    delta = 0.25 * valid.sum(dim=1, keepdim=True).double() * 1.5
    ref = oracle_moe(x, w.w1, w.w2, tw, ids, routed_scaling_factor=1.5) + delta
    assert_close_normalized(out, ref, *TOL)
    assert torch.equal(out[2], torch.full((H,), 0.0))      # a token with every slot filtered


def test_gate_up_edits_in_place_reach_the_output() -> None:
    class Zero:
        @hookimpl
        def moe_core_after_gate_up(self, gate_up: torch.Tensor) -> None:
            gate_up.zero_()                                   # silu(0)·0 = 0 for every expert

    runner = moe_core.MoERunner(LAYER, backend="torch")
    runner.register(Zero())
    assert torch.equal(run(runner), torch.zeros(M, H))


def test_runner_register_rejects_malformed_plugins_and_keeps_nothing() -> None:
    class Good:
        @hookimpl
        def moe_core_after_down(self) -> None:
            pass

    class WrongArg:
        @hookimpl
        def moe_core_after_down(self, down, adapter_ids) -> None:
            pass

    class Misspelled:
        @hookimpl
        def moe_core_after_dowm(self, down) -> None:
            pass

    class Unmarked:
        def moe_core_after_down(self, down) -> None:
            pass

    class Future:
        api_version = 2

        @hookimpl
        def moe_core_after_down(self, down) -> None:
            pass

    runner = moe_core.MoERunner(LAYER, backend="torch")
    for plugin, match in ((WrongArg(), "adapter_ids"), (Misspelled(), "unknown hook 'moe_core_after_dowm'"),
                          (Unmarked(), "no @moe_core.hookimpl"), (Future(), "plugin API version 2"),
                          (Good, "got class Good; register an instance")):
        with pytest.raises(PluginRegistrationError, match=match):
            runner.register(plugin)
        assert not runner.hooks.any
    good = Good()
    runner.register(good, name="lora")
    with pytest.raises(PluginRegistrationError, match="already registered"):
        runner.register(good, name="other")
    with pytest.raises(PluginRegistrationError, match="already registered"):
        runner.register(Good(), name="lora")
    assert [i.plugin for i in runner._pm.hook.moe_core_after_down.get_hookimpls()] == [good]


def test_hookspecs_document_their_contract() -> None:
    from moe_core import hookspecs

    specs = {n: getattr(hookspecs, n) for n in dir(hookspecs) if n.startswith("moe_core_")}
    assert set(specs) == {"moe_core_map_expert_ids", "moe_core_after_gate_up", "moe_core_after_down"}
    for name, spec in specs.items():
        opts = getattr(spec, f"{hookspecs.PROJECT_NAME}_spec")
        doc = spec.__doc__
        for arg in spec.__code__.co_varnames[:spec.__code__.co_argcount]:
            assert f":param {arg}:" in doc, (name, arg)
        assert ":returns:" in doc and "Called" in doc, name
        assert ("Stops at first non-None result." in doc) == opts["firstresult"], name
        assert not opts["historic"], name
    assert getattr(specs["moe_core_map_expert_ids"], "moe_core_spec")["firstresult"]
