"""Prefill and decode time of a transformers MoE model, unpatched vs patched with moe-core.

A real-sized model cut to a few layers, with random bf16 weights, on one CUDA GPU::

    python benchmarks/hf_patch_bench.py                       # Qwen3-30B-A3B shapes, 2 layers
    python benchmarks/hf_patch_bench.py --arch mixtral --layers 1 --json out.json

Measured, each as the median of CUDA-event timings after warm-up (eager, no CUDA graphs):

- ``block``: one MoE block alone on [1, M, H] hidden states, for several M;
- ``prefill``: the whole model on one sequence of S tokens (``logits_to_keep=1``);
- ``decode``: one generated token per sequence for a batch of B, with a KV cache of 128 tokens.

Baselines: the model's own experts (transformers 5: its default ``grouped_mm`` and ``eager``
experts implementations; transformers 4: its per-expert loop). Before timing, the patched
block is checked against the unpatched one (bf16 tolerance).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from typing import Any, Callable

import torch

logger = logging.getLogger("hf_patch_bench")

#: real model shapes (public configs), cut to --layers layers
REAL_SHAPES: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                      num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                      vocab_size=151936, norm_topk_prob=True),                          # Qwen3-30B-A3B
    "mixtral": dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
                    num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),     # Mixtral-8x7B
    "gpt_oss": dict(hidden_size=2880, intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4,
                    num_attention_heads=64, num_key_value_heads=8, head_dim=64, vocab_size=201088,
                    sliding_window=128),                                                  # gpt-oss-20b
    "qwen2_moe": dict(hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408, num_experts=60,
                      num_experts_per_tok=4, shared_expert_intermediate_size=5632, num_attention_heads=16,
                      num_key_value_heads=16, vocab_size=151936),                         # Qwen1.5-MoE-A2.7B
}


def _timed_ms(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Milliseconds of one call (CUDA events on a GPU, a wall clock on CPU) and its result."""
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        out = fn()
        return (time.perf_counter() - t0) * 1e3, out
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end), out


