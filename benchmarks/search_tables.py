"""Search entries of the cuda tables by timing the *whole forward* (one GPU).

``moe-core tune`` times each GEMM alone, and at decode sizes its pick can lose in the forward,
where gemm1 and gemm2 overlap through programmatic dependent launch (``pick_tables.py`` says
more). This script searches in the forward itself, one GEMM at a time: for each preset and batch
size it times the forward's CUDA-graph replay (L2 flushed, the mean over ``--seeds`` routings)
with the shipped gemm1 entry and with each candidate tile, keeps the fastest, then does the same
for gemm2 with gemm1's pick in place. ``BLOCK_SIZE_M`` and ``GROUP_SIZE_M`` stay as shipped (the
alignment depends on the first). Candidates are written as tables to ``--out``, for
``pick_tables.py`` to confirm against the shipped ones with fresh routings::

    python benchmarks/search_tables.py --models gpt-oss-20b --sizes 2,4,8,16,32,64 --out cand
    python benchmarks/pick_tables.py --candidate cand --out picked --models gpt-oss-20b

The defaults search decode tiles (4 warps) of the bf16 tables; ``--dtype fp8`` searches the fp8
block [128,128] tables instead, and ``--warps`` / ``--block-n`` / ``--block-k`` widen the tiles
for prefill sizes (``BLOCK_SIZE_K`` must divide fp8's 128; other tiles are skipped)::

    python benchmarks/search_tables.py --dtype fp8 --models gpt-oss-20b --sizes 16384 \
        --block-n 64,128,256 --block-k 64,128 --stages 3,4 --warps 4,8 --out cand
    python benchmarks/pick_tables.py --dtype fp8 --candidate cand --out picked --models gpt-oss-20b \
        --min-tokens 16384 --max-tokens 16384

Each candidate is timed through a table file in a scratch ``MOE_CORE_CONFIG_DIR``, so what is
measured is exactly what a shipped table would run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import statistics
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger("search_tables")


def _write(folder: Path, names: list[str], tables: list[dict]) -> None:
    from moe_core.config_files import write_table

    for name, table in zip(names, tables):
        write_table(folder / name, table)


def _forward_us(runner, weights, routings: list[tuple], folder: Path, names: list[str],
                tables: list[dict]) -> float:
    """Mean µs of the forward's graph replay (L2 flushed) over ``routings`` with ``tables`` in place."""
    from moe_core import config
    from moe_core.timing import time_graph

    _write(folder, names, tables)
    config.clear_cache()
    times = []
    for x, tw, ti in routings:
        times.append(time_graph(lambda: runner.run(x, weights, tw, ti), warm_s=0.01, reps=10))  # noqa: B023
    return statistics.mean(times) * 1e6


def main() -> None:
    from tqdm.auto import tqdm

    import moe_core
    from moe_core import config, config_files
    from moe_core.bench import fp8_block_weights, random_weights, table_file_names
    from moe_core.errors import MoECoreError
    from moe_core.presets import PRESETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shipped", default="backends/cuda/configs", help="folder holding the shipped triton_X_Y_Z/")
    p.add_argument("--out", required=True, help="candidate tables go to OUT/triton_X_Y_Z/")
    p.add_argument("--models", default="mixtral-8x7b,qwen3-30b-a3b,deepseek-v2-lite,gpt-oss-20b")
    p.add_argument("--sizes", default="2,4,8,16,32,64", help="batch sizes to search (keys of the tables)")
    p.add_argument("--seeds", type=int, default=2, help="routings each candidate is timed over")
    p.add_argument("--block-n", default="32,64,128", help="BLOCK_SIZE_N candidates")
    p.add_argument("--block-k", default="128,256", help="BLOCK_SIZE_K candidates")
    p.add_argument("--stages", default="3,4,5,6", help="num_stages candidates")
    p.add_argument("--warps", default="4", help="num_warps candidates")
    p.add_argument("--dtype", choices=("bfloat16", "fp8"), default="bfloat16",
                   help="search the bf16 tables, or the fp8 block [128,128] w8a8 ones (bf16 activations)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    folder = config_files.triton_folder()
    out_dir = Path(args.out) / folder
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="moe_core_search_"))
    (scratch / folder).mkdir()
    os.environ["MOE_CORE_CONFIG_DIR"] = str(scratch)
    device = torch.cuda.get_device_name().replace(" ", "_")
    smem = moe_core.get_backend("cuda").shared_memory_limit()
    tiles = [{"BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "num_stages": st, "num_warps": w}
             for bn, bk, st, w in itertools.product(*(map(int, s.split(",")) for s in
                                                      (args.block_n, args.block_k, args.stages, args.warps)))]
    fp8 = args.dtype == "fp8"
    operand_bytes = 1 if fp8 else 2
    report = ["| model | M | shipped µs | searched µs | gemm1 | gemm2 |", "|---|---|---|---|---|---|"]
    for model in args.models.split(","):
        preset = PRESETS[model]
        layer = preset.layer()
        E, H = layer.num_local_experts, layer.hidden_size
        names = table_file_names(layer, device, args.dtype)
        shipped = [json.loads((Path(args.shipped) / folder / n).read_text()) for n in names]
        tables = [dict(t) for t in shipped]
        gen = torch.Generator(device="cuda").manual_seed(1)
        w1, w2 = random_weights(layer, gen)
        weights = fp8_block_weights(w1, w2) if fp8 else moe_core.ExpertWeights(w1, w2)
        runner = moe_core.MoERunner(layer, backend="cuda")
        for M in tqdm([int(m) for m in args.sizes.split(",")], desc=model, disable=None):
            key = str(M)
            routings = []
            for _ in range(args.seeds):
                x = torch.randn(M, H, device="cuda", generator=gen, dtype=torch.bfloat16) / 10
                tw, ti = moe_core.select_experts(torch.randn(M, E, device="cuda", generator=gen), layer.top_k,
                                                 renormalize=preset.renormalize)
                routings.append((x, tw, ti))

            base = _forward_us(runner, weights, routings, scratch / folder, names, tables)
            best = base
            for which in (0, 1):               # gemm1, then gemm2 with gemm1's pick in place
                for tile in tiles:
                    entry = {**tables[which][key], **tile}
                    if smem is not None and config.estimate_shared_memory(entry, operand_bytes, operand_bytes) > smem:
                        continue
                    trial = [dict(t) for t in tables]
                    trial[which][key] = entry
                    try:
                        t = _forward_us(runner, weights, routings, scratch / folder, names, trial)
                    except MoECoreError as exc:       # a tile the compiler cannot place
                        logger.debug("%s M=%d %s: %s", model, M, entry, exc)
                        continue
                    if t < best:
                        best, tables = t, trial
            report.append(f"| {model} | {M} | {base:.1f} | {best:.1f} | {tables[0][key]} | {tables[1][key]} |")
            logger.info("%s M=%d: shipped %.1f µs, searched %.1f µs", model, M, base, best)
        _write(out_dir, names, tables)
        del w1, w2, weights
        torch.cuda.empty_cache()
    os.environ.pop("MOE_CORE_CONFIG_DIR", None)
    (Path(args.out) / "search.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
