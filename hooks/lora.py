"""Hook plugin ``lora``: LoRA adapters on the experts of one MoE layer (SEMANTICS §8).

One :class:`LoRAHooks` object holds up to ``max_loras`` adapters for one layer and is
registered on that layer's runner (``runner.register(lora)``). Each adapter has, per
*local* expert ``e``, matrices ``A`` and ``B`` for gate_up (two slices when gated: gate
and up; one otherwise) and for down; the forward adds, for every routed slot ``s = m·k + j``
with local id ``e ≥ 0`` and token adapter ``a = token_adapters[m] ≥ 0``::

    gate_up[s, slice q] += scaling[a] · (x[m]  · A_gu[a, e, q]ᵀ) · B_gu[a, e, q]ᵀ   (× w[s] iff apply_router_weight_on_input)
    down[s]             += scaling[a] · (act[s] · A_dn[a, e]ᵀ)    · B_dn[a, e]ᵀ     (× w[s] unless apply_router_weight_on_input)

with ``scaling = alpha / r`` and the rank-``r`` intermediate kept in fp32. Storage is
padded to ``max_rank`` with zeros, so adapters of different ranks share one buffer.
CPU tensors use torch math; CUDA tensors the Triton shrink/expand kernels of
:mod:`moe_core.kernels.lora` (slots grouped by (adapter, expert); no host sync, static
sizes, so the hooks run under CUDA-graph capture). The per-token adapter index lives in
:attr:`LoRAHooks.token_adapters` (int32 [max_num_tokens], ``-1`` = no adapter); update it
in place (:meth:`LoRAHooks.set_token_adapters`, or ``copy_`` into it between graph replays).

**Weighting.** Each delta is weighted like the buffer it edits: the gate_up delta by the
routed weight iff ``layer.apply_router_weight_on_input``; the down delta unless
``apply_router_weight_on_input`` or the forward's ``no_combine`` (the hook receives it).

**PEFT key layout** (:meth:`LoRAHooks.load_peft`, :meth:`LoRAHooks.export_peft`): one pair
of tensors per expert and projection, keys ending in::

    experts.{e}.{proj}.lora_A.weight    [r, in_features]
    experts.{e}.{proj}.lora_B.weight    [out_features, r]

with ``e`` the *global* expert index and ``proj`` one of ``gate_proj``, ``up_proj``
(gate_up slices 0 and 1; a non-gated layer has only ``up_proj``) and ``down_proj``
(``in_features`` = H for gate/up, I for down; ``out_features`` = I for gate/up, H for
down). Mixtral's names ``w1`` / ``w3`` / ``w2`` are accepted too. Any prefix before
``experts.`` is allowed (it must be the same for every key); experts without keys get no
delta. Under expert parallelism only this rank's experts are kept.

The module is also the ``lora`` entry point of ``moe_core.hooks``; it carries only an
informational optional hook, so installing moe-core puts no LoRA hook on any layer.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Mapping

import torch

from moe_core import envs, hookimpl
from moe_core.errors import MoEInputError, MoETypeError
from moe_core.spec import MoELayer

__all__ = ["LoRAHooks", "MAX_RANK", "PEFT_PROJ_NAMES"]

logger = logging.getLogger(__name__)

#: largest supported adapter rank
MAX_RANK = 256
#: accepted PEFT projection names -> (which, slice): gate_up slices 0/1, down
PEFT_PROJ_NAMES: Mapping[str, tuple[str, int]] = {
    "gate_proj": ("gate_up", 0), "w1": ("gate_up", 0),
    "up_proj": ("gate_up", 1), "w3": ("gate_up", 1),
    "down_proj": ("down", 0), "w2": ("down", 0),
}
_PEFT_KEY = re.compile(r"^(?P<prefix>.*?)experts\.(?P<e>\d+)\.(?P<proj>\w+?)\.lora_(?P<ab>[AB])\.weight$")


@hookimpl(optionalhook=True)
def moe_core_describe_plugin() -> str:
    """What this entry point provides (informational; no forward hook is registered)."""
    return ("LoRA on experts: create moe_core.hooks.lora.LoRAHooks.for_layer(layer, ...) and "
            "register it on that layer's runner")


def _int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MoETypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise MoEInputError(f"{name}: expected an int in [{lo}, {hi if hi is not None else 'inf'}], got {value}")
    return value


class LoRAHooks:
    """Several LoRA adapters on the experts of one MoE layer; a hook plugin object.

    :param num_experts: local experts ``E`` (the first dim of ``w1``).
    :param hidden_size: ``H``.
    :param intermediate_size: ``I``.
    :param is_gated: two gate_up slices (gate, up) when true, one otherwise.
    :param gate_up_layout: ``halves`` (gate columns ``[0, I)``, up ``[I, 2I)``) or ``interleaved``.
    :param max_loras: adapter slots; token indices lie in ``[-1, max_loras)``.
    :param max_rank: padded rank of the storage, at most :data:`MAX_RANK`.
    :param max_num_tokens: length of :attr:`token_adapters` (the largest ``M`` served).
    :param dtype: compute dtype of the layer (adapter weights are stored in it).
    :param device: where the buffers live.
    :param global_to_local: optional int32 [E_g] table global -> local expert (``-1``
        remote), used to shard adapters given for all global experts.
    """

    def __init__(self, *, num_experts: int, hidden_size: int, intermediate_size: int,
                 is_gated: bool = True, gate_up_layout: str = "halves", max_loras: int = 1,
                 max_rank: int = 16, max_num_tokens: int = 8192, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu", global_to_local: torch.Tensor | None = None) -> None:
        self.num_experts = _int("num_experts", num_experts, 1)
        self.hidden_size = _int("hidden_size", hidden_size, 1)
        self.intermediate_size = _int("intermediate_size", intermediate_size, 1)
        self.max_loras = _int("max_loras", max_loras, 1)
        self.max_rank = _int("max_rank", max_rank, 1, MAX_RANK)
        self.max_num_tokens = _int("max_num_tokens", max_num_tokens, 1)
        if gate_up_layout not in ("halves", "interleaved"):
            raise MoEInputError(f"gate_up_layout: expected 'halves' or 'interleaved', got {gate_up_layout!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise MoETypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        self.is_gated = bool(is_gated)
        self.gate_up_layout = gate_up_layout
        self.slices = 2 if self.is_gated else 1
        self.dtype = dtype
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if global_to_local is not None:
            if global_to_local.dim() != 1 or global_to_local.dtype != torch.int32:
                raise MoEInputError(f"global_to_local: expected a 1-D int32 table, got "
                                    f"{global_to_local.dtype} {list(global_to_local.shape)}")
            global_to_local = global_to_local.cpu()
        self.global_to_local = global_to_local
        #: ``auto`` (Triton on CUDA tensors, torch otherwise), ``torch`` or ``triton``
        #: (``triton`` on CPU tensors runs under ``TRITON_INTERPRET=1``)
        self.impl = "auto"
        L, E, S, R, H, I = self.max_loras, self.num_experts, self.slices, self.max_rank, hidden_size, intermediate_size
        kw = {"dtype": dtype, "device": self.device}
        #: [L, E, slices, R, H] / [L, E, slices, I, R]: gate_up A and B per adapter and expert
        self.gate_up_a = torch.zeros((L, E, S, R, H), **kw)
        self.gate_up_b = torch.zeros((L, E, S, I, R), **kw)
        #: [L, E, R, I] / [L, E, H, R]: down A and B
        self.down_a = torch.zeros((L, E, R, I), **kw)
        self.down_b = torch.zeros((L, E, H, R), **kw)
        #: [L] fp32 ``alpha / r``; 0 marks an empty slot (its tokens get no delta)
        self.scaling = torch.zeros((L,), dtype=torch.float32, device=self.device)
        #: [L] int32 rank of each slot (0 when empty)
        self.ranks = torch.zeros((L,), dtype=torch.int32, device=self.device)
        #: [max_num_tokens] int32 adapter slot per token, ``-1`` = none; update in place
        self.token_adapters = torch.full((self.max_num_tokens,), -1, dtype=torch.int32, device=self.device)
        self._names: dict[str, int] = {}
        self._host_ranks = [0] * L

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_layer(cls, layer: MoELayer, *, max_loras: int = 1, max_rank: int = 16,
                  max_num_tokens: int = 8192, dtype: torch.dtype = torch.bfloat16,
                  device: torch.device | str = "cpu") -> LoRAHooks:
        """Hooks sized for ``layer``; under expert parallelism adapters given for all
        global experts are sharded with this rank's experts (the ``filter_expert`` table)."""
        table = None
        if layer.filter_expert and layer.num_experts is not None:
            from moe_core.hooks.filter_expert import build_table

            table = build_table(layer)
        return cls(num_experts=layer.num_local_experts, hidden_size=layer.hidden_size,
                   intermediate_size=layer.intermediate_size, is_gated=layer.is_gated,
                   gate_up_layout=layer.gate_up_layout, max_loras=max_loras, max_rank=max_rank,
                   max_num_tokens=max_num_tokens, dtype=dtype, device=device, global_to_local=table)

    # ------------------------------------------------------------------ adapters
    @property
    def adapters(self) -> dict[str, int]:
        """Loaded adapters: name -> slot."""
        return dict(self._names)

    def slot_of(self, name: str) -> int:
        """The slot of adapter ``name`` (the value to put in :attr:`token_adapters`)."""
        if name not in self._names:
            raise MoEInputError(f"adapter: no adapter named {name!r} (loaded: {sorted(self._names)})")
        return self._names[name]

    def _local_rows(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` [E or E_g, ...] -> the local experts' rows [E, ...]."""
        E = self.num_experts
        if t.shape[0] == E:
            return t
        table = self.global_to_local
        if table is not None and t.shape[0] == table.shape[0]:
            local = torch.zeros((E, *t.shape[1:]), dtype=t.dtype, device=t.device)
            g = (table >= 0).nonzero().squeeze(1)
            local[table[g].long().to(t.device)] = t[g.to(t.device)]
            return local
        want = f"{E} (local)" + (f" or {table.shape[0]} (global)" if table is not None else "")
        raise MoEInputError(f"{name}: expected experts dim {want}, got shape {list(t.shape)}")

    def _check(self, name: str, t: torch.Tensor, shape: tuple[int | None, ...]) -> None:
        if not isinstance(t, torch.Tensor):
            raise MoETypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != self.dtype:
            raise MoETypeError(f"{name}: expected dtype {self.dtype} (the layer's compute dtype), got {t.dtype}")
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"
            raise MoEInputError(f"{name}: expected shape {want}, got {list(t.shape)}")

    def add_adapter(self, name: str, *, gate_up_a: torch.Tensor, gate_up_b: torch.Tensor,
                    down_a: torch.Tensor, down_b: torch.Tensor, alpha: float,
                    slot: int | None = None) -> int:
        """Load adapter ``name`` into a free slot (or ``slot``), in place; returns the slot.

        :param gate_up_a: [E, slices, r, H] (E local or global experts).
        :param gate_up_b: [E, slices, I, r].
        :param down_a: [E, r, I].
        :param down_b: [E, H, r].
        :param alpha: LoRA alpha; the delta is scaled by ``alpha / r``.
        Buffers are updated in place, so a captured CUDA graph sees the new adapter.
        """
        S, H, I = self.slices, self.hidden_size, self.intermediate_size
        if not isinstance(name, str):
            raise MoETypeError(f"name: expected a str, got {type(name).__name__}")
        if name in self._names:
            raise MoEInputError(f"name: adapter {name!r} is already loaded in slot {self._names[name]}; remove it first")
        self._check("gate_up_a", gate_up_a, (None, S, None, H))
        r = gate_up_a.shape[2]
        if r < 1 or r > self.max_rank:
            raise MoEInputError(f"gate_up_a: rank {r} outside [1, max_rank={self.max_rank}]")
        E_in = gate_up_a.shape[0]
        self._check("gate_up_b", gate_up_b, (E_in, S, I, r))
        self._check("down_a", down_a, (E_in, r, I))
        self._check("down_b", down_b, (E_in, H, r))
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha == alpha:
            raise MoETypeError(f"alpha: expected a finite number, got {alpha!r}")
        if slot is None:
            free = [i for i in range(self.max_loras) if i not in self._names.values()]
            if not free:
                raise MoEInputError(f"slot: all {self.max_loras} adapter slots are taken "
                                    f"({sorted(self._names)}); remove one or raise max_loras")
            slot = free[0]
        else:
            _int("slot", slot, 0, self.max_loras - 1)
            if slot in self._names.values():
                raise MoEInputError(f"slot: slot {slot} holds adapter "
                                    f"{[n for n, s in self._names.items() if s == slot][0]!r}")
        with torch.no_grad():
            self._clear(slot)
            self.gate_up_a[slot, :, :, :r].copy_(self._local_rows("gate_up_a", gate_up_a))
            self.gate_up_b[slot, :, :, :, :r].copy_(self._local_rows("gate_up_b", gate_up_b))
            self.down_a[slot, :, :r].copy_(self._local_rows("down_a", down_a))
            self.down_b[slot, :, :, :r].copy_(self._local_rows("down_b", down_b))
            self.ranks[slot] = r
            self.scaling[slot] = float(alpha) / r
        self._names[name] = slot
        self._host_ranks[slot] = r
        logger.debug("LoRA adapter %r loaded into slot %d (rank %d, alpha %s)", name, slot, r, alpha)
        return slot

    def _clear(self, slot: int) -> None:
        self.scaling[slot] = 0.0
        self.ranks[slot] = 0
        self.gate_up_a[slot].zero_()
        self.gate_up_b[slot].zero_()
        self.down_a[slot].zero_()
        self.down_b[slot].zero_()
        self._host_ranks[slot] = 0

    def remove_adapter(self, name: str) -> int:
        """Unload adapter ``name`` (in place: tokens still pointing at its slot get no
        delta). Returns the freed slot."""
        slot = self.slot_of(name)
        with torch.no_grad():
            self._clear(slot)
        del self._names[name]
        return slot

    def load_peft(self, name: str, state_dict: Mapping[str, torch.Tensor], *, alpha: float,
                  slot: int | None = None) -> int:
        """Load a PEFT-style per-expert state dict (layout in the module docstring)."""
        groups: dict[tuple[str, int], dict[tuple[int, str], torch.Tensor]] = {}
        prefixes = set()
        for key, t in state_dict.items():
            m = _PEFT_KEY.match(key)
            if m is None:
                raise MoEInputError(f"state_dict: key {key!r} does not match '<prefix>experts.<e>.<proj>."
                                    "lora_<A|B>.weight'")
            if m["proj"] not in PEFT_PROJ_NAMES:
                raise MoEInputError(f"state_dict: key {key!r}: unknown projection {m['proj']!r} "
                                    f"(known: {sorted(PEFT_PROJ_NAMES)})")
            which, q = PEFT_PROJ_NAMES[m["proj"]]
            if which == "gate_up" and not self.is_gated:
                q = 0
                if m["proj"] in ("gate_proj", "w1"):
                    raise MoEInputError(f"state_dict: key {key!r}: a non-gated layer has no gate projection")
            prefixes.add(m["prefix"])
            groups.setdefault((which, q), {})[(int(m["e"]), m["ab"])] = t
        if len(prefixes) > 1:
            raise MoEInputError(f"state_dict: keys mix prefixes {sorted(prefixes)}; pass one layer's tensors")
        ranks = {t.shape[0] for g in groups.values() for (e, ab), t in g.items() if ab == "A"}
        if len(ranks) != 1:
            raise MoEInputError(f"state_dict: expected one rank over all lora_A tensors, got {sorted(ranks)}")
        r = ranks.pop()
        n_exp = 1 + max(e for g in groups.values() for e, _ in g)
        table = self.global_to_local
        E_all = table.shape[0] if table is not None else self.num_experts
        if n_exp > E_all:
            raise MoEInputError(f"state_dict: expert index {n_exp - 1} >= number of experts {E_all}")
        S, H, I = self.slices, self.hidden_size, self.intermediate_size
        kw = {"dtype": self.dtype, "device": self.device}
        gu_a, gu_b = torch.zeros((E_all, S, r, H), **kw), torch.zeros((E_all, S, I, r), **kw)
        dn_a, dn_b = torch.zeros((E_all, r, I), **kw), torch.zeros((E_all, H, r), **kw)
        for (which, q), g in groups.items():
            for (e, ab), t in g.items():
                label = f"state_dict[...experts.{e}...lora_{ab}]"
                if which == "gate_up":
                    self._check(label, t, (r, H) if ab == "A" else (I, r))
                    (gu_a if ab == "A" else gu_b)[e, q].copy_(t)
                else:
                    self._check(label, t, (r, I) if ab == "A" else (H, r))
                    (dn_a if ab == "A" else dn_b)[e].copy_(t)
        return self.add_adapter(name, gate_up_a=gu_a, gate_up_b=gu_b, down_a=dn_a, down_b=dn_b,
                                alpha=alpha, slot=slot)

    def export_peft(self, name: str, prefix: str = "") -> dict[str, torch.Tensor]:
        """The PEFT-style state dict of adapter ``name`` for this rank's experts (global
        expert indices in the keys); the inverse of :meth:`load_peft`."""
        slot = self.slot_of(name)
        r = self._host_ranks[slot]
        table = self.global_to_local
        pairs = [(e, e) for e in range(self.num_experts)] if table is None else \
            [(g, int(table[g])) for g in range(table.shape[0]) if int(table[g]) >= 0]
        names = ("gate_proj", "up_proj") if self.is_gated else ("up_proj",)
        out: dict[str, torch.Tensor] = {}
        for g, e in pairs:
            base = f"{prefix}experts.{g}."
            for q, proj in enumerate(names):
                out[base + f"{proj}.lora_A.weight"] = self.gate_up_a[slot, e, q, :r].clone()
                out[base + f"{proj}.lora_B.weight"] = self.gate_up_b[slot, e, q, :, :r].clone()
            out[base + "down_proj.lora_A.weight"] = self.down_a[slot, e, :r].clone()
            out[base + "down_proj.lora_B.weight"] = self.down_b[slot, e, :, :r].clone()
        return out

    # ------------------------------------------------------------------ token index
    def set_token_adapters(self, index: torch.Tensor) -> None:
        """Copy the per-token adapter slots ``index`` [M] into :attr:`token_adapters` in
        place (rows past M become ``-1``). Values lie in ``[-1, max_loras)``; they are
        checked for CPU tensors always and for GPU tensors with ``MOE_CORE_DEBUG=1`` (the
        kernels treat out-of-range values as ``-1`` regardless)."""
        if not isinstance(index, torch.Tensor):
            raise MoETypeError(f"token_adapters: expected a torch.Tensor, got {type(index).__name__}")
        if index.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
            raise MoETypeError(f"token_adapters: expected an integer dtype, got {index.dtype}")
        if index.dim() != 1 or index.shape[0] > self.max_num_tokens:
            raise MoEInputError(f"token_adapters: expected a 1-D tensor of at most max_num_tokens="
                                f"{self.max_num_tokens} entries, got shape {list(index.shape)}")
        if index.device.type == "cpu" or envs.debug():
            bad = (index < -1) | (index >= self.max_loras)
            if bool(bad.any()):
                raise MoEInputError(f"token_adapters: values must lie in [-1, max_loras={self.max_loras}), "
                                    f"got {int(index[bad][0])} at position {int(bad.nonzero()[0, 0])}")
        M = index.shape[0]
        self.token_adapters[:M].copy_(index)
        self.token_adapters[M:].fill_(-1)

    # ------------------------------------------------------------------ the hooks
    def _keys(self, topk_ids: torch.Tensor, M: int) -> torch.Tensor:
        """int32 [M, k]: ``a·E + e`` for slots with an active adapter and a local expert, else -1."""
        if M > self.max_num_tokens:
            raise MoEInputError(f"x: M = {M} tokens exceed max_num_tokens={self.max_num_tokens} of the LoRA hooks")
        E, L = self.num_experts, self.max_loras
        ids = topk_ids.long()
        a = self.token_adapters[:M].long().unsqueeze(1)
        a_c = a.clamp(0, L - 1)
        valid = (ids >= 0) & (ids < E) & (a >= 0) & (a < L) & (self.scaling[a_c] != 0)
        return torch.where(valid, a_c * E + ids.clamp(0, E - 1), -1).to(torch.int32)

    def _check_call(self, name: str, t: torch.Tensor) -> None:
        if t.dtype != self.dtype:
            raise MoETypeError(f"{name}: LoRA adapters are {self.dtype}, the forward runs in {t.dtype}; "
                               "build the hooks with the layer's dtype")
        if t.device != self.device:
            raise MoEInputError(f"{name}: LoRA buffers live on {self.device}, the forward on {t.device}")

    def _apply(self, which: str, inp: torch.Tensor, out: torch.Tensor, topk_ids: torch.Tensor,
               topk_weights: torch.Tensor | None) -> None:
        M, k = topk_ids.shape
        if M == 0:
            return
        keys = self._keys(topk_ids, M)
        out2d = out.view(M * k, out.shape[-1])
        if self.impl == "triton" or (self.impl == "auto" and out2d.is_cuda):
            from moe_core.kernels.lora import lora_delta

            if which == "gate_up":
                interleaved = self.is_gated and self.gate_up_layout == "interleaved"
                lora_delta(self.gate_up_a, self.gate_up_b, self.ranks, self.scaling, inp, out2d, keys,
                           topk_weights, row_div=k, slice_off=1 if interleaved else self.intermediate_size,
                           col_stride=2 if interleaved else 1)
            else:
                lora_delta(self.down_a.unsqueeze(2), self.down_b.unsqueeze(2), self.ranks, self.scaling, inp,
                           out2d, keys, topk_weights, row_div=1, slice_off=0, col_stride=1)
        else:
            self._apply_torch(which, inp, out2d, keys, topk_weights, k)

    def _columns(self, q: int, width: int) -> slice:
        I = self.intermediate_size
        if width == I:
            return slice(0, I)
        if self.gate_up_layout == "interleaved":
            return slice(q, 2 * I, 2)
        return slice(q * I, (q + 1) * I)

    def _apply_torch(self, which: str, inp: torch.Tensor, out2d: torch.Tensor, keys: torch.Tensor,
                     topk_weights: torch.Tensor | None, k: int) -> None:
        """CPU path: one small GEMM pair per (adapter, expert) group; fp32 intermediate."""
        flat = keys.reshape(-1)
        E = self.num_experts
        w = topk_weights.reshape(-1).float() if topk_weights is not None else None
        for key in torch.unique(flat[flat >= 0]).tolist():
            a, e = divmod(key, E)
            r = self._host_ranks[a]
            slots = (flat == key).nonzero().squeeze(1)
            h = inp[slots // k if which == "gate_up" else slots].float()
            scale = self.scaling[a]
            for q in range(self.slices if which == "gate_up" else 1):
                if which == "gate_up":
                    A, B = self.gate_up_a[a, e, q, :r], self.gate_up_b[a, e, q, :, :r]
                else:
                    A, B = self.down_a[a, e, :r], self.down_b[a, e, :, :r]
                t = h @ A.float().T                                   # [n, r] fp32 intermediate
                delta = (t @ B.float().T) * scale                     # [n, I or H]
                if w is not None:
                    delta = delta * w[slots].unsqueeze(1)
                cols = torch.arange(out2d.shape[1], device=out2d.device)
                if which == "gate_up":
                    cols = cols[self._columns(q, out2d.shape[1])]
                index = (slots.unsqueeze(1), cols.unsqueeze(0))
                out2d[index] = (out2d[index].float() + delta).to(out2d.dtype)

    @hookimpl
    def moe_core_after_gate_up(self, x: torch.Tensor, gate_up: torch.Tensor, topk_weights: torch.Tensor,
                               topk_ids: torch.Tensor, layer: MoELayer) -> None:
        """Add the gate_up delta in place (weighted iff ``apply_router_weight_on_input``)."""
        self._check_call("x", x)
        N = self.slices * self.intermediate_size
        if gate_up.shape[-1] != N:
            raise MoEInputError(f"gate_up: LoRA hooks expect {N} columns ({self.slices}·I), got {gate_up.shape[-1]}")
        self._apply("gate_up", x, gate_up, topk_ids,
                    topk_weights if layer.apply_router_weight_on_input else None)

    @hookimpl
    def moe_core_after_down(self, act: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor,
                            topk_ids: torch.Tensor, layer: MoELayer, no_combine: bool) -> None:
        """Add the down delta in place (weighted unless ``apply_router_weight_on_input`` or
        ``no_combine``, like the ``down`` buffer)."""
        self._check_call("act", act)
        if act.shape[-1] != self.intermediate_size or down.shape[-1] != self.hidden_size:
            raise MoEInputError(f"act/down: LoRA hooks expect act [.., {self.intermediate_size}] and down "
                                f"[.., {self.hidden_size}], got {list(act.shape)} and {list(down.shape)}")
        weighted = not (layer.apply_router_weight_on_input or no_combine)
        self._apply("down", act, down, topk_ids, topk_weights if weighted else None)
