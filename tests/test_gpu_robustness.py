"""GPU robustness of the ``cuda`` backend (TESTING.md §5 rows "core: each shipped config",
"determinism", "cache race", "overflow", "sanitizer"; bug classes 1, 12, 15).

- every distinct entry of the shipped tables forced once through ``override_config`` on a
  small case, against the torch backend (a tile config that silently writes zeros fails);
- deterministic mode: five repeats bitwise equal, and a token's output independent of M;
- four processes compiling the same kernels into one fresh ``TRITON_CACHE_DIR`` at once;
- the remaining overflow sizes of §7 (M·k·N past 2^31), sampled rows;
- ``compute-sanitizer`` (marker ``sanitizer``; not in the plain GPU run:
  ``bash tools/gpu_check.sh LOGDIR -m sanitizer``) on ten small cases, each in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import moe_core
from moe_core.testing import assert_close_normalized, tolerance_for

pytestmark = pytest.mark.gpu

DEV = "cuda"
ROOT = Path(__file__).resolve().parents[1]


def _data(M: int, H: int, I: int, E: int, k: int, seed: int, dtype=torch.bfloat16):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = (torch.randn(M, H, generator=g, device=DEV) / 10).to(dtype)
    w1 = (torch.randn(E, 2 * I, H, generator=g, device=DEV) / 10).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g, device=DEV) / 10).to(dtype)
    tw, ti = moe_core.select_experts(torch.randn(M, E, generator=g, device=DEV), top_k=k)
    return x, w1, w2, tw, ti


def _shipped_entries() -> list[dict]:
    """Distinct entries of the shipped tables of the running Triton version (all versions if none)."""
    from moe_core.config_files import triton_folder

    root = ROOT / "backends" / "cuda" / "configs"
    folder = root / triton_folder()
    files = sorted(folder.glob("*.json")) if folder.is_dir() else sorted(root.glob("*/*.json"))
    seen: dict[str, dict] = {}
    for path in files:
        for key, entry in json.loads(path.read_text()).items():
            if key.isdigit():
                cfg = {k: v for k, v in entry.items() if k != "USE_TMA"}
                seen.setdefault(json.dumps(cfg, sort_keys=True), cfg)
    return list(seen.values())


@pytest.mark.parametrize("cfg", _shipped_entries(), ids=lambda c: "-".join(str(v) for v in c.values()))
def test_every_shipped_config_computes(cfg: dict, nan_empty) -> None:
    x, w1, w2, tw, ti = _data(M=37, H=320, I=192, E=8, k=2, seed=21)
    with moe_core.override_config(cfg):
        out = moe_core.fused_experts(x, w1, w2, tw, ti, backend="cuda")
    ref = moe_core.fused_experts(x, w1, w2, tw, ti, backend="torch")
    assert_close_normalized(out, ref, *tolerance_for(torch.bfloat16), topk_ids=ti, config=cfg)


def test_deterministic_mode_bitwise_and_independent_of_M(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_CORE_DETERMINISTIC", "1")
    x, w1, w2, tw, ti = _data(M=4096, H=512, I=256, E=16, k=4, seed=22)
    first_rows = []
    for M in (1, 33, 4096):
        outs = [moe_core.fused_experts(x[:M], w1, w2, tw[:M], ti[:M], backend="cuda") for _ in range(5)]
        for again in outs[1:]:
            assert torch.equal(outs[0], again), f"M={M}: repeats differ"
        first_rows.append(outs[0][:1])
    assert torch.equal(first_rows[0], first_rows[1]) and torch.equal(first_rows[0], first_rows[2]), \
        "token 0's output depends on the batch size in deterministic mode"


_RACE_SCRIPT = textwrap.dedent("""
    import sys, torch, moe_core
    g = torch.Generator(device="cuda").manual_seed(5)
    x = (torch.randn(19, 256, generator=g, device="cuda") / 10).bfloat16()
    w1 = (torch.randn(8, 256, 256, generator=g, device="cuda") / 10).bfloat16()
    w2 = (torch.randn(8, 256, 128, generator=g, device="cuda") / 10).bfloat16()
    tw, ti = moe_core.select_experts(torch.randn(19, 8, generator=g, device="cuda"), top_k=2)
    outs = [moe_core.fused_experts(x, w1, w2, tw, ti, backend="cuda") for _ in range(20)]
    assert all(torch.equal(outs[0], o) for o in outs)
    torch.save(outs[0].cpu(), sys.argv[1])
