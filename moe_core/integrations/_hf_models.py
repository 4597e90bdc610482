"""Tiny, randomly initialised transformers models of every supported architecture.

For tests (no download: configs are built in code) and for benchmarks (``tiny_config`` with
real sizes passed as overrides). transformers is imported inside the functions only.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["TINY_ARCHS", "arch_available", "tiny_config", "tiny_model", "randomize_", "capture_block_io"]

_COMMON: dict[str, Any] = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                               rms_norm_eps=1e-6)

#: arch -> (config class name, tiny overrides)
_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=128, moe_intermediate_size=48,
                                         shared_expert_intermediate_size=80, num_experts=8, num_experts_per_tok=2,
                                         norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[])),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=128, moe_intermediate_size=48, num_experts=8,
                                         num_experts_per_tok=2, norm_topk_prob=True, head_dim=16,
                                         decoder_sparse_step=1, mlp_only_layers=[])),
    "deepseek_v3": ("DeepseekV3Config", dict(intermediate_size=128, moe_intermediate_size=48, n_routed_experts=8,
                                             n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                                             first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=32,
                                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                             routed_scaling_factor=2.5, norm_topk_prob=True,
                                             num_key_value_heads=4)),
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                     sliding_window=16, max_position_embeddings=131072)),
}

#: the architectures :func:`tiny_model` builds
TINY_ARCHS: tuple[str, ...] = tuple(_ARCHS)


def arch_available(arch: str) -> tuple[bool, str]:
    """Whether the installed transformers has ``arch``'s config class, and a reason when not."""
    import transformers

    cls_name = _ARCHS[arch][0]
    if hasattr(transformers, cls_name):
        return True, ""
    return False, f"transformers {transformers.__version__} has no {cls_name}"


def tiny_config(arch: str, **overrides: Any) -> Any:
    """A transformers config of ``arch`` (one of :data:`TINY_ARCHS`), tiny unless overridden."""
    import transformers

    if arch not in _ARCHS:
        raise ValueError(f"arch: expected one of {TINY_ARCHS}, got {arch!r}")
    ok, reason = arch_available(arch)
    if not ok:
        raise ImportError(reason)
    cls_name, tiny = _ARCHS[arch]
    kwargs = {**_COMMON, **tiny, **overrides}
    return getattr(transformers, cls_name)(**kwargs)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, std: float | None = None) -> torch.nn.Module:
    """Seeded random weights with a scale at which the MoE blocks matter.

    Matrices get ``N(0, std²)`` with ``std = 1/sqrt(hidden_size)`` by default, biases and
    other 1-D parameters ``N(0, 0.1²)``, norm weights stay 1, DeepSeek correction biases
    ``U(0, 0.1)`` (kept non-negative: transformers 4 masks excluded groups with 0, 5 with -inf).
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = getattr(getattr(model, "config", None), "hidden_size", 64)
    std = std if std is not None else hidden ** -0.5
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        elif "norm" not in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(torch.rand(b.shape, generator=gen) * 0.1)
    return model


def tiny_model(arch: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A randomly initialised ``AutoModelForCausalLM`` of ``arch`` in eval mode (eager attention)."""
    import transformers

    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    randomize_(model, seed)
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def capture_block_io(model: torch.nn.Module, blocks: dict[str, torch.nn.Module], *args: Any,
                     **kwargs: Any) -> dict[str, tuple[torch.Tensor, Any]]:
    """Run ``model(*args, **kwargs)`` once and record each block's input hidden states and output.

    :param blocks: module name -> block (e.g. the MoE blocks of ``model``).
    :returns: name -> (input [B, S, H] clone, output as the block returned it).
    """
    seen: dict[str, tuple[torch.Tensor, Any]] = {}
    handles = []
    for name, block in blocks.items():
        def hook(module: torch.nn.Module, inputs: tuple[Any, ...], output: Any, name: str = name) -> None:
            seen[name] = (inputs[0].detach().clone(), output)
        handles.append(block.register_forward_hook(hook))
    try:
        model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen
