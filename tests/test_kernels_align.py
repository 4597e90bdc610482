"""Tier B: ``moe_align_block_size`` (torch reference and the Triton kernels) against a
golden per-bucket loop (SEMANTICS §6). Metadata compares exactly."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from moe_core.align import moe_align_block_size, moe_align_block_size_torch, padded_capacity
from moe_core.errors import MoEInputError, MoETypeError

TOKENS = (0, 1, 2, 3, 7, 16, 255, 256, 257)
TOPK = (1, 2, 4, 8)
EXPERTS = (1, 2, 3, 8, 33, 257, 1025)
BLOCKS = (16, 32, 64)


def golden(ids: torch.Tensor, block_m: int, E: int) -> tuple[list[int], list[int], int]:
    """The plain-Python statement of SEMANTICS §6 (ascending slots within a bucket)."""
    flat = ids.reshape(-1).tolist()
    numel = len(flat)
    buckets: list[list[int]] = [[] for _ in range(E + 1)]
    for s, e in enumerate(flat):
        buckets[e + 1 if -1 <= e < E else 0].append(s)
    sorted_ids: list[int] = []
    expert_ids: list[int] = []
    for b, slots in enumerate(buckets):
        if not slots:
            continue
        padded = -(-len(slots) // block_m) * block_m
        sorted_ids += slots + [numel] * (padded - len(slots))
        expert_ids += [b - 1] * (padded // block_m)
    total = len(sorted_ids)
    P = numel + min(numel, E + 1) * (block_m - 1)
    sorted_ids += [numel] * (P - total)
    expert_ids += [-1] * (-(-P // block_m) - len(expert_ids))
    return sorted_ids, expert_ids, total


def make_ids(M: int, k: int, E: int, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "all_minus_one":
        return torch.full((M, k), -1, dtype=torch.int32)
    ids = torch.randint(0, E, (M, k), generator=g, dtype=torch.int32)
    if kind == "with_minus_one" and ids.numel():
        drop = torch.rand((M, k), generator=g) < 0.3
        ids = torch.where(drop, torch.full_like(ids, -1), ids)
    return ids


def check_alignment(result: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ids: torch.Tensor,
                    block_m: int, E: int, *, exact_order: bool) -> None:
    sorted_ids, expert_ids, n_post = (t.cpu() for t in result)
    want_sorted, want_experts, want_total = golden(ids.cpu(), block_m, E)
    numel = ids.numel()
    P = padded_capacity(numel, block_m, E)
    assert sorted_ids.dtype == expert_ids.dtype == n_post.dtype == torch.int32
    assert tuple(sorted_ids.shape) == (P,) and tuple(n_post.shape) == (1,)
    assert expert_ids.tolist() == want_experts, "expert_ids differ from the golden loop"
    total = int(n_post[0])
    assert total == want_total, f"num_tokens_post_padded {total} != {want_total}"
    assert total % block_m == 0 and total >= numel
    got = sorted_ids.tolist()
    if exact_order:
        assert got == want_sorted
    for blk in range(-(-P // block_m)):
        lo, hi = blk * block_m, min((blk + 1) * block_m, P)
        assert sorted(got[lo:hi]) == sorted(want_sorted[lo:hi]), f"block {blk} holds other slots"
    assert all(v == numel for v in got[total:]), "sentinel missing past num_tokens_post_padded"
    real = sorted(v for v in got if v != numel)
    assert real == list(range(numel)), "every slot must appear exactly once"


def _sampled_grid(n: int, seed: int) -> list[tuple[int, int, int, int, str]]:
    full = list(itertools.product(TOKENS, TOPK, EXPERTS, BLOCKS, ("random", "with_minus_one")))
    return random.Random(seed).sample(full, n)


def test_worked_example() -> None:
    ids = torch.tensor([[0, -1], [1, 0]], dtype=torch.int32)
    for fn in (moe_align_block_size_torch, _triton()):
        sorted_ids, expert_ids, n_post = fn(ids, 2, 2)
        assert sorted_ids.tolist() == [1, 4, 0, 3, 2, 4, 4]
        assert expert_ids.tolist() == [-1, 0, 1, -1]
        assert n_post.tolist() == [6]


# -- torch reference: the fuller grid --------------------------------------------------------
@pytest.mark.parametrize("M,k,E,block_m,kind", _sampled_grid(120, 1)
                         + [(257, 8, 4096, 16, "with_minus_one"), (3, 2, 4096, 64, "random"),
                            (16, 4, 4096, 32, "all_minus_one"), (0, 2, 8, 16, "random")])
def test_torch_reference(M: int, k: int, E: int, block_m: int, kind: str) -> None:
    ids = make_ids(M, k, E, kind, seed=M * 31 + k)
    check_alignment(moe_align_block_size_torch(ids, block_m, E), ids, block_m, E, exact_order=True)


# -- Triton kernels under the interpreter (sampled: the interpreter is slow) ---------------------
def _triton():
    from moe_core.kernels.align import moe_align_block_size_triton

    return moe_align_block_size_triton


@pytest.mark.interp
@pytest.mark.parametrize("M,k,E,block_m,kind", _sampled_grid(14, 2)
                         + [(257, 8, 1025, 16, "with_minus_one"), (256, 4, 33, 64, "all_minus_one"),
                            (1, 1, 1, 16, "random"), (0, 4, 8, 32, "random"), (7, 8, 257, 32, "with_minus_one")])
def test_triton_matches_golden(M: int, k: int, E: int, block_m: int, kind: str) -> None:
    ids = make_ids(M, k, E, kind, seed=M * 17 + E)
    result = _triton()(ids, block_m, E)
    check_alignment(result, ids, block_m, E, exact_order=True)
    ref = moe_align_block_size_torch(ids, block_m, E)
    for got, want in zip(result, ref):
        assert torch.equal(got, want)


@pytest.mark.interp
def test_triton_deterministic_and_three_launch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_core.kernels import align as kalign

    ids = make_ids(300, 8, 9, "with_minus_one", seed=5)          # 2400 slots: 3 chunks
    first = _triton()(ids, 32, 9)
    check_alignment(first, ids, 32, 9, exact_order=True)
    monkeypatch.setattr(kalign, "SCATTER_INLINE_MAX", 0)        # force the separate scatter launch
    for _ in range(4):
        again = _triton()(ids, 32, 9)
        assert all(torch.equal(a, b) for a, b in zip(first, again)), "runs differ"


@pytest.mark.interp
@pytest.mark.parametrize("one_launch_max", [0, 1024])
@pytest.mark.parametrize("M,k,E,block_m", [(1, 8, 128, 16), (64, 8, 128, 16), (128, 8, 64, 32), (100, 6, 1025, 16),
                                           (200, 2, 8, 64)])
def test_triton_one_launch_path_matches_golden(monkeypatch: pytest.MonkeyPatch, one_launch_max: int,
                                               M: int, k: int, E: int, block_m: int) -> None:
    """Up to ``ONE_LAUNCH_MAX`` slots one program counts, scans and scatters (decode); the same
    inputs through the count + scan launches give the same result."""
    from moe_core.kernels import align as kalign

    monkeypatch.setattr(kalign, "ONE_LAUNCH_MAX", one_launch_max)
    launches = []
    real = kalign._align_count_kernel
    monkeypatch.setattr(kalign, "_align_count_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: (launches.append(grid), real[grid])[1]})())
    ids = make_ids(M, k, E, "with_minus_one", seed=M + E)
    result = _triton()(ids, block_m, E)
    check_alignment(result, ids, block_m, E, exact_order=True)
    assert (launches == []) is (M * k <= one_launch_max)


@pytest.mark.interp
def test_triton_masks_out_of_range_ids() -> None:
    ids = torch.tensor([[0, 2071690107], [-99999, 1], [3, 3]], dtype=torch.int32)   # E = 3: 3 is out of range
    masked = torch.where((ids >= -1) & (ids < 3), ids, torch.full_like(ids, -1))
    result = _triton()(ids, 16, 3)
    check_alignment(result, masked, 16, 3, exact_order=True)


@pytest.mark.parametrize("fn_name", ["torch", "public"])
def test_rejects_bad_arguments(fn_name: str) -> None:
    fn = moe_align_block_size_torch if fn_name == "torch" else moe_align_block_size
    with pytest.raises(MoETypeError, match="int32"):
        fn(torch.zeros((2, 2), dtype=torch.int64), 16, 4)
    with pytest.raises(MoEInputError, match="block_m"):
        fn(torch.zeros((2, 2), dtype=torch.int32), 0, 4)
    with pytest.raises(MoEInputError, match="2-D"):
        fn(torch.zeros((4,), dtype=torch.int32), 16, 4)


def test_int64_converted_explicitly_gives_same_result() -> None:
    ids64 = make_ids(33, 2, 8, "with_minus_one", seed=3).to(torch.int64)
    a = moe_align_block_size_torch(ids64.to(torch.int32), 16, 8)
    check_alignment(a, ids64, 16, 8, exact_order=True)


# -- GPU --------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("M,k,E,block_m", [(1, 8, 256, 16), (222, 6, 60, 32), (4096, 8, 257, 64),
                                           (8192, 8, 1025, 16), (100, 8, 4096, 128), (70000, 8, 64, 64)])
def test_gpu_triton_matches_torch(M: int, k: int, E: int, block_m: int) -> None:
    ids = make_ids(M, k, E, "with_minus_one", seed=M).cuda()
    got = moe_align_block_size(ids, block_m, E)
    want = moe_align_block_size_torch(ids, block_m, E)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    if M * k <= 4096:
        check_alignment(got, ids, block_m, E, exact_order=True)
    for _ in range(4):
        assert all(torch.equal(a, b) for a, b in zip(got, moe_align_block_size(ids, block_m, E)))
