"""The conformance suite run against our backends and the third-party example (TESTING.md §10).

- ``torch`` through its entry point;
- ``hip`` and ``xpu`` with their platform probes replaced (a pretend MI300X / Intel Max),
  their whole forward under the Triton interpreter in fp32/fp16; the Triton sequence with the
  activation fused into gemm1, likewise;
- the ``moe-core-example`` distribution, as a ``.dist-info`` fixture and (``slow``) really
  installed with pip into a target folder, then run by ``pytest --moe-backend example``;
- under ``pytester``: a dummy backend passes; one that drops ``routed_scaling_factor`` fails
  with a readable message.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moe_core.kernels.backend import interpreting
from moe_core.testing.conformance import BackendConformanceTests

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "third_party_backend"


def _gfx942():
    from moe_core.backends.hip import HipPlatform

    return HipPlatform("6.4.0", 1, "AMD Instinct MI300X", "gfx942")


def _intel_max():
    from moe_core.backends.xpu import XpuPlatform

    return XpuPlatform(True, 1, "Intel(R) Data Center GPU Max 1550")


class TestTorchConformance(BackendConformanceTests):
    backend_name = "torch"


class _Interpreted(BackendConformanceTests):
    """A Triton backend on a pretend device: its whole forward on CPU under the interpreter."""

    dtypes = (torch.float32, torch.float16)
    num_tokens = 5
    activations = ("swiglu_oai", "relu2")

    def make_backend(self, config: pytest.Config):
        if not interpreting():
            pytest.skip("runs only under the Triton interpreter (TRITON_INTERPRET=1, no GPU)")
        return self.build()


@pytest.mark.interp
class TestHipConformance(_Interpreted):
    def build(self):
        from moe_core.backends.hip import HipBackend

        return HipBackend(probe=_gfx942)

    #: fp8 is what differs on HIP (e4m3fnuz); the other schemes run the same kernels as xpu's
    quant_cases = ("fp8-per-tensor", "fp8-per-channel", "fp8-block", "int8_w8a8-per-channel", "int4_w4a16-group")


@pytest.mark.interp
class TestXpuConformance(_Interpreted):
    def build(self):
        from moe_core.backends.xpu import XpuBackend

        return XpuBackend(probe=_intel_max)

    quant_cases = ("int8_w8a8-block", "int8_w8a16-per-channel", "int8_w8a16-group")


@pytest.mark.interp
class TestFusedActivationConformance(_Interpreted):
    """gemm1 with the activation in its epilogue (``TritonBackend.fuse_activation``): every
    activation and scheme; the hook cases run unfused, as a hook needs ``gate_up``."""

    activations = ("gelu", "swiglu_oai", "relu2")

    def build(self):
        from moe_core.kernels.backend import TritonBackend

        class FusedTriton(TritonBackend):
            name = "fused-triton"
            fuse_activation = True

        return FusedTriton()


# -- the example distribution, as a .dist-info fixture -------------------------------------


@pytest.fixture
def example_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``moe-core-example`` visible to ``importlib.metadata`` without installing it."""
    meta = tmp_path / "moe_core_example-0.1.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: moe-core-example\nVersion: 0.1.0\n")
    (meta / "entry_points.txt").write_text("[moe_core.backends]\nexample = moe_core_example:ExampleBackend\n")
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return meta


class TestExampleConformance(BackendConformanceTests):
    backend_name = "example"

    @pytest.fixture(autouse=True)
    def _installed(self, example_dist: Path) -> None:
        """The example distribution is on the path for every test of this class."""


