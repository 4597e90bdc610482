"""Tier H: the tuner's search loop on CPU with a fake backend and a fake timer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from moe_core import config, config_files
from moe_core.backend import BASE_CONFIG_KEYS
from moe_core.errors import ConfigError
from moe_core.reference import TorchBackend
from moe_core.spec import QuantSpec
from moe_core.tune import TuneSpec, _default_config, search_space, tune

SPEC = TuneSpec(E=4, I=64, H=128, top_k=2, act_dtype=torch.float32)
FOLDER = config_files.triton_folder()


class FakeBackend(TorchBackend):
    """Torch GEMM that fails to "compile" some configs and computes others wrongly."""

    name = "faketune"
    config_keys = BASE_CONFIG_KEYS | {"USE_TMA"}

    def __init__(self, tma: bool = False, smem: int | None = None) -> None:
        self.tma, self.smem = tma, smem
        self.seen: list[dict[str, Any]] = []
        self.seen_up: list[dict[str, Any]] = []          # gemm1 launches (no routed weight)
        self.last: dict[str, Any] = {}

    def device_name(self) -> str:
        return "Fake_GPU"

    def has_tma(self) -> bool:
        return self.tma

    def shared_memory_limit(self) -> int | None:
        return self.smem

    @staticmethod
    def broken(cfg: dict[str, Any]) -> bool:
        return cfg.get("num_stages") == 4 and cfg["BLOCK_SIZE_N"] == 128

    @staticmethod
    def wrong(cfg: dict[str, Any]) -> bool:
        return cfg["BLOCK_SIZE_K"] == 64 and cfg.get("num_stages") == 3 and cfg["BLOCK_SIZE_N"] == 64

    def gemm(self, a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, *, config: dict[str, Any],
             **kw: Any) -> torch.Tensor:
        from triton.runtime.errors import OutOfResources

        self.seen.append(dict(config))
        if not kw["mul_routed_weight"]:
            self.seen_up.append(dict(config))
        self.last = dict(config)
        if self.broken(config):
            raise OutOfResources(300000, 232448, "shared memory")
        if kw.pop("sorted_in", False):      # sorted mode (USE_TMA): row p of a is position p's slot
            ids = kw["sorted_token_ids"].long()
            valid = ids < out.shape[0]
            a_slot = a.new_zeros((out.shape[0], a.shape[1]))
            a_slot[ids[valid]] = a[: ids.shape[0]][valid]
            a = a_slot
        super().gemm(a, w, out, config=config, **kw)
        if self.wrong(config):
            out[0] += 1.0                                   # one tile silently wrong
        return out


def cost(cfg: dict[str, Any]) -> float:
    """Fake time: broken and wrong configs are the cheapest, so skipping them matters."""
    t = 10.0
    t -= 4.0 * FakeBackend.broken(cfg) + 3.0 * FakeBackend.wrong(cfg)
    t += cfg["BLOCK_SIZE_N"] / 64 + cfg.get("num_stages", 3) * 0.1 + cfg["BLOCK_SIZE_M"] * 0.01
    t += cfg["GROUP_SIZE_M"] * 0.001 + cfg.get("num_warps", 4) * 0.0001 - 2.0 * cfg.get("USE_TMA", False)
    return t


def fake_timer(backend: FakeBackend) -> Any:
    return lambda fn: cost(backend.last)


def expected_best(gemm: str, M: int, backend: FakeBackend, block_m: int | None = None) -> dict[str, Any]:
    """The cheapest correct candidate, or the backend's default config where that is cheaper."""
    cands = search_space(SPEC, gemm, M, fast=True, has_tma=backend.tma, block_m=block_m)
    cands.append(_default_config(backend, SPEC, gemm, M, block_m))
    ok = [c for c in cands if not FakeBackend.broken(c) and not FakeBackend.wrong(c)]
    return min(ok, key=cost)


