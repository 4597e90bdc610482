"""Quantize float expert weights into the storage layout of each scheme (SEMANTICS §4.1).

Test and benchmark helpers: they turn float ``w1`` [E, N, H] / ``w2`` [E, H, I] into the
tensors and scales a :class:`moe_core.QuantSpec` describes. They are written apart from
:mod:`moe_core.quant` (which *reads* these layouts), so a layout bug on either side
shows up as a mismatch against the oracle.

Layouts produced:

- w8a8 (fp8 / int8) per tensor: scale [E]; per channel: [E, N_out]; block ``[bn, bk]``:
  [E, ⌈N_out/bn⌉, ⌈K/bk⌉]. int8 values round half to even and are clamped to ±127.
- int8 w8a16 per channel: signed int8, scale [E, N_out]; grouped: uint8 with zero point
  (default 128), scale and zero points [E, N_out, K/g].
- int4 w4a16 grouped: uint8 [E, N_out, K/2], two values per byte along K, low nibble
  first; zero points (default 8) packed two per byte along N: [E, N_out/2, K/g].
"""

from __future__ import annotations

import torch

from moe_core.spec import QuantSpec

__all__ = ["quantize_w8a8", "quantize_int8_w8a16", "quantize_int4_w4a16", "pack_int4_k",
           "pack_int4_n", "quantize_layer"]

_TINY = 1e-12


def _qmax(qdtype: torch.dtype) -> float:
    return 127.0 if qdtype == torch.int8 else float(torch.finfo(qdtype).max)


def _to_q(v: torch.Tensor, qdtype: torch.dtype) -> torch.Tensor:
    qmax = _qmax(qdtype)
    if qdtype == torch.int8:
        return torch.round(v).clamp(-qmax, qmax).to(torch.int8)
    return v.clamp(-qmax, qmax).to(qdtype)