def _median_ms(fn: Callable[[], Any], reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return statistics.median(_timed_ms(fn)[0] for _ in range(reps))


def build_model(arch: str, layers: int, seed: int, *, tiny: bool = False, device: str = "cuda",
                dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The model of ``arch`` with real shapes (``tiny``: the test shapes) and ``layers`` layers,
    random weights, on ``device``."""
    import transformers

    from moe_core.integrations.transformers import tiny_config

    shapes = {} if tiny else REAL_SHAPES[arch]
    config = tiny_config(arch, **{**shapes, "num_hidden_layers": layers,
                                  "max_position_embeddings": 131072 if arch == "gpt_oss" else 32768})
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            try:
                model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
            except (ValueError, ImportError):
                model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    finally:
        torch.set_default_dtype(default)
    model = model.to(dtype).eval()
    with torch.no_grad():
        std = config.hidden_size ** -0.5
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
            elif "norm" not in name:
                p.normal_(0.0, 0.1)
    return model


def _moe_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from moe_core.integrations._hf_adapters import supported_name

    return [(n, m) for n, m in model.named_modules() if supported_name(m) is not None]


def _baselines(model: torch.nn.Module) -> list[str]:
    """The model's own experts implementations worth timing."""
    if hasattr(model, "set_experts_implementation") and hasattr(model.config, "_experts_implementation"):
        current = model.config._experts_implementation
        return list(dict.fromkeys([current, "eager"]))
    return ["hf"]


def _set_baseline(model: torch.nn.Module, name: str) -> None:
    if name != "hf":
        model.set_experts_implementation(name)


def measure(model: torch.nn.Module, label: str, args: argparse.Namespace) -> dict[str, Any]:
    """Times of one variant (the model as it is now)."""
    H = model.config.hidden_size
    dev, dtype = model.device, model.dtype
    gen = torch.Generator(device=dev).manual_seed(0)
    res: dict[str, Any] = {"variant": label, "block": {}, "prefill": {}, "decode": {}}
    _, block = _moe_blocks(model)[0]
    with torch.no_grad():
        for M in args.block_tokens:
            x = torch.randn(1, M, H, device=dev, generator=gen).to(dtype)
            res["block"][M] = _median_ms(lambda: block(x), args.reps, args.warmup)
            logger.info("%-12s block   M=%-6d %9.3f ms", label, M, res["block"][M])
        for S in args.prefill:
            ids = torch.randint(0, model.config.vocab_size, (1, S), device=dev, generator=gen)
            res["prefill"][S] = _median_ms(lambda: model(ids, use_cache=False, logits_to_keep=1), args.reps,
                                           args.warmup)
            logger.info("%-12s prefill S=%-6d %9.3f ms", label, S, res["prefill"][S])
        for B in args.decode_batch:
            ids = torch.randint(0, model.config.vocab_size, (B, 128), device=dev, generator=gen)
            cache = model(ids, use_cache=True, logits_to_keep=1).past_key_values
            tok = ids[:, -1:]
            steps = []
            for i in range(args.warmup + args.decode_steps):
                ms, out = _timed_ms(lambda: model(tok, past_key_values=cache, use_cache=True, logits_to_keep=1))
                cache = out.past_key_values
                tok = out.logits[:, -1:].argmax(-1)
                if i >= args.warmup:
                    steps.append(ms)
            res["decode"][B] = statistics.median(steps)
            logger.info("%-12s decode  B=%-6d %9.3f ms/token step", label, B, res["decode"][B])
    return res


def check(model: torch.nn.Module, backend: str) -> float:
    """Patched vs unpatched block output on 512 tokens: the normalised max error (logged as an
    error when over the dtype's tolerance)."""
    from moe_core.integrations.transformers import patch_moe, unpatch_moe
    from moe_core.testing import assert_close_normalized, normalized_errors, tolerance_for

    _, block = _moe_blocks(model)[0]
    x = torch.randn(1, 512, model.config.hidden_size, device=model.device,
                    generator=torch.Generator(device=model.device).manual_seed(1)).to(model.dtype)
    with torch.no_grad():
        ref = block(x)
        patch_moe(model, backend=backend)
        out = block(x)
        unpatch_moe(model)
    ref, out = (ref[0], out[0]) if isinstance(ref, tuple) else (ref, out)
    try:
        assert_close_normalized(out, ref, *tolerance_for(model.dtype), what="patched vs unpatched block")
    except AssertionError as exc:           # still time it, but say so loudly
        logger.error("CHECK FAILED: %s", exc)
    return normalized_errors(out, ref)[0]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="qwen3_moe", choices=sorted(REAL_SHAPES))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--backend", default="cuda")
    p.add_argument("--block-tokens", type=ints, default=[1, 16, 128, 1024, 4096])
    p.add_argument("--prefill", type=ints, default=[512, 2048])
    p.add_argument("--decode-batch", type=ints, default=[1, 32])
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--tiny", action="store_true", help="smoke test: tiny test shapes (with --backend torch on CPU)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("moe_core").setLevel(logging.ERROR)           # "no tuned config" warnings
    import transformers

    from moe_core.integrations.transformers import patch_moe, unpatch_moe

    torch.backends.cuda.matmul.allow_tf32 = False
    on_gpu = torch.cuda.is_available()
    model = build_model(args.arch, args.layers, seed=0, tiny=args.tiny, device="cuda" if on_gpu else "cpu",
                        dtype=torch.bfloat16 if on_gpu else torch.float32)
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    logger.info("transformers %s, torch %s, %s, arch %s, %d layers, %d MoE blocks",
                transformers.__version__, torch.__version__, device_name, args.arch, args.layers,
                len(_moe_blocks(model)))
    err = check(model, args.backend)
    logger.info("patched vs unpatched block (%s, 512 tokens): normalised max error %.2e", model.dtype, err)
    results: dict[str, Any] = {"arch": args.arch, "layers": args.layers, "transformers": transformers.__version__,
                               "torch": torch.__version__, "device": device_name,
                               "check_max_err": err, "variants": []}
    for base in _baselines(model):
        try:
            _set_baseline(model, base)
            results["variants"].append(measure(model, f"hf:{base}", args))
        except Exception as exc:  # noqa: BLE001 -- a baseline this torch/transformers cannot run
            logger.error("baseline hf:%s failed: %r", base, exc)
    report = patch_moe(model, backend=args.backend)
    logger.info("%s", report)
    results["variants"].append(measure(model, f"moe-core:{report.backend[0]}", args))
    unpatch_moe(model)
    _summary(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


def _summary(results: dict[str, Any]) -> None:
    variants = results["variants"]
    ours = variants[-1]
    lines = [f"| measure | {' | '.join(v['variant'] for v in variants)} | speed-up vs {variants[0]['variant']} |",
             "|---|" + "---|" * (len(variants) + 1)]
    for kind, unit in (("block", "M"), ("prefill", "S"), ("decode", "B")):
        for key in ours[kind]:
            times = [v[kind][key] for v in variants]
            lines.append(f"| {kind} {unit}={key} (ms) | {' | '.join(f'{t:.3f}' for t in times)} | "
                         f"{times[0] / times[-1]:.2f}x |")
    logger.info("\n%s", "\n".join(lines))


if __name__ == "__main__":
    main()
