"""select_experts against an independent per-row Python loop written here."""

from __future__ import annotations

import math

import pytest
import torch

from moe_core import select_experts
from moe_core.errors import MoEInputError, MoETypeError
from moe_core.testing.strategies import single_torch_thread  # noqa: F401  (autouse)


def _loop_route(logits: torch.Tensor, k: int, *, scoring: str = "softmax", renormalize: bool = True,
                groups: int | None = None, topk_group: int | None = None, bias: torch.Tensor | None = None,
                scale: float | None = None) -> list[dict[int, float]]:
    """Per row: {expert id: weight}, with plain Python floats and sorts."""
    rows = []
    for row in logits.double().tolist():
        E = len(row)
        if scoring == "softmax":
            mx = max(row)
            ex = [math.exp(v - mx) for v in row]
            scores = [v / sum(ex) for v in ex]
        else:
            scores = [1.0 / (1.0 + math.exp(-v)) for v in row]
        choice = [s + (0.0 if bias is None else float(bias[e])) for e, s in enumerate(scores)]
        allowed = set(range(E))
        if groups is not None:
            size = E // groups
            gscore = []
            for g in range(groups):
                members = sorted(choice[g * size:(g + 1) * size], reverse=True)
                gscore.append(sum(members[:2]) if bias is not None else members[0])
            kept = sorted(range(groups), key=lambda g: -gscore[g])[:topk_group]
            allowed = {e for g in kept for e in range(g * size, (g + 1) * size)}
        chosen = sorted(allowed, key=lambda e: -choice[e])[:k]
        w = {e: scores[e] for e in chosen}
        if renormalize:
            total = sum(w.values())
            w = {e: v / total for e, v in w.items()}
        if scale is not None:
            w = {e: v * scale for e, v in w.items()}
        rows.append(w)
    return rows


def _assert_same(weights: torch.Tensor, ids: torch.Tensor, want: list[dict[int, float]]) -> None:
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.is_contiguous() and ids.is_contiguous()
    for m, row in enumerate(want):
        got = dict(zip(ids[m].tolist(), weights[m].tolist()))
        assert set(got) == set(row), (m, sorted(got), sorted(row))
        for e, v in row.items():
            assert got[e] == pytest.approx(v, rel=1e-5, abs=1e-7), (m, e)