def test_search_space_pruning() -> None:
    spec = TuneSpec(E=8, I=96, H=64, top_k=2, act_dtype=torch.bfloat16, scheme="fp8_w8a8", block_shape=(128, 64))
    small = search_space(spec, "up", 1)
    assert {c["BLOCK_SIZE_M"] for c in small} == {16}                # 1·2/8 slots per expert
    assert {c["BLOCK_SIZE_K"] for c in small} <= {32, 64}            # divides bk = 64, <= K = 64
    assert {c["GROUP_SIZE_M"] for c in small} == {1, 16}               # 2 slots: either block order
    assert {c["GROUP_SIZE_M"] for c in search_space(spec, "up", 1, fast=True)} == {1, 16}
    one_slot = TuneSpec(E=8, I=96, H=64, top_k=1, act_dtype=torch.bfloat16)
    assert {c["GROUP_SIZE_M"] for c in search_space(one_slot, "up", 1)} == {1}   # one block: no order
    # decode tiles reach down to 16 columns, so a few experts' weights spread over every SM
    assert min(c["BLOCK_SIZE_N"] for c in search_space(spec, "up", 1, fast=True)) == 16
    assert max(c["BLOCK_SIZE_N"] for c in small) == 256             # N_out = 192 -> up to 256
    # 16 ± 4 rows per expert at M = 64: a 32-row block holds all of them (weights streamed once)
    assert {c["BLOCK_SIZE_M"] for c in search_space(spec, "up", 64, fast=True)} == {16, 32}
    big = search_space(spec, "up", 4096)
    assert {c["BLOCK_SIZE_M"] for c in big} == {16, 32, 64, 128}
    assert {c["GROUP_SIZE_M"] for c in big} == {1, 16, 32, 64}
    assert all(c["num_warps"] == 4 for c in big if c["BLOCK_SIZE_M"] * c["BLOCK_SIZE_N"] < 8192)
    assert not any("USE_TMA" in c for c in big)
    assert not any("USE_TMA" in c for c in search_space(spec, "up", 4096, has_tma=True))
    down = search_space(spec, "down", 4096, has_tma=True, block_m=64)
    assert {c["BLOCK_SIZE_M"] for c in down} == {64}
    assert any(c.get("USE_TMA") for c in down) and any("USE_TMA" not in c for c in down)
    limited = search_space(spec, "up", 4096, smem_limit=64 * 1024)
    assert limited and all(config.estimate_shared_memory(c, 1, 1) <= 64 * 1024 for c in limited)
    assert len(limited) < len(big)
    fast = search_space(spec, "up", 4096, fast=True)
    assert 0 < len(fast) < len(big) // 4


def test_tune_picks_fastest_correct_candidate_and_writes_loadable_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = FakeBackend()
    results = tune(backend, SPEC, out_dir=tmp_path, batch_sizes=[64, 1, 4], fast=True,
                   timer=fake_timer(backend), progress=False)
    up_path = tmp_path / FOLDER / "E=4,N=64,device_name=Fake_GPU,dtype=float32.json"
    down_path = tmp_path / FOLDER / "E=4,N=64,device_name=Fake_GPU,dtype=float32_down.json"
    up, down = json.loads(up_path.read_text()), json.loads(down_path.read_text())
    assert list(up) == ["1", "4", "64"] and list(down) == ["1", "4", "64"]
    for M in (1, 4, 64):
        r = results["up"][M]
        assert up[str(M)] == r.config == expected_best("up", M, backend)
        assert r.skipped > 0 and r.wrong > 0 and r.tried == len(search_space(SPEC, "up", M, fast=True))
        cheaper_failures = [c for c in search_space(SPEC, "up", M, fast=True)
                            if cost(c) < r.time_ms]
        assert cheaper_failures and all(FakeBackend.broken(c) or FakeBackend.wrong(c) for c in cheaper_failures)
        bm = up[str(M)]["BLOCK_SIZE_M"]
        assert down[str(M)]["BLOCK_SIZE_M"] == bm                  # gemm2 keeps gemm1's alignment
        assert down[str(M)] == expected_best("down", M, backend, block_m=bm)
        assert r.default_ms is not None and r.default_config is not None
    timings = json.loads((tmp_path / "timings" / FOLDER / up_path.name).read_text())
    assert set(timings) == {"1", "4", "64"} and timings["64"]["time_ms"] == results["up"][64].time_ms
    # the normal lookup finds both files
    monkeypatch.setenv("MOE_CORE_CONFIG_DIR", str(tmp_path))
    res = config.resolve_configs(backend, M=50, E=4, I=64, H=128, top_k=2, act_dtype=torch.float32,
                                 quant=QuantSpec.none(), has_hooks=False)
    assert res.config == up["64"] and res.down_config == down["64"]
    assert res.why["gemm1"]["file"] == str(up_path) and res.why["gemm2"]["file"] == str(down_path)


