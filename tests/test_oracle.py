"""The float64 oracle itself: independence from the code under test, and hand-computed cases."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

import moe_core.testing.oracle as oracle_mod
from moe_core.testing import oracle_moe
from moe_core.testing.oracle import oracle_dequantize_weight, oracle_quantize_activation
from moe_core.testing.strategies import single_torch_thread  # noqa: F401  (autouse)

NAN = float("nan")


def test_oracle_imports_nothing_from_moe_core() -> None:
    tree = ast.parse(Path(oracle_mod.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "math", "torch", "typing"}, imported


def test_relu2_literal_numbers() -> None:
    # x·w1ᵀ = 1 + 2 = 3 → relu2 = 9 → ·w2ᵀ = [4.5, −9] → ·0.5 (weight) → ·2 (scaling)
    x = torch.tensor([[1.0, 2.0]])
    w1 = torch.tensor([[[1.0, 1.0]], [[5.0, 5.0]]])            # [E=2, I=1, H=2]
    w2 = torch.tensor([[[0.5], [-1.0]], [[7.0], [7.0]]])       # [E=2, H=2, I=1]
    out = oracle_moe(x, w1, w2, torch.tensor([[0.5]]), torch.tensor([[0]], dtype=torch.int32),
                     activation="relu2", is_gated=False, routed_scaling_factor=2.0)
    assert out.dtype == torch.float64
    assert torch.equal(out, torch.tensor([[4.5, -9.0]], dtype=torch.float64))


def _silu(v: float) -> float:
    return v / (1.0 + math.exp(-v))


def _hand_moe(x, w1, w2, b1, b2, weights, ids, scale):
    """Python-scalar loop over tokens and slots (gated silu, halves)."""
    M, k = len(ids), len(ids[0])
    H = len(w2[0])
    I = len(w2[0][0])
    out = [[0.0] * H for _ in range(M)]
    for m in range(M):
        for j in range(k):
            e = ids[m][j]
            if e < 0:
                continue
            h = [sum(x[m][c] * w1[e][r][c] for c in range(len(x[m]))) + b1[e][r] for r in range(2 * I)]
            act = [_silu(h[i]) * h[I + i] for i in range(I)]
            for c in range(H):
                y = sum(act[i] * w2[e][c][i] for i in range(I)) + b2[e][c]
                out[m][c] += weights[m][j] * y
    return [[v * scale for v in row] for row in out]


def test_gated_silu_matches_hand_loop() -> None:
    x = [[1.0, 2.0, -0.5], [0.5, -1.0, 0.25]]
    w1 = [[[0.5, -0.25, 0.1], [1.0, 0.5, -0.3], [0.2, 0.2, 0.2], [-0.7, 0.1, 0.4]],
          [[-1.0, 0.5, 0.3], [0.25, 0.25, 0.9], [0.6, -0.1, 0.0], [0.3, 0.3, -0.3]]]   # [E=2, N=4, H=3]
    w2 = [[[2.0, 0.1], [-1.0, 0.3], [0.5, 0.5]], [[0.5, -0.2], [1.5, 0.7], [-0.4, 0.1]]]  # [E=2, H=3, I=2]
    b1 = [[0.1, -0.1, 0.0, 0.2], [0.0, 0.3, -0.2, 0.1]]
    b2 = [[0.01, 0.02, 0.03], [-0.05, 0.0, 0.05]]
    ids = [[0, 1], [1, -1]]
    weights = [[0.25, 0.75], [1.0, NAN]]                  # the -1 slot's weight is never read
    T = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    got = oracle_moe(T(x), T(w1), T(w2), T(weights), torch.tensor(ids, dtype=torch.int32), b1=T(b1), b2=T(b2),
                     routed_scaling_factor=2.5)
    want64 = oracle_moe(T(x).double(), T(w1).double(), T(w2).double(), T(weights).double(),
                        torch.tensor(ids), b1=T(b1).double(), b2=T(b2).double(), routed_scaling_factor=2.5)
    # the hand loop runs on the fp32-rounded inputs too: compare with those
    x32, w132, w232 = T(x).double().tolist(), T(w1).double().tolist(), T(w2).double().tolist()
    want = _hand_moe(x32, w132, w232, T(b1).double().tolist(), T(b2).double().tolist(),
                     T(weights).double().tolist(), ids, 2.5)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(want64, got, rtol=0, atol=0)


def test_no_combine_weight_on_input_and_minus_one() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g)
    w1 = torch.randn(2, 6, 4, generator=g)
    w2 = torch.randn(2, 4, 3, generator=g)
    ids = torch.tensor([[0, -1], [1, 1], [-1, -1]], dtype=torch.int32)
    tw = torch.tensor([[0.3, NAN], [0.5, 0.25], [NAN, NAN]])
    per_slot = oracle_moe(x, w1, w2, tw, ids, no_combine=True)
    assert per_slot.shape == (3, 2, 4)
    assert torch.equal(per_slot[0, 1], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(per_slot[2], torch.zeros(2, 4, dtype=torch.float64))
    assert torch.equal(per_slot[1, 0], per_slot[1, 1])            # same expert, same token, unweighted
    combined = oracle_moe(x, w1, w2, tw, ids, routed_scaling_factor=3.0)
    want = 3.0 * (per_slot * torch.nan_to_num(tw.double()).unsqueeze(-1)).sum(1)
    torch.testing.assert_close(combined, want, rtol=1e-12, atol=1e-12)
    # k = 1 with the weight on the input: relu2 of a scaled input is not the scaled output
    ids1, tw1 = ids[:, :1], torch.tensor([[0.5], [2.0], [NAN]])
    on_in = oracle_moe(x, w1[:, :3], w2, tw1, ids1, activation="relu2", is_gated=False,
                       apply_router_weight_on_input=True)
    ref = oracle_moe(x * tw1.nan_to_num(), w1[:, :3], w2, torch.ones(3, 1), ids1, activation="relu2",
                     is_gated=False)
    torch.testing.assert_close(on_in, ref, rtol=1e-6, atol=1e-6)


def test_expert_map_masks_stale_ids() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 8, generator=g)
    w1, w2 = torch.randn(2, 8, 8, generator=g), torch.randn(2, 8, 4, generator=g)
    table = torch.tensor([-1, -1, 0, 1], dtype=torch.int32)      # E_g = 4, this rank holds 2 and 3
    gids = torch.tensor([[2, 0], [3, 2], [2071690107, -99999], [4, 3]], dtype=torch.int32)
    tw = torch.full((4, 2), 0.5)
    got = oracle_moe(x, w1, w2, tw, gids, expert_map=table)
    lids = torch.tensor([[0, -1], [1, 0], [-1, -1], [-1, 1]], dtype=torch.int32)
    assert torch.equal(got, oracle_moe(x, w1, w2, tw, lids))
    assert torch.equal(got[2], torch.zeros(8, dtype=torch.float64))


@pytest.mark.parametrize("layout", ["halves", "interleaved"])
def test_swiglu_oai_formula(layout: str) -> None:
    alpha, limit = 1.702, 0.8
    x = torch.tensor([[1.0, -2.0]])
    w1 = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, -1.0]]])   # gate/up rows per layout
    w2 = torch.eye(2).reshape(1, 2, 2)
    out = oracle_moe(x, w1, w2, torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int32), activation="swiglu_oai",
                     gate_up_layout=layout, alpha=alpha, limit=limit)
    h = [1.0, -2.0, 2.0, 2.0]
    g, u = (h[0::2], h[1::2]) if layout == "interleaved" else (h[:2], h[2:])
    want = []
    for gi, ui in zip(g, u):
        gi, ui = min(gi, limit), max(-limit, min(ui, limit))
        want.append(gi / (1 + math.exp(-alpha * gi)) * (ui + 1))
    torch.testing.assert_close(out, torch.tensor([want], dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_dequantize_int4_nibbles_and_zero_points() -> None:
    w = torch.tensor([[[0x21, 0xF0]], [[0x00, 0x00]]], dtype=torch.uint8)      # [E=2, N=1, K/2=2]
    scale = torch.tensor([[[0.5]], [[1.0]]])                                   # group 4 -> [E, 1, 1]
    got = oracle_dequantize_weight(w, 0, "int4_w4a16", scale, None, group_size=4)
    assert got.tolist() == [[(1 - 8) * 0.5, (2 - 8) * 0.5, (0 - 8) * 0.5, (15 - 8) * 0.5]]
    w2 = torch.tensor([[[0x21], [0x43]]], dtype=torch.uint8)                   # [E=1, N=2, K/2=1]
    zp = torch.tensor([[[0x53]]], dtype=torch.uint8)                           # N packed: row0 3, row1 5
    got = oracle_dequantize_weight(w2, 0, "int4_w4a16", torch.ones(1, 2, 1), zp, group_size=2)
    assert got.tolist() == [[1 - 3, 2 - 3], [3 - 5, 4 - 5]]


def test_quantize_activation_int8_rounds_half_to_even() -> None:
    # per-tensor scale = 127 / 127 = 1: values are their own quantized values
    a = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 127.0]])
    got = oracle_quantize_activation(a, "int8_w8a8")
    assert got.tolist() == [[0.0, 2.0, 2.0, -0.0, -2.0, 127.0]]
    static = oracle_quantize_activation(a, "int8_w8a8", static_scale=torch.tensor([0.5]))
    assert static.tolist() == [[0.5, 1.5, 2.5, -0.5, -2.5, 63.5]]            # 254 clamps to 127
