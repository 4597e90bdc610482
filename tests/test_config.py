"""Tier H: kernel-config naming, lookup order, entry choice, memo and clamps (SEMANTICS §5)."""

from __future__ import annotations

import json
import logging
import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

import moe_core
from moe_core import config, config_files
from moe_core.backend import BASE_CONFIG_KEYS, Backend
from moe_core.config_files import FileKey, config_file_name, parse_file_name
from moe_core.errors import ConfigError
from moe_core.reference import TorchBackend
from moe_core.spec import QuantSpec

DEV = "Fake_GPU_80GB"
RUNNING = config_files.triton_folder()


def entry(bm: int = 16, bn: int = 32, bk: int = 64, gm: int = 1, warps: int = 4, stages: int = 3,
          **extra: Any) -> dict[str, Any]:
    return {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "GROUP_SIZE_M": gm,
            "num_warps": warps, "num_stages": stages, **extra}


def write(folder: Path, body: Any, *, name: str | None = None, **key: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fk = FileKey(**{"E": 8, "N": 64, "device_name": DEV, **key})
    path = folder / (name or config_file_name(fk))
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    return path


class FakeBackend(TorchBackend):
    """The torch backend with config dirs, a device name, TMA and a shared-memory limit."""

    name = "fakegpu"
    dirs: list[Any] = []
    tma = False
    smem: int | None = None
    device_aliases = ("Fake_GPU",)

    def device_name(self) -> str:
        return DEV.replace("_", " ")           # spaces become "_" in file names

    def config_dirs(self) -> list[Any]:
        return list(self.dirs)

    def has_tma(self) -> bool:
        return self.tma

    def shared_memory_limit(self) -> int | None:
        return self.smem


def make_backend(*dirs: Any, tma: bool = False, smem: int | None = None,
                 keys: frozenset[str] = BASE_CONFIG_KEYS) -> FakeBackend:
    b = FakeBackend()
    b.dirs, b.tma, b.smem = list(dirs), tma, smem
    b.config_keys = keys
    return b


def resolve(backend: Backend, M: int = 1, *, quant: QuantSpec | None = None, has_hooks: bool = False,
            act_dtype: torch.dtype = torch.float16, **kw: Any) -> config.Resolved:
    return config.resolve_configs(backend, M=M, E=8, I=64, H=32, top_k=2, act_dtype=act_dtype,
                                  quant=quant or QuantSpec.none(), has_hooks=has_hooks, **kw)


def fp8_block(bn: int = 128, bk: int = 128) -> QuantSpec:
    return QuantSpec.fp8_w8a8(torch.ones(8, 1, 1), torch.ones(8, 1, 1), block_shape=(bn, bk))


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# -- naming -------------------------------------------------------------------------------


def test_file_name_ours_and_round_trip() -> None:
    key = FileKey(E=256, N=256, device_name="NVIDIA H100 80GB HBM3", dtype="fp8_w8a8",
                  block_shape=(128, 128), per_channel=False, down=True)
    name = config_file_name(key)
    assert name == "E=256,N=256,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[128,128]_down.json"
    assert parse_file_name(name) == FileKey(E=256, N=256, device_name="NVIDIA_H100_80GB_HBM3",
                                            dtype="fp8_w8a8", block_shape=(128, 128), down=True)
    plain = config_file_name(FileKey(E=8, N=14336, device_name="X", per_channel=True))
    assert plain == "E=8,N=14336,device_name=X,per_channel_quant=True.json"
    # block_shape with a zero part is no block shape
    assert config_file_name(FileKey(E=1, N=2, device_name="X", block_shape=(0, 0))) == "E=1,N=2,device_name=X.json"


@pytest.mark.parametrize("dtype", [None, "float32", "fp8_w8a8", "int8_w8a16"])
@pytest.mark.parametrize("block, per_channel", [(None, False), ((128, 64), False), (None, True)])
@pytest.mark.parametrize("down", [False, True])
@pytest.mark.parametrize("device", ["NVIDIA_H100_80GB_HBM3", "", "AMD_Instinct_MI300X_down_x"])
def test_file_name_round_trip_every_part(dtype: str | None, block: Any, per_channel: bool, down: bool,
                                         device: str) -> None:
    key = FileKey(E=64, N=1408, device_name=device, dtype=dtype, block_shape=block, per_channel=per_channel,
                  down=down)
    assert parse_file_name(config_file_name(key)) == key


@pytest.mark.parametrize("name, expected", [
    ("E=8,N=64,device_name=X,dtype=fp8_w8a8,block_shape=[128, 128].json", (128, 128)),   # SGLang
    ("E=8,N=64,device_name=X,dtype=fp8_w8a8,block_shape=[128,128].json", (128, 128)),    # vLLM / ours
    ("E=8,N=64,device_name=,dtype=int8_w8a16.json", None),                              # empty device
])
def test_parse_accepts_other_spellings(name: str, expected: Any) -> None:
    key = parse_file_name(name)
    assert key is not None and key.block_shape == expected
    assert parse_file_name("E=8,N=64.json") is None and parse_file_name("README.md") is None


def test_write_table_rewrites_every_shipped_table_byte_for_byte(tmp_path: Path) -> None:
    """The one table writer (tuner, pick_tables, search_tables): batch sizes ascending, entry keys
    in ENTRY_KEY_ORDER, whatever order they come in; no temp file is left behind."""
    shipped = sorted((Path(__file__).parents[1] / "backends" / "cuda" / "configs").glob("triton_*/*.json"))
    assert shipped
    for path in shipped:
        body = json.loads(path.read_text())
        scrambled = {k: dict(reversed(list(v.items()))) for k, v in reversed(list(body.items()))}
        config_files.write_table(tmp_path / path.name, scrambled)
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({p.name for p in shipped})
    config_files.write_table(tmp_path / "t.json", {16: {"num_warps": 4, "BLOCK_SIZE_M": 16}, "2": {"x": 1},
                                                   "triton_version": "3.6.0"})
    assert list(json.loads((tmp_path / "t.json").read_text())) == ["triton_version", "2", "16"]
    assert list(json.loads((tmp_path / "t.json").read_text())["16"]) == ["BLOCK_SIZE_M", "num_warps"]


def test_sglang_spelling_found_by_lookup(tmp_path: Path) -> None:
    write(tmp_path / RUNNING, {"1": entry(bk=128)},
          name=f"E=8,N=64,device_name={DEV},dtype=fp8_w8a8,block_shape=[128, 128].json")
    r = resolve(make_backend(tmp_path), quant=fp8_block())
    assert r.why["gemm1"]["source"] == "file" and "[128, 128]" in r.why["gemm1"]["file"]
    assert r.why["gemm2"]["source"] == "up table (no _down file)"


def test_exact_device_then_alias_then_empty(tmp_path: Path) -> None:
    write(tmp_path, {"1": entry(bn=128)}, device_name="")
    write(tmp_path, {"1": entry(bn=64)}, device_name="Fake_GPU")
    assert resolve(make_backend(tmp_path)).config["BLOCK_SIZE_N"] == 64          # alias beats empty
    write(tmp_path, {"1": entry(bn=32)})
    config.clear_cache()
    assert resolve(make_backend(tmp_path)).config["BLOCK_SIZE_N"] == 32          # exact beats alias
    assert resolve(make_backend(tmp_path), device_name="Other").config["BLOCK_SIZE_N"] == 64   # aliases still
    no_alias = make_backend(tmp_path)
    no_alias.device_aliases = ()
    assert resolve(no_alias, device_name="Other").config["BLOCK_SIZE_N"] == 128


# -- lookup order ---------------------------------------------------------------------------


def test_env_dir_first_then_backend_dirs_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user, a, b = tmp_path / "user", tmp_path / "a", tmp_path / "b"
    write(a, {"1": entry(bn=64)})
    write(b, {"1": entry(bn=128)})
    backend = make_backend(a, b)
    assert resolve(backend).config["BLOCK_SIZE_N"] == 64
    write(user, {"1": entry(bn=256)})
    monkeypatch.setenv("MOE_CORE_CONFIG_DIR", str(user))
    r = resolve(backend)
    assert r.config["BLOCK_SIZE_N"] == 256 and r.why["gemm1"]["file"].startswith(str(user))


def test_missing_env_dir_warns_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    caplog: pytest.LogCaptureFixture) -> None:
    write(tmp_path / "shipped", {"1": entry(bn=64)})
    monkeypatch.setenv("MOE_CORE_CONFIG_DIR", str(tmp_path / "typo"))
    with caplog.at_level(logging.WARNING):
        for M in (1, 2):
            assert resolve(make_backend(tmp_path / "shipped"), M=M).config["BLOCK_SIZE_N"] == 64
    assert len([m for m in warnings_of(caplog) if "is not a directory" in m]) == 1


