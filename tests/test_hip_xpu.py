"""The ``hip`` and ``xpu`` backends with their platform probes replaced (no AMD or Intel GPU here):
detection and selection, config keys and their way to the launch, default configs, fp8 dtype
choice and the e4m3fn → e4m3fnuz rule, the HIP K-padding rule, device naming. Their whole
forward runs in ``tests/test_conformance.py`` (interpreter)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

import moe_core
from moe_core import config as cfg
from moe_core import plugins
from moe_core.backends.cuda import CudaBackend
from moe_core.backends.hip import HipBackend, HipPlatform, e4m3fn_to_e4m3fnuz, pad_weight_k
from moe_core.backends.hip import backend as hip_module
from moe_core.backends.xpu import XpuBackend, XpuPlatform
from moe_core.backends.xpu import backend as xpu_module
from moe_core.errors import MoETypeError, PluginRegistrationError
from moe_core.kernels.backend import interpreting
from moe_core.testing import oracle_moe
from moe_core.testing.quantize_weights import quantize_layer
from moe_core.testing.strategies import softmax_topk
from moe_core.testing.tolerances import assert_close_quant

MI300X = HipPlatform("6.4.0", 1, "AMD Instinct MI300X", "gfx942")
MI355X = HipPlatform("7.0.0", 1, "AMD Instinct MI355X", "gfx950")
MI250 = HipPlatform("6.4.0", 1, "AMD Instinct MI250X/MI250", "gfx90a")
MAX1550 = XpuPlatform(True, 1, "Intel(R) Data Center GPU Max 1550")
LAYER = moe_core.MoELayer(num_local_experts=4, top_k=2, hidden_size=64, intermediate_size=32)


def hip(info: HipPlatform = MI300X) -> HipBackend:
    return HipBackend(probe=lambda: info)


def xpu(info: XpuPlatform = MAX1550) -> XpuBackend:
    return XpuBackend(probe=lambda: info)


# -- detection and selection ------------------------------------------------------------


def test_real_probes_say_no_here_with_a_reason() -> None:
    ok, reason = HipBackend().is_available()
    assert not ok and "ROCm" in reason
    ok, reason = XpuBackend().is_available()
    assert not ok and ("xpu" in reason.lower() or "Intel" in reason)


def test_probe_failure_is_recorded_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "hip", "6.4.0", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def broken() -> int:
        raise RuntimeError("hipErrorNoDevice")

    monkeypatch.setattr(torch.cuda, "device_count", broken)
    info = hip_module.probe()
    assert info.hip_version == "6.4.0" and "hipErrorNoDevice" in info.note
    ok, reason = HipBackend(probe=hip_module.probe).is_available()
    assert not ok and "hipErrorNoDevice" in reason


def test_cuda_says_no_on_a_rocm_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "hip", "6.4.0", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ok, reason = CudaBackend().is_available()
    assert not ok and "hip" in reason


@pytest.mark.parametrize("which", ["hip", "xpu"])
def test_selected_automatically_on_its_platform(which: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if which == "hip":
        monkeypatch.setattr(hip_module, "probe", lambda: MI300X)
        monkeypatch.setattr(torch.version, "hip", "6.4.0", raising=False)      # cuda says no
    else:
        monkeypatch.setattr(xpu_module, "probe", lambda: MAX1550)
    plugins.reset()
    chosen = plugins.select_backend(None, LAYER, moe_core.QuantSpec.none())
    assert chosen.name == which
    report = {i.name: i.available for i in moe_core.list_backends()}
    assert report[which][0] and not report["hip" if which == "xpu" else "xpu"][0]


def test_two_platforms_at_once_is_a_tie_not_first_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hip_module, "probe", lambda: MI300X)
    monkeypatch.setattr(xpu_module, "probe", lambda: MAX1550)
    plugins.reset()
    with pytest.raises(PluginRegistrationError, match="'hip'.*'xpu'|'xpu'.*'hip'"):
        plugins.select_backend(None, LAYER, moe_core.QuantSpec.none())
    assert plugins.select_backend("xpu", LAYER, moe_core.QuantSpec.none()).name == "xpu"


# -- fp8 dtype choice and the e4m3fn -> e4m3fnuz rule ----------------------------------------


def _fp8_quant() -> moe_core.QuantSpec:
    return moe_core.QuantSpec.fp8_w8a8(torch.ones(4), torch.ones(4))


def test_fp8_dtype_follows_the_gfx_arch() -> None:
    assert hip(MI300X).fp8_dtype == torch.float8_e4m3fnuz
    assert hip(MI355X).fp8_dtype == torch.float8_e4m3fn
    assert hip(MI300X).supports(LAYER, _fp8_quant()) == (True, "")
    ok, reason = hip(MI250).supports(LAYER, _fp8_quant())
    assert not ok and "gfx90a" in reason
    ok, reason = xpu().supports(LAYER, _fp8_quant())
    assert not ok and "fp8" in reason
    assert xpu().supports(LAYER, moe_core.QuantSpec.none()) == (True, "")


def test_e4m3fnuz_bits_are_half_the_e4m3fn_value_for_every_pattern() -> None:
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    fn = bits.view(torch.float8_e4m3fn).float()
    fnuz = bits.view(torch.float8_e4m3fnuz).float()
    ordinary = ~torch.isnan(fn) & (bits != 0x80)
    assert int(ordinary.sum()) == 253                              # all but -0 and the two NaNs
    assert torch.equal(fnuz[ordinary], fn[ordinary] / 2)
    w, s, a = e4m3fn_to_e4m3fnuz(fn.to(torch.float8_e4m3fn)[~torch.isnan(fn)], torch.tensor([0.5]),
                                 torch.tensor([0.25]))
    assert w.dtype == torch.float8_e4m3fnuz and not torch.isnan(w.float()).any()   # -0 became +0
    assert torch.equal(w.float() * s, fn[~torch.isnan(fn)] * 0.5)                   # values kept
    assert (s.item(), a.item()) == (1.0, 0.5)
    with pytest.raises(MoETypeError, match="float8_e4m3fn"):
        e4m3fn_to_e4m3fnuz(w, s)


@pytest.mark.interp
def test_converted_e4m3fn_checkpoint_gives_the_same_layer_output() -> None:
    """An e4m3fn checkpoint converted for gfx942 computes the original layer (a missing
    × 2 on the scales would halve every output)."""
    if not interpreting():
        pytest.skip("runs the HIP backend under the Triton interpreter only")
    backend = hip(MI300X)
    M, E, k, H, I = 5, 4, 2, 64, 32
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(M, H, generator=gen) / 10).half()
    w1, w2 = torch.randn(E, 2 * I, H, generator=gen) / 10, torch.randn(E, H, I, generator=gen) / 10
    tw, ti = softmax_topk(M, E, k)
    q1, q2, quant = quantize_layer(w1, w2, "fp8_w8a8", fp8_dtype=torch.float8_e4m3fn)
    converted = backend.convert_fp8_weights(moe_core.ExpertWeights(q1, q2, quant=quant))
    assert converted.w1.dtype == torch.float8_e4m3fnuz and torch.equal(converted.quant.w1_scale, quant.w1_scale * 2)
    out = moe_core.MoERunner(LAYER, backend=backend).run(x, converted, tw, ti)
    ref = oracle_moe(x, q1, q2, tw, ti, quant=quant, round_intermediate=torch.float16,
                     fp8_dtype=torch.float8_e4m3fnuz)
    assert_close_quant(out, ref, quant)
    assert backend.convert_fp8_weights(converted) is converted                   # already fnuz: unchanged


# -- the K-padding rule ----------------------------------------------------------------------


def test_k_padding_rule_covers_w8a8_without_blocks_only() -> None:
    b = hip()
    one = torch.ones(4)
    assert b.needs_k_padding(moe_core.QuantSpec.fp8_w8a8(one, one))
    assert b.needs_k_padding(moe_core.QuantSpec.int8_w8a8(torch.ones(4, 64), torch.ones(4, 64), per_channel=True))
    assert not b.needs_k_padding(moe_core.QuantSpec.fp8_w8a8(torch.ones(4, 1, 1), torch.ones(4, 1, 1),
                                                             block_shape=(128, 128)))
    assert not b.needs_k_padding(moe_core.QuantSpec.int8_w8a16(torch.ones(4, 64), torch.ones(4, 64)))
    assert not b.needs_k_padding(moe_core.QuantSpec.none())


def test_pad_weight_k_keeps_values_and_pads_the_row_stride() -> None:
    w = torch.randn(3, 5, 64).to(torch.float8_e4m3fnuz)
    p = pad_weight_k(w)
    assert p.shape == w.shape and p.stride() == (5 * 192, 192, 1)
    assert torch.equal(p.view(torch.uint8), w.view(torch.uint8))
    base = torch.as_strided(p, (3, 5, 192), (5 * 192, 192, 1))
    assert not base[..., 64:].float().any()                                     # the padding is zeros


@pytest.mark.interp
def test_padded_fp8_weights_run_through_strides() -> None:
    if not interpreting():
        pytest.skip("runs the HIP backend under the Triton interpreter only")
    backend = hip(MI300X)
    M, E, k, H, I = 5, 4, 2, 64, 32
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(M, H, generator=gen) / 10).half()
    w1, w2 = torch.randn(E, 2 * I, H, generator=gen) / 10, torch.randn(E, H, I, generator=gen) / 10
    tw, ti = softmax_topk(M, E, k, seed=1)
    q1, q2, quant = quantize_layer(w1, w2, "fp8_w8a8", per_channel=True, fp8_dtype=backend.fp8_dtype)
    padded = backend.pad_weights(moe_core.ExpertWeights(q1, q2, quant=quant))
    assert padded.w1.stride(1) == H + 128 and padded.w2.stride(1) == I + 128
    out = moe_core.MoERunner(LAYER, backend=backend).run(x, padded, tw, ti)
    ref = oracle_moe(x, q1, q2, tw, ti, quant=quant, round_intermediate=torch.float16, fp8_dtype=backend.fp8_dtype)
    assert_close_quant(out, ref, quant)


# -- config keys, defaults, naming -------------------------------------------------------------


def test_config_key_whitelists() -> None:
    base = {"BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages"}
    assert set(hip().config_keys) == base | {"waves_per_eu", "matrix_instr_nonkdim", "kpack"}
    assert set(xpu().config_keys) == base | {"grf_mode"}
    assert not hip().has_tma() and not xpu().has_tma()
    assert hip().shared_memory_limit() is None and xpu().shared_memory_limit() is None


def _write_table(folder: Path, name: str, entry: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps({"1": entry, "64": entry}))


_TILE = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1, "num_warps": 4,
         "num_stages": 2, "waves_per_eu": 2, "matrix_instr_nonkdim": 16, "kpack": 2, "grf_mode": "large",
         "SPLIT_K": 1}


@pytest.mark.parametrize("which, device_file, kept, dropped", [
    ("hip", "AMD_Instinct_MI300X", {"waves_per_eu", "matrix_instr_nonkdim", "kpack"}, {"grf_mode", "SPLIT_K"}),
    ("hip-alias", "gfx942", {"waves_per_eu", "matrix_instr_nonkdim", "kpack"}, {"grf_mode", "SPLIT_K"}),
    ("xpu", "Intel(R)_Data_Center_GPU_Max_1550", {"grf_mode"},
     {"waves_per_eu", "matrix_instr_nonkdim", "kpack", "SPLIT_K"}),
])
def test_tuned_files_by_device_name_and_whitelisted_keys(which: str, device_file: str, kept: set, dropped: set,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    backend = xpu() if which == "xpu" else hip()
    name = f"E=4,N=32,device_name={device_file}.json"
    _write_table(tmp_path, name, _TILE)
    monkeypatch.setenv("MOE_CORE_CONFIG_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        res = cfg.resolve_configs(backend, M=3, E=4, I=32, H=64, top_k=2, act_dtype=torch.float16,
                                  quant=moe_core.QuantSpec.none(), has_hooks=False)
    assert res.why["gemm1"]["file"].endswith(name)
    assert kept <= set(res.config) and not dropped & set(res.config)
    assert set(res.why["gemm1"]["dropped_keys"]) == dropped
    assert all(any(key in r.getMessage() for r in caplog.records) for key in dropped)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")      # the spied GEMM leaves gate_up unwritten
def test_backend_keys_reach_the_kernel_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whitelisted compile options are passed to the Triton launch (spy on the kernel)."""
    from moe_core.kernels import _gemm

    if not interpreting():
        pytest.skip("the other steps of the pretend device run under the Triton interpreter only")
    seen: dict = {}

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.update(kwargs)
            return launch

    monkeypatch.setattr(_gemm, "_grouped_gemm_kernel", Spy())
    x = torch.randn(3, 64).half()
    w1, w2 = torch.randn(4, 64, 64).half(), torch.randn(4, 64, 32).half()
    tw, ti = softmax_topk(3, 4, 2)
    with moe_core.override_config({k: v for k, v in _TILE.items() if k != "SPLIT_K"}):
        moe_core.fused_experts(x, w1, w2, tw, ti, backend=hip())
    assert {"waves_per_eu": 2, "matrix_instr_nonkdim": 16, "kpack": 2, "num_stages": 2}.items() <= seen.items()
    assert "grf_mode" not in seen
    seen.clear()
    with moe_core.override_config({k: v for k, v in _TILE.items() if k != "SPLIT_K"}):
        moe_core.fused_experts(x, w1, w2, tw, ti, backend=xpu())
    assert seen.get("grf_mode") == "large" and "waves_per_eu" not in seen


