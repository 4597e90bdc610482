"""GPU robustness of the ``cuda`` backend across processes (TESTING.md §5 rows "cache race" and
"sanitizer"; bug class 15), each case in its own subprocess:

- four processes compiling the same kernels into one fresh ``TRITON_CACHE_DIR`` at once;
- ``compute-sanitizer`` (marker ``sanitizer``; not in the plain GPU run:
  ``bash tools/gpu_check.sh LOGDIR -m sanitizer``) on ten small cases, each in a subprocess.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch


pytestmark = pytest.mark.gpu


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