@pytest.mark.parametrize("default_fastest", [True, False])
def test_default_config_kept_when_it_beats_every_candidate(tmp_path: Path, default_fastest: bool) -> None:
    """The fast space may miss the defaults' tile (fp8 at M = 128 on the H200 did): the table then
    holds the default, never something slower."""
    backend = FakeBackend()
    default = _default_config(backend, SPEC, "up", 64, None)
    assert default not in search_space(SPEC, "up", 64, fast=True)
    bonus = -100.0 if default_fastest else 100.0
    res = tune(backend, SPEC, out_dir=tmp_path, batch_sizes=[64], gemms=("up",), fast=True, progress=False,
               timer=lambda fn: cost(backend.last) + (bonus if backend.last == default else 0.0))
    r = res["up"][64]
    assert r.default_won is default_fastest
    assert (r.config == default) is default_fastest and r.time_ms <= r.default_ms
    table = json.loads((tmp_path / FOLDER / "E=4,N=64,device_name=Fake_GPU,dtype=float32.json").read_text())
    assert table["64"] == r.config


def test_tune_resumes_from_partial_file(tmp_path: Path) -> None:
    backend = FakeBackend()
    partial = {"1": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 1,
                     "num_warps": 4, "num_stages": 2}}
    path = tmp_path / FOLDER / "E=4,N=64,device_name=Fake_GPU,dtype=float32.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(partial))
    results = tune(backend, SPEC, out_dir=tmp_path, batch_sizes=[1, 4], gemms=("up",), fast=True,
                   timer=fake_timer(backend), progress=False)
    assert set(results["up"]) == {4}                                # M = 1 was not re-tuned
    body = json.loads(path.read_text())
    assert body["1"] == partial["1"] and body["4"] == expected_best("up", 4, backend)
    seen = len(backend.seen)
    again = tune(backend, SPEC, out_dir=tmp_path, batch_sizes=[1, 4], gemms=("up",), fast=True,
                 timer=fake_timer(backend), progress=False)
    assert again == {"up": {}} and len(backend.seen) == seen          # nothing left: nothing launched
    path.write_text('{"1": {"BLOCK_SIZE_M": 16')
    with pytest.raises(ConfigError, match="corrupt"):
        tune(backend, SPEC, out_dir=tmp_path, batch_sizes=[1, 8], gemms=("up",), fast=True,
             timer=fake_timer(backend), progress=False)


@pytest.mark.parametrize("tma", [False, True])
def test_tma_candidates_only_for_gemm2_with_descriptors(tmp_path: Path, tma: bool) -> None:
    spec = TuneSpec(E=2, I=32, H=64, top_k=1, act_dtype=torch.float32)
    backend = FakeBackend(tma=tma)
    tune(backend, spec, out_dir=tmp_path, batch_sizes=[128], fast=True, timer=fake_timer(backend), progress=False)
    up = json.loads((tmp_path / FOLDER / "E=2,N=32,device_name=Fake_GPU,dtype=float32.json").read_text())
    down = json.loads((tmp_path / FOLDER / "E=2,N=32,device_name=Fake_GPU,dtype=float32_down.json").read_text())
    assert "USE_TMA" not in up["128"]
    assert down["128"].get("USE_TMA", False) is tma                 # the fake timer favours TMA
    assert any(c.get("USE_TMA") for c in backend.seen) is tma
    assert backend.seen_up and not any(c.get("USE_TMA") for c in backend.seen_up)


def test_tune_block_quant_on_cpu(tmp_path: Path) -> None:
    """fp8 block weights: inputs quantized once, BLOCK_SIZE_K divides bk, output checked."""
    spec = TuneSpec(E=4, I=64, H=128, top_k=2, act_dtype=torch.float32, scheme="fp8_w8a8", block_shape=(64, 64))
    backend = FakeBackend()
    res = tune(backend, spec, out_dir=tmp_path, batch_sizes=[4], gemms=("up",), fast=True,
               timer=fake_timer(backend), progress=False)
    best = res["up"][4].config
    assert best is not None and 64 % best["BLOCK_SIZE_K"] == 0
    assert (tmp_path / FOLDER / "E=4,N=64,device_name=Fake_GPU,dtype=fp8_w8a8,block_shape=[64,64].json").exists()


