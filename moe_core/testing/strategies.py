"""Routing builders and Hypothesis strategies shared by the test modules (TESTING.md §3).

Every builder returns ``(topk_weights [M, k] float32, topk_ids [M, k] int32)`` on the CPU
(move them with ``.to(device)``), built from a seeded ``torch.Generator`` so a failing
case replays. Weights are positive and, for valid slots, sum to about 1 per row.

Builders (``ROUTINGS`` maps the names to them):

- ``softmax_topk``: random logits, softmax, top-k, renormalised (distinct experts per row);
- ``all_to_expert0``: every token's first slot on expert 0, the other slots on 1 … k−1;
- ``round_robin``: slot ``s`` on expert ``s mod E``;
- ``forced_empty``: softmax top-k with one expert (``E // 2``) never chosen;
- ``half_empty``: only even experts are chosen (needs ``k <= ⌈E/2⌉``);
- ``with_minus_one``: softmax top-k, then about a third of the slots set to ``-1``;
- ``stale_padding``: rows ``>= n_valid`` hold stale CUDA-graph garbage
  (``-99999``, ``2071690107``, ``E_g``) and NaN weights.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["single_torch_thread", "ROUTINGS", "STALE_IDS", "softmax_topk", "all_to_expert0", "round_robin", "forced_empty",
           "half_empty", "with_minus_one", "stale_padding", "random_weights", "moe_shapes"]

def _single_torch_thread():
    """Run the test with one intra-op torch thread, then restore the count.

    The CPU tests use tiny matmuls: extra OpenMP threads only spin against each other and
    against other test processes (5x slower on a busy 2-core machine). Import it into a
    test module to apply it there: ``from moe_core.testing.strategies import single_torch_thread``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


try:
    import pytest as _pytest
except ImportError:  # pragma: no cover - pytest is a test extra
    single_torch_thread = None
else:
    single_torch_thread = _pytest.fixture(autouse=True)(_single_torch_thread)


#: values seen in padded rows of CUDA-graph batches (leftovers of ``torch.empty``)
STALE_IDS = (-99999, 2071690107)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_weights(M: int, k: int, seed: int = 0) -> torch.Tensor:
    """[M, k] positive fp32 weights summing to 1 per row."""
    w = torch.rand(M, k, generator=_gen(seed)) + 0.05
    return (w / w.sum(dim=1, keepdim=True)).float().contiguous()


def _topk_of(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits.double(), dim=-1)
    vals, ids = probs.topk(k, dim=-1)
    vals = vals / vals.sum(dim=-1, keepdim=True).clamp(min=1e-300)
    return vals.float().contiguous(), ids.to(torch.int32).contiguous()


def softmax_topk(M: int, E: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over random logits, top-k, renormalised."""
    return _topk_of(torch.randn(M, E, generator=_gen(seed)), k)


def all_to_expert0(M: int, E: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot ``j`` of every token goes to expert ``j`` (so every token hits expert 0)."""
    ids = torch.arange(k, dtype=torch.int32).repeat(M, 1).contiguous()
    return random_weights(M, k, seed), ids


def round_robin(M: int, E: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot ``s = m·k + j`` goes to expert ``s mod E`` (distinct per row when ``k <= E``)."""
    ids = (torch.arange(M * k, dtype=torch.int32) % E).view(M, k).contiguous()
    return random_weights(M, k, seed), ids


def forced_empty(M: int, E: int, k: int, seed: int = 0, empty: int | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k where expert ``empty`` (default ``E // 2``) gets no token (needs ``k < E``)."""
    if k >= E:
        raise ValueError(f"forced_empty needs k < E, got k={k}, E={E}")
    logits = torch.randn(M, E, generator=_gen(seed))
    logits[:, E // 2 if empty is None else empty] = float("-inf")
    return _topk_of(logits, k)


def half_empty(M: int, E: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k over the even experts only; odd experts get no token."""
    if k > (E + 1) // 2:
        raise ValueError(f"half_empty needs k <= ceil(E/2), got k={k}, E={E}")
    logits = torch.randn(M, E, generator=_gen(seed))
    logits[:, 1::2] = float("-inf")
    return _topk_of(logits, k)


def with_minus_one(M: int, E: int, k: int, seed: int = 0, frac: float = 0.34,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k, then about ``frac`` of the slots set to ``-1`` (remote / filtered);
    the weights of those slots are NaN, since they must never be read."""
    w, ids = softmax_topk(M, E, k, seed)
    drop = torch.rand(M, k, generator=_gen(seed + 1)) < frac
    return w.masked_fill(drop, float("nan")), ids.masked_fill(drop, -1)


def stale_padding(M: int, E: int, k: int, seed: int = 0, n_valid: int | None = None,
                  E_g: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k in rows ``< n_valid`` (default ``M // 2``); later rows hold stale ids
    (``-99999``, ``2071690107``, ``E_g`` cycling) and NaN weights."""
    n_valid = M // 2 if n_valid is None else n_valid
    w, ids = softmax_topk(M, E, k, seed)
    stale = torch.tensor([*STALE_IDS, E if E_g is None else E_g], dtype=torch.int32)
    pad = stale[torch.arange((M - n_valid) * k) % stale.numel()].view(M - n_valid, k)
    ids[n_valid:] = pad
    w[n_valid:] = float("nan")
    return w, ids


ROUTINGS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "softmax_topk": softmax_topk,
    "all_to_expert0": all_to_expert0,
    "round_robin": round_robin,
    "forced_empty": forced_empty,
    "half_empty": half_empty,
    "with_minus_one": with_minus_one,
}


def moe_shapes(*, max_m: int = 40, max_e: int = 9, max_h: int = 40, max_i: int = 24):
    """Hypothesis strategy of small layer shapes: a dict with ``M`` (0 included), ``H``,
    ``I``, ``E``, ``k`` (``1 … E``, ``E`` included), ``gated``, ``routing`` (a name of
    :data:`ROUTINGS` valid for that ``E``/``k``) and ``seed``. Imports Hypothesis lazily."""
    from hypothesis import strategies as st

    @st.composite
    def _shapes(draw):
        E = draw(st.integers(1, max_e))
        k = draw(st.one_of(st.just(E), st.integers(1, E)))
        routes = ["softmax_topk", "all_to_expert0", "round_robin", "with_minus_one"]
        if k < E:
            routes.append("forced_empty")
        if k <= (E + 1) // 2:
            routes.append("half_empty")
        return {
            "M": draw(st.one_of(st.just(0), st.integers(0, max_m))),
            "H": draw(st.integers(1, max_h)),
            "I": draw(st.integers(1, max_i)),
            "E": E,
            "k": k,
            "gated": draw(st.booleans()),
            "routing": draw(st.sampled_from(routes)),
            "seed": draw(st.integers(0, 2**16)),
        }

    return _shapes()
