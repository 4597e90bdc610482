"""Triton kernels of ``moe_align_block_size`` (SEMANTICS §6); the wrapper is :mod:`.align`.

Buckets ``b = id + 1`` (expert ``-1`` is bucket 0; ids outside ``[-1, E)`` are masked to
bucket 0). Slots are cut into chunks of ``CHUNK``; within a chunk the rank of a slot
among earlier slots of its bucket is exact (no atomics), so the result is deterministic
and keeps ascending slot order inside every bucket, like the torch reference::

    count  (grid G; inside ``scan`` when one chunk holds every slot):
                      rank[s] = #earlier slots of bucket(s) in its chunk
                      chunk[g, b] = slots of bucket b in chunk g;  sorted[:] = sentinel
    scan   (1 CTA):   per tile of buckets, over a [chunks, buckets] tile of the table:
                      counts = Σ_g chunk[g];  padded = roundup(counts, block_m)
                      start = exclusive cumsum(padded) (carried across tiles)
                      chunk[g, b] = start[b] + Σ_{g' < g} chunk[g', b]   (cumsum over chunks)
                      expert_ids[block] = bucket of block − 1 (−1 past the total);  n_post = Σ padded
    scatter:          sorted[chunk[s // CHUNK, bucket(s)] + rank[s]] = s
                      (inside ``scan`` for small inputs, else its own grid launch)

Every size is a static function of ``numel``, E and ``block_m``: no host sync.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_core.kernels._gdc import _pdl_enter

__all__ = ["_align_count_kernel", "_align_scan_kernel", "_align_scatter_kernel"]


@triton.jit
def _bucket_of(ids_ptr, s, valid, E, E1_PAD: tl.constexpr):
    """Bucket ``id + 1`` of slots ``s``; out-of-range ids -> 0; lanes past numel -> E1_PAD − 1 (unused bin)."""
    eid = tl.load(ids_ptr + s, mask=valid, other=-1)
    in_range = (eid >= -1) & (eid < E)
    b = tl.where(in_range, eid + 1, 0)
    return tl.where(valid, b, E1_PAD - 1)


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _align_count_kernel(ids_ptr, rank_ptr, chunk_ptr, sorted_ptr, numel, E, P, CHUNK, num_programs,
                        E1_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
                        PDL: tl.constexpr = False):
    """Per chunk: in-chunk ranks, the chunk's bucket histogram; a share of the sentinel fill."""
    _pdl_enter(PDL)
    _count_chunk(ids_ptr, rank_ptr, chunk_ptr, sorted_ptr, tl.program_id(0).to(tl.int64), numel, E, P, CHUNK,
                 num_programs, E1_PAD, BLOCK_T, BLOCK_P)


