"""moe_core.integrations.transformers on CPU: tiny random models of every supported
architecture, patched (torch backend, float32) against the same model unpatched.

The unpatched transformers blocks are the independent oracle here: their per-expert loops
share no code with moe-core's routing, alignment or GEMMs.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from moe_core.errors import BackendNotFoundError, MoEInputError, UnsupportedConfigError  # noqa: E402
from moe_core import select_experts  # noqa: E402
from moe_core.integrations._hf_adapters import looks_like_moe, plan_block  # noqa: E402
from moe_core.integrations._hf_models import arch_available, capture_block_io  # noqa: E402
from moe_core.integrations.transformers import (TINY_ARCHS, is_patched, patch_moe, tiny_model,  # noqa: E402
                                                unpatch_moe)
from moe_core.testing import assert_close_normalized, tolerance_for  # noqa: E402

FP32 = tolerance_for(torch.float32)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: intra-op threads only add contention on a small CI box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=TINY_ARCHS)
def arch_model(request):
    ok, reason = arch_available(request.param)
    if not ok:
        pytest.skip(reason)
    return request.param, tiny_model(request.param, seed=3)


def _ids(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _moe_blocks(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n.endswith(("mlp", "block_sparse_moe")) and looks_like_moe(m)}


def test_logits_match_and_unpatch_restores(arch_model, nan_empty):
    arch, model = arch_model
    ids = _ids()
    blocks = _moe_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    with torch.no_grad():
        ref = model(ids).logits
        report = patch_moe(model, backend="torch")
        try:
            assert [p[0] for p in report.patched] == list(blocks) and not report.unsupported
            assert report.backend == ("torch",)
            assert all("forward" in b.__dict__ for b in blocks.values())
            out = model(ids).logits
        finally:
            assert unpatch_moe(model) == len(blocks)
        back = model(ids).logits
    assert_close_normalized(out, ref, *FP32, arch=arch)
    assert not torch.equal(out, torch.zeros_like(out))
    # unpatch restores exactly: same forwards, no state left, bit-identical logits
    assert torch.equal(back, ref)
    assert not is_patched(model)
    assert all("forward" not in b.__dict__ and not hasattr(b, "_moe_core_patch") for b in blocks.values())


def test_greedy_generation_identical(arch_model):
    arch, model = arch_model
    prompt = _ids(batch=1, seq=6, seed=2)
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(prompt, **kw)
        patch_moe(model, backend="torch")
        try:
            out = model.generate(prompt, **kw)
        finally:
            unpatch_moe(model)
    assert out.shape == (1, 26)
    assert torch.equal(out, ref), f"{arch}: greedy tokens differ:\n{out}\n{ref}"


def test_each_block_matches_on_real_activations(arch_model):
    """Per block, on the hidden states the model really feeds it (2x and 8x scaled too: gpt-oss's
    clamp at limit=7 is reached): same output structure, aux outputs exact, hidden within fp32 tolerance."""
    arch, model = arch_model
    blocks = _moe_blocks(model)
    seen = capture_block_io(model, blocks, _ids(seed=4))
    patch_moe(model, backend="torch")
    try:
        with torch.no_grad():
            for name, block in blocks.items():
                x, _ = seen[name]
                for scale in (1.0, 8.0):
                    xs = x * scale
                    state = block._moe_core_patch
                    ref = state.original_forward(xs) if callable(state.original_forward) else type(block).forward(block, xs)
                    out = block(xs)
                    assert type(out) is type(ref)
                    if isinstance(ref, tuple):
                        assert len(out) == len(ref) == 2
                        assert torch.equal(out[1], ref[1]), f"{arch} {name}: aux output differs"
                        out, ref = out[0], ref[0]
                    assert out.shape == ref.shape == xs.shape
                    assert_close_normalized(out, ref, *FP32, arch=arch, block=name, scale=scale)
                if arch == "gpt_oss":       # the clamp is exercised at scale 8
                    w1 = state.plan.weights().w1
                    gate_up = torch.einsum("mh,enh->men", (x * 8).reshape(-1, x.shape[-1]), w1)
                    assert (gate_up.abs() > state.plan.layer.gemm1_limit).any()
    finally:
        unpatch_moe(model)


def _model_router_choice(block: nn.Module, h: torch.Tensor, plan) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, weights) as the block's own router picks them, scaling removed, sorted by id."""
    gate = getattr(block, "gate", None) or block.router
    if isinstance(gate, nn.Linear):                      # transformers 4 Mixtral / Qwen: in-block softmax routing
        probs = torch.softmax(gate(h).float(), dim=-1)
        w, ids = probs.topk(plan.layer.top_k, dim=-1)
        if getattr(block, "norm_topk_prob", True):
            w = w / w.sum(-1, keepdim=True)
    else:
        out = gate(h)
        if len(out) == 3:
            _, w, ids = out
        elif out[0].dtype.is_floating_point:               # transformers 4 gpt-oss: dense scores, ids
            ids = out[1]
            w = out[0].gather(1, ids)
        else:                                            # transformers 4 DeepSeek-V3: ids, weights
            ids, w = out
    w = w.float() / plan.layer.scaling
    order = ids.argsort(dim=-1)
    return ids.gather(1, order).long(), w.gather(1, order)


