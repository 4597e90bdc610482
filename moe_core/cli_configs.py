"""``moe-core configs`` and ``moe-core tune``: which kernel config each GEMM uses, and the tuner.

``configs`` works without the device: it instantiates the backend class from the load report
(no ``is_available`` check) and, for the ``cuda`` backend on a machine without a GPU, assumes
``NVIDIA_H100_80GB_HBM3`` (saying so) unless ``--device-name`` is given.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from moe_core.backend import Backend

__all__ = ["add_configs_parser", "add_tune_parser", "backend_instance", "DEFAULT_DEVICE_NAMES"]

logger = logging.getLogger("moe_core.cli")

#: device name assumed per backend when its device is absent (``configs`` only)
DEFAULT_DEVICE_NAMES = {"cuda": "NVIDIA_H100_80GB_HBM3"}
_GEMM_TITLES = {"gemm1": "gemm1 (gate/up)", "gemm2": "gemm2 (down)"}


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return values


def _block_shape(text: str) -> tuple[int, int]:
    values = _ints(text.strip("[]()"))
    if len(values) != 2 or not all(values):
        raise argparse.ArgumentTypeError(f"expected two positive integers 'bn,bk', got {text!r}")
    return values[0], values[1]


def backend_instance(name: str) -> tuple[Backend, bool, str]:
    """The backend called ``name`` from the load report, without requiring it to be available.

    :returns: ``(backend, available, reason)``; raises BackendNotFoundError / BackendUnavailableError
        when no such backend exists or its plugin failed to load.
    """
    from moe_core import plugins
    from moe_core.errors import BackendNotFoundError, BackendUnavailableError

    for info in plugins.list_backends():
        if info.name != name:
            continue
        if info.backend is None:
            raise BackendUnavailableError(
                f"backend {name!r} (distribution {info.distribution}) failed to load: "
                f"{type(info.error).__name__}: {info.error}") from info.error
        ok, reason = info.available
        return info.backend, ok, reason
    known = ", ".join(i.name for i in plugins.list_backends()) or "none"
    raise BackendNotFoundError(f"no backend named {name!r}; installed backends: {known}")


def _spec(args: argparse.Namespace) -> Any:
    from moe_core.presets import get_preset
    from moe_core.tune import TuneSpec

    return TuneSpec.from_preset(get_preset(args.model), args.dtype, block_shape=args.block_shape,
                                per_channel=args.per_channel, group_size=args.group_size, tp=args.tp)


def _format_config(cfg: dict[str, Any]) -> str:
    short = {"BLOCK_SIZE_M": "BM", "BLOCK_SIZE_N": "BN", "BLOCK_SIZE_K": "BK", "GROUP_SIZE_M": "GM",
             "num_warps": "warps", "num_stages": "stages"}
    return " ".join(f"{short.get(k, k)}={v}" for k, v in cfg.items())


def _cmd_configs(args: argparse.Namespace) -> int:
    from moe_core import config as _config
    from moe_core import config_files as files

    spec = _spec(args)
    backend, available, reason = backend_instance(args.backend)
    device_note = ""
    device = args.device_name
    if device is None:
        if available:
            device = backend.device_name()
        elif backend.name in DEFAULT_DEVICE_NAMES:
            device = DEFAULT_DEVICE_NAMES[backend.name]
            device_note = f" (assumed: backend unavailable here: {reason}; pass --device-name to change)"
        else:
            device = backend.device_name()
            device_note = f" (backend unavailable here: {reason}; pass --device-name)"
    device = device.replace(" ", "_")
    quant = spec.quant()
    roots = _config.search_roots(backend)
    env_dir = _config.envs.config_dir()
    print(f"model {args.model}: E={spec.E} k={spec.top_k} H={spec.H} I={spec.I} (per partition, tp={args.tp}); "
          f"dtype {args.dtype}" + (f", block_shape {list(spec.block_shape)}" if spec.block_shape else ""))
    print(f"backend {backend.name}; device {device}{device_note}; Triton folder {files.triton_folder()}")
    print("search order: " + ("$MOE_CORE_CONFIG_DIR unset; " if not env_dir else "")
          + (", ".join(str(r) for r in roots) if roots else "no directories"))
    rows = []
    for M in args.tokens:
        r = _config.resolve_configs(backend, M=M, E=spec.E, I=spec.I, H=spec.H, top_k=spec.top_k,
                                    act_dtype=spec.act_dtype, quant=quant, has_hooks=False, device_name=device)
        if M == args.tokens[0]:
            for gemm, name_key in (("gemm1", "up_file_name"), ("gemm2", "down_file_name")):
                rec = r.why[gemm]
                where = rec["file"] if rec["file"] else "not found: backend defaults"
                print(f"{_GEMM_TITLES[gemm]}: looks for {r.why['lookup'][name_key]}\n    -> {rec['source']}: {where}")
        for gemm in ("gemm1", "gemm2"):
            rec = r.why[gemm]
            entry = "-" if rec["key"] is None else str(rec["key"])
            notes = list(rec["notes"]) + ([f"dropped {', '.join(rec['dropped_keys'])}"] if rec["dropped_keys"] else [])
            rows.append((str(M), gemm, rec["source"], entry, _format_config(rec["config"]), "; ".join(notes)))
    header = ("tokens", "gemm", "source", "entry", "config", "notes")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print("entry = the batch-size key nearest to tokens (ties to the smaller); both GEMMs share BLOCK_SIZE_M")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from moe_core import config_files as files
    from moe_core import tune as _tune

    spec = _spec(args)
    backend, available, reason = backend_instance(args.backend)
    if not available:
        print(f"moe-core tune: backend {args.backend!r} is not available here: {reason}", file=sys.stderr)
        return 2
    batch_sizes = args.batch_sizes or list(_tune.DEFAULT_BATCH_SIZES)
    gemms = ("up", "down") if args.gemm == "both" else (args.gemm,)
    logging.getLogger("moe_core.tune").setLevel(logging.INFO)
    with logging_redirect_tqdm():
        results = _tune.tune(backend, spec, out_dir=args.out, batch_sizes=batch_sizes, gemms=gemms,
                             fast=args.fast, device_name=args.device_name, seed=args.seed)
    print(f"device {args.device_name or backend.device_name()}; torch {torch.__version__}; "
          f"Triton folder {files.triton_folder()}")
    print("gemm  tokens  tuned_ms  default_ms  speedup  tried  failed  wrong  config")
    for gemm, per_m in results.items():
        for M, res in sorted(per_m.items()):
            speed = f"{res.default_ms / res.time_ms:.2f}x" if res.default_ms and res.time_ms else "-"
            default = f"{res.default_ms:.4f}" if res.default_ms is not None else "-"
            print(f"{gemm:<5} {M:>6}  {res.time_ms:8.4f}  {default:>10}  {speed:>7}  {res.tried:5d}  "
                  f"{res.skipped:6d}  {res.wrong:5d}  {_format_config(res.config)}"
                  + ("  (the default: no candidate beat it)" if res.default_won else ""))
    print(f"results in {args.out}")
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    from moe_core.presets import PRESETS
    from moe_core.tune import ACT_DTYPES, SCHEMES

    p.add_argument("--model", required=True, choices=sorted(PRESETS), help="preset model shape (MODELS.md)")
    p.add_argument("--dtype", required=True, choices=[*ACT_DTYPES, *SCHEMES],
                   help="activation dtype, or a quantization scheme (bfloat16 activations)")
    p.add_argument("--block-shape", type=_block_shape, default=None, metavar="BN,BK",
                   help="block quantization [bn, bk] for fp8/int8 w8a8, e.g. 128,128")
    p.add_argument("--per-channel", action="store_true", help="per-token x per-channel w8a8")
    p.add_argument("--group-size", type=int, default=None, help="group size of int8_w8a16 / int4_w4a16")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree: I per partition = I / tp")
    p.add_argument("--backend", default="cuda", help="backend whose configs to use (default cuda)")
    p.add_argument("--device-name", default=None,
                   help="device name in file names (default: the backend's device; for cuda without "
                        "a GPU, NVIDIA_H100_80GB_HBM3)")


def add_configs_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``configs``: per GEMM and token count, the file (or default) used, the entry and why."""
    p = subparsers.add_parser("configs", help="show which tuned-config file and entry each GEMM uses, and why")
    _add_common(p)
    p.add_argument("--tokens", type=_ints, default=[1, 64, 4096], help="comma-separated token counts (default 1,64,4096)")
    p.set_defaults(func=_cmd_configs)
    return p


def add_tune_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``tune``: search kernel configs on the device and write our JSON files."""
    p = subparsers.add_parser("tune", help="tune kernel configs for a preset model on the GPU")
    _add_common(p)
    p.add_argument("--batch-sizes", type=_ints, default=None,
                   help="comma-separated batch sizes (default 1,2,4,...,16384)")
    p.add_argument("--out", default="tuned_configs", help="output folder; files go to OUT/triton_X_Y_Z/ "
                   "and a partial run there is resumed (default tuned_configs)")
    p.add_argument("--fast", action="store_true", help="smaller search space (about ten minutes per model)")
    p.add_argument("--gemm", choices=("both", "up", "down"), default="both", help="which GEMM to tune")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and routing")
    p.set_defaults(func=_cmd_tune)
    return p
