"""The backend conformance suite: one base class, :class:`BackendConformanceTests`.

A backend author subclasses it in a test module (or runs ``pytest --moe-backend NAME``)::

    from moe_core.testing.conformance import BackendConformanceTests

    class TestMineConformance(BackendConformanceTests):
        backend_name = "mine"          # the entry-point name in ``moe_core.backends``

What it checks, every result against the float64 oracle (:func:`moe_core.testing.oracle_moe`)
with the tolerance table of :mod:`moe_core.testing.tolerances`, outputs poisoned with NaN
before the run:

- the declared contract (name, API version, capability answers);
- numerics for every compute dtype and every quantization scheme the backend's
  ``supports()`` / ``supports_dtype()`` accepts (the others skip with the backend's reason);
- bad inputs raise :class:`~moe_core.errors.MoEInputError` / a ``TypeError`` before any step runs;
- hooks see token-major ``gate_up`` / ``down`` rows and their edits reach the output;
- ``-1`` slots contribute exactly zero; ``routed_scaling_factor`` is applied (k = 1, 2, 3);
- ``no_combine``, ``inplace``, ``M = 0``, and bit-identical entry points;
- CUDA-graph capture and replay when the backend computes on a CUDA device (skipped otherwise).

Class attributes size the cases; the defaults are tiny so an interpreted backend runs the
whole suite in about half a minute.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import pytest
import torch

from moe_core.testing.oracle import oracle_moe
from moe_core.testing.tolerances import assert_close_normalized, assert_close_quant, tolerance_for

__all__ = ["BackendConformanceTests", "QUANT_CASES", "poison_empty"]

#: quantization cases: id -> (scheme, keyword arguments of ``quantize_layer``); ``block`` and
#: ``group`` are replaced by the class's ``block_shape`` / ``group_size``
QUANT_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "fp8-per-tensor": ("fp8_w8a8", {}),
    "fp8-per-channel": ("fp8_w8a8", {"per_channel": True}),
    "fp8-block": ("fp8_w8a8", {"block_shape": "block"}),
    "int8_w8a8-per-channel": ("int8_w8a8", {"per_channel": True}),
    "int8_w8a8-block": ("int8_w8a8", {"block_shape": "block"}),
    "int8_w8a16-per-channel": ("int8_w8a16", {}),
    "int8_w8a16-group": ("int8_w8a16", {"group_size": "group", "zero_point": True}),
    "int4_w4a16-group": ("int4_w4a16", {"group_size": "group", "zero_point": True}),
}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def poison_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.empty``/``empty_like`` return NaN-filled float tensors: unwritten rows show up."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.dtype.is_floating_point and t.dtype.itemsize >= 2:
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


class _Case:
    """One layer with inputs on the backend's device (weights ``randn / 10``)."""

    def __init__(self, suite: BackendConformanceTests, backend: Any, dtype: torch.dtype, *, M: int | None = None,
                 k: int | None = None, seed: int = 0, minus_one: bool = False, **layer_kw: Any) -> None:
        import moe_core

        E, H, I = suite.num_experts, suite.hidden_size, suite.intermediate_size
        M = suite.num_tokens if M is None else M
        k = suite.top_k if k is None else k
        self.device = backend.device()
        self.dtype = dtype
        self.layer = moe_core.MoELayer(num_local_experts=E, num_experts=E, top_k=k, hidden_size=H,
                                       intermediate_size=I, **layer_kw)
        gen = torch.Generator().manual_seed(seed)
        N = self.layer.gate_up_rows
        self.x = (torch.randn(M, H, generator=gen) / 10).to(dtype)
        self.w1 = (torch.randn(E, N, H, generator=gen) / 10).to(dtype)
        self.w2 = (torch.randn(E, H, I, generator=gen) / 10).to(dtype)
        logits = torch.randn(M, E, generator=gen)
        vals, ids = torch.softmax(logits, dim=-1).topk(k, dim=-1)
        self.topk_weights = (vals / vals.sum(dim=-1, keepdim=True)).float()
        self.topk_ids = ids.to(torch.int32)
        if minus_one and M:
            drop = torch.rand(M, k, generator=gen) < 0.34
            drop[-1] = True                                   # one token with every slot filtered
            self.topk_ids = self.topk_ids.masked_fill(drop, -1)
            self.topk_weights = self.topk_weights.masked_fill(drop, float("nan"))   # never read
        self.quant = moe_core.QuantSpec.none()
        self.fp8_dtype = backend.fp8_dtype

    def quantize(self, scheme: str, **kw: Any) -> None:
        """Replace the float weights by quantized ones (SEMANTICS §4.1 layouts)."""
        from moe_core.testing.quantize_weights import quantize_layer

        self.w1, self.w2, self.quant = quantize_layer(self.w1.float(), self.w2.float(), scheme,
                                                      fp8_dtype=self.fp8_dtype, **kw)

    def on_device(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(self.device)

    def weights(self) -> Any:
        import attrs

        import moe_core

        q = self.quant
        quant = attrs.evolve(q, **{name: self.on_device(getattr(q, name)) for name in q.TENSOR_FIELDS})
        return moe_core.ExpertWeights(self.on_device(self.w1), self.on_device(self.w2), quant=quant)

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.on_device(self.x), self.on_device(self.topk_weights), self.on_device(self.topk_ids)

    def oracle(self, *, no_combine: bool = False) -> torch.Tensor:
        layer = self.layer
        return oracle_moe(self.x, self.w1, self.w2, self.topk_weights, self.topk_ids,
                          activation=layer.activation, is_gated=layer.is_gated,
                          gate_up_layout=layer.gate_up_layout, alpha=layer.gemm1_alpha, limit=layer.gemm1_limit,
                          apply_router_weight_on_input=layer.apply_router_weight_on_input,
                          routed_scaling_factor=layer.routed_scaling_factor, no_combine=no_combine,
                          quant=None if self.quant.scheme == "none" else self.quant,
                          round_intermediate=None if self.dtype == torch.float32 else self.dtype,
                          fp8_dtype=self.fp8_dtype)

    def context(self, backend: Any, **extra: Any) -> dict[str, Any]:
        return {"backend": backend.name, "dtype": str(self.dtype), "scheme": self.quant.scheme,
                "M": self.x.shape[0], "E": self.w1.shape[0], "k": self.layer.top_k,
                "H": self.layer.hidden_size, "I": self.layer.intermediate_size, **extra}


class BackendConformanceTests:
    """The conformance suite; subclass it with ``backend_name`` set (or pass ``--moe-backend``).

    Override :meth:`make_backend` to test an instance built in code (a platform probe
    replaced, say). Class attributes below size the cases and choose the dtypes.
    """

    #: the backend to check (its entry-point name); None: the ``--moe-backend`` option
    backend_name: ClassVar[str | None] = None
    #: compute dtypes to check; each also needs ``backend.supports_dtype``
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.float16, torch.bfloat16)
    #: compute dtype of the quantized cases (None: the first of bf16, fp16, fp32 in ``dtypes``)
    quant_dtype: ClassVar[torch.dtype | None] = None
    #: activations checked besides gated ``silu`` (``swiglu_oai`` uses the interleaved layout)
    activations: ClassVar[tuple[str, ...]] = ("gelu", "swiglu_oai", "relu2")
    #: ids of :data:`QUANT_CASES` to check; each also needs ``backend.supports``
    quant_cases: ClassVar[tuple[str, ...]] = tuple(QUANT_CASES)
    #: case sizes: M, E, k, H, I (small: interpreted backends run every case)
    num_tokens: ClassVar[int] = 7
    num_experts: ClassVar[int] = 4
    top_k: ClassVar[int] = 2
    hidden_size: ClassVar[int] = 64
    intermediate_size: ClassVar[int] = 32
    #: block shape of the block-quantized cases and group size of the grouped ones
    block_shape: ClassVar[tuple[int, int]] = (32, 32)
    group_size: ClassVar[int] = 32

    # -- fixtures ----------------------------------------------------------------------
    def make_backend(self, config: pytest.Config) -> Any:
        """The backend under test: ``backend_name`` (or ``--moe-backend``) from the registry.

        Skips when that backend cannot run here (with its reason); fails when it is not
        installed or did not load.
        """
        from moe_core import plugins

        name = self.backend_name or config.getoption("moe_backend", default=None)
        if not name:
            pytest.skip("no backend to check: set backend_name on the subclass or pass --moe-backend NAME")
        info = next((i for i in plugins.list_backends() if i.name == name), None)
        if info is not None and info.backend is not None:
            ok, reason = info.available
            if not ok:
                pytest.skip(f"backend {name!r} is not available here: {reason}")
        return plugins.get_backend(name)          # not installed / failed to load: the error says why

    @pytest.fixture
    def moe_backend(self, request: pytest.FixtureRequest) -> Any:
        return self.make_backend(request.config)

    def _dtype_or_skip(self, backend: Any, dtype: torch.dtype) -> None:
        if dtype not in self.dtypes:
            pytest.skip(f"{dtype} is not among this suite's dtypes {[str(d) for d in self.dtypes]}")
        ok, reason = backend.supports_dtype(dtype)
        if not ok:
            pytest.skip(f"backend {backend.name!r}: {reason}")

    def _supported_or_skip(self, backend: Any, case: _Case) -> None:
        ok, reason = backend.supports(case.layer, case.quant)
        if not ok:
            pytest.skip(f"backend {backend.name!r} does not support this case: {reason}")

    def _quant_dtype(self) -> torch.dtype:
        if self.quant_dtype is not None:
            return self.quant_dtype
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            if dtype in self.dtypes:
                return dtype
        return self.dtypes[0]

    def _run(self, backend: Any, case: _Case, **kw: Any) -> torch.Tensor:
        import moe_core

        x, tw, ti = case.inputs()
        w = case.weights()
        return moe_core.fused_experts(x, w.w1, w.w2, tw, ti, layer=case.layer, quant=w.quant,
                                      backend=backend, **kw)

    def _check(self, backend: Any, case: _Case, out: torch.Tensor, ref: torch.Tensor, **extra: Any) -> None:
        context = case.context(backend, **extra)
        if case.quant.scheme == "none":
            assert_close_normalized(out, ref, *tolerance_for(case.dtype), **context)
        else:
            assert_close_quant(out, ref, case.quant, **context)

    # -- the declared contract -----------------------------------------------------------
    def test_declares_contract(self, moe_backend: Any) -> None:
        import moe_core
        from moe_core.backend import BASE_CONFIG_KEYS

        b = moe_backend
        assert isinstance(b, moe_core.Backend), f"{b!r} is not a moe_core.Backend"
        assert isinstance(b.name, str) and b.name and b.name == b.name.lower(), \
            f"backend name must be a non-empty lowercase id, got {b.name!r}"
        assert b.api_version == moe_core.PLUGIN_API_VERSION, \
            f"backend {b.name!r} declares plugin API {b.api_version}, moe-core has {moe_core.PLUGIN_API_VERSION}"
        assert isinstance(b.priority, int) and not isinstance(b.priority, bool), \
            f"priority must be an int, got {b.priority!r}"
        for answer, what in ((b.is_available(), "is_available()"),
                             (b.supports(_Case(self, b, torch.float32, M=1).layer, moe_core.QuantSpec.none()),
                              "supports(layer, QuantSpec.none())"),
                             (b.supports_dtype(torch.float32), "supports_dtype(torch.float32)")):
            assert isinstance(answer, tuple) and len(answer) == 2 and isinstance(answer[0], bool) \
                and isinstance(answer[1], str), f"{what} must return (bool, str), got {answer!r}"
        missing = BASE_CONFIG_KEYS - set(b.config_keys)
        assert not missing, f"config_keys of backend {b.name!r} lack the base launch keys {sorted(missing)}"
        assert isinstance(b.device(), torch.device), f"device() must return a torch.device, got {b.device()!r}"

    # -- numerics ------------------------------------------------------------------------
    @pytest.mark.parametrize("dtype", list(_DTYPES))
    def test_matches_oracle(self, moe_backend: Any, dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self._dtype_or_skip(moe_backend, _DTYPES[dtype])
        case = _Case(self, moe_backend, _DTYPES[dtype])
        self._supported_or_skip(moe_backend, case)
        poison_empty(monkeypatch)
        self._check(moe_backend, case, self._run(moe_backend, case), case.oracle())

    @pytest.mark.parametrize("activation", ["gelu", "swiglu_oai", "relu2"])
    def test_activations(self, moe_backend: Any, activation: str, monkeypatch: pytest.MonkeyPatch) -> None:
        if activation not in self.activations:
            pytest.skip(f"{activation} is not among this suite's activations")
        dtype = self.dtypes[0]
        self._dtype_or_skip(moe_backend, dtype)
        kw: dict[str, Any] = {"activation": activation}
        if activation == "swiglu_oai":
            kw.update(gemm1_alpha=1.702, gemm1_limit=7.0)           # interleaved gate/up rows
        if activation == "relu2":
            kw["is_gated"] = False
        case = _Case(self, moe_backend, dtype, seed=1, **kw)
        self._supported_or_skip(moe_backend, case)
        poison_empty(monkeypatch)
        self._check(moe_backend, case, self._run(moe_backend, case), case.oracle(), activation=activation)

    @pytest.mark.parametrize("quant_case", list(QUANT_CASES))
    def test_quantized_matches_oracle(self, moe_backend: Any, quant_case: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
        if quant_case not in self.quant_cases:
            pytest.skip(f"{quant_case} is not among this suite's quant_cases")
        dtype = self._quant_dtype()
        self._dtype_or_skip(moe_backend, dtype)
        scheme, kw = QUANT_CASES[quant_case]
        kw = {key: self.block_shape if value == "block" else self.group_size if value == "group" else value
              for key, value in kw.items()}
        case = _Case(self, moe_backend, dtype, seed=2)
        case.quantize(scheme, **kw)
        self._supported_or_skip(moe_backend, case)
        poison_empty(monkeypatch)
        self._check(moe_backend, case, self._run(moe_backend, case), case.oracle(), quant_case=quant_case)

    # -- semantics -----------------------------------------------------------------------
    @pytest.mark.parametrize("k", [1, 2, 3])
    def test_routed_scaling_factor(self, moe_backend: Any, k: int, monkeypatch: pytest.MonkeyPatch) -> None:
        """SEMANTICS §9 / R4: every combine path applies ``s`` (fast paths for k = 1, 2 too)."""
        dtype = self.dtypes[0]
        self._dtype_or_skip(moe_backend, dtype)
        s = 2.5
        case = _Case(self, moe_backend, dtype, k=min(k, self.num_experts), seed=3, routed_scaling_factor=s)
        self._supported_or_skip(moe_backend, case)
        poison_empty(monkeypatch)
        out = self._run(moe_backend, case)
        ref = case.oracle()
        o, r = out.detach().double().cpu(), ref
        ratio = float((o * r).sum() / (r * r).sum()) if float((r * r).sum()) else math.nan
        assert abs(ratio - 1.0) < 0.05, (
            f"routed_scaling_factor={s} is not honoured by backend {moe_backend.name!r} (k={k}): the output is "
            f"{ratio:.4g} x the oracle's (expected 1; {1 / s:.4g} means the factor was dropped, {s:.4g} that it "
            f"was applied twice). SEMANTICS §9: out[m] = s * sum_j down[m, j] on every combine path")
        self._check(moe_backend, case, out, ref, routed_scaling_factor=s)

    def test_minus_one_slots_contribute_zero(self, moe_backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        """SEMANTICS §7: ``-1`` slots add exactly 0; their weights (NaN here) are never read."""
        dtype = self.dtypes[0]
        self._dtype_or_skip(moe_backend, dtype)
        case = _Case(self, moe_backend, dtype, k=min(3, self.num_experts), seed=4, minus_one=True)
        self._supported_or_skip(moe_backend, case)
        poison_empty(monkeypatch)
        out = self._run(moe_backend, case)
        assert bool((out[-1] == 0).all()), (
            f"a token whose every slot is -1 must give an exactly zero row, got "
            f"max |out| = {out[-1].abs().max().item():.3e}; {case.context(moe_backend)}")
        self._check(moe_backend, case, out, case.oracle(), routing="with -1 slots")

    def test_no_combine_is_unweighted(self, moe_backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        """SEMANTICS §3: ``no_combine`` returns [M, k, H] without routed weight or scaling."""
        dtype = self.dtypes[0]
        self._dtype_or_skip(moe_backend, dtype)
        case = _Case(self, moe_backend, dtype, seed=5, routed_scaling_factor=3.0)
        self._supported_or_skip(moe_backend, case)
        poison_empty(monkeypatch)
        out = self._run(moe_backend, case, no_combine=True)
        assert tuple(out.shape) == (case.x.shape[0], case.layer.top_k, case.layer.hidden_size), \
            f"no_combine must return [M, k, H], got {tuple(out.shape)}"
        self._check(moe_backend, case, out, case.oracle(no_combine=True), no_combine=True)

    def test_entry_points_and_inplace_agree(self, moe_backend: Any) -> None:
        """``MoERunner.run`` and ``fused_experts(inplace=True)``: bit-identical outputs, the
        in-place one written into ``x``, the other leaving its input alone."""
        import moe_core

        dtype = self.dtypes[0]
        self._dtype_or_skip(moe_backend, dtype)
        case = _Case(self, moe_backend, dtype, seed=6)
        self._supported_or_skip(moe_backend, case)
        x, tw, ti = case.inputs()
        w = case.weights()
        runner = moe_core.MoERunner(case.layer, backend=moe_backend).run(x, w, tw, ti)
        assert torch.equal(x, case.on_device(case.x)), "an out-of-place run changed its input x"
        x_copy = x.clone()
        inplace = moe_core.fused_experts(x_copy, w.w1, w.w2, tw, ti, layer=case.layer, backend=moe_backend,
                                         inplace=True)
        assert inplace.data_ptr() == x_copy.data_ptr(), "inplace=True must return x itself"
        assert torch.equal(runner, x_copy), ("fused_experts(inplace=True) and MoERunner.run differ: "
                                             "one sequence must serve both entry points bit for bit")

    def test_empty_batch(self, moe_backend: Any) -> None:
        """``M = 0`` is valid: an empty [0, H] output, no launch."""
        dtype = self.dtypes[0]
        self._dtype_or_skip(moe_backend, dtype)
        case = _Case(self, moe_backend, dtype, M=0)
        out = self._run(moe_backend, case)
        assert tuple(out.shape) == (0, case.layer.hidden_size), f"M = 0 must give [0, H], got {tuple(out.shape)}"

    # -- hooks ---------------------------------------------------------------------------
    def test_hooks_see_token_major_rows(self, moe_backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        """SEMANTICS §8: ``gate_up`` [M, k, N] and ``down`` [M, k, H] are token-major (row
        ``[m, j]`` is slot ``m·k + j``), ``-1`` rows of ``down`` are zero, and an edit of
        ``down`` reaches the output (R1, R3)."""
        import moe_core

        if not moe_backend.accepts_hooks:
            pytest.skip(f"backend {moe_backend.name!r} declares accepts_hooks = False")
        dtype = self.dtypes[0]
        self._dtype_or_skip(moe_backend, dtype)
        s = 1.5
        case = _Case(self, moe_backend, dtype, k=min(3, self.num_experts), seed=7, minus_one=True,
                      routed_scaling_factor=s)
        self._supported_or_skip(moe_backend, case)
        delta = 0.25

        class Recorder:
            def __init__(self) -> None:
                self.seen: dict[str, torch.Tensor] = {}

            @moe_core.hookimpl
            def moe_core_after_gate_up(self, x, gate_up, topk_weights, topk_ids, layer):
                self.seen["gate_up"] = gate_up.detach().clone()

            @moe_core.hookimpl
            def moe_core_after_down(self, act, down, topk_weights, topk_ids, layer):
                self.seen["down"] = down.detach().clone()
                self.seen["ids"] = topk_ids.detach().clone()
                down.add_((topk_ids >= 0).unsqueeze(-1).to(down.dtype) * delta)   # never -1 rows

        recorder = Recorder()
        runner = moe_core.MoERunner(case.layer, backend=moe_backend)
        runner.register(recorder, name="conformance-recorder")
        x, tw, ti = case.inputs()
        poison_empty(monkeypatch)
        out = runner.run(x, case.weights(), tw, ti)
        M, k = case.topk_ids.shape
        assert set(recorder.seen) >= {"gate_up", "down"}, "the hooks were not called"
        gate_up, down = recorder.seen["gate_up"].double().cpu(), recorder.seen["down"].double().cpu()
        N, H = case.layer.gate_up_rows, case.layer.hidden_size
        assert tuple(gate_up.shape) == (M, k, N), \
            f"after_gate_up must see [M, k, N] = {(M, k, N)}, got {tuple(gate_up.shape)}"
        assert tuple(down.shape) == (M, k, H), f"after_down must see [M, k, H] = {(M, k, H)}, got {tuple(down.shape)}"
        assert torch.equal(recorder.seen["ids"].cpu(), case.topk_ids), "hooks must see the local ids [M, k]"
        valid = case.topk_ids >= 0
        rows = valid.nonzero(as_tuple=True)
        w1 = case.w1.double()
        want_gu = torch.stack([case.x[m].double() @ w1[e].T for m, e in zip(rows[0].tolist(),
                                                                             case.topk_ids[rows].tolist())])
        if dtype != torch.float32:
            want_gu = want_gu.to(dtype).double()
        assert_close_normalized(gate_up[rows], want_gu, *tolerance_for(dtype),
                                **case.context(moe_backend, hook="after_gate_up: row [m, j] must be x[m] @ w1[e]^T"))
        weights = torch.where(valid, case.topk_weights.double(), 0.0)
        want_down = case.oracle(no_combine=True) * weights.unsqueeze(-1)
        where = "after_down: row [m, j] must be slot m*k + j, weighted"
        assert_close_normalized(down[rows], want_down[rows], *tolerance_for(dtype),
                                **case.context(moe_backend, hook=where))
        assert bool((down[~valid] == 0).all()), "after_down: rows of -1 slots must be exactly zero"
        want = case.oracle() + s * delta * valid.double().sum(dim=1, keepdim=True)
        assert_close_normalized(out, want, *tolerance_for(dtype),
                                **case.context(moe_backend, hook="an after_down edit must reach the output (R1)"))

    # -- bad inputs ----------------------------------------------------------------------
    def test_bad_inputs_raise_before_any_step(self, moe_backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        """TESTING.md §9: each bad input raises MoEInputError or a TypeError naming the
        argument, before any step of the backend runs."""
        import moe_core
        from moe_core.errors import MoECoreError

        dtype = self.dtypes[0]
        self._dtype_or_skip(moe_backend, dtype)
        case = _Case(self, moe_backend, dtype, seed=8)
        calls: list[str] = []
        for step in moe_backend.step_names():
            real = getattr(moe_backend, step)

            def spy(*a: Any, _real: Any = real, _step: str = step, **kw: Any) -> Any:
                calls.append(_step)
                return _real(*a, **kw)

            monkeypatch.setattr(moe_backend, step, spy)
        monkeypatch.setenv("MOE_CORE_DEBUG", "1")          # id values are checked on GPU tensors too
        x, tw, ti = case.inputs()
        w = case.weights()
        E = w.w1.shape[0]
        bad_ids = ti.clone()
        bad_ids[0, 0] = E
        cases = {
            "x": dict(x=x.to(torch.int32)),
            "x ": dict(x=x[:, :-1]),
            "w2": dict(w2=w.w2[:-1]),
            "topk_ids": dict(topk_ids=ti[:, :1]),
            "topk_ids ": dict(topk_ids=ti.float()),
            "topk_ids  ": dict(topk_ids=bad_ids),
            "topk_weights": dict(topk_weights=tw.half()),
            "inplace": dict(inplace=True, no_combine=True),
        }
        for expected_name, change in cases.items():
            args = dict(x=x, w1=w.w1, w2=w.w2, topk_weights=tw, topk_ids=ti)
            args.update(change)
            kw = {key: args.pop(key) for key in ("inplace", "no_combine") if key in args}
            with pytest.raises((ValueError, TypeError)) as info:
                moe_core.fused_experts(args["x"], args["w1"], args["w2"], args["topk_weights"], args["topk_ids"],
                                       layer=case.layer, backend=moe_backend, **kw)
            assert isinstance(info.value, MoECoreError), \
                f"bad {expected_name.strip()}: expected a moe_core error, got {type(info.value).__name__}: {info.value}"
            assert expected_name.strip() in str(info.value), \
                f"the error for a bad {expected_name.strip()!r} must name it, got: {info.value}"
            assert not calls, f"bad {expected_name.strip()}: steps {calls} ran before the error was raised"

    # -- CUDA graphs ---------------------------------------------------------------------
    @pytest.mark.gpu
    def test_cuda_graph_replay(self, moe_backend: Any) -> None:
        """Capture one forward in a CUDA graph; replays with new inputs equal eager runs."""
        import moe_core

        device = moe_backend.device()
        if device.type != "cuda" or not torch.cuda.is_available():
            pytest.skip(f"backend {moe_backend.name!r} computes on {device}; CUDA graphs need a CUDA device")
        dtype = torch.bfloat16 if torch.bfloat16 in self.dtypes else self.dtypes[0]
        self._dtype_or_skip(moe_backend, dtype)
        case = _Case(self, moe_backend, dtype, seed=9, routed_scaling_factor=1.25)
        self._supported_or_skip(moe_backend, case)
        x, tw, ti = case.inputs()
        w = case.weights()

        def forward() -> torch.Tensor:
            return moe_core.fused_experts(x, w.w1, w.w2, tw, ti, layer=case.layer, backend=moe_backend)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):                              # compile every kernel before capture
                forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = forward()
        for seed in (11, 12, 13):
            fresh = _Case(self, moe_backend, dtype, seed=seed, routed_scaling_factor=1.25)
            fx, ftw, fti = fresh.inputs()
            x.copy_(fx)
            tw.copy_(ftw)
            ti.copy_(fti)
            static_out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            eager = forward()
            assert_close_normalized(static_out, eager, *tolerance_for(dtype),
                                    **case.context(moe_backend, replay_seed=seed))
            fresh.w1, fresh.w2 = case.w1, case.w2
            assert_close_normalized(static_out, fresh.oracle(), *tolerance_for(dtype),
                                    **case.context(moe_backend, replay_seed=seed, against="oracle"))