def test_routing_matches_the_models_router(arch_model):
    """select_experts with the model's scoring/grouping/bias picks the experts the model picks."""
    arch, model = arch_model
    blocks = _moe_blocks(model)
    seen = capture_block_io(model, blocks, _ids(seed=5))
    config = model.config
    with torch.no_grad():
        for name, block in blocks.items():
            plan = plan_block(block, config)
            h = seen[name][0].reshape(-1, seen[name][0].shape[-1])
            _, w, ids = plan.route(h)
            ref_ids, ref_w = _model_router_choice(block, h, plan)
            order = ids.argsort(dim=-1)
            assert torch.equal(ids.gather(1, order).long(), ref_ids), f"{arch} {name}: experts differ"
            torch.testing.assert_close(w.gather(1, order), ref_w, rtol=1e-5, atol=1e-6)
            assert len(torch.unique(ids)) > plan.layer.top_k          # routing is not degenerate


def test_deepseek_plan_uses_grouping_bias_and_scaling():
    model = tiny_model("deepseek_v3")
    block = model.model.layers[0].mlp
    plan = plan_block(block, model.config)
    assert plan.layer.routed_scaling_factor == 2.5
    assert plan.shared is block.shared_experts
    assert (plan.layer.num_local_experts, plan.layer.top_k, plan.layer.intermediate_size) == (8, 2, 48)
    # the correction bias steers the choice: a large bias on expert 7 puts it in every token's top-k
    h = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        block.gate.e_score_correction_bias[7] = 10.0
        try:
            _, w, ids = plan.route(h)
        finally:
            block.gate.e_score_correction_bias[7] = 0.05
    assert (ids == 7).any(dim=1).all()
    assert torch.allclose(w.sum(-1), torch.ones(16))           # norm_topk_prob; scaling is the layer's


def test_gpt_oss_plan_maps_swiglu_interleaved_biases_without_copy():
    model = tiny_model("gpt_oss")
    block = model.model.layers[0].mlp
    plan = plan_block(block, model.config)
    layer, weights = plan.layer, plan.weights()
    assert (layer.activation, layer.gate_up_layout, layer.gemm1_alpha, layer.gemm1_limit) == \
        ("swiglu_oai", "interleaved", 1.702, 7.0)
    assert plan.layout == "fused" and plan.returns_aux
    # views of the model's own parameters: no copy
    assert weights.w1.data_ptr() == block.experts.gate_up_proj.data_ptr()
    assert weights.w2.data_ptr() == block.experts.down_proj.data_ptr()
    assert weights.b1 is block.experts.gate_up_proj_bias and weights.b2 is block.experts.down_proj_bias


def test_gpt_oss_router_choice_is_select_experts_softmax_renormalize():
    """gpt-oss reuses its router's top-k; it is select_experts(softmax, renormalize=True) of the logits."""
    model = tiny_model("gpt_oss")
    block = model.model.layers[0].mlp
    plan = plan_block(block, model.config)
    h = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, w, ids = plan.route(h)
        logits = nn.functional.linear(h, block.router.weight, block.router.bias)
        ref_w, ref_ids = select_experts(logits, plan.layer.top_k, renormalize=True)
    order, ref_order = ids.argsort(-1), ref_ids.argsort(-1)
    assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order))
    torch.testing.assert_close(w.gather(1, order), ref_w.gather(1, ref_order), rtol=1e-5, atol=1e-6)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32


