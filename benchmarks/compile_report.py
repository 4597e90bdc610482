"""What the GPU would compile, read on a machine without one: registers, spills, shared
memory, software pipelining and Hopper MMA of every kernel one forward launches.

The forward runs on CPU tensors with every Triton launch intercepted: each launch's arguments
go through Triton's own JIT specialisation (pointer alignment, divisibility by 16) and the
kernel is compiled for the target GPU (default sm_90, the H100/H200) by Triton's own compiler
and its bundled ``ptxas``, and the cubin's resource usage read with the bundled ``cuobjdump``;
nothing runs. The kernels see what a CUDA launch would pass them (the wrappers'
interpreter-only fp32 paths are switched off)::

    python benchmarks/compile_report.py --model qwen3-30b-a3b --tokens 1,64,4096
    python benchmarks/compile_report.py --config '{"BLOCK_SIZE_M": 64, ...}'   # one config for both GEMMs
    python benchmarks/compile_report.py --digests before.json   # then after an edit: --digests after.json

Columns: ``regs`` per thread, ``spill`` bytes of local memory per thread (spills; should be 0), ``smem`` bytes of
shared memory (grows with ``num_stages`` when the K loop is pipelined), ``async`` whether the
loads are asynchronous copies (``cp.async`` or TMA: the pipeliner's mark), ``wgmma`` whether
the dot uses Hopper's warp-group MMA.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)          # real JIT functions, not the interpreter's

import torch  # noqa: E402
from _kernels import replace_kernels  # noqa: E402 - benchmarks/ is the script's folder


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def ptx_digest(ptx: str) -> str:
    """A digest of the PTX instructions alone (debug line info and labels dropped), so a
    refactor of a kernel's source can be shown to leave its machine code unchanged."""
    body = ptx[ptx.index("{"):] if "{" in ptx else ptx
    if ".section" in body:
        body = body[:body.index(".section")]
    lines = (line for line in body.splitlines()
             if not line.strip().startswith((".loc", ".file", "//", "$L__tmp")))   # $L__tmp: debug markers
    return hashlib.sha256(re.sub(r"\$L__\w+", "L", "\n".join(lines)).encode()).hexdigest()[:16]


