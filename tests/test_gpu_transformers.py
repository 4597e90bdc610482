"""moe_core.integrations.transformers on a CUDA GPU with the ``cuda`` backend (marker ``gpu``).

- bf16: a one-layer model's logits (its MoE input is the same patched or not, so the routing
  is too) and, for two-layer models, every block's output on the activations the unpatched
  model feeds it, within the bf16 tolerance. (Whole multi-layer bf16 models are not compared:
  rounding upstream flips near-tied routing choices, in the unpatched model too.)
- fp32 (IEEE dots on both sides): logits within the fp32 tolerance and 20 greedy tokens identical.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from moe_core.integrations._hf_adapters import looks_like_moe  # noqa: E402
from moe_core.integrations._hf_models import arch_available, capture_block_io  # noqa: E402
from moe_core.integrations.transformers import TINY_ARCHS, patch_moe, tiny_model, unpatch_moe  # noqa: E402
from moe_core.testing import assert_close_normalized, tolerance_for  # noqa: E402

pytestmark = pytest.mark.gpu
logger = logging.getLogger(__name__)


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """The unpatched model's fp32 matmuls in IEEE fp32 too (moe-core never uses TF32)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture
def arch(request):
    ok, reason = arch_available(request.param)
    if not ok:
        pytest.skip(reason)
    return request.param


def _ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed)).cuda()


def _model(arch: str, **kw) -> nn.Module:
    """A tiny model whose unpatched experts are the per-expert loop (transformers 5 would
    otherwise pick ``grouped_mm``, whose fp32 support depends on the torch build)."""
    model = tiny_model(arch, device="cuda", **kw)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    return model


def _moe_blocks(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n.endswith(("mlp", "block_sparse_moe")) and looks_like_moe(m)}


@pytest.mark.parametrize("arch", TINY_ARCHS, indirect=True)
def test_bf16_one_layer_logits(arch):
    model = _model(arch, dtype=torch.bfloat16, num_hidden_layers=1, seed=7)
    ids = _ids(4, 32, 1)
    with torch.no_grad():
        ref = model(ids).logits
        report = patch_moe(model, backend="cuda")
        try:
            assert report.backend == ("cuda",) and len(report.patched) == 1
            out = model(ids).logits
        finally:
            unpatch_moe(model)
        back = model(ids).logits
    logger.info("transformers %s, %s: %s", transformers.__version__, arch, report)
    assert_close_normalized(out, ref, *tolerance_for(torch.bfloat16), arch=arch)
    assert torch.equal(back, ref)


@pytest.mark.parametrize("arch", TINY_ARCHS, indirect=True)
def test_bf16_every_block_on_real_activations(arch):
    model = _model(arch, dtype=torch.bfloat16, num_hidden_layers=3, seed=8)
    blocks = _moe_blocks(model)
    seen = capture_block_io(model, blocks, _ids(4, 64, 2))
    patch_moe(model, backend="cuda")
    try:
        with torch.no_grad():
            for name, block in blocks.items():
                x, ref = seen[name]
                out = block(x)
                assert type(out) is type(ref)
                if isinstance(ref, tuple):
                    out, ref = out[0], ref[0]
                assert_close_normalized(out, ref, *tolerance_for(torch.bfloat16), arch=arch, block=name)
    finally:
        unpatch_moe(model)


@pytest.mark.parametrize("arch", TINY_ARCHS, indirect=True)
def test_fp32_logits_and_greedy_generation(arch):
    model = _model(arch, dtype=torch.float32, seed=9)
    ids = _ids(2, 16, 3)
    prompt = _ids(1, 6, 4)
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model(ids).logits
        ref_tokens = model.generate(prompt, **kw)
        patch_moe(model, backend="cuda")
        try:
            out = model(ids).logits
            tokens = model.generate(prompt, **kw)
        finally:
            unpatch_moe(model)
    assert_close_normalized(out, ref, *tolerance_for(torch.float32), arch=arch)
    assert torch.equal(tokens, ref_tokens), f"{arch}: greedy tokens differ:\n{tokens}\n{ref_tokens}"