def _logits(M: int, E: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(M, E, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("k", [1, 2, 6])
def test_plain_topk(scoring: str, renormalize: bool, k: int) -> None:
    logits = _logits(23, 16, seed=k)
    w, ids = select_experts(logits, k, renormalize=renormalize, scoring_func=scoring)
    assert w.shape == ids.shape == (23, k)
    _assert_same(w, ids, _loop_route(logits, k, scoring=scoring, renormalize=renormalize))


def test_deepseek_v3_grouped_with_bias_and_scaling() -> None:
    E, groups, topk_group, k = 64, 8, 4, 8
    logits = _logits(31, E, seed=1)
    bias = torch.randn(E, generator=torch.Generator().manual_seed(2)) * 0.3
    w, ids = select_experts(logits, k, renormalize=True, scoring_func="sigmoid", num_expert_group=groups,
                            topk_group=topk_group, correction_bias=bias, routed_scaling_factor=2.5)
    want = _loop_route(logits, k, scoring="sigmoid", groups=groups, topk_group=topk_group, bias=bias, scale=2.5)
    _assert_same(w, ids, want)
    # chosen experts come from at most topk_group groups
    assert all(len(set((ids[m] // (E // groups)).tolist())) <= topk_group for m in range(31))
    # bias shifts the choice only: weights are the unbiased sigmoid scores, renormalised, scaled
    scores = torch.sigmoid(logits).gather(1, ids.long())
    torch.testing.assert_close(w, 2.5 * scores / scores.sum(1, keepdim=True), rtol=1e-5, atol=1e-6)
    assert torch.allclose(w.sum(1), torch.full((31,), 2.5))


def test_correction_bias_changes_the_choice() -> None:
    E = 16
    logits = _logits(8, E, seed=3)
    plain_w, plain_ids = select_experts(logits, 2, scoring_func="sigmoid", renormalize=False)
    bias = torch.zeros(E)
    bias[5] = 100.0                                            # expert 5 always wins the choice
    w, ids = select_experts(logits, 2, scoring_func="sigmoid", renormalize=False, correction_bias=bias)
    assert (ids == 5).any(dim=1).all()
    col = (ids == 5).int().argmax(dim=1)
    got5 = w.gather(1, col.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(got5, torch.sigmoid(logits[:, 5]))     # its weight is unbiased
    _assert_same(w, ids, _loop_route(logits, 2, scoring="sigmoid", renormalize=False, bias=bias))


def test_deepseek_v2_group_limited_greedy() -> None:
    E, groups, topk_group, k = 32, 8, 3, 6
    logits = _logits(19, E, seed=4)
    w, ids = select_experts(logits, k, renormalize=False, num_expert_group=groups, topk_group=topk_group)
    _assert_same(w, ids, _loop_route(logits, k, renormalize=False, groups=groups, topk_group=topk_group))


def test_deepseek_v2_lite_greedy() -> None:
    logits = _logits(13, 64, seed=5)
    w, ids = select_experts(logits, 6, renormalize=False, routed_scaling_factor=1.0)
    _assert_same(w, ids, _loop_route(logits, 6, renormalize=False, scale=1.0))
    assert (w.sum(1) < 1).all()                                 # not renormalised


def test_gpt_oss_softmax_over_selected_equals_softmax_renormalize() -> None:
    logits = _logits(17, 32, seed=6)
    w, ids = select_experts(logits, 4, renormalize=True)
    top = logits.topk(4, dim=1)
    want_w = torch.softmax(top.values, dim=1)
    for m in range(17):
        got = dict(zip(ids[m].tolist(), w[m].tolist()))
        want = dict(zip(top.indices[m].tolist(), want_w[m].tolist()))
        assert set(got) == set(want)
        for e in want:
            assert got[e] == pytest.approx(want[e], rel=1e-5)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("grouped", [False, True])
def test_nan_logits_give_ids_in_range_and_finite_weights(scoring: str, grouped: bool) -> None:
    E = 16
    logits = _logits(6, E, seed=7)
    logits[0] = float("nan")                                    # a whole row
    logits[1, ::2] = float("nan")                               # half a row
    logits[2, 3] = float("inf")
    logits[3, :] = float("-inf")
    logits[4, 0] = float("nan")
    kw = dict(num_expert_group=4, topk_group=2) if grouped else {}
    w, ids = select_experts(logits, 3, scoring_func=scoring, renormalize=True,
                            correction_bias=torch.zeros(E) if grouped else None, **kw)
    assert ((ids >= 0) & (ids < E)).all()
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert torch.equal(w[0], torch.zeros(3)) and torch.equal(w[3], torch.zeros(3))   # 0/0 -> zeros
    assert not set(ids[1].tolist()) & set(range(0, E, 2))          # NaN experts are never chosen
    if scoring == "softmax":
        assert 3 in ids[2].tolist() and w[2].max().item() == pytest.approx(1.0)  # +inf is the top score


def test_zero_sum_renormalisation_gives_zeros() -> None:
    logits = torch.full((2, 8), -1e4)                           # sigmoid underflows to exactly 0
    w, ids = select_experts(logits, 2, scoring_func="sigmoid", renormalize=True)
    assert torch.equal(w, torch.zeros(2, 2))
    assert ((ids >= 0) & (ids < 8)).all()


def test_low_precision_logits_and_empty_batch() -> None:
    logits = _logits(9, 8, seed=8).to(torch.bfloat16)
    w, ids = select_experts(logits, 2)
    assert w.dtype == torch.float32
    _assert_same(w, ids, _loop_route(logits.float(), 2))
    w, ids = select_experts(torch.zeros(0, 8), 2)
    assert w.shape == ids.shape == (0, 2) and ids.dtype == torch.int32


def test_bad_arguments() -> None:
    logits = _logits(3, 8)
    with pytest.raises(MoEInputError, match=r"^top_k: expected an int in \[1, E = 8\], got 9"):
        select_experts(logits, 9)
    with pytest.raises(MoEInputError, match=r"^top_k"):
        select_experts(logits, 0)
    with pytest.raises(MoEInputError, match=r"^scoring_func: expected one of"):
        select_experts(logits, 2, scoring_func="relu")
    with pytest.raises(MoEInputError, match=r"^router_logits: expected a 2-D"):
        select_experts(logits[0], 2)
    with pytest.raises(MoETypeError, match=r"^router_logits: expected a floating-point"):
        select_experts(logits.long(), 2)
    with pytest.raises(MoEInputError, match=r"^num_expert_group and topk_group: pass both"):
        select_experts(logits, 2, num_expert_group=4)
    with pytest.raises(MoEInputError, match=r"^num_expert_group: must divide E = 8"):
        select_experts(logits, 2, num_expert_group=3, topk_group=1)
    with pytest.raises(MoEInputError, match=r"^topk_group: expected 1..4"):
        select_experts(logits, 2, num_expert_group=4, topk_group=5)
    with pytest.raises(MoEInputError, match=r"^top_k: expected <= topk_group"):
        select_experts(logits, 5, num_expert_group=4, topk_group=2)
    with pytest.raises(MoEInputError, match=r"^correction_bias: expected a tensor of shape \[8\]"):
        select_experts(logits, 2, correction_bias=torch.zeros(7))
