"""Paged attention for TPU: one Pallas Mosaic kernel for decode, chunked prefill and mixed batches.

Verified only in TPU interpret mode (`pltpu.InterpretParams`, with race detection) on a CPU
machine, jax 0.11.2: no TPU was available, so this kernel has never been compiled by Mosaic nor
run on a TPU, and nothing here is measured.

Work split. q [B,T,N,H] is regrouped outside the kernel (one XLA transpose) to [B,K,T*Q,H], so
the Q query heads that share a KV head sit next to each other; a query block is `bt` tokens of
one row and one KV head, i.e. R = bt*Q rows of [R,H]. The grid is (B, K, T/bt), one program per
query block, visited in row-major order:

    program (b, k, ti): rows = q[b, k, ti*R:(ti+1)*R]          [R,H]
        key blocks 0 .. n-1, each `ppb` pages of row b's page table, KV head k only:
          page_table[b, first + i*ppb + j]  --DMA-->  k_buf[slot, j*G:(j+1)*G]   [G,H] each

Keys a query block can see lie in [lo, hi) (hi: one past its last live position, capped by
kv_len; lo: the window start of its first query, or 0), worked out outside the kernel and
scalar-prefetched with the page table and kv_lens. Key blocks start at the page holding lo and
stop at the page holding hi - 1: pages outside are never DMA'd, and inside the last block a page
past that range is skipped (its buffer slots keep stale data, masked below).

DMA. The pools stay in HBM (`pl.ANY`; jax 0.11.2 has no `pltpu.ANY`); each page is copied per
KV head, `k_pages.at[page, :, k, :]` (a strided copy of G rows of H contiguous elements), into a
[ppb*G, H] VMEM buffer. The alternative, copying whole pages [G,K,H] and slicing a head out in
VMEM, moves the same bytes but puts K on the sublane axis: every head slice is then a strided
sublane gather and, for K < 8, most of each VMEM tile is padding. Per-head copies land in the
[keys, H] tiles the MXU consumes, with no reshape of any ref (the TPU interpreter supports none).
How well the strided copy runs depends on the tiled HBM layout XLA gives [P,G,K,H]; a head-major
pool [P,K,G,H] would make it one contiguous slab. Untested on hardware either way.

Double buffering. K and V buffers have two slots with one DMA semaphore each per slot. The
copies of key block i+1 start before block i is waited on and computed; at a program's last key
block the next program's first block is started instead, so the chain runs across grid steps
(the slot in use is carried in SMEM scratch). Every program with keys thus finds its first
block already in flight, except the very first; hence all grid axes are "arbitrary" (sequential
on one core: a megacore split would need one chain per core).

Numerics: online softmax in f32 with masking by select (never arithmetic on masked logits), so
NaN or inf in unwritten slots, skipped pages or the trash page cannot leak; V rows outside
[lo, hi) are zeroed before the P @ V product for the same reason. bf16 inputs go to the MXU in
bf16 (P rounded to bf16), f32 at full precision; fp16 is computed in f32 (no fp16 MXU path).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

KEYS_PER_BLOCK = 128    # default key block: ppb = max(1, KEYS_PER_BLOCK // G) pages
ROWS_PER_BLOCK = 128    # default query block: bt*Q rows, bt a multiple of 8 unless bt = T


def _spans(q_positions, kv_lens, bt, window):
    """Visible key range [lo, hi) of every query block: two [B*T/bt] int32 arrays."""
    b, t = q_positions.shape
    pos = q_positions.reshape(b, t // bt, bt)                              # [B,T/bt,bt]
    live = pos >= 0
    any_live = live.any(axis=-1)
    hi = jnp.minimum(jnp.max(jnp.where(live, pos, -1), axis=-1) + 1, kv_lens[:, None])
    lo = jnp.zeros_like(hi)
    if window is not None:
        first = jnp.min(jnp.where(live, pos, jnp.iinfo(jnp.int32).max), axis=-1)
        lo = jnp.maximum(first - window + 1, 0)
    hi = jnp.where(any_live, jnp.maximum(hi, 0), 0)
    lo = jnp.where(any_live, lo, 0)
    return lo.reshape(-1).astype(jnp.int32), hi.reshape(-1).astype(jnp.int32)


def _kernel(table_ref, lens_ref, lo_ref, hi_ref,          # SMEM, scalar-prefetched
            q_ref, pos_ref, k_hbm, v_hbm,                 # [R,H], [R,1], [P,G,K,H] x2
            o_ref,                                        # [R,H]
            k_buf, v_buf, sems, slot_ref, m_ref, l_ref, acc_ref,
            *, page_size, pages_per_row, ppb, window, softcap, mxu_dtype):
    g, m, bk = page_size, pages_per_row, ppb * page_size
    b, kh, ti = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_b, num_k, num_t = pl.num_programs(0), pl.num_programs(1), pl.num_programs(2)

    def span(row, block):
        lo, hi = lo_ref[row * num_t + block], hi_ref[row * num_t + block]
        first, end = lo // g, jnp.minimum((hi + g - 1) // g, m)
        blocks = jnp.where((hi > lo) & (end > first), (end - first + ppb - 1) // ppb, 0)
        return lo, hi, first, end, blocks

    def copies(row, head, first, end, block, slot):
        """(live, copy) for each page of key block `block`; dead pages are past `end`."""
        out = []
        for j in range(ppb):
            idx = first + block * ppb + j
            page = table_ref[row * m + jnp.minimum(idx, m - 1)]
            dst = pl.ds(j * g, g)
            for pool, buf, kind in ((k_hbm, k_buf, 0), (v_hbm, v_buf, 1)):
                out.append((idx < end, pltpu.make_async_copy(
                    pool.at[page, :, head, :], buf.at[slot, dst, :], sems.at[slot, kind])))
        return out

    def start(cps):
        for live, cp in cps:
            pl.when(live)(cp.start)

    def wait(cps):
        for live, cp in cps:
            pl.when(live)(cp.wait)

    def start_next_program(slot):
        last_t, last_k = ti == num_t - 1, kh == num_k - 1
        nt = jnp.where(last_t, 0, ti + 1)
        nk = jnp.where(last_t, jnp.where(last_k, 0, kh + 1), kh)
        nb = jnp.where(last_t & last_k, b + 1, b)
        exists = nb < num_b
        nb = jnp.minimum(nb, num_b - 1)
        _, _, first, end, blocks = span(nb, nt)

        @pl.when(exists & (blocks > 0))
        def _():
            start(copies(nb, nk, first, end, 0, slot))

    lo, hi, first, end, blocks = span(b, ti)
    is_first_step = (b == 0) & (kh == 0) & (ti == 0)

    @pl.when(is_first_step)
    def _():
        slot_ref[0] = 0

    slot0 = slot_ref[0]

    @pl.when(is_first_step & (blocks > 0))    # later programs find their first block in flight
    def _():
        start(copies(b, kh, first, end, 0, slot0))

    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    q = q_ref[...].astype(mxu_dtype)                          # [R,H]
    pos = pos_ref[...]                                        # [R,1]
    kv_len = lens_ref[b]
    scale = q_ref.shape[-1] ** -0.5
    precision = lax.Precision.HIGHEST if mxu_dtype == jnp.float32 else None

    def body(i, slot):
        @pl.when(i + 1 < blocks)
        def _():
            start(copies(b, kh, first, end, i + 1, 1 - slot))

        @pl.when(i + 1 == blocks)
        def _():
            start_next_program(1 - slot)

        wait(copies(b, kh, first, end, i, slot))
        base = (first + i * ppb) * g
        keys = k_buf[slot].astype(mxu_dtype)                  # [bk,H]
        logits = lax.dot_general(q, keys, (((1,), (1,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32) * scale   # [R,bk]
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        cols = base + lax.broadcasted_iota(jnp.int32, (1, bk), 1)             # [1,bk]
        visible = (cols <= pos) & (cols < kv_len) & (pos >= 0)              # [R,bk]
        if window is not None:
            visible &= pos - cols < window
        logits = jnp.where(visible, logits, -jnp.inf)
        m_prev = m_ref[...]                                   # [R,1]
        m_next = jnp.maximum(m_prev, logits.max(axis=1, keepdims=True))
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)   # no visible key yet: exp -> 0
        probs = jnp.exp(logits - m_safe)                      # [R,bk]
        alpha = jnp.exp(m_prev - m_safe)                      # [R,1]
        rows = base + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)             # [bk,1]
        values = jnp.where((rows >= lo) & (rows < hi), v_buf[slot], 0)       # [bk,H]
        pv = lax.dot_general(probs.astype(mxu_dtype), values.astype(mxu_dtype),
                             (((1,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)             # [R,H]
        l_ref[...] = alpha * l_ref[...] + probs.sum(axis=1, keepdims=True)
        acc_ref[...] = alpha * acc_ref[...] + pv
        m_ref[...] = m_next
        return 1 - slot

    slot_ref[0] = lax.fori_loop(0, blocks, body, slot0)

    @pl.when(blocks == 0)                      # nothing to compute; keep the chain going
    def _():
        start_next_program(slot0)

    denom = l_ref[...]
    o_ref[...] = jnp.where(denom > 0, acc_ref[...] / jnp.where(denom > 0, denom, 1.0),
                           0.0).astype(o_ref.dtype)


def _block_sizes(t, q_per_kv, g, pages_per_block, tokens_per_block):
    ppb = pages_per_block or max(1, KEYS_PER_BLOCK // g)
    if tokens_per_block is None:
        fit = ROWS_PER_BLOCK // q_per_kv // 8 * 8
        tokens_per_block = t if t * q_per_kv <= ROWS_PER_BLOCK or fit == 0 else fit
    bt = min(tokens_per_block, t)
    if bt < t and (bt * q_per_kv) % 8:
        raise ValueError(f"tokens_per_block={bt} gives {bt * q_per_kv} query rows per block; "
                         "choose a value whose rows (tokens x query heads per KV head) are a "
                         "multiple of 8, or one >= T")
    return ppb, bt


@functools.partial(jax.jit, static_argnames=("sliding_window", "logit_softcap", "interpret",
                                             "pages_per_block", "tokens_per_block"))
def paged_attention_tpu(q, k_pages, v_pages, page_table, q_positions, kv_lens, *,
                        sliding_window=None, logit_softcap=None, interpret=False,
                        pages_per_block=None, tokens_per_block=None):
    """Attention of query tokens over the pages of their rows, as one Mosaic TPU kernel call.

    Same contract as `kernels.reference.paged_attention_reference`: q [B,T,N,H]; k_pages,
    v_pages [P,G,K,H] (one layer; page 0 is the trash page); page_table [B,M] int32;
    q_positions [B,T] int32 (-1: padding, whose output row is 0); kv_lens [B] int32. Key s is
    visible from a query at position t iff s <= t, s < kv_len and (with a window W) t - s < W;
    a soft-cap c turns a logit x into c * tanh(x / c). Returns [B,T,N,H] in q's dtype. DMAs
    only pages holding a key visible to some query of the query block; whatever other pages (or
    unwritten slots of read pages) hold, NaN included, does not reach the output. Page ids must
    be < P for those pages only.

    interpret: False (compile for TPU), True (TPU interpreter with race detection) or a
    `pltpu.InterpretParams`. pages_per_block / tokens_per_block: key / query block sizes
    (defaults: ~128 keys, ~128 query rows).
    """
    b, t, n, h = q.shape
    _, g, k, _ = k_pages.shape
    m = page_table.shape[1]
    q_per_kv = n // k
    ppb, bt = _block_sizes(t, q_per_kv, g, pages_per_block, tokens_per_block)
    num_t = -(-t // bt)
    tp, rows = num_t * bt, bt * q_per_kv
    if interpret is True:
        interpret = pltpu.InterpretParams(detect_races=True)

    positions = jnp.pad(q_positions.astype(jnp.int32), ((0, 0), (0, tp - t)),
                        constant_values=-1)                                  # [B,Tp]
    qg = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0)))                   # [B,Tp,N,H]
    qg = qg.reshape(b, tp, k, q_per_kv, h).transpose(0, 2, 1, 3, 4)           # [B,K,Tp,Q,H]
    qg = qg.reshape(b, k, tp * q_per_kv, h)                                  # [B,K,Tp*Q,H]
    pos_rows = jnp.repeat(positions, q_per_kv, axis=1)[:, :, None]          # [B,Tp*Q,1]
    lo, hi = _spans(positions, kv_lens.astype(jnp.int32), bt, sliding_window)
    both_bf16 = q.dtype == jnp.bfloat16 and k_pages.dtype == jnp.bfloat16
    mxu_dtype = jnp.bfloat16 if both_bf16 else jnp.float32

    kernel = functools.partial(_kernel, page_size=g, pages_per_row=m, ppb=ppb,
                               window=sliding_window, softcap=logit_softcap,
                               mxu_dtype=mxu_dtype)
    q_spec = pl.BlockSpec((None, None, rows, h), lambda bi, ki, ti, *_: (bi, ki, ti, 0))
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(b, k, num_t),
            in_specs=[q_spec,
                      pl.BlockSpec((None, rows, 1), lambda bi, ki, ti, *_: (bi, ti, 0)),
                      pl.BlockSpec(memory_space=pl.ANY),
                      pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=q_spec,
            scratch_shapes=[
                pltpu.VMEM((2, ppb * g, h), k_pages.dtype),    # k_buf [slot, keys, H]
                pltpu.VMEM((2, ppb * g, h), v_pages.dtype),    # v_buf [slot, keys, H]
                pltpu.SemaphoreType.DMA((2, 2)),               # [slot, K or V]
                pltpu.SMEM((1,), jnp.int32),                   # slot of the next key block
                pltpu.VMEM((rows, 1), jnp.float32),            # running max      [R,1]
                pltpu.VMEM((rows, 1), jnp.float32),            # running sum      [R,1]
                pltpu.VMEM((rows, h), jnp.float32),            # running P @ V    [R,H]
            ]),
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("arbitrary", "arbitrary", "arbitrary")),
        interpret=interpret,
    )(page_table.astype(jnp.int32).reshape(-1), kv_lens.astype(jnp.int32), lo, hi,
      qg, pos_rows, k_pages, v_pages)
    out = out.reshape(b, k, tp, q_per_kv, h).transpose(0, 2, 1, 3, 4)        # [B,Tp,K,Q,H]
    return out.reshape(b, tp, n, h)[:, :t]
