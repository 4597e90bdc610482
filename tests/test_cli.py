"""The CLI through ``main(argv)``: backends table, run against the oracle, clean errors."""

from __future__ import annotations

import pytest
import torch

from moe_core import cli


def test_backends_lists_torch_available(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    torch_row = next(line for line in out.splitlines() if line.startswith("torch "))
    assert "yes" in torch_row and "moe-core" in torch_row
    assert "filter_expert" in out


@pytest.mark.slow
def test_run_real_preset_passes_against_oracle(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--model", "qwen3-30b-a3b", "--tokens", "3", "--backend", "torch",
                     "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "backend torch" in out and "PASS" in out
    max_err = float(out.split("max ")[1].split()[0])
    assert max_err < 1e-5


@pytest.fixture
def tiny_preset(monkeypatch: pytest.MonkeyPatch) -> str:
    """A preset of toy size under the name of a real one, for tests of the command's logic."""
    import attrs

    from moe_core import presets

    tiny = attrs.evolve(presets.PRESETS["deepseek-v3"], num_experts=16, hidden_size=64, intermediate_size=32,
                        num_expert_group=4, topk_group=2, top_k=4)
    monkeypatch.setattr(presets, "PRESETS", {**presets.PRESETS, "deepseek-v3": tiny})
    return "deepseek-v3"


def test_run_zero_tokens(tiny_preset: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--model", tiny_preset, "--tokens", "0", "--repeat", "1"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_run_fails_when_error_exceeds_tolerance(tiny_preset: str, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from moe_core import reference

    real = reference.TorchBackend.combine

    def wrong_combine(self, down, out, scale):            # drops the last slot of every token
        return real(self, down[:, :-1], out, scale)

    monkeypatch.setattr(reference.TorchBackend, "combine", wrong_combine)
    assert cli.main(["run", "--model", tiny_preset, "--tokens", "5", "--repeat", "1"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_unknown_backend_is_a_clean_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--model", "qwen3-30b-a3b", "--tokens", "1", "--backend", "nope"]) == 2
    err = capsys.readouterr().err
    assert "BackendNotFoundError" in err and "torch" in err


def test_bad_model_is_rejected_by_argparse() -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "--model", "no-such-model"])


def test_make_weights_overlapping_experts_are_distinct() -> None:
    gen = torch.Generator().manual_seed(0)
    monkey_limit = cli._FULL_WEIGHTS_LIMIT
    try:
        cli._FULL_WEIGHTS_LIMIT = 0                          # force the shared-buffer layout
        w = cli.make_weights((4, 8, 64), torch.float32, torch.device("cpu"), gen)
    finally:
        cli._FULL_WEIGHTS_LIMIT = monkey_limit
    assert w.shape == (4, 8, 64) and w.stride(-1) == 1 and w.stride(0) < 8 * 64
    assert not torch.equal(w[0], w[1])