@pytest.mark.parametrize("M, E, block, stages", [(256, 8, None, 2), (4, 8, None, 2), (4, 8, (128, 128), 2)])
def test_hip_defaults_use_two_stages_on_fp8_rows(M: int, E: int, block, stages: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    b = hip()
    got = b.default_config(M, E, 128, 128, 2, "fp8_w8a8", block)
    shared = cfg.default_heuristics(M, E, "fp8_w8a8", block)
    assert got == {**shared, "num_stages": stages}
    # never the CUDA low-shared-memory rows, whatever the device reports
    monkeypatch.setattr(HipBackend, "shared_memory_limit", lambda self: 64 * 1024)
    assert b.default_config(M, E, 128, 128, 2, "fp8_w8a8", block) == got
    assert b.default_config(M, E, 128, 128, 2, None, None) == cfg.default_heuristics(M, E, None, None)
    assert "num_stages" not in b.default_config(M, E, 128, 128, 2, "fp8_w8a8", block, deterministic=True)


def test_xpu_defaults_large_grf_for_big_tiles() -> None:
    b = xpu()
    big = b.default_config(256, 8, 128, 128, 2, None, None)                     # 64 x 64 tile
    small = b.default_config(4, 8, 128, 128, 2, None, None)                     # 16 x 32 tile
    assert big == {**cfg.default_heuristics(256, 8, None, None), "grf_mode": "large"}
    assert small == cfg.default_heuristics(4, 8, None, None)
    assert "grf_mode" not in b.default_config(256, 8, 128, 128, 2, None, None, deterministic=True)


def test_device_naming_for_config_files() -> None:
    assert hip().device_name() == "AMD_Instinct_MI300X" and hip().device_aliases == ("gfx942",)
    assert hip(HipPlatform("6.4.0", 1, "", "gfx942")).device_name() == "gfx942"
    assert hip(HipPlatform("6.4.0", 1, "", "gfx942")).device_aliases == ()
    assert xpu().device_name() == "Intel(R)_Data_Center_GPU_Max_1550"
    res = cfg.resolve_configs(hip(), M=3, E=4, I=32, H=64, top_k=2, act_dtype=torch.float16,
                              quant=_fp8_quant(), has_hooks=False)
    assert res.why["lookup"]["up_file_name"] == "E=4,N=32,device_name=AMD_Instinct_MI300X,dtype=fp8_w8a8.json"


def test_core_never_branches_on_a_platform_name() -> None:
    """Platform differences are data and predicates of the backends, not ``if`` in moe_core/."""
    pattern = re.compile(r"""(name|platform|device_name\(\))\s*(==|!=|in)\s*[\(\[]?\s*["'](cuda|hip|rocm|xpu)["']""")
    core = Path(moe_core.__file__).parent
    hits = [f"{p.relative_to(core)}:{i}" for p in core.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, f"platform-name branches in moe_core/: {hits}"