""")


@pytest.mark.dist
def test_four_processes_share_a_fresh_triton_cache(tmp_path: Path) -> None:
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    script = tmp_path / "race.py"
    script.write_text(_RACE_SCRIPT)
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / f"out{i}.pt")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(4)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    outs = [torch.load(tmp_path / f"out{i}.pt") for i in range(4)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def _sampled_rows(M: int, n: int = 1024) -> torch.Tensor:
    g = torch.Generator().manual_seed(M)
    rows = torch.randperm(M, generator=g)[:n - 2]
    return torch.cat([torch.tensor([0, M - 1]), rows]).unique().to(DEV)


@pytest.mark.parametrize("M,H,I,k", [(70000, 4096, 2048, 8), (131072, 4096, 2048, 8), (40000, 7168, 2048, 8)])
def test_overflow_sizes(M: int, H: int, I: int, k: int) -> None:
    """M·k·N past 2^31 (and ``down`` past 2^31 elements at H = 7168): sampled rows, every row finite."""
    assert M * k * 2 * I > 2 ** 31
    x, w1, w2, tw, ti = _data(M, H, I, E=8, k=k, seed=23)
    out = moe_core.fused_experts(x, w1, w2, tw, ti, backend="cuda")
    assert torch.isfinite(out).all()
    rows = _sampled_rows(M)
    ref = moe_core.fused_experts(x[rows], w1, w2, tw[rows], ti[rows], backend="torch")
    assert_close_normalized(out[rows], ref, *tolerance_for(torch.bfloat16))
    del out, x, w1, w2
    torch.cuda.empty_cache()


_SANITIZE_SCRIPT = textwrap.dedent("""
    import sys, torch, moe_core
    from moe_core.testing.quantize_weights import quantize_layer
    M, scheme, dtype = int(sys.argv[1]), sys.argv[2], getattr(torch, sys.argv[3])
    g = torch.Generator().manual_seed(M)
    E, k, H, I = 8, 2, 256, 128
    x = (torch.randn(M, H, generator=g) / 10).to(dtype).cuda()
    w1 = (torch.randn(E, 2 * I, H, generator=g) / 10).cuda()
    w2 = (torch.randn(E, H, I, generator=g) / 10).cuda()
    tw, ti = moe_core.select_experts(torch.randn(M, E, generator=g), top_k=k)
    ti[0, 0] = -1
    if scheme == "none":
        weights = moe_core.ExpertWeights(w1.to(dtype), w2.to(dtype))
    else:
        kw = {"block_shape": (128, 128)} if scheme == "fp8_w8a8" else {"group_size": 64, "zero_point": True}
        q1, q2, quant = quantize_layer(w1, w2, scheme, **kw)
        weights = moe_core.ExpertWeights(q1, q2, quant=quant)
    layer = moe_core.MoELayer(num_experts=E, num_local_experts=E, top_k=k, hidden_size=H,
                              intermediate_size=I, activation="silu")
    out = moe_core.MoERunner(layer, backend="cuda").run(x, weights, tw.cuda(), ti.cuda())
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
""")


@pytest.mark.sanitizer
@pytest.mark.parametrize("tool,M,scheme,dtype", [
    ("memcheck", 1, "none", "bfloat16"), ("memcheck", 33, "none", "float16"),
    ("memcheck", 17, "fp8_w8a8", "bfloat16"), ("memcheck", 9, "int4_w4a16", "bfloat16"),
    ("memcheck", 300, "none", "bfloat16"), ("initcheck", 33, "none", "bfloat16"),
    ("initcheck", 17, "fp8_w8a8", "bfloat16"), ("racecheck", 33, "none", "bfloat16"),
    ("racecheck", 300, "none", "float16"), ("synccheck", 33, "none", "bfloat16"),
])
def test_compute_sanitizer(tool: str, M: int, scheme: str, dtype: str, tmp_path: Path) -> None:
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not Path(sanitizer).exists():
        pytest.skip("compute-sanitizer is not installed")
    script = tmp_path / "case.py"
    script.write_text(_SANITIZE_SCRIPT)
    args = [sanitizer, f"--tool={tool}"] + (["--padding=4096"] if tool == "memcheck" else [])
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "CUDA_LAUNCH_BLOCKING": "1"}
    run = subprocess.run(args + [sys.executable, str(script), str(M), scheme, dtype], env=env,
                         capture_output=True, text=True, timeout=900)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "ERROR SUMMARY: 0 errors" in log, log[-4000:]
