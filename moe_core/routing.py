"""Routing: turn router logits into ``topk_weights`` (fp32) and ``topk_ids`` (int32)."""

from __future__ import annotations

import torch

from moe_core.errors import MoEInputError, MoETypeError

__all__ = ["select_experts", "SCORING_FUNCS"]

SCORING_FUNCS = ("softmax", "sigmoid")


def _describe(t: object) -> str:
    return str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def select_experts(router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True,
                   scoring_func: str = "softmax", num_expert_group: int | None = None,
                   topk_group: int | None = None, correction_bias: torch.Tensor | None = None,
                   routed_scaling_factor: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``top_k`` experts per token.

    Scores are ``softmax`` or ``sigmoid`` of the logits (computed in fp32). With
    ``num_expert_group``/``topk_group`` (DeepSeek grouped routing) the experts are split
    into groups; a group's score is the sum of its top-2 *biased* scores when
    ``correction_bias`` is given (DeepSeek-V3), else its best score (DeepSeek-V2), and only
    the ``topk_group`` best groups compete. ``correction_bias`` [E] shifts the *choice*
    only; the weights are the unbiased scores of the chosen experts. ``renormalize``
    divides the weights by their sum (a zero sum gives zero weights, never NaN);
    ``routed_scaling_factor`` multiplies them — then the layer must say
    ``routed_scaling_factor=None`` so the factor is applied once. gpt-oss's "top-k of the
    logits, then softmax over the k" is ``softmax`` with ``renormalize=True``.

    NaN logits count as the lowest score; a row of only NaN gets weights 0.

    :param router_logits: [M, E] float.
    :returns: ``topk_weights`` [M, k] float32, ``topk_ids`` [M, k] int32.
    """
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2:
        raise MoEInputError(f"router_logits: expected a 2-D [M, E] tensor, got {_describe(router_logits)}")
    if not router_logits.dtype.is_floating_point:
        raise MoETypeError(f"router_logits: expected a floating-point tensor, got {router_logits.dtype}")
    M, E = router_logits.shape
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise MoEInputError(f"top_k: expected an int in [1, E = {E}], got {top_k!r}")
    if scoring_func not in SCORING_FUNCS:
        raise MoEInputError(f"scoring_func: expected one of {SCORING_FUNCS}, got {scoring_func!r}")
    logits = router_logits.float()
    # NaN is the lowest score; +inf the highest finite one (so softmax gives no inf - inf = NaN)
    big = torch.finfo(torch.float32).max
    logits = torch.nan_to_num(logits, nan=float("-inf"), posinf=big, neginf=float("-inf"))
    scores = torch.softmax(logits, dim=-1) if scoring_func == "softmax" else torch.sigmoid(logits)
    scores = torch.nan_to_num(scores, nan=0.0)                 # rows of only -inf
    choice = scores
    if correction_bias is not None:
        if not isinstance(correction_bias, torch.Tensor) or correction_bias.shape != (E,):
            raise MoEInputError(f"correction_bias: expected a tensor of shape [{E}], got {_describe(correction_bias)}")
        if correction_bias.device != router_logits.device:
            raise MoEInputError(f"correction_bias: expected device {router_logits.device}, "
                                f"got {correction_bias.device}")
        bias = torch.nan_to_num(correction_bias.float(), nan=0.0)
        choice = scores + bias.unsqueeze(0)
    if num_expert_group is not None or topk_group is not None:
        if num_expert_group is None or topk_group is None:
            raise MoEInputError("num_expert_group and topk_group: pass both for grouped routing, "
                                f"got {num_expert_group!r} and {topk_group!r}")
        if E % num_expert_group:
            raise MoEInputError(f"num_expert_group: must divide E = {E}, got {num_expert_group}")
        if not 1 <= topk_group <= num_expert_group:
            raise MoEInputError(f"topk_group: expected 1..{num_expert_group}, got {topk_group}")
        if top_k > topk_group * (E // num_expert_group):
            raise MoEInputError(f"top_k: expected <= topk_group·(E/num_expert_group) = "
                                f"{topk_group * (E // num_expert_group)} experts in the kept groups, got {top_k}")
        grouped = choice.view(M, num_expert_group, E // num_expert_group)
        if correction_bias is not None:
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        else:
            group_scores = grouped.amax(dim=-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // num_expert_group, dim=1), float("-inf"))
    topk_ids = choice.topk(top_k, dim=-1).indices
    topk_weights = scores.gather(1, topk_ids)
    if renormalize:
        total = topk_weights.sum(dim=-1, keepdim=True)
        topk_weights = torch.where(total > 0, topk_weights / total.clamp(min=torch.finfo(torch.float32).tiny),
                                   torch.zeros_like(topk_weights))
    if routed_scaling_factor is not None:
        topk_weights = topk_weights * float(routed_scaling_factor)
    return topk_weights.contiguous(), topk_ids.to(torch.int32).contiguous()
