"""Keep, per batch size, whichever of two table sets gives the faster *whole forward* (one GPU).

``moe-core tune`` times each GEMM alone. At decode sizes that is a few microseconds per kernel,
and its pick can lose in the forward, where gemm1 and gemm2 overlap through programmatic
dependent launch and the routing differs (mixtral-8x7b M = 8 took 603 µs with a freshly tuned
pair vs 497 µs with the shipped one). This script settles it the way ``moe-core bench`` measures:
for each preset and each batch size of the candidate tables, the forward's CUDA-graph replay
(L2 flushed) with the shipped tables and with the candidate tables, interleaved over
``--rounds`` and ``--seeds`` routings; the candidate's gemm1 + gemm2 pair replaces the shipped
pair only when it is faster by more than ``--margin``. Merged files go to ``--out``::

    moe-core tune ... --out .tune_out          # candidates
    python benchmarks/pick_tables.py --candidate .tune_out --out picked \
        --models qwen3-30b-a3b,mixtral-8x7b --max-tokens 1024
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
from pathlib import Path

import torch

logger = logging.getLogger("pick_tables")


def _table(path: Path) -> dict[str, dict]:
    return json.loads(path.read_text()) if path.exists() else {}


def main() -> None:
    import moe_core
    from moe_core import config_files
    from moe_core.bench import fp8_block_weights, random_weights, table_file_names
    from moe_core.presets import PRESETS
    from moe_core.timing import time_graph
    from tqdm.auto import tqdm

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidate", required=True, help="folder holding triton_X_Y_Z/ candidate tables")
    p.add_argument("--shipped", default="backends/cuda/configs", help="folder holding the shipped triton_X_Y_Z/")
    p.add_argument("--out", required=True, help="merged tables go to OUT/triton_X_Y_Z/")
    p.add_argument("--models", default="mixtral-8x7b,qwen3-30b-a3b,deepseek-v2-lite,gpt-oss-20b")
    p.add_argument("--min-tokens", type=int, default=1, help="compare batch sizes from this")
    p.add_argument("--max-tokens", type=int, default=1024, help="compare batch sizes up to this")
    p.add_argument("--sizes", default=None, help="compare only these batch sizes (comma list; within the range)")
    p.add_argument("--seeds", type=int, default=2, help="routings per batch size")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timings per routing and table set")
    p.add_argument("--margin", type=float, default=0.02, help="the candidate must be this much faster")
    p.add_argument("--dtype", choices=("bfloat16", "fp8"), default="bfloat16",
                   help="bf16 weights, or fp8 block [128,128] w8a8 (bf16 activations either way)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    folder = config_files.triton_folder()
    shipped_dir, cand_dir = Path(args.shipped), Path(args.candidate)
    out_dir = Path(args.out) / folder
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name().replace(" ", "_")
    report = ["| model | M | shipped µs | candidate µs | kept |", "|---|---|---|---|---|"]
    for model in args.models.split(","):
        preset = PRESETS[model]
        layer = preset.layer()
        E, H = layer.num_local_experts, layer.hidden_size
        names = table_file_names(layer, device, args.dtype)
        shipped = [_table(shipped_dir / folder / n) for n in names]
        cand = [_table(cand_dir / folder / n) for n in names]
        if not all(cand):
            logger.warning("%s: no candidate tables %s; skipped", model, names)
            continue
        merged = [dict(t) for t in shipped]
        gen = torch.Generator(device="cuda").manual_seed(0)
        w1, w2 = random_weights(layer, gen)
        weights = fp8_block_weights(w1, w2) if args.dtype == "fp8" else moe_core.ExpertWeights(w1, w2)
        runner = moe_core.MoERunner(layer, backend="cuda")
        only = None if args.sizes is None else {int(m) for m in args.sizes.split(",")}
        # batch sizes whose pair differs from the shipped one (an unchanged pair times the same kernels twice)
        sizes = sorted(int(m) for m in cand[0] if args.min_tokens <= int(m) <= args.max_tokens and m in shipped[0]
                       and (only is None or int(m) in only)
                       and any(c.get(m) != t.get(m) for c, t in zip(cand, shipped)))
        for M in tqdm(sizes, desc=model, disable=None):
            times: dict[str, list[float]] = {"shipped": [], "candidate": []}
            for _ in range(args.seeds):
                x = torch.randn(M, H, device="cuda", generator=gen, dtype=torch.bfloat16) / 10
                logits = torch.randn(M, E, device="cuda", generator=gen)
                tw, ti = moe_core.select_experts(logits, layer.top_k, renormalize=preset.renormalize)
                for _ in range(args.rounds):
                    for which, root in (("shipped", shipped_dir), ("candidate", cand_dir)):
                        os.environ["MOE_CORE_CONFIG_DIR"] = str(root)    # read at every forward
                        times[which].append(time_graph(lambda: runner.run(x, weights, tw, ti), warm_s=0.01))
            os.environ.pop("MOE_CORE_CONFIG_DIR", None)
            old, new = (statistics.median(times[k]) * 1e6 for k in ("shipped", "candidate"))
            take = new < (1 - args.margin) * old
            if take:
                for t, c in zip(merged, cand):
                    t[str(M)] = c[str(M)]
            report.append(f"| {model} | {M} | {old:.1f} | {new:.1f} | {'candidate' if take else 'shipped'} |")
            logger.info("%s M=%d: shipped %.1f µs, candidate %.1f µs -> %s", model, M, old, new,
                        "candidate" if take else "shipped")
        for name, table in zip(names, merged):
            config_files.write_table(out_dir / name, table)
        del w1, w2, weights
        torch.cuda.empty_cache()
    (Path(args.out) / "pick.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
