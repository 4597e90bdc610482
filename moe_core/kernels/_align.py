"""Triton kernels of ``moe_align_block_size`` (SEMANTICS §6); the wrapper is :mod:`.align`.

Buckets ``b = id + 1`` (expert ``-1`` is bucket 0; ids outside ``[-1, E)`` are masked to
bucket 0). Slots are cut into chunks of ``CHUNK``; within a chunk the rank of a slot
among earlier slots of its bucket is exact (no atomics), so the result is deterministic
and keeps ascending slot order inside every bucket, like the torch reference::

    count  (grid G):  rank[s] = #earlier slots of bucket(s) in its chunk
                      chunk[g, b] = slots of bucket b in chunk g;  sorted[:] = sentinel
    scan   (1 CTA):   counts = Σ_g chunk[g];  padded = roundup(counts, block_m)
                      start = exclusive cumsum(padded);  chunk[g, b] = start[b] + Σ_{g' < g} chunk[g', b]
                      expert_ids[block] = bucket of block − 1 (−1 past the total);  n_post = Σ padded
    scatter:          sorted[chunk[g(s), bucket(s)] + rank[s]] = s
                      (inside ``scan`` for small inputs, else its own grid-G launch)

Every size is a static function of ``numel``, E and ``block_m``: no host sync.
"""

from __future__ import annotations

import triton
import triton.language as tl

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
                        E1_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    """Per chunk: in-chunk ranks, the chunk's bucket histogram; a share of the sentinel fill."""
    pid = tl.program_id(0).to(tl.int64)
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
def _scatter_chunk(ids_ptr, rank_ptr, chunk_ptr, sorted_ptr, g, numel, E, CHUNK,
                   E1_PAD: tl.constexpr, BLOCK_S: tl.constexpr):
    """``sorted[chunk[g, b] + rank[s]] = s`` for the slots ``s`` of chunk ``g``."""
    lane = tl.arange(0, BLOCK_S).to(tl.int64)
    first = (tl.zeros([BLOCK_S], dtype=tl.int64) + g) * CHUNK           # int64 slot offsets
    for off in range(0, tl.minimum(CHUNK, numel - g * CHUNK), BLOCK_S):
        s = first + off + lane
        valid = s < numel
        b = _bucket_of(ids_ptr, s, valid, E, E1_PAD)
        base = tl.load(chunk_ptr + g * E1_PAD + b, mask=valid, other=0, cache_modifier=".cg")
        rank = tl.load(rank_ptr + s, mask=valid, other=0)
        pos = base.to(tl.int64) + rank
        tl.store(sorted_ptr + pos, s.to(tl.int32), mask=valid)


@triton.jit
def _align_scan_kernel(ids_ptr, rank_ptr, chunk_ptr, sorted_ptr, expert_ids_ptr, npost_ptr,
                       numel, E, block_m, num_chunks, num_blocks, CHUNK,
                       E1_PAD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr,
                       SCATTER: tl.constexpr):
    """One program: bucket counts, padded starts, per-chunk bases, expert_ids, the count."""
    bins = tl.arange(0, E1_PAD)
    is_bucket = bins < E + 1
    counts = tl.zeros([E1_PAD], dtype=tl.int32)
    for g in range(0, num_chunks):
        counts += tl.load(chunk_ptr + g * E1_PAD + bins)
    counts = tl.where(is_bucket, counts, 0)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    total = tl.sum(padded, 0)
    tl.store(npost_ptr, total)
    # chunk[g, b] <- start[b] + slots of bucket b in chunks before g
    run = starts
    for g in range(0, num_chunks):
        ptrs = chunk_ptr + g * E1_PAD + bins
        c = tl.load(ptrs)
        tl.store(ptrs, run)
        run += c
    # expert_ids: mark each non-empty bucket's first block, then forward-fill with a running max
    blk = tl.arange(0, BLOCK_B)
    for b0 in range(0, num_blocks, BLOCK_B):
        tl.store(expert_ids_ptr + b0 + blk, tl.zeros([BLOCK_B], dtype=tl.int32), mask=b0 + blk < num_blocks)
    tl.debug_barrier()
    tl.store(expert_ids_ptr + starts // block_m, bins, mask=is_bucket & (padded > 0))
    tl.debug_barrier()
    carry = tl.zeros([BLOCK_B], dtype=tl.int32)
    for b0 in range(0, num_blocks, BLOCK_B):
        idx = b0 + blk
        inside = idx < num_blocks
        mark = tl.load(expert_ids_ptr + idx, mask=inside, other=0, cache_modifier=".cg")
        fill = tl.maximum(tl.associative_scan(mark, 0, _max_combine), carry)
        carry = tl.zeros([BLOCK_B], dtype=tl.int32) + tl.max(fill, 0)
        eid = tl.where(idx.to(tl.int64) * block_m < total, fill - 1, -1)
        tl.store(expert_ids_ptr + idx, eid, mask=inside)
    if SCATTER:
        tl.debug_barrier()
        for g in range(0, num_chunks):
            _scatter_chunk(ids_ptr, rank_ptr, chunk_ptr, sorted_ptr, g, numel, E, CHUNK,
                           E1_PAD, BLOCK_S)


@triton.jit
def _align_scatter_kernel(ids_ptr, rank_ptr, chunk_ptr, sorted_ptr, numel, E, CHUNK,
                          E1_PAD: tl.constexpr, BLOCK_S: tl.constexpr):
    """Grid G: scatter the slots of chunk ``program_id`` (large inputs)."""
    g = tl.program_id(0).to(tl.int64)
    _scatter_chunk(ids_ptr, rank_ptr, chunk_ptr, sorted_ptr, g, numel, E, CHUNK, E1_PAD, BLOCK_S)