def test_tune_fails_loudly_when_nothing_runs(tmp_path: Path) -> None:
    class Broken(FakeBackend):
        def gemm(self, *a: Any, **k: Any) -> torch.Tensor:
            raise RuntimeError("PassManager::run failed")

    with pytest.raises(ConfigError, match="no candidate of up at M=1"):
        tune(Broken(), SPEC, out_dir=tmp_path, batch_sizes=[1], gemms=("up",), fast=True,
             timer=lambda fn: 1.0, progress=False)
    assert not (tmp_path / FOLDER).exists() or not any((tmp_path / FOLDER).iterdir())


@pytest.mark.interp
def test_tune_through_the_triton_gemm_under_the_interpreter(tmp_path: Path) -> None:
    """The real grouped-GEMM step (interpreted on CPU) accepts every candidate the loop launches."""
    from moe_core.kernels.backend import TritonBackend

    if torch.cuda.is_available():
        pytest.skip("interpreter test: on a GPU machine TritonBackend tunes the GPU, not CPU tensors")

    spec = TuneSpec(E=2, I=16, H=32, top_k=2, act_dtype=torch.float16)
    res = tune(TritonBackend(), spec, out_dir=tmp_path, batch_sizes=[3], fast=True, timer=lambda fn: 1.0,
               progress=False)
    for gemm in ("up", "down"):
        r = res[gemm][3]
        assert r.config is not None and r.skipped == r.wrong == 0 and r.default_ms == 1.0
    up = json.loads((tmp_path / FOLDER / "E=2,N=16,device_name=cpu.json").read_text())
    down = json.loads((tmp_path / FOLDER / "E=2,N=16,device_name=cpu_down.json").read_text())
    assert up["3"] == res["up"][3].config and down["3"]["BLOCK_SIZE_M"] == up["3"]["BLOCK_SIZE_M"]


@pytest.mark.interp
@pytest.mark.parametrize("scheme", ["none", "fp8_w8a8"])
def test_tune_times_sorted_mode_through_the_triton_gemm2(tmp_path: Path, scheme: str) -> None:
    """With tensor descriptors, gemm2's ``USE_TMA`` candidates run the real kernel in sorted
    mode over the tuner's sorted input (fp8: gathered through a byte view) and every one of
    them matches the reference (a wrong gather would be counted in ``wrong``)."""
    from moe_core.kernels.backend import TritonBackend

    if torch.cuda.is_available():
        pytest.skip("interpreter test: on a GPU machine TritonBackend tunes the GPU, not CPU tensors")

    class Sorted(TritonBackend):
        def has_tma(self) -> bool:
            return True

    fp8 = scheme == "fp8_w8a8"
    spec = TuneSpec(E=2, I=128 if fp8 else 16, H=128 if fp8 else 32, top_k=2, act_dtype=torch.float16,
                    scheme=scheme, block_shape=(128, 128) if fp8 else None)
    res = tune(Sorted(), spec, out_dir=tmp_path, batch_sizes=[5], gemms=("down",), fast=True,
               timer=lambda fn: (fn(), 1.0)[1], progress=False)
    r = res["down"][5]
    cands = search_space(spec, "down", 5, fast=True, has_tma=True)
    assert any(c.get("USE_TMA") for c in cands)
    assert r.config is not None and r.skipped == r.wrong == 0 and r.tried == len(cands)


class FusingFake(FakeBackend):
    """Fuses the activation into gemm1 at ``BLOCK_SIZE_N == 64`` tiles; ``bad_act`` breaks the
    unfused activation step, ``bad_fused`` the fused epilogue."""

    name = "faketune-fused"

    def __init__(self, bad_act: bool = False, bad_fused: bool = False) -> None:
        super().__init__()
        self.bad_act, self.bad_fused = bad_act, bad_fused
        self.fused_launches = self.act_steps = 0

    def fuses_activation(self, layer: Any, quant: Any, config: dict[str, Any]) -> bool:
        return config["BLOCK_SIZE_N"] == 64

    def gemm(self, a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, *, config: dict[str, Any],
             activation: Any = None, **kw: Any) -> torch.Tensor:
        if activation is None:
            return super().gemm(a, w, out, config=config, **kw)
        assert self.fuses_activation(activation, None, config), "fused launch for a tile that does not fuse"
        self.fused_launches += 1
        gate_up = torch.empty((out.shape[0], w.shape[1]), dtype=out.dtype, device=out.device)
        super().gemm(a, w, gate_up, config=config, **kw)
        TorchBackend.activation(self, gate_up, out, activation, kw["sorted_token_ids"])
        if self.bad_fused:
            out[0] += 1.0
        return out

    def activation(self, gate_up: torch.Tensor, out: torch.Tensor, layer: Any, topk_ids: torch.Tensor) -> torch.Tensor:
        self.act_steps += 1
        super().activation(gate_up, out, layer, topk_ids)
        if self.bad_act:
            out[-1] -= 1.0
        return out


