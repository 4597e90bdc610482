"""Plugin discovery, loading and selection with ``.dist-info`` fixtures (TESTING.md §10–§11, tier E).

Every fixture distribution lives in ``tmp_path`` (see ``plugin_fixtures``); the real
``moe-core`` entry points (``torch``, ``cuda``, ``filter_expert``) are loaded beside them.
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import logging
import random
import re
import sys

import pytest
import torch

import moe_core
from moe_core import plugins
from moe_core.errors import (BackendNotFoundError, BackendUnavailableError, PluginLoadError,
                             PluginRegistrationError, UnsupportedConfigError)
from moe_core.testing import assert_close_normalized, oracle_moe, tolerance_for
from tests.plugin_fixtures import BACKEND_HEADER, DistFactory, dists  # noqa: F401  (fixture)

LAYER = moe_core.MoELayer(num_local_experts=4, top_k=2, hidden_size=16, intermediate_size=8)


def backend_module(cls: str, name: str, priority: int = -5, extra: str = "") -> str:
    """Source of a module defining backend class ``cls`` called ``name``."""
    return BACKEND_HEADER + f"""
class {cls}(TorchBackend):
    name = {name!r}
    platform = "fake"
    priority = {priority}
{extra}
"""


def plugin_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "moe_core.plugins" and r.levelno == logging.WARNING]


def info_of(name: str, group: str = plugins.BACKENDS_GROUP) -> plugins.BackendInfo:
    return next(i for i in plugins.load_report() if i.name == name and i.group == group)


# -- good plugins -------------------------------------------------------------------


def test_good_backend_is_listed_selected_and_runs(dists: DistFactory) -> None:
    dists.add("moe-core-fake", "2.3", backends={"fake": "fake_be:FakeBackend"},
              modules={"fake_be": backend_module("FakeBackend", "fake")})
    assert "fake_be" not in sys.modules           # lazy: nothing loaded before first use
    info = next(i for i in moe_core.list_backends() if i.name == "fake")
    assert (info.state, info.distribution, info.version, info.priority) == ("loaded", "moe-core-fake", "2.3", -5)
    assert info.available == (True, "plain torch runs on every device")
    assert [i.name for i in moe_core.list_backends()] == sorted(i.name for i in moe_core.list_backends())

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=g) / 10
    w1, w2 = torch.randn(4, 16, 16, generator=g) / 10, torch.randn(4, 16, 8, generator=g) / 10
    weights, ids = torch.rand(5, 2, generator=g), torch.randint(0, 4, (5, 2), generator=g, dtype=torch.int32)
    runner = moe_core.MoERunner(LAYER, backend="fake")
    out = runner.run(x, moe_core.ExpertWeights(w1, w2), weights, ids)
    assert runner.backend is moe_core.get_backend("fake")
    assert "moe-core-fake 2.3" in runner.explain()
    assert_close_normalized(out, oracle_moe(x, w1, w2, weights, ids), *tolerance_for(torch.float32))


def test_env_backend_selects_and_auto_takes_highest_priority(dists: DistFactory, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    dists.add("moe-core-hi", backends={"hi": "hi_be:HiBackend"},
              modules={"hi_be": backend_module("HiBackend", "hi", priority=50)})
    with caplog.at_level(logging.INFO, logger="moe_core.plugins"):
        for _ in range(3):
            assert plugins.select_backend(None, LAYER, moe_core.QuantSpec.none()).name == "hi"
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == ["backend hi selected: priority 50, distribution moe-core-hi 1.0"]    # once per process
    monkeypatch.setenv("MOE_CORE_BACKEND", "torch")
    assert plugins.select_backend(None, LAYER, moe_core.QuantSpec.none()).name == "torch"
    assert plugins.select_backend("hi", LAYER, moe_core.QuantSpec.none()).name == "hi"   # argument first


def test_loading_is_lazy_and_happens_once(dists: DistFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = importlib.metadata.distributions

    def counting(**kw):
        calls.append(kw)
        return real(**kw)

    monkeypatch.setattr(importlib.metadata, "distributions", counting)
    assert calls == []
    moe_core.list_backends()
    plugins.load_report()
    plugins.global_hookset()
    moe_core.MoERunner(LAYER).backend
    assert calls == [{}]


def test_concurrent_first_use_loads_once(dists: DistFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    dists.add("moe-core-slow", backends={"slow": "slow_be:B"}, modules={"slow_be": (
        "import time\ntime.sleep(0.05)\n" + backend_module("B", "slow"))})
    calls = []
    real = importlib.metadata.distributions
    monkeypatch.setattr(importlib.metadata, "distributions", lambda **kw: calls.append(kw) or real(**kw))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        seen = list(pool.map(lambda _: [i.name for i in moe_core.list_backends()], range(8)))
    assert len(calls) == 1 and all("slow" in names for names in seen)
    assert len({tuple(names) for names in seen}) == 1


def test_plugin_may_use_the_registry_while_it_loads(dists: DistFactory) -> None:
    dists.add("moe-core-curious", backends={"curious": "curious_be:B"}, modules={"curious_be": (
        "import moe_core\nSEEN = [i.name for i in moe_core.list_backends()]\n" + backend_module("B", "curious"))})
    info = next(i for i in moe_core.list_backends() if i.name == "curious")
    assert info.state == "loaded"
    assert "curious" not in sys.modules["curious_be"].SEEN        # a partial view, no recursion


# -- failures -----------------------------------------------------------------------


def test_import_error_is_recorded_warned_once_and_skipped(dists: DistFactory,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Bug classes 23 and 24: the failure is neither silent nor stops the plugins after it."""
    dists.add("moe-core-broken", "0.4", backends={"broken": "broken_be:BrokenBackend"},
              modules={"broken_be": "import no_such_vendor_library_xyz\n"})
    dists.add("moe-core-zz", backends={"zz": "zz_be:ZzBackend"},       # loaded after the broken one
              modules={"zz_be": backend_module("ZzBackend", "zz")})
    with caplog.at_level(logging.WARNING):
        names = {i.name: i for i in moe_core.list_backends()}
        plugins.load_report()
    assert names["zz"].state == "loaded" and names["torch"].state == "loaded"
    info = names["broken"]
    assert (info.state, info.distribution, info.version) == ("failed", "moe-core-broken", "0.4")
    assert isinstance(info.error, ModuleNotFoundError)
    assert "no_such_vendor_library_xyz" in info.traceback and "broken_be.py" in info.traceback
    assert info.available[0] is False and "no_such_vendor_library_xyz" in info.available[1]
    warned = plugin_warnings(caplog)
    assert len(warned) == 1
    assert "'broken'" in warned[0] and "moe-core-broken 0.4" in warned[0] and "ModuleNotFoundError" in warned[0]

    # asked for by name: raised, from the original exception
    with pytest.raises(BackendUnavailableError, match="broken") as err:
        moe_core.get_backend("broken")
    assert err.value.__cause__ is info.error
    with pytest.raises(BackendUnavailableError) as err:
        moe_core.MoERunner(LAYER, backend="broken").backend
    assert err.value.__cause__ is info.error