class MixtralSparseMoeBlock(nn.Module):
    """A transformers-4 style block (per-expert nn.Linear, ``(hidden, logits)`` return), written
    independently here so CI covers the stacked-copy reader whatever transformers is installed."""

    def __init__(self, H: int = 32, I: int = 24, E: int = 4, k: int = 2) -> None:
        super().__init__()
        self.top_k = k
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList()
        for _ in range(E):
            mlp = nn.Module()
            mlp.w1, mlp.w3, mlp.w2 = nn.Linear(H, I, bias=False), nn.Linear(H, I, bias=False), nn.Linear(I, H, bias=False)
            self.experts.append(mlp)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, H = hidden_states.shape
        h = hidden_states.reshape(-1, H)
        logits = self.gate(h)
        w, ids = torch.softmax(logits, dim=-1).topk(self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(h)
        for m in range(h.shape[0]):
            for j in range(self.top_k):
                mlp = self.experts[int(ids[m, j])]
                out[m] += w[m, j] * mlp.w2(nn.functional.silu(mlp.w1(h[m])) * mlp.w3(h[m]))
        return out.reshape(B, S, H), logits


def test_per_expert_linear_layout_is_stacked_once_and_restacked_on_change():
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock().eval()
    config = type("Cfg", (), {"hidden_act": "silu"})()
    block.config = config
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        ref, ref_logits = block(x)
        report = patch_moe(block, backend="torch")
        assert report.copied == ("<model>",) and report.patched[0][3] == "stacked copy"
        out, logits = block(x)
        assert torch.equal(logits, ref_logits)
        assert_close_normalized(out, ref, *FP32)
        stacked = block._moe_core_patch.plan.weights()
        assert stacked.w1.shape == (4, 48, 32) and stacked.w2.shape == (4, 32, 24)
        assert block._moe_core_patch.plan.weights() is stacked             # one copy, reused
        # replacing an expert's weights (new storage) is picked up
        block.experts[0].w1.weight = nn.Parameter(torch.randn(24, 32))
        block.experts[-1].w2.weight = nn.Parameter(torch.randn(32, 24))
        out2, _ = block(x)
        assert block._moe_core_patch.plan.weights() is not stacked
        unpatch_moe(block)
        ref2, _ = block(x)
    assert_close_normalized(out2, ref2, *FP32)
    assert not torch.equal(ref2, ref)


def _mixtral_with_foreign_block() -> nn.Module:
    model = tiny_model("mixtral", seed=5)
    mlp = model.model.layers[1].mlp if hasattr(model.model.layers[1], "mlp") else model.model.layers[1].block_sparse_moe

    class OtherSparseMoeBlock(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.experts = nn.ModuleList([nn.Linear(4, 4)])

        def forward(self, hidden_states):
            return self.inner(hidden_states)

    layer = model.model.layers[1]
    name = "mlp" if hasattr(layer, "mlp") else "block_sparse_moe"
    setattr(layer, name, OtherSparseMoeBlock(mlp))
    return model


def test_unsupported_blocks_are_reported_by_name():
    model = _mixtral_with_foreign_block()
    ids = _ids()
    with pytest.raises(UnsupportedConfigError, match=r"model\.layers\.1\.\w+: OtherSparseMoeBlock"):
        patch_moe(model, backend="torch")
    assert not is_patched(model)                                    # strict: nothing patched
    with torch.no_grad():
        ref = model(ids).logits
        report = patch_moe(model, backend="torch", strict=False)
        assert [(n.split(".")[2], c) for n, c, _ in report.unsupported] == [("1", "OtherSparseMoeBlock")]
        assert "OtherSparseMoeBlock" in str(report) and len(report.patched) == 1
        out = model(ids).logits
        unpatch_moe(model)
    assert_close_normalized(out, ref, *FP32)


def test_quantized_or_unknown_expert_storage_is_reported():
    model = tiny_model("gpt_oss")               # fused 3-D experts in transformers 4 and 5
    experts = model.model.layers[0].mlp.experts
    experts.gate_up_proj = nn.Parameter(experts.gate_up_proj.data.to(torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(UnsupportedConfigError, match=r"model\.layers\.0\.mlp: GptOssMLP: .*float8"):
        patch_moe(model, backend="torch")


def test_errors_no_moe_double_patch_bad_backend():
    with pytest.raises(UnsupportedConfigError, match="no MoE block found in Sequential"):
        patch_moe(nn.Sequential(nn.Linear(4, 4)))
    model = tiny_model("qwen3_moe")
    with pytest.raises(BackendNotFoundError):
        patch_moe(model, backend="no-such-backend")
    assert not is_patched(model)
    patch_moe(model, backend="torch")
    with pytest.raises(MoEInputError, match="already patched"):
        patch_moe(model, backend="torch")
    assert unpatch_moe(model) == 2 and unpatch_moe(model) == 0


def test_training_mode_runs_the_original_forward(caplog):
    model = tiny_model("mixtral")
    block = next(iter(_moe_blocks(model).values()))
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        ref = block(x)
        patch_moe(model, backend="torch")
        model.train()
        out = block(x)
        model.eval()
        unpatch_moe(model)
    if isinstance(ref, tuple):                      # transformers 4: (hidden, router_logits)
        assert torch.equal(out[1], ref[1])
        out, ref = out[0], ref[0]
    assert torch.equal(out, ref)
    assert "training mode" in caplog.text


@pytest.mark.interp
def test_logits_match_through_the_triton_sequence_under_the_interpreter(arch_model):
    """The CUDA backend's Triton kernels (interpreter, CPU) on the model's own views: strided
    gpt-oss weights, biases, interleaved swiglu, grouped DeepSeek routing."""
    if torch.cuda.is_available():
        pytest.skip("interpreter test: runs on CPU machines only")
    pytest.importorskip("triton")
    from moe_core.backends.cuda import CudaBackend

    class InterpCuda(CudaBackend):
        def is_available(self) -> tuple[bool, str]:
            return True, "test: interpreter"

    arch, model = arch_model
    ids = _ids(seed=6)
    with torch.no_grad():
        ref = model(ids).logits
        report = patch_moe(model, backend=InterpCuda())
        try:
            assert report.backend == ("cuda",)
            out = model(ids).logits
        finally:
            unpatch_moe(model)
    assert_close_normalized(out, ref, *FP32, arch=arch)


def test_importing_moe_core_does_not_import_transformers():
    code = ("import sys, moe_core, moe_core.integrations.transformers as t; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