def quantize_w8a8(w: torch.Tensor, qdtype: torch.dtype, *, per_channel: bool = False,
                  block_shape: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit weights for a w8a8 scheme.

    :param w: [E, N_out, K] float weights.
    :param qdtype: ``torch.int8`` or an fp8 dtype (``float8_e4m3fn`` / ``float8_e4m3fnuz``).
    :param per_channel: one scale per output row ([E, N_out]).
    :param block_shape: ``(bn, bk)``: one scale per [bn, bk] tile ([E, ⌈N_out/bn⌉, ⌈K/bk⌉]).
    :returns: ``(w_q [E, N_out, K] qdtype, scale fp32)``; ``w ≈ w_q · scale``.
    """
    w32 = w.float()
    E, n_out, K = w32.shape
    qmax = _qmax(qdtype)
    if block_shape is not None:
        bn, bk = block_shape
        nb, kb = -(-n_out // bn), -(-K // bk)
        padded = torch.zeros(E, nb * bn, kb * bk, dtype=torch.float32, device=w.device)
        padded[:, :n_out, :K] = w32.abs()
        amax = padded.view(E, nb, bn, kb, bk).amax(dim=(2, 4))                  # [E, nb, kb]
        scale = amax.clamp(min=_TINY) / qmax
        full = scale.repeat_interleave(bn, dim=1)[:, :n_out].repeat_interleave(bk, dim=2)[:, :, :K]
        return _to_q(w32 / full, qdtype), scale.contiguous()
    if per_channel:
        scale = w32.abs().amax(dim=2).clamp(min=_TINY) / qmax                    # [E, N_out]
        return _to_q(w32 / scale.unsqueeze(2), qdtype), scale.contiguous()
    scale = w32.abs().amax(dim=(1, 2)).clamp(min=_TINY) / qmax                    # [E]
    return _to_q(w32 / scale.view(E, 1, 1), qdtype), scale.contiguous()


def _group_view(w32: torch.Tensor, group_size: int) -> torch.Tensor:
    E, n_out, K = w32.shape
    if K % group_size:
        raise ValueError(f"K = {K} is not a multiple of group_size {group_size}")
    return w32.view(E, n_out, K // group_size, group_size)


def _grouped(w: torch.Tensor, group_size: int, levels: int, zero_point: bool,
             default_zp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Unsigned grouped quantization: q in [0, levels], value = (q − zp)·scale."""
    g = _group_view(w.float(), group_size)                                     # [E, N, K/g, g]
    if zero_point:
        lo = g.amin(dim=-1).clamp(max=0)
        hi = g.amax(dim=-1).clamp(min=0)
        scale = ((hi - lo) / levels).clamp(min=_TINY)
        zp = torch.round(-lo / scale).clamp(0, levels)
    else:
        half = levels - default_zp                      # 7 for int4 (zp 8), 127 for int8 (zp 128)
        scale = (g.abs().amax(dim=-1) / half).clamp(min=_TINY)
        zp = torch.full_like(scale, float(default_zp))
    q = (torch.round(g / scale.unsqueeze(-1)) + zp.unsqueeze(-1)).clamp(0, levels)
    E, n_out, groups, _ = g.shape
    q = q.view(E, n_out, groups * group_size).to(torch.uint8)
    return q, scale.contiguous(), (zp.to(torch.uint8) if zero_point else None)


def quantize_int8_w8a16(w: torch.Tensor, *, group_size: int | None = None, zero_point: bool = False,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """int8 weights for ``int8_w8a16``.

    :param w: [E, N_out, K] float weights.
    :param group_size: None: per-channel signed int8, scale [E, N_out]. Else grouped uint8
        with scale [E, N_out, K/g] and zero points (explicit [E, N_out, K/g] uint8 when
        ``zero_point``; otherwise none, meaning the default 128).
    :returns: ``(w_q, scale fp32, zp or None)``.
    """
    if group_size is None:
        if zero_point:
            raise ValueError("per-channel int8_w8a16 has no zero points")
        w_q, scale = quantize_w8a8(w, torch.int8, per_channel=True)
        return w_q, scale, None
    return _grouped(w, group_size, 255, zero_point, 128)


def pack_int4_k(q: torch.Tensor) -> torch.Tensor:
    """[..., K] values in [0, 16) -> [..., K/2] uint8, low nibble = even column."""
    q = q.to(torch.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()


def pack_int4_n(zp: torch.Tensor) -> torch.Tensor:
    """[E, N, G] values in [0, 16) -> [E, N/2, G] uint8, low nibble = even row."""
    zp = zp.to(torch.uint8)
    return (zp[:, 0::2] | (zp[:, 1::2] << 4)).contiguous()


def quantize_int4_w4a16(w: torch.Tensor, *, group_size: int, zero_point: bool = False,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """int4 weights for ``int4_w4a16``, packed two per byte along K.

    :param w: [E, N_out, K] float weights (K and, with zero points, N_out even).
    :returns: ``(w_q [E, N_out, K/2] uint8, scale [E, N_out, K/g] fp32, zp [E, N_out/2, K/g] or None)``.
    """
    if w.shape[2] % 2 or (zero_point and w.shape[1] % 2):
        raise ValueError(f"int4 packing needs an even K (and even N_out with zero points), got {tuple(w.shape)}")
    q, scale, zp = _grouped(w, group_size, 15, zero_point, 8)
    return pack_int4_k(q), scale, (pack_int4_n(zp) if zp is not None else None)


def quantize_layer(w1: torch.Tensor, w2: torch.Tensor, scheme: str, *, per_channel: bool = False,
                   block_shape: tuple[int, int] | None = None, group_size: int | None = None,
                   zero_point: bool = False, a1_scale: torch.Tensor | None = None,
                   a2_scale: torch.Tensor | None = None,
                   fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor, QuantSpec]:
    """Quantize both weights of a layer and build the matching :class:`QuantSpec`.

    :param w1: [E, N, H] float; ``w2`` [E, H, I] float.
    :param scheme: ``fp8_w8a8``, ``int8_w8a8``, ``int8_w8a16`` or ``int4_w4a16``.
    :returns: ``(w1_q, w2_q, quant)``.
    """
    if scheme in ("fp8_w8a8", "int8_w8a8"):
        qdtype = fp8_dtype if scheme == "fp8_w8a8" else torch.int8
        w1_q, s1 = quantize_w8a8(w1, qdtype, per_channel=per_channel, block_shape=block_shape)
        w2_q, s2 = quantize_w8a8(w2, qdtype, per_channel=per_channel, block_shape=block_shape)
        ctor = QuantSpec.fp8_w8a8 if scheme == "fp8_w8a8" else QuantSpec.int8_w8a8
        return w1_q, w2_q, ctor(s1, s2, a1_scale=a1_scale, a2_scale=a2_scale, per_channel=per_channel,
                                block_shape=block_shape)
    if scheme == "int8_w8a16":
        w1_q, s1, z1 = quantize_int8_w8a16(w1, group_size=group_size, zero_point=zero_point)
        w2_q, s2, z2 = quantize_int8_w8a16(w2, group_size=group_size, zero_point=zero_point)
        return w1_q, w2_q, QuantSpec.int8_w8a16(s1, s2, group_size=group_size, w1_zp=z1, w2_zp=z2)
    if scheme == "int4_w4a16":
        if group_size is None:
            raise ValueError("int4_w4a16 needs group_size")
        w1_q, s1, z1 = quantize_int4_w4a16(w1, group_size=group_size, zero_point=zero_point)
        w2_q, s2, z2 = quantize_int4_w4a16(w2, group_size=group_size, zero_point=zero_point)
        return w1_q, w2_q, QuantSpec.int4_w4a16(s1, s2, group_size=group_size, w1_zp=z1, w2_zp=z2)
    raise ValueError(f"unknown scheme {scheme!r}")
