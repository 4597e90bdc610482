"""The ``filter_expert`` hook plugin: global -> local ids of SEMANTICS §7, alone and through
``MoERunner`` on the torch backend against the float64 oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moe_core
from moe_core import hookimpl
from moe_core.errors import MoEInputError
from moe_core.hooks import filter_expert
from moe_core.testing import assert_close_normalized, oracle_moe, tolerance_for

STALE = (2071690107, -99999)       # leftovers of torch.empty in padded CUDA-graph rows
H, I = 16, 8
TOL = tolerance_for(torch.float32)


def ep_layer(E_g: int | None, E: int, *, k: int = 2, rank: int = 0, size: int = 1, shared: int = 0,
             expert_map: torch.Tensor | None = None) -> moe_core.MoELayer:
    return moe_core.MoELayer(num_experts=E_g, num_local_experts=E, top_k=k, hidden_size=H, intermediate_size=I,
                             ep_rank=rank, ep_size=size, num_fused_shared_experts=shared, expert_map=expert_map)


def mapped(layer: moe_core.MoELayer, ids: list[list[int]]) -> list[list[int]]:
    out = filter_expert.moe_core_map_expert_ids(torch.tensor(ids, dtype=torch.int32), layer)
    assert out.dtype == torch.int32
    return out.tolist()


def expected(table: list[int], ids: list[list[int]]) -> list[list[int]]:
    """Plain-Python mapping: ids outside [0, E_g) are -1, the rest go through the table."""
    return [[table[i] if 0 <= i < len(table) else -1 for i in row] for row in ids]


# -- the table ----------------------------------------------------------------------


@pytest.mark.parametrize("rank", range(4))
def test_rank_ranges(rank: int) -> None:
    table = filter_expert.build_table(ep_layer(16, 4, rank=rank, size=4)).tolist()
    assert table == [-1] * (4 * rank) + [0, 1, 2, 3] + [-1] * (12 - 4 * rank)


def test_fused_shared_experts_take_the_last_global_ids() -> None:
    # 16 routed experts over 4 ranks, 2 shared experts fused as global ids 16, 17 on every rank
    table = filter_expert.build_table(ep_layer(18, 6, rank=1, size=4, shared=2)).tolist()
    assert table == [-1] * 4 + [0, 1, 2, 3] + [-1] * 8 + [4, 5]


def test_explicit_expert_map_replaces_the_ranges() -> None:
    expert_map = torch.tensor([2, -1, -1, 0, -1, 1, -1, -1], dtype=torch.int32)
    layer = ep_layer(8, 3, size=2, expert_map=expert_map)
    assert filter_expert.build_table(layer).tolist() == expert_map.tolist()


@pytest.mark.parametrize("expert_map, match", [
    (torch.tensor([0, 1, -1], dtype=torch.int32), "length num_experts = 8"),
    (torch.tensor([0, 1, 2, -1, -1, -1, -1, -1]), "torch.int32"),
    (torch.tensor([0, 1, 3, -1, -1, -1, -1, -1], dtype=torch.int32), r"\[-1, 3\)"),
    (torch.tensor([0, 1, -2, -1, -1, -1, -1, -1], dtype=torch.int32), r"\[-1, 3\)"),
    (torch.tensor([0, 1, 1, -1, -1, -1, -1, -1], dtype=torch.int32), "same local id"),
])
def test_bad_expert_map_is_rejected(expert_map: torch.Tensor, match: str) -> None:
    with pytest.raises(MoEInputError, match=match):
        filter_expert.build_table(ep_layer(8, 3, size=2, expert_map=expert_map))


def test_uneven_placement_without_map_is_rejected() -> None:
    with pytest.raises(MoEInputError, match="pass expert_map"):
        filter_expert.build_table(ep_layer(10, 4, size=2))


# -- the mapping ----------------------------------------------------------------------


def test_stale_ids_and_minus_one_never_reach_the_table() -> None:
    # first and last table entries are valid local ids: table[-1], table[clamp(E_g)] and
    # table[clamp(-99999)] would all give a *valid* expert if the mask came after the gather
    expert_map = torch.tensor([0, -1, 1, -1, -1, 2, -1, 3], dtype=torch.int32)
    layer = ep_layer(8, 4, size=2, expert_map=expert_map)
    ids = [[STALE[0], STALE[1]], [8, -1], [0, 7], [5, 1]]
    assert mapped(layer, ids) == [[-1, -1], [-1, -1], [0, 3], [2, -1]]


def test_inactive_unless_layer_filter_expert() -> None:
    plain = ep_layer(4, 4)
    assert not plain.filter_expert
    assert filter_expert.moe_core_map_expert_ids(torch.zeros(2, 2, dtype=torch.int32), plain) is None
    unknown = ep_layer(None, 4)                        # global count unknown: ids are local already
    assert unknown.filter_expert
    assert mapped(unknown, [[0, 3], [4, -1], [STALE[0], STALE[1]]]) == [[0, 3], [-1, -1], [-1, -1]]


@given(size=st.integers(2, 4), local=st.integers(1, 5), shared=st.integers(0, 2), data=st.data())
def test_mapping_matches_a_plain_loop(size: int, local: int, shared: int, data: st.DataObject) -> None:
    rank = data.draw(st.integers(0, size - 1))
    E_g = size * local + shared
    layer = ep_layer(E_g, local + shared, k=1, rank=rank, size=size, shared=shared)
    table = [-1] * E_g
    for j in range(local):
        table[rank * local + j] = j
    for j in range(shared):
        table[size * local + j] = local + j
    id_values = st.one_of(st.integers(-1, E_g), st.sampled_from(STALE + (E_g + 1, -2, 2**31 - 1, -2**31)))
    ids = data.draw(st.lists(st.lists(id_values, min_size=3, max_size=3), min_size=1, max_size=6))
    assert mapped(layer, ids) == expected(table, ids)


# -- through the runner ---------------------------------------------------------------


def weights_for(E: int, seed: int) -> moe_core.ExpertWeights:
    g = torch.Generator().manual_seed(seed)
    return moe_core.ExpertWeights(torch.randn(E, 2 * I, H, generator=g) / 10, torch.randn(E, H, I, generator=g) / 10)


@pytest.mark.parametrize("rank", [0, 1])
def test_runner_with_shared_experts_matches_the_oracle(rank: int, nan_empty) -> None:
    # 8 routed experts on 2 ranks + 1 fused shared expert (global id 8) on each
    layer = ep_layer(9, 5, k=3, rank=rank, size=2, shared=1)
    g = torch.Generator().manual_seed(7)
    M = 7
    x = torch.randn(M, H, generator=g) / 10
    routed = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(M)])
    ids = torch.cat([routed, torch.full((M, 1), 8)], dim=1).to(torch.int32)
    tw = torch.rand(M, 3, generator=g)
    w = weights_for(5, seed=rank)
    out = moe_core.MoERunner(layer, backend="torch").run(x, w, tw, ids)
    ref = oracle_moe(x, w.w1, w.w2, tw, ids, expert_map=filter_expert.build_table(layer))
    assert_close_normalized(out, ref, *TOL)


def test_replicated_ep_partials_sum_to_one_process() -> None:
    g = torch.Generator().manual_seed(11)
    M, E_g, size = 9, 8, 2
    x = torch.randn(M, H, generator=g) / 10
    ids = torch.stack([torch.randperm(E_g, generator=g)[:2] for _ in range(M)]).to(torch.int32)
    tw = torch.rand(M, 2, generator=g)
    full = weights_for(E_g, seed=3)
    total = torch.zeros(M, H, dtype=torch.float64)
    for rank in range(size):
        part = slice(rank * 4, rank * 4 + 4)
        w = moe_core.ExpertWeights(full.w1[part], full.w2[part])
        total += moe_core.MoERunner(ep_layer(E_g, 4, rank=rank, size=size), backend="torch").run(x, w, tw, ids)
    assert_close_normalized(total, oracle_moe(x, full.w1, full.w2, tw, ids), *TOL)


@pytest.mark.parametrize("as_tensor, expert_parallel", [(False, True), (True, True), (False, False)])
def test_rows_past_n_valid_are_padding(as_tensor: bool, expert_parallel: bool, nan_empty) -> None:
    layer = ep_layer(8, 4, rank=1, size=2) if expert_parallel else ep_layer(8, 8)
    g = torch.Generator().manual_seed(5)
    M, n_valid = 6, 4
    x = torch.randn(M, H, generator=g) / 10
    ids = torch.randint(0, 8, (M, 2), generator=g, dtype=torch.int32)
    ids[n_valid:] = torch.tensor([[STALE[0], STALE[1]], [8, 3]], dtype=torch.int32)   # stale and a real id
    tw = torch.rand(M, 2, generator=g)
    w = weights_for(layer.num_local_experts, seed=1)
    n = torch.tensor(n_valid) if as_tensor else n_valid
    out = moe_core.MoERunner(layer, backend="torch").run(x, w, tw, ids, n_valid=n)
    table = filter_expert.build_table(layer) if expert_parallel else None
    ref = oracle_moe(x[:n_valid], w.w1, w.w2, tw[:n_valid], ids[:n_valid], expert_map=table)
    assert_close_normalized(out[:n_valid], ref, *TOL)
    assert torch.equal(out[n_valid:], torch.zeros(M - n_valid, H))


def test_runner_calls_the_map_hook_exactly_when_filter_expert() -> None:
    calls: list[bool] = []

    class Spy:
        @hookimpl(tryfirst=True)
        def moe_core_map_expert_ids(self, layer: moe_core.MoELayer) -> None:
            calls.append(layer.filter_expert)

    g = torch.Generator().manual_seed(0)
    x, tw = torch.randn(3, H, generator=g) / 10, torch.rand(3, 2, generator=g)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2]], dtype=torch.int32)
    w = weights_for(4, seed=0)
    for layer in (ep_layer(4, 4), ep_layer(8, 4, size=2)):
        runner = moe_core.MoERunner(layer, backend="torch")
        runner.register(Spy())
        runner.run(x, w, tw, ids)
    assert calls == [True]