def test_example_is_listed_and_selected_by_env(example_dist: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import moe_core

    info = {i.name: i for i in moe_core.list_backends()}["example"]
    assert (info.distribution, info.version, info.state) == ("moe-core-example", "0.1.0", "loaded")
    monkeypatch.setenv("MOE_CORE_BACKEND", "example")
    layer = moe_core.MoELayer(num_local_experts=2, top_k=1, hidden_size=16, intermediate_size=8)
    runner = moe_core.MoERunner(layer)
    assert runner.backend.name == "example"


def test_example_grouped_mm_path_matches_loop(example_dist: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``torch._grouped_mm`` path (CUDA in production) equals the loop; forced on CPU here."""
    import moe_core
    from moe_core_example import gemm

    from moe_core.testing.strategies import with_minus_one

    M, E, k, H, I = 6, 3, 2, 32, 16
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, H, generator=gen) / 10
    w1, w2 = torch.randn(E, 2 * I, H, generator=gen) / 10, torch.randn(E, H, I, generator=gen) / 10
    tw, ti = with_minus_one(M, E, k)
    layer = moe_core.MoELayer(num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I,
                              routed_scaling_factor=1.5)
    loop = moe_core.fused_experts(x, w1, w2, tw, ti, layer=layer, backend="example")
    monkeypatch.setattr(gemm, "_use_grouped_mm", lambda a, w: True)
    grouped = moe_core.fused_experts(x, w1, w2, tw, ti, layer=layer, backend="example")
    torch.testing.assert_close(grouped, loop, atol=1e-6, rtol=1e-5)
    assert grouped.abs().max() > 0


@pytest.fixture
def fresh_example_modules():
    """Forget ``moe_core_example`` modules imported from another copy, before and after."""
    def forget() -> None:
        for name in [m for m in sys.modules if m == "moe_core_example" or m.startswith("moe_core_example.")]:
            del sys.modules[name]

    forget()
    yield
    forget()


@pytest.mark.slow
def test_example_installs_and_passes_pytest_moe_backend(tmp_path: Path, pytester: pytest.Pytester,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture, fresh_example_modules) -> None:
    """A real install (pip, no index) of the example next to moe-core; ``moe-core backends``
    lists it, ``MOE_CORE_BACKEND`` selects it, ``pytest --moe-backend example`` passes."""
    import moe_core
    from moe_core import plugins
    from moe_core.cli import main

    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(target), str(EXAMPLE)],
                         capture_output=True, text=True, timeout=240)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert (target / "moe_core_example-0.1.0.dist-info" / "entry_points.txt").is_file()
    monkeypatch.syspath_prepend(str(target))
    importlib.invalidate_caches()
    plugins.reset()
    assert main(["backends"]) == 0
    listed = capsys.readouterr().out
    assert re.search(r"^example\s.*moe-core-example 0\.1\.0", listed, re.M), listed
    monkeypatch.setenv("MOE_CORE_BACKEND", "example")
    layer = moe_core.MoELayer(num_local_experts=2, top_k=1, hidden_size=16, intermediate_size=8)
    assert moe_core.MoERunner(layer).backend.name == "example"
    assert sys.modules["moe_core_example"].__file__.startswith(str(target))
    monkeypatch.delenv("MOE_CORE_BACKEND")
    result = pytester.runpytest("--moe-backend", "example", "-p", "no:cacheprovider",
                                "-k", "matches_oracle or scaling or hooks or bad_inputs")
    result.assert_outcomes(passed=8, skipped=8, deselected=9)         # skipped: quantized (unsupported)


# -- the plugin under pytester ----------------------------------------------------------------

_DUMMY = """
from moe_core.reference import TorchBackend


class DummyBackend(TorchBackend):
    name = "dummy"
    priority = -5


class DropScaleBackend(TorchBackend):
    name = "dropscale"
    priority = -6

    def combine(self, down, out, scale):
        out.copy_(down.float().sum(dim=1))      # forgets routed_scaling_factor (R4)
        return out
"""


@pytest.fixture
def dummy_dists(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(moe_core_dummy=_DUMMY)
    meta = pytester.path / "moe_core_dummy-1.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: moe-core-dummy\nVersion: 1.0\n")
    (meta / "entry_points.txt").write_text("[moe_core.backends]\ndummy = moe_core_dummy:DummyBackend\n"
                                           "dropscale = moe_core_dummy:DropScaleBackend\n")
    pytester.syspathinsert()
    return pytester


def test_plugin_dummy_backend_passes(dummy_dists: pytest.Pytester) -> None:
    result = dummy_dists.runpytest("--moe-backend", "dummy", "-p", "no:cacheprovider",
                                   "-k", "float32 or scaling or contract or minus_one or bad_inputs")
    result.assert_outcomes(passed=7, deselected=18)


def test_plugin_dropped_scaling_factor_fails_readably(dummy_dists: pytest.Pytester) -> None:
    result = dummy_dists.runpytest("--moe-backend", "dropscale", "-p", "no:cacheprovider", "-k", "scaling_factor")
    result.assert_outcomes(failed=3, deselected=22)
    result.stdout.fnmatch_lines(["*routed_scaling_factor=2.5 is not honoured by backend 'dropscale'*"
                                 "the output is 0.4 x the oracle's*0.4 means the factor was dropped*"])


def test_plugin_subclass_in_a_test_module(dummy_dists: pytest.Pytester) -> None:
    """The documented way: subclass the base class in one's own test module."""
    dummy_dists.makepyfile(test_mine=textwrap.dedent("""
        from moe_core.testing.conformance import BackendConformanceTests

        class TestDummyConformance(BackendConformanceTests):
            backend_name = "dummy"
    """))
    result = dummy_dists.runpytest("-p", "no:cacheprovider", "-k", "contract or empty")
    result.assert_outcomes(passed=2, deselected=23)


def test_plugin_unknown_backend_errors_with_the_roster(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--moe-backend", "nosuch", "-p", "no:cacheprovider", "-k", "contract")
    result.assert_outcomes(errors=1, deselected=24)
    result.stdout.fnmatch_lines(["*no backend named 'nosuch'*", "*torch*"])


def test_plugin_unavailable_backend_skips_with_reason(pytester: pytest.Pytester) -> None:
    if torch.cuda.is_available():
        pytest.skip("cuda is available here")
    result = pytester.runpytest("--moe-backend", "cuda", "-p", "no:cacheprovider", "-rs", "-k", "contract")
    result.assert_outcomes(skipped=1, deselected=24)
    result.stdout.fnmatch_lines(["*backend 'cuda' is not available here*"])


def test_plugin_is_registered_and_import_light() -> None:
    from importlib.metadata import distribution

    eps = {(ep.group, ep.name): ep.value for ep in distribution("moe-core").entry_points}
    assert eps[("pytest11", "moe_core")] == "moe_core.testing.plugin"
    assert eps[("moe_core.backends", "hip")] == "moe_core.backends.hip:HipBackend"
    assert eps[("moe_core.backends", "xpu")] == "moe_core.backends.xpu:XpuBackend"
    code = ("import sys, moe_core.testing.plugin; "
            "print(sorted(m for m in ('triton', 'moe_core.testing.conformance', 'moe_core.kernels.gemm', "
            "'moe_core.backends.hip', 'hypothesis') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