def compile_launch(kernel: Any, args: tuple, kwargs: dict, capability: int) -> dict[str, Any]:
    """Compile ``kernel`` as ``kernel[grid](*args, **kwargs)`` would on a ``capability`` GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {"debug": False, "instrumentation_mode": "", **kwargs}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    src = triton.compiler.ASTSource(kernel, signature, constexprs, attrs)
    compiled = triton.compile(src, target=target, options=options.__dict__)
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        usage = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    finally:
        os.unlink(f.name)
    regs = re.search(r"REG:(\d+)", usage)
    spill = re.search(r"LOCAL:(\d+)", usage)
    return {"ptx": ptx_digest(ptx),
            "regs": int(regs.group(1)) if regs else None, "spill": int(spill.group(1)) if spill else 0,
            "smem": compiled.metadata.shared, "async": ("cp.async" in ptx) or ("cp.async.bulk" in ptx),
            "wgmma": "wgmma.mma_async" in ptx,
            "warps": options.num_warps, "stages": options.num_stages}


_LAUNCHES: list = []      # (name, kernel, args, kwargs) of the current forward


def record_forward(model: str, M: int, dtype: torch.dtype, config: dict | None, fp8: bool = False,
                   fuse: bool = False, pdl: bool = False, tma: bool = False) -> list:
    """The kernel launches of one forward of ``model`` at ``M`` tokens, as a CUDA run makes them."""
    import importlib

    import moe_core
    from moe_core.backends.cuda import CudaBackend
    from moe_core.presets import PRESETS

    launches = _LAUNCHES
    launches.clear()
    replace_kernels(lambda *launch: _LAUNCHES.append(launch))
    # the wrappers take CPU tensors for the interpreter and add its fp32 paths; a CUDA launch has none
    import moe_core.kernels._launch as launch_helpers
    import moe_core.kernels.gemm as gemm

    gemm._is_interpreter = lambda t: False
    launch_helpers.interpreting = lambda t: False
    for name in ("act", "moe_sum", "quantize"):
        importlib.import_module(f"moe_core.kernels.{name}").needs_fp32_store = lambda t: False
    for name in ("act", "align", "gemm", "moe_sum", "quantize"):     # as on an sm_90 device, or none
        importlib.import_module(f"moe_core.kernels.{name}").pdl_args = (
            (lambda t: {"PDL": True, "launch_pdl": True}) if pdl else (lambda t: {}))

    class Hopper(CudaBackend):
        """The cuda backend's configs and device facts as on an H100, on CPU tensors."""

        fuse_activation = fuse
        fuse_activation_max_tile = None      # --fuse: every tile, to read the fused kernel's cost

        def uses_weight_tma(self, config: Any, quant: Any, activation: Any) -> bool:
            return tma      # --tma: weight tiles through TMA at every tile

        def is_available(self) -> tuple[bool, str]:
            return True, ""

        def device_name(self) -> str:
            return "NVIDIA_H100_80GB_HBM3"

        def capability(self) -> tuple[int, int]:
            return (9, 0)

        def shared_memory_limit(self) -> int:
            return 232448

    preset = PRESETS[model]
    layer = preset.layer()
    E, H, I, N = layer.num_local_experts, layer.hidden_size, layer.intermediate_size, layer.gate_up_rows
    x = torch.zeros(M, H, dtype=dtype)
    tw, ti = moe_core.select_experts(torch.randn(M, E), top_k=layer.top_k)
    if fp8:   # block [128, 128] w8a8, scales of SEMANTICS §4.1
        f8 = torch.float8_e4m3fn
        weights = moe_core.ExpertWeights(
            torch.empty(E, N, H, dtype=f8), torch.empty(E, H, I, dtype=f8),
            quant=moe_core.QuantSpec.fp8_w8a8(torch.ones(E, -(-N // 128), -(-H // 128)),
                                              torch.ones(E, -(-H // 128), -(-I // 128)), block_shape=(128, 128)))
    else:
        weights = moe_core.ExpertWeights(torch.empty(E, N, H, dtype=dtype), torch.empty(E, H, I, dtype=dtype))
    runner = moe_core.MoERunner(layer, backend=Hopper())
    if config is not None:
        with moe_core.override_config(config):
            runner.run(x, weights, tw, ti)
    else:
        runner.run(x, weights, tw, ti)
    return list(launches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-30b-a3b")
    p.add_argument("--tokens", default="1,64,4096")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--fp8", action="store_true", help="fp8 w8a8 block [128,128] weights")
    p.add_argument("--fuse", action="store_true", help="the activation fused into gemm1 at every tile")
    p.add_argument("--tma", action="store_true", help="weight tiles through tensor descriptors (TMA)")
    p.add_argument("--pdl", action="store_true", help="kernels launched with programmatic dependent launch")
    p.add_argument("--capability", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    p.add_argument("--config", default=None, help="JSON config for both GEMMs instead of the tuned tables")
    p.add_argument("--digests", default=None,
                   help="write {kernel + constexprs: PTX digest} as JSON here (compare two trees' files "
                        "to show a kernel edit leaves the compiled code unchanged)")
    args = p.parse_args()
    config = json.loads(args.config) if args.config else None
    print(f"{'M':>6} {'kernel':<24} {'config':<44} {'regs':>4} {'spill':>5} {'smem':>6} async wgmma")
    seen: dict = {}
    for M in (int(t) for t in args.tokens.split(",")):
        for name, kernel, largs, lkwargs in record_forward(args.model, M, getattr(torch, args.dtype), config, args.fp8,
                                                           args.fuse, args.pdl, args.tma):
            meta = {k: v for k, v in lkwargs.items() if k.isupper() and k.startswith(("BLOCK", "GROUP", "FUSE", "PDL"))}
            meta.update({k: lkwargs[k] for k in ("num_warps", "num_stages") if k in lkwargs})
            key = (name, json.dumps(meta, sort_keys=True))
            if key not in seen:
                seen[key] = compile_launch(kernel, largs, lkwargs, args.capability)
            r = seen[key]
            cfg = " ".join(f"{k.replace('BLOCK_SIZE_', 'B').replace('GROUP_SIZE_M', 'GM')}={v}"
                           for k, v in meta.items())
            print(f"{M:>6} {name:<24} {cfg:<44} {r['regs']:>4} {r['spill']:>5} {r['smem']:>6} "
                  f"{'yes' if r['async'] else 'no':>5} {'yes' if r['wgmma'] else 'no':>5}")
            sys.stdout.flush()
    if args.digests:
        Path(args.digests).write_text(json.dumps({f"{name} {meta}": r["ptx"] for (name, meta), r in seen.items()},
                                                 indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