@triton.jit
def _count_chunk(ids_ptr, rank_ptr, chunk_ptr, sorted_ptr, pid, numel, E, P, CHUNK, num_programs,
                 E1_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    """The count step of chunk ``pid`` (one program of ``num_programs``)."""
    lane = tl.arange(0, BLOCK_T)
    bins = tl.arange(0, E1_PAD)
    cursor = tl.zeros([E1_PAD], dtype=tl.int32)
    chunk_start = pid * CHUNK
    for off in range(0, tl.minimum(CHUNK, numel - chunk_start), BLOCK_T):
        s = chunk_start + off + lane.to(tl.int64)
        valid = s < numel
        b = _bucket_of(ids_ptr, s, valid, E, E1_PAD)
        earlier = (b[:, None] == b[None, :]) & (lane[None, :] < lane[:, None])
        rank = tl.sum(earlier.to(tl.int32), axis=1) + tl.gather(cursor, b, 0)
        tl.store(rank_ptr + s, rank, mask=valid)
        cursor += tl.histogram(b, E1_PAD)
    tl.store(chunk_ptr + pid * E1_PAD + bins, cursor)
    # sentinel fill of sorted_token_ids, strided over the programs of this launch
    poffs = tl.arange(0, BLOCK_P).to(tl.int64)
    for p0 in range(pid * BLOCK_P, P, num_programs * BLOCK_P):
        p = p0 + poffs
        tl.store(sorted_ptr + p, tl.zeros([BLOCK_P], dtype=tl.int32) + numel, mask=p < P)


@triton.jit
def _scatter_slots(ids_ptr, rank_ptr, chunk_ptr, sorted_ptr, s, numel, E, CHUNK, E1_PAD: tl.constexpr):
    """``sorted[chunk[g(s), bucket(s)] + rank[s]] = s`` for the int64 slot offsets ``s``."""
    valid = s < numel
    b = _bucket_of(ids_ptr, s, valid, E, E1_PAD)
    base = tl.load(chunk_ptr + (s // CHUNK) * E1_PAD + b, mask=valid, other=0, cache_modifier=".cg")
    rank = tl.load(rank_ptr + s, mask=valid, other=0, cache_modifier=".cg")
    tl.store(sorted_ptr + base.to(tl.int64) + rank, s.to(tl.int32), mask=valid)


@triton.jit
def _align_scan_kernel(ids_ptr, rank_ptr, chunk_ptr, sorted_ptr, expert_ids_ptr, npost_ptr,
                       numel, E, block_m, num_chunks, num_blocks, CHUNK, P,
                       E1_PAD: tl.constexpr, G_PAD: tl.constexpr, BT: tl.constexpr,
                       BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr, SCATTER: tl.constexpr,
                       COUNT: tl.constexpr = False, BLOCK_T: tl.constexpr = 64, BLOCK_P: tl.constexpr = 1024,
                       PDL: tl.constexpr = False):
    """One program: per bucket tile of ``BT`` buckets, the counts (sum over chunks), padded
    starts (cumsum carried across tiles), per-chunk bases (cumsum over chunks) and the
    first-block markers; then expert_ids (forward fill) and the count. ``COUNT`` (one chunk
    holds every slot): the count step runs here first, so small inputs take one launch."""
    _pdl_enter(PDL)
    if COUNT:
        _count_chunk(ids_ptr, rank_ptr, chunk_ptr, sorted_ptr, 0, numel, E, P, CHUNK, 1, E1_PAD, BLOCK_T, BLOCK_P)
        tl.debug_barrier()
    blk = tl.arange(0, BLOCK_B)
    for b0 in range(0, num_blocks, BLOCK_B):
        tl.store(expert_ids_ptr + b0 + blk, tl.zeros([BLOCK_B], dtype=tl.int32), mask=b0 + blk < num_blocks)
    tl.debug_barrier()
    rows = tl.arange(0, G_PAD)
    row_ok = (rows < num_chunks)[:, None]
    lane = tl.arange(0, BT)
    carry = tl.sum(tl.zeros([BT], dtype=tl.int32), 0)
    for t0 in range(0, E1_PAD, BT):
        bins = t0 + lane
        ptrs = chunk_ptr + rows[:, None] * E1_PAD + bins[None, :]
        if COUNT:                                                      # written by this program
            tile = tl.load(ptrs, mask=row_ok, other=0, cache_modifier=".cg")
        else:
            tile = tl.load(ptrs, mask=row_ok, other=0)                 # [chunks, buckets]
        is_bucket = bins < E + 1
        counts = tl.where(is_bucket, tl.sum(tile, 0), 0)
        padded = (counts + block_m - 1) // block_m * block_m
        starts = tl.cumsum(padded, 0) - padded + carry
        before = tl.cumsum(tile, 0) - tile                             # earlier chunks, same bucket
        tl.store(ptrs, starts[None, :] + before, mask=row_ok)
        tl.store(expert_ids_ptr + starts // block_m, bins, mask=is_bucket & (padded > 0))
        carry += tl.sum(padded, 0)
    total = carry
    tl.store(npost_ptr, total)
    tl.debug_barrier()
    fill_carry = tl.zeros([BLOCK_B], dtype=tl.int32)
    for b0 in range(0, num_blocks, BLOCK_B):
        idx = b0 + blk
        inside = idx < num_blocks
        mark = tl.load(expert_ids_ptr + idx, mask=inside, other=0, cache_modifier=".cg")
        fill = tl.maximum(tl.associative_scan(mark, 0, _max_combine), fill_carry)
        fill_carry = tl.zeros([BLOCK_B], dtype=tl.int32) + tl.max(fill, 0)
        eid = tl.where(idx.to(tl.int64) * block_m < total, fill - 1, -1)
        tl.store(expert_ids_ptr + idx, eid, mask=inside)
    if SCATTER:
        tl.debug_barrier()
        slot_lane = tl.arange(0, BLOCK_S).to(tl.int64)
        for s0 in range(0, numel, BLOCK_S):
            _scatter_slots(ids_ptr, rank_ptr, chunk_ptr, sorted_ptr, slot_lane + s0, numel, E, CHUNK, E1_PAD)


@triton.jit
def _align_scatter_kernel(ids_ptr, rank_ptr, chunk_ptr, sorted_ptr, numel, E, CHUNK,
                          E1_PAD: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr = False):
    """Grid cdiv(numel, BLOCK_S): scatter one block of slots (large inputs)."""
    _pdl_enter(PDL)
    pid = tl.program_id(0).to(tl.int64)
    s = pid * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    _scatter_slots(ids_ptr, rank_ptr, chunk_ptr, sorted_ptr, s, numel, E, CHUNK, E1_PAD)