def test_explicit_request_through_env_raises_with_cause(dists: DistFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug class 23: asked for by name, a broken backend raises; no silent fallback to torch."""
    dists.add("moe-core-broken", backends={"broken": "broken_be:BrokenBackend"},
              modules={"broken_be": "raise RuntimeError('vendor driver 1.2 too old')\n"})
    monkeypatch.setenv("MOE_CORE_BACKEND", "broken")
    x = torch.zeros(2, 16)
    with pytest.raises(BackendUnavailableError, match="vendor driver 1.2 too old") as err:
        moe_core.fused_experts(x, torch.zeros(4, 16, 16), torch.zeros(4, 16, 8), torch.ones(2, 2),
                               torch.zeros(2, 2, dtype=torch.int32))
    assert isinstance(err.value.__cause__, RuntimeError)


def test_failures_while_registering_are_undone(dists: DistFactory, caplog: pytest.LogCaptureFixture) -> None:
    # a backend whose constructor raises; a module that registers a backend from code, then fails
    dists.add("moe-core-ctor", backends={"ctor": "ctor_be:CtorBackend"},
              modules={"ctor_be": backend_module("CtorBackend", "ctor", extra=(
                  "    def __init__(self):\n        raise OSError('no device node')\n"))})
    dists.add("moe-core-half", backends={"half": "half_be:HalfBackend"},
              modules={"half_be": backend_module("SideBackend", "side") + (
                  "import moe_core\nmoe_core.register_backend(SideBackend)\n"
                  "raise ImportError('second half of the plugin is missing')\n")})
    # a hook plugin whose first impl is fine and whose second impl has an argument the spec lacks
    dists.add("moe-core-halfhook", hooks={"halfhook": "halfhook_mod:PLUGIN"}, modules={"halfhook_mod": """
        from moe_core import hookimpl
        class Plugin:
            @hookimpl
            def moe_core_after_down(self, down):
                pass
            @hookimpl
            def moe_core_after_gate_up(self, gate_up, lora_index):
                pass
        PLUGIN = Plugin()
        """})
    with caplog.at_level(logging.WARNING):
        names = {i.name: i for i in moe_core.list_backends()}
    assert names["ctor"].state == "failed" and isinstance(names["ctor"].error, OSError)
    assert names["half"].state == "failed" and "side" not in names
    hook = info_of("halfhook", plugins.HOOKS_GROUP)
    assert hook.state == "rejected" and isinstance(hook.error, PluginRegistrationError)
    assert "lora_index" in str(hook.error) and "moe-core-halfhook" in str(hook.error)
    hooks = plugins.global_hookset()
    assert hooks.after_down is None and hooks.after_gate_up is None
    registered = [n for n, _ in plugins._REGISTRY.hooks.list_name_plugin()]
    assert "moe-core:filter_expert" in registered and not [n for n in registered if "halfhook" in n]
    assert len(plugin_warnings(caplog)) == 3


@pytest.mark.parametrize("target, source, match", [
    ("mod:Plain", "class Plain:\n    name = 'bad'\n", "not a Backend subclass"),
    ("mod:INSTANCE", BACKEND_HEADER + "class B(TorchBackend):\n    name = 'bad'\nINSTANCE = B()\n",
     "got an instance of B"),
    ("mod:Other", BACKEND_HEADER + "class Other(TorchBackend):\n    name = 'other'\n", "whose name is 'other'"),
    ("mod:Old", BACKEND_HEADER + "class Old(TorchBackend):\n    name = 'bad'\n    api_version = 0\n",
     "plugin API version 0"),
])
def test_invalid_backend_entry_points_are_rejected(dists: DistFactory, target: str, source: str, match: str) -> None:
    dists.add("moe-core-bad", "0.1", backends={"bad": target}, modules={"mod": source})
    info = next(i for i in moe_core.list_backends() if i.name == "bad")
    assert info.state == "rejected" and isinstance(info.error, PluginRegistrationError)
    assert "'bad'" in str(info.error) and "moe-core-bad" in str(info.error)
    with pytest.raises(PluginRegistrationError, match=match) as err:
        moe_core.get_backend("bad")
    assert err.value.__cause__ is info.error
    assert moe_core.get_backend("torch").name == "torch"


def test_missing_attribute_is_a_load_failure(dists: DistFactory) -> None:
    dists.add("moe-core-typo", backends={"typo": "typo_be:TypoBackend"},
              modules={"typo_be": backend_module("TpyoBackend", "typo")})
    info = next(i for i in moe_core.list_backends() if i.name == "typo")
    assert info.state == "failed" and isinstance(info.error, AttributeError)
    assert "TypoBackend" in str(info.error)


@pytest.mark.parametrize("source, match", [
    ("@hookimpl\ndef moe_core_after_down(down, lora_index):\n    pass\n",
     r"moe_core_after_down.*lora_index|lora_index.*moe_core_after_down"),
    ("@hookimpl\ndef moe_core_after_dwon(down):\n    pass\n", "unknown hook 'moe_core_after_dwon'"),
    ("def moe_core_after_down(down):\n    pass\n", "carries no @moe_core.hookimpl"),
    ("api_version = 99\n@hookimpl\ndef moe_core_after_down(down):\n    pass\n", "plugin API version 99"),
    ("class Lora:\n    @hookimpl\n    def moe_core_after_down(self, down):\n        pass\nLORA = Lora\n",
     "got class Lora; register an instance"),
])
def test_invalid_hook_plugins_are_rejected(dists: DistFactory, source: str, match: str,
                                           caplog: pytest.LogCaptureFixture) -> None:
    target = "badhook_mod:LORA" if "LORA" in source else "badhook_mod"
    dists.add("moe-core-badhook", "3.0", hooks={"badhook": target},
              modules={"badhook_mod": "from moe_core import hookimpl\n" + source})
    with caplog.at_level(logging.WARNING):
        info = info_of("badhook", plugins.HOOKS_GROUP)
    assert info.state == "rejected" and isinstance(info.error, PluginRegistrationError)
    message = str(info.error)
    assert "'badhook'" in message and "moe-core-badhook 3.0" in message
    assert re.search(match, message), message
    assert plugins.global_hookset().after_down is None          # nothing stayed registered
    assert [w for w in plugin_warnings(caplog) if "badhook" in w] == [plugin_warnings(caplog)[0]]


def test_one_name_in_two_distributions_names_both(dists: DistFactory, caplog: pytest.LogCaptureFixture) -> None:
    dists.add("moe-core-vendor-a", "1.0", backends={"npu": "npu_a:NpuBackend"},
              modules={"npu_a": backend_module("NpuBackend", "npu")})
    dists.add("moe-core-vendor-b", "2.0", backends={"npu": "npu_b:NpuBackend"},
              modules={"npu_b": backend_module("NpuBackend", "npu")})
    with caplog.at_level(logging.WARNING):
        info = next(i for i in moe_core.list_backends() if i.name == "npu")
    assert info.state == "rejected"
    assert "moe-core-vendor-a 1.0" in str(info.error) and "moe-core-vendor-b 2.0" in str(info.error)
    assert "npu_a" not in sys.modules and "npu_b" not in sys.modules     # neither was imported
    assert len(plugin_warnings(caplog)) == 1 and info in plugins.load_report()
    with pytest.raises(PluginRegistrationError, match="moe-core-vendor-a 1.0 and moe-core-vendor-b 2.0"):
        moe_core.get_backend("npu")
    assert plugins.select_backend(None, LAYER, moe_core.QuantSpec.none()).name == "torch"   # others unaffected


def test_priority_tie_is_an_error(dists: DistFactory) -> None:
    """Bug class 25: two backends claiming one platform at one priority; never "first wins"."""
    for name in ("alpha", "beta"):
        dists.add(f"moe-core-{name}", backends={name: f"{name}_be:B"},
                  modules={f"{name}_be": backend_module("B", name, priority=50)})
    with pytest.raises(PluginRegistrationError, match=r"'alpha' \(distribution moe-core-alpha\), 'beta'.*"
                                                      r"priority 50") as err:
        plugins.select_backend(None, LAYER, moe_core.QuantSpec.none())
    assert "MOE_CORE_BACKEND" in str(err.value)
    assert plugins.select_backend("beta", LAYER, moe_core.QuantSpec.none()).name == "beta"


def test_tie_only_counts_available_supporting_backends(dists: DistFactory) -> None:
    dists.add("moe-core-alpha", backends={"alpha": "alpha_be:B"},
              modules={"alpha_be": backend_module("B", "alpha", priority=50)})
    dists.add("moe-core-gone", backends={"gone": "gone_be:B"}, modules={"gone_be": backend_module(
        "B", "gone", priority=50, extra="    def is_available(self):\n        return False, 'no card'\n")})
    dists.add("moe-core-picky", backends={"picky": "picky_be:B"}, modules={"picky_be": backend_module(
        "B", "picky", priority=50, extra="    def supports(self, layer, quant):\n        return False, 'fp8 only'\n")})
    assert plugins.select_backend(None, LAYER, moe_core.QuantSpec.none()).name == "alpha"
    with pytest.raises(BackendUnavailableError, match="no card"):
        moe_core.get_backend("gone")
    with pytest.raises(UnsupportedConfigError, match="fp8 only"):
        plugins.select_backend("picky", LAYER, moe_core.QuantSpec.none())


def test_unknown_name_lists_every_backend_with_state_and_reason(dists: DistFactory) -> None:
    dists.add("moe-core-broken", "0.4", backends={"broken": "broken_be:B"},
              modules={"broken_be": "raise ImportError('libvendor.so: cannot open')\n"})
    with pytest.raises(BackendNotFoundError) as err:
        moe_core.get_backend("nope")
    message = str(err.value)
    assert "'nope'" in message
    for line in ("broken [failed] (distribution moe-core-broken 0.4): unavailable: failed: ImportError: "
                 "libvendor.so: cannot open",
                 "cuda [loaded] (distribution moe-core ",
                 "torch [loaded] (distribution moe-core "):
        assert line in message, message


# -- switches -----------------------------------------------------------------------


def test_allowlist_loads_only_named_plugins_and_warns_about_unknown(
        dists: DistFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    dists.add("moe-core-fake", backends={"fake": "fake_be:B"}, modules={"fake_be": backend_module("B", "fake")})
    dists.add("moe-core-hook", hooks={"myhook": "myhook_mod"},
              modules={"myhook_mod": "from moe_core import hookimpl\n@hookimpl\ndef moe_core_after_down(down):\n"
                                     "    pass\n"})
    monkeypatch.setenv("MOE_CORE_PLUGINS", "torch, filter_expert,nosuch")
    with caplog.at_level(logging.WARNING):
        states = {i.name: i.state for i in moe_core.list_backends()}
        plugins.load_report()
    assert states.pop("torch") == "loaded" and states.pop("fake") == "skipped"
    assert set(states.values()) == {"skipped"}                     # cuda and the other in-tree backends
    assert [(i.name, i.group) for i in plugins.load_report()] == [
        ("torch", plugins.BACKENDS_GROUP), ("filter_expert", plugins.HOOKS_GROUP)]
    assert "fake_be" not in sys.modules and "myhook_mod" not in sys.modules
    assert plugins.global_hookset().after_down is None
    warned = plugin_warnings(caplog)
    assert len(warned) == 1 and "'nosuch'" in warned[0] and "'torch'" not in warned[0]
    with pytest.raises(BackendUnavailableError, match="MOE_CORE_PLUGINS"):
        moe_core.get_backend("fake")


def test_autoload_disabled_loads_nothing(dists: DistFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    dists.add("moe-core-fake", backends={"fake": "fake_be:B"}, modules={"fake_be": backend_module("B", "fake")})
    monkeypatch.setenv("MOE_CORE_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert moe_core.list_backends() == [] and plugins.load_report() == []
    assert "fake_be" not in sys.modules
    assert plugins.global_hookset().map_expert_ids is None
    with pytest.raises(BackendNotFoundError, match="MOE_CORE_DISABLE_PLUGIN_AUTOLOAD"):
        moe_core.get_backend("torch")
    from moe_core.reference import TorchBackend

    moe_core.register_backend(TorchBackend)                   # code registration still works
    assert moe_core.get_backend("torch").name == "torch"
    with pytest.raises(PluginRegistrationError, match="already provided"):
        moe_core.register_backend(TorchBackend)


def test_strict_mode_makes_any_failure_fatal(dists: DistFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    dists.add("moe-core-broken", "0.4", backends={"broken": "broken_be:B"},
              modules={"broken_be": "raise ImportError('libvendor.so: cannot open')\n"})
    monkeypatch.setenv("MOE_CORE_STRICT_PLUGINS", "1")
    for _ in range(2):                                  # not half-loaded after the first failure
        with pytest.raises(PluginLoadError, match="'broken'.*moe-core-broken 0.4.*libvendor.so") as err:
            moe_core.list_backends()
        assert isinstance(err.value.__cause__, ImportError)
    monkeypatch.delenv("MOE_CORE_STRICT_PLUGINS")
    assert {i.name for i in moe_core.list_backends()} >= {"broken", "torch"}


def test_strict_mode_rejects_invalid_registration(dists: DistFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    dists.add("moe-core-badhook", hooks={"badhook": "badhook_mod"},
              modules={"badhook_mod": "from moe_core import hookimpl\n@hookimpl\ndef moe_core_aftr_down(down):\n"
                                      "    pass\n"})
    monkeypatch.setenv("MOE_CORE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="moe_core_aftr_down") as err:
        plugins.global_hookset()
    assert isinstance(err.value.__cause__, PluginRegistrationError)


# -- order and duplicate metadata ------------------------------------------------------


def test_order_does_not_depend_on_discovery_order(dists: DistFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    for i, name in enumerate(["delta", "alpha", "charlie", "bravo"]):
        dists.add(f"moe-core-{name}", backends={name: f"{name}_be:B"}, hooks={f"{name}_hook": f"{name}_be"},
                  modules={f"{name}_be": backend_module("B", name, priority=i) + (
                      "import moe_core\nSEEN = []\n@moe_core.hookimpl\n"
                      f"def moe_core_after_down(down):\n    SEEN.append({name!r})\n")})
    real = importlib.metadata.distributions
    observed = set()
    for seed in range(4):
        def shuffled(**kw):
            found = list(real(**kw))
            random.Random(seed).shuffle(found)
            return found

        monkeypatch.setattr(importlib.metadata, "distributions", shuffled)
        plugins.reset()
        report = tuple((i.group, i.name, i.distribution) for i in plugins.load_report())
        impls = plugins._REGISTRY.hooks.hook.moe_core_after_down.get_hookimpls()
        hook_order = tuple(impl.plugin_name for impl in impls)
        observed.add((report, hook_order))
    assert len(observed) == 1
    report, hook_order = observed.pop()
    mine = [n for g, n, d in report if g == plugins.BACKENDS_GROUP and d != "moe-core"]
    assert mine == ["alpha", "bravo", "charlie", "delta"]
    names = [n for g, n, _ in report if g == plugins.BACKENDS_GROUP]
    assert names == sorted(names)
    assert [g for g, _, _ in report] == sorted(g for g, _, _ in report)      # backends, then hooks
    assert hook_order == tuple(f"moe-core-{n}:{n}_hook" for n in ["alpha", "bravo", "charlie", "delta"])


def test_stale_egg_info_shadowing_the_real_distribution(dists: DistFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # real install: .dist-info 1.0; a stale .egg-info 0.9 of the same project earlier on sys.path
    modules = {"shadow_be": backend_module("B", "shadow")}
    real_meta = dists.add("moe_core-shadow", "1.0", backends={"shadow": "shadow_be:B"}, modules=modules, sub="site")
    stale_meta = dists.add("moe-core-shadow", "0.9", backends={"shadow": "shadow_be:B"}, egg_info=True, sub="src")
    assert sys.path.index(str(stale_meta.parent)) < sys.path.index(str(real_meta.parent))
    info = next(i for i in moe_core.list_backends() if i.name == "shadow")
    assert (info.state, info.version) == ("loaded", "0.9")      # what importlib.metadata.version() says
    assert importlib.metadata.version("moe-core-shadow") == "0.9"

    # discovery sees both copies, in any order: one distribution, not a name clash
    real = importlib.metadata.distributions
    names = [d.metadata["Name"] for d in real()]
    assert names.count("moe-core-shadow") + names.count("moe_core-shadow") == 2
    for reverse in (False, True):
        monkeypatch.setattr(importlib.metadata, "distributions",
                            lambda reverse=reverse, **kw: sorted(real(**kw), key=lambda d: str(d.locate_file("")),
                                                                 reverse=reverse))
        plugins.reset()
        info = next(i for i in moe_core.list_backends() if i.name == "shadow")
        assert (info.state, info.version) == ("loaded", "0.9")


def test_stale_copy_with_other_entry_points_contributes_nothing(dists: DistFactory) -> None:
    dists.add("moe-core-shadow", "1.0", backends={"shadow": "shadow_be:B"},
              modules={"shadow_be": backend_module("B", "shadow")}, sub="site")
    dists.add("moe-core-shadow", "0.9", backends={"old_name": "shadow_be:B"}, egg_info=True, sub="src")
    names = {i.name for i in moe_core.list_backends()}
    assert "old_name" in names and "shadow" not in names        # importlib's pick: the first on sys.path


def test_malformed_entry_points_txt_hides_only_its_own_plugins(dists: DistFactory,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Bug class 24: importlib.metadata.entry_points() raises for *every* group when one
    distribution's entry_points.txt is malformed; we read distributions one by one."""
    meta = dists.add("moe-core-mangled", "0.2")
    (meta / "entry_points.txt").write_text("[moe_core.backends]\nthis line has no equals sign\n")
    dists.add("moe-core-fake", backends={"fake": "fake_be:B"}, modules={"fake_be": backend_module("B", "fake")})
    with caplog.at_level(logging.WARNING):
        states = {i.name: i.state for i in moe_core.list_backends()}
    assert states["fake"] == states["torch"] == "loaded"
    bad = next(i for i in plugins.load_report() if i.distribution == "moe-core-mangled")
    assert (bad.name, bad.group, bad.state, bad.version) == ("entry_points.txt", "metadata", "failed", "0.2")
    warned = plugin_warnings(caplog)
    assert len(warned) == 1 and "moe-core-mangled 0.2" in warned[0]


def test_cli_backends_shows_third_party_and_broken_plugins(dists: DistFactory,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 2's done-when: a separate distribution shows up in ``moe-core backends``; a
    broken one is reported with its cause and does not stop the others."""
    from moe_core import cli

    dists.add("moe-core-fake", "2.3", backends={"fake": "fake_be:B"}, modules={"fake_be": backend_module("B", "fake")})
    dists.add("moe-core-broken", "0.4", backends={"broken": "broken_be:B"},
              modules={"broken_be": "raise ImportError('libvendor.so: cannot open shared object file')\n"})
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "yes" in rows["fake"] and "moe-core-fake 2.3" in rows["fake"]
    assert "failed" in rows["broken"] and "yes" in rows["torch"]
    assert "libvendor.so: cannot open shared object file" in out and "broken_be.py" in out   # cause + traceback
