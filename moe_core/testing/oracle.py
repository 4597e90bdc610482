"""The independent float64 oracle: a per-expert masked loop (TESTING.md §1).

It shares no code with ``sequence``, ``align``, ``config``, ``quant`` or ``reference``:
activations, dequantization and activation quantization are written out again here, in
float64, so a bug in any of those shows up as a mismatch.
"""

from __future__ import annotations

import math

import torch

__all__ = ["oracle_moe", "oracle_dequantize_weight", "oracle_quantize_activation"]


def _act(h: torch.Tensor, activation: str, gated: bool, layout: str, alpha: float | None,
         limit: float | None) -> torch.Tensor:
    if not gated:
        if activation == "silu":
            return h / (1 + torch.exp(-h))
        if activation == "gelu":
            return 0.5 * h * (1 + torch.erf(h / math.sqrt(2.0)))
        if activation == "relu2":
            return torch.clamp(h, min=0) ** 2
        raise ValueError(activation)
    if layout == "interleaved":
        g, u = h[:, 0::2], h[:, 1::2]
    else:
        n = h.shape[1] // 2
        g, u = h[:, :n], h[:, n:]
    if activation == "swiglu_oai":
        g = torch.clamp(g, max=limit)
        u = torch.clamp(u, -limit, limit)
        return g / (1 + torch.exp(-alpha * g)) * (u + 1)
    if activation == "gelu":
        return 0.5 * g * (1 + torch.erf(g / math.sqrt(2.0))) * u
    s = g / (1 + torch.exp(-g))
    if limit is not None:
        s = torch.clamp(s, max=limit)
        u = torch.clamp(u, -limit, limit)
    return s * u