@pytest.mark.parametrize("broken", [None, "act", "fused"])
def test_gemm1_is_timed_and_checked_with_its_activation(tmp_path: Path, broken: str | None) -> None:
    """gemm1 candidates run as the forward runs them: the fused kernel where the backend fuses
    that tile, else the GEMM and the activation step; the checked output is ``act``, so a
    wrong activation (fused or not) rejects the candidate."""
    backend = FusingFake(bad_act=broken == "act", bad_fused=broken == "fused")
    res = tune(backend, SPEC, out_dir=tmp_path, batch_sizes=[8], gemms=("up",), fast=True,
               timer=fake_timer(backend), progress=False)[("up")][8]
    cands = search_space(SPEC, "up", 8, fast=True)
    fusing = [c for c in cands if c["BLOCK_SIZE_N"] == 64]
    assert fusing and len(fusing) < len(cands)
    assert backend.fused_launches >= len([c for c in fusing if not FakeBackend.broken(c)])
    assert backend.act_steps > 0
    picked = res.config
    if broken == "fused":
        assert picked["BLOCK_SIZE_N"] != 64
    elif broken == "act":
        assert picked["BLOCK_SIZE_N"] == 64      # every unfused candidate's act is wrong
    else:
        assert picked == expected_best("up", 8, backend)
    assert res.wrong >= {None: 0, "act": 1, "fused": 1}[broken]


@pytest.mark.interp
def test_tune_times_the_fused_triton_gemm1_under_the_interpreter(tmp_path: Path) -> None:
    """With the activation fused (every tile), the real fused kernel's ``act`` passes the check."""
    from moe_core.kernels.backend import TritonBackend

    class Fused(TritonBackend):
        name = "triton-fused-tune"
        fuse_activation = True

    spec = TuneSpec(E=2, I=16, H=32, top_k=2, act_dtype=torch.float16, activation="silu")
    res = tune(Fused(), spec, out_dir=tmp_path, batch_sizes=[3], gemms=("up",), fast=True,
               timer=lambda fn: 1.0, progress=False)["up"][3]
    assert res.config is not None and res.skipped == res.wrong == 0


def test_tuner_times_like_the_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tuner's GPU timer is the bench's (one call per CUDA graph, L2 flushed before each
    replay): timed back to back, a few small experts' weights stay in L2 and the tuner ranked
    tiles by a cache the forward never has."""
    import importlib

    from moe_core.tune import cuda_graph_timer

    calls = []

    def fake_time_graph(fn, reps=30, warm_s=0.05):
        calls.append((fn, reps, warm_s))
        return 2.5e-5

    # the module the tuner's import will find (sys.modules): an in-process pytester run elsewhere in
    # this worker restores sys.modules afterwards, so moe_core's ``timing`` attribute may be stale
    monkeypatch.setattr(importlib.import_module("moe_core.timing"), "time_graph", fake_time_graph)
    fn = lambda: None  # noqa: E731
    assert cuda_graph_timer(fn) == pytest.approx(0.025)          # milliseconds
    assert len(calls) == 1 and calls[0][0] is fn and calls[0][1] >= 10


@pytest.mark.gpu
def test_time_graph_flushes_l2_before_every_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_core import timing

    class Flush:
        count = 0

        def zero_(self) -> None:
            self.count += 1

    flush = Flush()
    monkeypatch.setattr(timing, "l2_flush_buffer", lambda: flush)
    x = torch.ones(1024, device="cuda")
    assert timing.time_graph(lambda: x.mul_(1.0), reps=7, warm_s=0.0) > 0
    assert flush.count == 7
