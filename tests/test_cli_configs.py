"""``moe-core configs`` and ``moe-core tune`` on a CPU machine (no GPU needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_core import cli, config_files

H100 = "NVIDIA_H100_80GB_HBM3"


def entry(bm: int, bn: int = 64) -> dict[str, int]:
    return {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1, "num_warps": 4,
            "num_stages": 3}


def test_configs_without_gpu_says_which_h100_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["configs", "--model", "qwen3-30b-a3b", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert f"device {H100} (assumed" in out
    assert f"E=128,N=768,device_name={H100}.json" in out
    assert f"E=128,N=768,device_name={H100}_down.json" in out
    for tokens in ("1", "64", "4096"):
        assert any(line.split()[:2] == [tokens, "gemm1"] for line in out.splitlines())


def test_configs_shows_tuned_file_entry_and_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / config_files.triton_folder()
    folder.mkdir()
    up = folder / f"E=256,N=2048,device_name={H100},dtype=fp8_w8a8,block_shape=[128,128].json"
    down = folder / f"E=256,N=2048,device_name={H100},dtype=fp8_w8a8,block_shape=[128,128]_down.json"
    up.write_text(json.dumps({"1": entry(16), "64": entry(32), "4096": entry(64, 128)}))
    down.write_text(json.dumps({"1": {**entry(16), "SPLIT_K": 1}, "64": entry(64), "4096": entry(64)}))
    monkeypatch.setenv("MOE_CORE_CONFIG_DIR", str(tmp_path))
    argv = ["configs", "--model", "deepseek-v3", "--dtype", "fp8_w8a8", "--block-shape", "128, 128",
            "--tokens", "1,50,5000", "--device-name", H100]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert str(up) in out and str(down) in out and "(assumed" not in out
    rows = {(line.split()[0], line.split()[1]): line for line in out.splitlines()
            if line.split()[:1] in (["1"], ["50"], ["5000"])}
    assert rows[("50", "gemm1")].split()[2:4] == ["file", "64"]
    assert "BM=32" in rows[("50", "gemm1")] and "BM=32" in rows[("50", "gemm2")]     # shared BLOCK_SIZE_M
    assert "shared with gemm1" in rows[("50", "gemm2")]
    assert rows[("5000", "gemm1")].split()[3] == "4096" and "BN=128" in rows[("5000", "gemm1")]
    assert "dropped SPLIT_K" in rows[("1", "gemm2")]


def test_configs_torch_backend_and_unknown_backend(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["configs", "--model", "mixtral-8x7b", "--dtype", "float32", "--backend", "torch",
                     "--tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "backend torch; device cpu;" in out and "E=8,N=14336,device_name=cpu,dtype=float32.json" in out
    assert cli.main(["configs", "--model", "mixtral-8x7b", "--dtype", "float32", "--backend", "nope"]) == 2
    assert "no backend named 'nope'" in capsys.readouterr().err


def test_tune_refuses_without_the_device(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["tune", "--model", "qwen3-30b-a3b", "--dtype", "bfloat16", "--fast"]) == 2
    assert "not available here" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["configs", "--model", "qwen3-30b-a3b", "--dtype", "bfloat16", "--block-shape", "128"],
    ["configs", "--model", "qwen3-30b-a3b", "--dtype", "bfloat16", "--tokens", "1,x"],
    ["configs", "--model", "no-such-model", "--dtype", "bfloat16"],
    ["tune", "--model", "qwen3-30b-a3b", "--dtype", "int3"],
])
def test_bad_arguments_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2


def test_bench_untuned_backend_skips_shipped_tables() -> None:
    """``bench --compare-default`` times ``untuned(cuda)``: same device, no shipped tables."""
    import torch

    from moe_core import bench, config
    from moe_core.backends.cuda import CudaBackend
    from moe_core.spec import QuantSpec

    def resolve(backend: object) -> config.Resolved:
        return config.resolve_configs(backend, M=64, E=128, I=768, H=2048, top_k=8, act_dtype=torch.bfloat16,
                                      quant=QuantSpec.none(), has_hooks=False, device_name=H100)

    tuned = resolve(CudaBackend())
    assert tuned.why["gemm1"]["source"] == tuned.why["gemm2"]["source"] == "file"
    plain = bench.untuned(CudaBackend())
    assert isinstance(plain, CudaBackend) and plain.config_dirs() == [] and plain.name == "cuda"
    default = resolve(plain)
    assert default.why["gemm1"]["source"] == default.why["gemm2"]["source"] == "default"
    assert default.config == plain.default_config(64, 128, 2 * 768, 2048, 8, None, None)
    small, wide = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64}, {"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 256}
    cuda, none = CudaBackend(), QuantSpec.none()
    assert cuda.fuses_activation(None, none, small) and cuda.fuses_activation(None, none, wide)  # every tile
    capped = type("Capped", (CudaBackend,), {"fuse_activation_max_tile": 128 * 128})()
    assert capped.fuses_activation(None, none, small) and not capped.fuses_activation(None, none, wide)
    fused = bench.with_fused_activation(capped)                  # --compare-fused: same tables, every tile
    unfused = bench.with_fused_activation(capped, fused=False)   # ... and none
    assert isinstance(fused, CudaBackend) and isinstance(unfused, CudaBackend)
    assert fused.fuses_activation(None, none, small) and fused.fuses_activation(None, none, wide)
    assert not unfused.fuses_activation(None, none, small)
    assert resolve(fused).config == resolve(unfused).config == tuned.config


def test_bench_roofline_counts_the_experts_hit_and_the_activations() -> None:
    """The roofline of issue 5: bytes = weights of the experts hit + activations in and out,
    flops = 2·M·k·(H·N + I·H), time = the larger of bytes / bandwidth and flops / matmul rate."""
    from moe_core import bench
    from moe_core.presets import PRESETS

    layer = PRESETS["qwen3-30b-a3b"].layer()          # H 2048, I 768, gated (N = 1536), k 8
    per_expert = (1536 * 2048 + 2048 * 768) * 2        # bf16 w1 and w2 of one expert
    assert bench.roofline_bytes(1, layer, 8, 2.0, 2) == 8 * per_expert + 2 * 1 * 2048 * 2
    assert bench.roofline_bytes(64, layer, 100, 1.0, 2) == 100 * per_expert / 2 + 2 * 64 * 2048 * 2
    slow_mm = {"copy_bytes_per_s": 4e12, "mm_flops_per_s": 1e9}
    fast_mm = {"copy_bytes_per_s": 4e12, "mm_flops_per_s": 1e18}
    flops = 2 * 64 * 8 * (2048 * 1536 + 768 * 2048)
    assert bench.roofline(64, layer, 100, 2.0, 2, slow_mm) == flops / 1e9
    assert bench.roofline(64, layer, 100, 2.0, 2, fast_mm) == bench.roofline_bytes(64, layer, 100, 2.0, 2) / 4e12


def test_bench_fp8_weights_quantized_in_expert_chunks_equal_whole() -> None:
    """deepseek-v3's fp8 bench quantizes a few experts at a time (the whole of w1 at once ran out
    of memory on an H200); the chunks give exactly the weights and scales of one pass."""
    import torch

    from moe_core import bench
    from moe_core.testing.quantize_weights import quantize_w8a8

    g = torch.Generator().manual_seed(5)
    w1, w2 = torch.randn(5, 256, 384, generator=g), torch.randn(5, 384, 128, generator=g)
    chunked = bench.fp8_block_weights(w1, w2, chunk_elems=2 * 256 * 384)      # 2 experts of w1 per chunk
    for w, q, s in ((w1, chunked.w1, chunked.quant.w1_scale), (w2, chunked.w2, chunked.quant.w2_scale)):
        rq, rs = quantize_w8a8(w, torch.float8_e4m3fn, block_shape=(128, 128))
        assert q.dtype == torch.float8_e4m3fn and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
        assert torch.equal(s, rs)


@pytest.mark.parametrize("dtype", ["bfloat16", "fp8"])
def test_bench_table_file_names_are_the_shipped_tables(dtype: str) -> None:
    """The table scripts (pick_tables, search_tables) read and write the files the runner looks
    up for the bench's weights: each preset's H200 gemm1/gemm2 pair ships under these names, and
    each name parses back to that preset's key (fp8: block [128, 128])."""
    from moe_core import bench
    from moe_core.presets import PRESETS

    folder = Path(__file__).resolve().parents[1] / "backends" / "cuda" / "configs" / config_files.triton_folder((3, 6, 0))
    for model in bench.DEFAULT_MODELS:
        layer = PRESETS[model].layer()
        names = bench.table_file_names(layer, "NVIDIA H200", dtype)
        assert [(folder / n).is_file() for n in names] == [True, True], names
        keys = [config_files.parse_file_name(n) for n in names]
        assert [k.down for k in keys] == [False, True]
        assert all((k.E, k.N) == (layer.num_local_experts, layer.intermediate_size) for k in keys)
        assert all(k.block_shape == ((128, 128) if dtype == "fp8" else None) for k in keys)


def test_tune_table_marks_rows_where_the_default_won(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from moe_core import tune as _tune

    cfg = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1}

    def fake_tune(backend: object, spec: object, **kw: object) -> dict:
        return {"up": {64: _tune.GemmResult(M=64, config=cfg, time_ms=1.0, default_config=cfg, default_ms=1.0,
                                            tried=3, default_won=True),
                       1: _tune.GemmResult(M=1, config=cfg, time_ms=0.5, default_config=cfg, default_ms=1.0, tried=3)}}

    monkeypatch.setattr(_tune, "tune", fake_tune)
    argv = ["tune", "--model", "qwen3-30b-a3b", "--dtype", "bfloat16", "--backend", "torch", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    rows = {tuple(line.split()[:2]): line for line in capsys.readouterr().out.splitlines()}
    assert "no candidate beat it" in rows[("up", "64")]
    assert "no candidate beat it" not in rows[("up", "1")] and "2.00x" in rows[("up", "1")]