def oracle_dequantize_weight(w: torch.Tensor, e: int, scheme: str, scale: torch.Tensor | None,
                             zp: torch.Tensor | None, *, block_shape=None, group_size=None) -> torch.Tensor:
    """float64 [N_out, K] value of ``w[e]`` (independent of :mod:`moe_core.quant`)."""
    we = w[e]
    if scheme == "none":
        return we.double()
    if scheme == "int4_w4a16":
        b = we.to(torch.int64)
        q = torch.empty(b.shape[0], b.shape[1] * 2, dtype=torch.float64)
        q[:, 0::2] = (b % 16).double()
        q[:, 1::2] = (b // 16).double()
    else:
        q = we.to(torch.int64).double() if we.dtype in (torch.int8, torch.uint8) else we.double()
    n_out, K = q.shape
    s = scale[e].double()
    if scheme in ("int4_w4a16", "int8_w8a16") and group_size is not None:
        g = group_size
        cols = torch.arange(K) // g
        if zp is None:
            z = torch.full((n_out, K // g), 8.0 if scheme == "int4_w4a16" else 128.0, dtype=torch.float64)
        elif scheme == "int4_w4a16":
            zb = zp[e].to(torch.int64)                        # [N_out/2, K/g], packed along N
            z = torch.empty(n_out, K // g, dtype=torch.float64)
            z[0::2] = (zb % 16).double()
            z[1::2] = (zb // 16).double()
        else:
            z = zp[e].double()
        return (q - z[:, cols]) * s[:, cols]
    if block_shape is not None:
        bn, bk = block_shape
        r = torch.arange(n_out) // bn
        c = torch.arange(K) // bk
        return q * s[r][:, c]
    if s.numel() == 1:
        return q * s.reshape(())
    return q * s.reshape(n_out, 1)


def oracle_quantize_activation(a: torch.Tensor, scheme: str, *, static_scale=None, per_channel=False,
                               block_k=None, fp8_dtype=torch.float8_e4m3fn) -> torch.Tensor:
    """The value (float64) the kernels see after quantizing ``a`` [rows, K] and scaling back."""
    a64 = a.double()
    rows, K = a64.shape
    qmax = 127.0 if scheme == "int8_w8a8" else float(torch.finfo(fp8_dtype).max)
    if static_scale is not None:
        s = static_scale.double().reshape(-1, 1) if static_scale.numel() > 1 else static_scale.double().reshape(1, 1)
        s = s.expand(rows, K)
    elif block_k is not None:
        s = torch.empty(rows, K, dtype=torch.float64)
        for g0 in range(0, K, block_k):
            part = a.float()[:, g0:g0 + block_k].abs().amax(dim=1).clamp(min=1e-10) / qmax
            s[:, g0:g0 + block_k] = part.double().unsqueeze(1)
    elif per_channel:
        s = (a.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-10) / qmax).double().expand(rows, K)
    else:
        s = (a.float().abs().amax().clamp(min=1e-10) / qmax).double().expand(rows, K)
    q = (a.float() / s.float())
    if scheme == "int8_w8a8":
        q = torch.round(q).clamp(-128, 127)
    else:
        q = q.clamp(-qmax, qmax).to(fp8_dtype).float()
    return q.double() * s


def oracle_moe(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
               topk_ids: torch.Tensor, *, activation: str = "silu", is_gated: bool = True,
               gate_up_layout: str = "halves", alpha: float | None = None, limit: float | None = None,
               b1: torch.Tensor | None = None, b2: torch.Tensor | None = None,
               apply_router_weight_on_input: bool = False, routed_scaling_factor: float | None = None,
               no_combine: bool = False, quant=None, expert_map: torch.Tensor | None = None,
               round_intermediate: torch.dtype | None = None,
               fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """The MoE forward in float64, one expert at a time.

    ``topk_ids`` are *local* ids after mapping unless ``expert_map`` (global -> local) is
    given; ``-1`` slots contribute nothing. ``quant`` is a :class:`moe_core.QuantSpec`
    (only its fields are read). ``round_intermediate`` rounds ``gate_up``, ``act`` and
    ``down`` to that dtype, as a kernel storing them in the compute dtype does.
    ``fp8_dtype`` is the activation fp8 type of fp8 w8a8 (``float8_e4m3fnuz`` on gfx942).
    :returns: float64 [M, H] (or [M, k, H] unweighted with ``no_combine``).
    """
    M, k = topk_ids.shape
    H = w2.shape[1]
    E = w1.shape[0]
    ids = topk_ids.long().cpu()
    if expert_map is not None:
        table = expert_map.long().cpu()
        ok = (ids >= 0) & (ids < table.shape[0])
        ids = torch.where(ok, table[ids.clamp(0, table.shape[0] - 1)], torch.full_like(ids, -1))
    scheme = "none" if quant is None else quant.scheme
    x64 = x.double().cpu()
    down = torch.zeros(M, k, H, dtype=torch.float64)
    weights = topk_weights.double().cpu()

    def act_input(a: torch.Tensor, which: int) -> torch.Tensor:
        if scheme not in ("fp8_w8a8", "int8_w8a8"):
            return a.double()
        static = getattr(quant, f"a{which}_scale")
        return oracle_quantize_activation(
            a, scheme, static_scale=None if static is None else static.cpu(), per_channel=quant.per_channel,
            block_k=quant.block_shape[1] if quant.block_shape else None, fp8_dtype=fp8_dtype)

    def weight(w: torch.Tensor, e: int, which: int) -> torch.Tensor:
        if quant is None:
            return w[e].double().cpu()
        scale = getattr(quant, f"w{which}_scale")
        zp = getattr(quant, f"w{which}_zp")
        return oracle_dequantize_weight(w.cpu(), e, scheme, None if scale is None else scale.cpu(),
                                        None if zp is None else zp.cpu(), block_shape=quant.block_shape,
                                        group_size=quant.group_size)

    # activations are quantized over the whole tensor (dynamic per-tensor scale sees every row)
    x_in = act_input(x.cpu(), 1) if M else x64
    gate_up = {}
    for e in range(E):
        m_idx, j_idx = (ids == e).nonzero(as_tuple=True)
        if m_idx.numel() == 0:
            continue
        h = x_in[m_idx] @ weight(w1, e, 1).T
        if b1 is not None:
            h = h + b1[e].double().cpu()
        if apply_router_weight_on_input:
            h = h * weights[m_idx, j_idx].unsqueeze(1)
        if round_intermediate is not None:
            h = h.to(round_intermediate).double()
        gate_up[e] = (m_idx, j_idx, _act(h, activation, is_gated, gate_up_layout, alpha, limit))
    # gemm2 input: all slots' activations (dynamic per-tensor scale over every slot row)
    width = w2.shape[2] * (2 if scheme == "int4_w4a16" else 1)
    act_all = torch.zeros(M * k, width, dtype=torch.float64)
    for e, (m_idx, j_idx, a) in gate_up.items():
        if round_intermediate is not None:
            a = a.to(round_intermediate).double()
        act_all[m_idx * k + j_idx] = a
    a_in = act_input(act_all.to(x.dtype) if scheme in ("fp8_w8a8", "int8_w8a8") else act_all, 2) \
        if M else act_all
    for e, (m_idx, j_idx, _) in gate_up.items():
        y = a_in[m_idx * k + j_idx] @ weight(w2, e, 2).T
        if b2 is not None:
            y = y + b2[e].double().cpu()
        if not (apply_router_weight_on_input or no_combine):
            y = y * weights[m_idx, j_idx].unsqueeze(1)
        if round_intermediate is not None:
            y = y.to(round_intermediate).double()
        down[m_idx, j_idx] = y
    if no_combine:
        return down
    s = 1.0 if routed_scaling_factor is None else float(routed_scaling_factor)
    return down.sum(dim=1) * s