def test_triton_folders_exact_then_newest_then_root(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(tmp_path, {"1": entry(bn=16)})
    write(tmp_path / "triton_1_0_0", {"1": entry(bn=32)})
    write(tmp_path / "triton_1_10_0", {"1": entry(bn=64)})      # newer than 1_9_9 (numeric, not text)
    write(tmp_path / "triton_1_9_9", {"1": entry(bn=128)})
    backend = make_backend(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert resolve(backend).config["BLOCK_SIZE_N"] == 64
        resolve(backend, M=2)
    msgs = [m for m in warnings_of(caplog) if "another Triton version" in m]
    assert len(msgs) == 1 and "triton_1_10_0" in msgs[0]
    write(tmp_path / RUNNING, {"1": entry(bn=256)})
    config.clear_cache()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert resolve(backend).config["BLOCK_SIZE_N"] == 256
    assert not [m for m in warnings_of(caplog) if "another Triton version" in m]


def test_root_used_when_no_version_folder(tmp_path: Path) -> None:
    write(tmp_path, {"1": entry(bn=16)})
    (tmp_path / "triton_not_a_version").mkdir()
    r = resolve(make_backend(tmp_path))
    assert r.config["BLOCK_SIZE_N"] == 16 and r.why["gemm1"]["file"] == str(tmp_path / config_file_name(
        FileKey(E=8, N=64, device_name=DEV)))


def test_traversable_config_dir(tmp_path: Path) -> None:
    """Backends ship configs as package data, read through a Traversable (here a zip)."""
    archive = tmp_path / "pkg.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(f"configs/{RUNNING}/" + config_file_name(FileKey(E=8, N=64, device_name=DEV)),
                    json.dumps({"1": entry(bn=64), "64": entry(bm=64)}))
    root = zipfile.Path(archive) / "configs"
    r = resolve(make_backend(root), M=50)
    assert r.config["BLOCK_SIZE_M"] == 64 and r.why["gemm1"]["key"] == 64


def test_dtype_and_quant_parts_select_the_file(tmp_path: Path) -> None:
    write(tmp_path, {"1": entry(bn=16)})                                   # bf16/fp16
    write(tmp_path, {"1": entry(bn=32)}, dtype="float32")
    write(tmp_path, {"1": entry(bn=64, bk=128)}, dtype="fp8_w8a8", block_shape=(128, 128))
    b = make_backend(tmp_path)
    assert resolve(b).config["BLOCK_SIZE_N"] == 16
    assert resolve(b, act_dtype=torch.float32).config["BLOCK_SIZE_N"] == 32
    assert resolve(b, quant=fp8_block()).config["BLOCK_SIZE_N"] == 64
    per_tensor = QuantSpec.fp8_w8a8(torch.ones(8), torch.ones(8))
    assert resolve(b, quant=per_tensor).why["gemm1"]["source"] == "default"


# -- entry choice -----------------------------------------------------------------------------


@pytest.mark.parametrize("M, key", [(1, 1), (3, 2), (6, 4), (8, 8), (12, 8), (13, 16), (48, 32),
                                    (49, 64), (100000, 64)])
def test_nearest_key_ties_to_smaller(M: int, key: int) -> None:
    table = {64: 0, 16: 0, 1: 0, 8: 0, 4: 0, 32: 0, 2: 0}
    assert config.nearest_key(table, M) == key


def test_entry_nearest_to_M_from_unsorted_file(tmp_path: Path) -> None:
    body = '{"64": %s, "1": %s, "32": %s, "triton_version": "3.1.0"}' % (
        json.dumps(entry(bm=64)), json.dumps(entry(bm=16)), json.dumps(entry(bm=32)))
    write(tmp_path, body)
    b = make_backend(tmp_path)
    assert resolve(b, M=48).config["BLOCK_SIZE_M"] == 32                  # tie 32/64 -> 32
    assert resolve(b, M=49).config["BLOCK_SIZE_M"] == 64
    assert resolve(b, M=16).why["gemm1"]["key"] == 1                        # tie 1/32 -> 1


# -- _down files and BLOCK_SIZE_M -------------------------------------------------------------


def test_down_file_used_and_block_m_shared(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    up = write(tmp_path, {"1": entry(bm=32, bn=64)})
    down = write(tmp_path, {"1": entry(bm=64, bn=128)}, down=True)
    b = make_backend(tmp_path)
    with caplog.at_level(logging.WARNING):
        r = resolve(b)
        resolve(b, M=3)
    assert r.config == entry(bm=32, bn=64)
    assert r.down_config == entry(bm=32, bn=128)
    msgs = [m for m in warnings_of(caplog) if "BLOCK_SIZE_M" in m]
    assert len(msgs) == 1 and str(up) in msgs[0] and str(down) in msgs[0]
    assert r.why["gemm2"]["file"] == str(down)
    assert any("shared with gemm1" in n for n in r.why["gemm2"]["notes"])


def test_down_fallback_to_up_table_without_tma(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(tmp_path, {"1": entry(bn=64, USE_TMA=True)})
    b = make_backend(tmp_path, tma=True, keys=BASE_CONFIG_KEYS | {"USE_TMA"})
    with caplog.at_level(logging.WARNING):
        r = resolve(b)
        resolve(b, M=2)
    assert r.config == entry(bn=64) and r.down_config == entry(bn=64)
    assert len([m for m in warnings_of(caplog) if "_down" in m and "without TMA" in m]) == 1


def test_no_files_default_with_one_warning_per_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    b = make_backend(tmp_path)
    with caplog.at_level(logging.WARNING):
        for M in (1, 2, 300):
            r = resolve(b, M=M)
    assert r.config == config.default_heuristics(300, 8, None, None)
    assert r.why["gemm1"]["source"] == r.why["gemm2"]["source"] == "default"
    msgs = [m for m in warnings_of(caplog) if "no tuned config" in m]
    assert len(msgs) == 1 and f"E=8,N=64,device_name={DEV}.json" in msgs[0]


def test_up_default_down_file(tmp_path: Path) -> None:
    write(tmp_path, {"1": entry(bm=64, bn=128)}, down=True)
    r = resolve(make_backend(tmp_path))
    assert r.why["gemm1"]["source"] == "default" and r.why["gemm2"]["source"] == "file"
    assert r.down_config["BLOCK_SIZE_M"] == r.config["BLOCK_SIZE_M"] == 16


# -- whitelist, TMA, clamps ------------------------------------------------------------------


def test_whitelist_drops_unknown_keys_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, {"1": entry(SPLIT_K=1), "2": entry(SPLIT_K=1, waves_per_eu=2)})
    b = make_backend(tmp_path)
    with caplog.at_level(logging.WARNING):
        r1 = resolve(b, M=1)
        r2 = resolve(b, M=2)
        resolve(b, M=3)
    assert "SPLIT_K" not in r1.config and "SPLIT_K" not in r1.down_config
    assert r2.why["gemm1"]["dropped_keys"] == ("SPLIT_K", "waves_per_eu")
    msgs = [m for m in warnings_of(caplog) if "dropping config key" in m]
    assert len(msgs) == 2 and all(str(path) in m for m in msgs)
    assert any("'SPLIT_K'" in m for m in msgs) and any("'waves_per_eu'" in m for m in msgs)
    hip_like = make_backend(tmp_path, keys=BASE_CONFIG_KEYS | {"waves_per_eu"})
    assert resolve(hip_like, M=2).config["waves_per_eu"] == 2


@pytest.mark.parametrize("tma, hooks, expected", [(True, False, True), (True, True, False), (False, False, False)])
def test_use_tma_only_with_descriptors_and_no_hooks(tmp_path: Path, tma: bool, hooks: bool, expected: bool) -> None:
    write(tmp_path, {"1": entry(USE_TMA=True)})
    write(tmp_path, {"1": entry(USE_TMA=True)}, down=True)
    r = resolve(make_backend(tmp_path, tma=tma, keys=BASE_CONFIG_KEYS | {"USE_TMA"}), has_hooks=hooks)
    assert "USE_TMA" not in r.config                               # gemm1 never
    assert r.down_config.get("USE_TMA", False) is expected
    assert r.why["gemm1"]["dropped_keys"] == () and r.why["gemm2"]["dropped_keys"] == ()


def test_block_k_clamped_to_divisor_of_bk(tmp_path: Path) -> None:
    write(tmp_path, {"1": entry(bk=256)}, dtype="fp8_w8a8", block_shape=(128, 64))
    r = resolve(make_backend(tmp_path), quant=fp8_block(128, 64))
    assert r.config["BLOCK_SIZE_K"] == 64 and r.down_config["BLOCK_SIZE_K"] == 64
    with moe_core.override_config(entry(bk=128)):
        assert resolve(make_backend(), quant=fp8_block(128, 32)).config["BLOCK_SIZE_K"] == 32


def test_shared_memory_clamp_reduces_stages_first(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    big = entry(bm=128, bn=256, bk=64, stages=4)                # fp16: 4·(128·64 + 256·64)·2 = 196608 B
    write(tmp_path, {"1": big})
    with caplog.at_level(logging.WARNING):
        r = resolve(make_backend(tmp_path, smem=101376))        # sm86-class limit: 2 stages fit (98304 B)
        resolve(make_backend(tmp_path, smem=101376), M=2)
    assert r.config == {**big, "num_stages": 2}
    assert config.estimate_shared_memory(r.config, 2, 2) <= 101376
    msgs = [m for m in warnings_of(caplog) if "clamped" in m]
    assert len(msgs) == 2 and "gemm1" in msgs[0] and "gemm2" in msgs[1]      # one per GEMM, not per call
    assert any("shared memory" in n for n in r.why["gemm1"]["notes"])
    config.clear_cache()
    assert resolve(make_backend(tmp_path, smem=None)).config == big          # unknown limit: untouched
    assert resolve(make_backend(tmp_path, smem=232448)).config == big        # H100 limit: fits


def test_shared_memory_clamp_keeps_block_m_when_stages_are_not_enough(tmp_path: Path) -> None:
    write(tmp_path, {"1": entry(bm=128, bn=256, bk=128, stages=2)}, dtype="float32")
    r = resolve(make_backend(tmp_path, smem=32768), act_dtype=torch.float32)
    assert r.config["BLOCK_SIZE_M"] == r.down_config["BLOCK_SIZE_M"] == 128
    assert r.config["num_stages"] == 1 and r.config["BLOCK_SIZE_K"] == 16 and r.config["BLOCK_SIZE_N"] == 256
    assert config.estimate_shared_memory(r.config, 4, 4) <= 32768


def test_default_fp8_config_respects_low_shared_memory() -> None:
    """SEMANTICS §5.5 low-shared-memory rows, and the clamp keeps any default within the limit."""
    low = config.default_heuristics(4, 8, "fp8_w8a8", None, low_shared_memory=True)
    assert low == {"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 256, "GROUP_SIZE_M": 1,
                   "num_warps": 4, "num_stages": 4}
    quant = QuantSpec.fp8_w8a8(torch.ones(8), torch.ones(8))
    r = resolve(make_backend(smem=101376), M=4096, quant=quant)
    assert config.estimate_shared_memory(r.config, 1, 1) <= 101376
    assert r.config["BLOCK_SIZE_M"] == 128 and r.config["num_stages"] < 4


# -- override, deterministic -------------------------------------------------------------------


def test_override_restored_after_exception(tmp_path: Path) -> None:
    write(tmp_path, {"1": entry(bn=64)})
    b = make_backend(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with moe_core.override_config(entry(bm=32, bn=128)):
            r = resolve(b)
            assert r.config == entry(bm=32, bn=128) == r.down_config
            assert r.why["gemm1"]["source"] == "override_config"
            raise RuntimeError("boom")
    assert config.get_override() is None
    assert resolve(b).config["BLOCK_SIZE_N"] == 64


def test_override_rejects_bad_block_sizes() -> None:
    with pytest.raises(ConfigError, match="BLOCK_SIZE_N must be a power of two"):
        with moe_core.override_config(entry(bn=48)):
            pass
    with pytest.raises(ConfigError, match="lacks BLOCK_SIZE_K"):
        with moe_core.override_config({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 16}):
            pass


def test_deterministic_mode_skips_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, {"1": entry(bn=256)})
    monkeypatch.setenv("MOE_CORE_DETERMINISTIC", "1")
    for M in (1, 33, 4096):
        r = resolve(make_backend(tmp_path), M=M)
        assert r.config == r.down_config == config.default_heuristics(M, 8, None, None, deterministic=True)
        assert r.why["gemm1"]["source"] == "deterministic default"


# -- corrupt files, memo, threads ---------------------------------------------------------------


@pytest.mark.parametrize("body, match", [
    ('{"1": {"BLOCK_SIZE_M": 16,', "corrupt"),
    ("[1, 2]", "expected a JSON object"),
    ('{"1": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 24, "BLOCK_SIZE_K": 32}}', "BLOCK_SIZE_N"),
    ('{"1": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32}}', "BLOCK_SIZE_K"),
    ('{"triton_version": "3.1"}', "no batch-size entries"),
    ('{"1": [16, 32, 64]}', "must be an object"),
])
def test_corrupt_file_raises_config_error_naming_it(tmp_path: Path, body: str, match: str) -> None:
    path = write(tmp_path, body)
    b = make_backend(tmp_path)
    with pytest.raises(ConfigError, match=match) as info:
        resolve(b)
    assert str(path) in str(info.value)
    write(tmp_path, {"1": entry(bn=128)})                       # fixed: the failure was not memoised
    assert resolve(b).config["BLOCK_SIZE_N"] == 128


def test_memo_loads_once_and_clear_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, {"1": entry(bn=64), "8": entry(bn=128)})
    calls: list[Any] = []
    real = config_files.load_table
    monkeypatch.setattr(config_files, "load_table", lambda p: calls.append(p) or real(p))
    b = make_backend(tmp_path)
    assert [resolve(b, M=m).config["BLOCK_SIZE_N"] for m in (1, 8, 2, 1)] == [64, 128, 64, 64]
    assert len(calls) == 1                                       # up table once; no _down file
    r = resolve(b)
    r.config["BLOCK_SIZE_N"] = 999                               # callers get copies
    with pytest.raises(TypeError):
        r.why["gemm1"]["config"]["BLOCK_SIZE_N"] = 999            # the why record is read-only
    assert resolve(b).config["BLOCK_SIZE_N"] == 64 and resolve(b).why["gemm1"]["notes"] == ()
    config.clear_cache()
    resolve(b)
    assert len(calls) == 2


def test_sixteen_threads_one_key_one_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, {"1": entry(bn=64)})
    write(tmp_path, {"1": entry(bn=128)}, down=True)
    calls: list[Any] = []
    real = config_files.load_table
    gate = threading.Barrier(16)

    def slow_load(path: Any) -> Any:
        calls.append(path)
        threading.Event().wait(0.02)                             # widen the race window
        return real(path)

    monkeypatch.setattr(config_files, "load_table", slow_load)
    b = make_backend(tmp_path)
    results: list[config.Resolved] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            gate.wait()
            results.append(resolve(b))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 2                                       # one load per file (up, down)
    assert len(results) == 16
    assert all(r.config == results[0].config and r.down_config == results[0].down_config for r in results)
    assert results[0].down_config["BLOCK_SIZE_N"] == 128


# -- through the sequence -------------------------------------------------------------------------


def test_runner_plan_uses_tuned_file_and_explains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end on the torch backend: the tuned entry reaches the plan; output matches the oracle."""
    from moe_core.testing import assert_close_normalized, oracle_moe, tolerance_for

    monkeypatch.setenv("MOE_CORE_CONFIG_DIR", str(tmp_path))
    path = write(tmp_path, {"1": entry(bm=32, bn=16), "4": entry(bm=16, bn=16)}, device_name="cpu", E=4, N=16,
                 dtype="float32")
    layer = moe_core.MoELayer(num_local_experts=4, top_k=2, hidden_size=8, intermediate_size=16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=g) / 10
    w1 = torch.randn(4, 32, 8, generator=g) / 10
    w2 = torch.randn(4, 8, 16, generator=g) / 10
    weights_, ids = torch.softmax(torch.randn(3, 4, generator=g), -1).topk(2)
    runner = moe_core.MoERunner(layer, backend="torch")
    out = runner.run(x, moe_core.ExpertWeights(w1, w2), weights_, ids.to(torch.int32))
    plan = runner._last_plan
    assert dict(plan.config) == entry(bm=16, bn=16) and plan.block_m == 16   # M=3 -> key 4 (nearest)
    assert plan.why["gemm1"]["file"] == str(path)
    assert str(path) in runner.explain()
    ref = oracle_moe(x, w1, w2, weights_, ids)
    assert_close_normalized(out, ref, *tolerance_for(torch.float32))
