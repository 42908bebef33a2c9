"""Paged attention on Hopper in Pallas Mosaic GPU: chunked prefill (rows of many query tokens)
and decode (one query token a row).

Why Mosaic GPU kernels beside the Triton-lowered one (kernels/gpu.py): Triton gathers a block of
pages with pointer loads. For prefill that does not feed the tensor cores as a contiguous kernel
does (its 8192-token prefill reached 63% of PyTorch SDPA on the H100); for decode its load loop
stopped at ~2.8 TB/s however it was tuned (BENCHMARKS.md). Here pages arrive in shared memory by
TMA copies, issued by a producer warpgroup into a ring of slots while consumer warpgroups run
wgmma on the slots before: the FlashAttention-3 plan, with a page table between the producer
and the pool.

Prefill (`paged_prefill_mgpu`). A program owns one (row, KV head, tile of 2 x BLOCK_Q query
rows); query rows are tokens x the Q heads of one KV head (GQA folded into rows):

    producer warpgroup: for each key block (block_kv keys = block_kv / G pages), one TMA per
        page for K, then one per page for V, into a ring of `stages` slots
    consumer warpgroup w (0, 1): its BLOCK_Q rows; blocks every live row sees whole run
        unmasked, the rest with the causal mask (key s visible from position t iff s <= t);
        online softmax in base 2; the output is normalised and stored by TMA

The two consumers take turns on the tensor cores (a shared barrier), so one's softmax overlaps
the other's matmuls. Constraints, checked by `supports`: fp16/bf16, head_dim 64 or 128, page
size a multiple of 8 dividing block_kv, no sliding window.

Decode (`paged_decode_mgpu`). A program owns one work item (a row and a run of its pages, cut
by length over the whole call: kernels/worklist.py) and all its heads. A page of the pool,
[G,K,H], is one contiguous [G*K, H] matrix (rows: slot x KV head), so each page is a single TMA
copy of G*K*H elements (32 KB for G=16, K=8, H=128):

    producer warpgroup: the item's page ids, read one step ahead; per key block of pages, one
        TMA per page for K and one for V into a ring of `stages` slots
    consumer warpgroup: S = Q' K_page^T with Q' [64, H] the row's N query heads repeated down
        one wgmma tile, so S is [64, G*K]; column (slot, KV head) is kept for row r only if
        the KV head is r's own (r % N // Q) and the slot holds a visible key; online softmax
        over the kept columns, then O += P V_page, where the zeroed columns make every row
        take its own head's values. Partials of a row's items merge in XLA (log-sum-exp).

The tensor cores do 16x the useful multiply-adds (8 KV heads x 2 for the repeated rows), about
190 TFLOP/s at 3 TB/s, which the H100 has to spare; in exchange the copies are the largest
contiguous runs the pool holds. Constraints, checked by `supports_decode`: fp16/bf16, head_dim
64 or 128, N <= 64 query heads in a multiple of 8, 8 <= G*K <= 256 dividing 64 or divided by it,
and a page table of at least DECODE_MIN_KEYS key slots (smaller calls are faster on Triton).

Both kernels take a logit soft-cap c (each logit x becomes c * tanh(x / c) before the masks
and the softmax). Measured on the H100 (BENCHMARKS.md), the cap cost the decode kernel nothing
measurable at 64 x 4096 and 8 x 32768 keys and 2-3% at 1 x 131072.

Every other call goes to kernels/gpu.py. CI runs these kernels on a CPU in Mosaic GPU interpret
mode (`InterpretGPUParams` with race detection on), which simulates the warpgroups, barriers and
TMA copies. Two differences from the GPU: the interpreter's wgmma takes both operands from
shared memory, so the softmax weights P go through shared memory there (on the H100, P in
registers measured 4% faster on the 8192-token prefill); and jax 0.11.2's race detector does not
track wgmma's reads of shared memory.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels import worklist
from kernels.gpu import log2_logits

BLOCK_Q = 64        # query rows per consumer warpgroup (one wgmma M tile)


def supports(q, k_pages, sliding_window, block_kv: int = 128) -> bool:
    """Whether this kernel takes a call with these operands."""
    g, h = k_pages.shape[1], q.shape[-1]
    return (q.dtype in (jnp.float16, jnp.bfloat16) and k_pages.dtype == q.dtype
            and h in (64, 128) and g % 8 == 0 and block_kv % g == 0
            and sliding_window is None)


def _kernel(q_ref, pos_ref, bounds_ref, table_ref, k_ref, v_ref, o_ref, scoped, *,
            block_kv: int, stages: int, n_tiles: int, logit_softcap: float | None):
    smem, (k_full, v_full, q_full), (k_free, v_free), turn = scoped
    qo_smem2, pos_smem2, k_smem, v_smem, p_smem2 = smem
    g = k_ref.shape[1]
    ppb = block_kv // g
    dtype = q_ref.dtype
    head_dim = q_ref.shape[-1]
    b = lax.axis_index("rows")
    kh = lax.axis_index("heads")
    tile = n_tiles - 1 - lax.axis_index("tiles")       # longest tiles first
    wg = lax.axis_index("wg")
    scale, cap = log2_logits(head_dim, logit_softcap)  # logits in base-2 units

    need = jnp.maximum(bounds_ref[b, tile * 2, 0], bounds_ref[b, tile * 2 + 1, 0])
    max_steps = pl.cdiv(need, block_kv)                # key blocks the producer loads

    def take_turn():
        plgpu.barrier_arrive(turn)
        plgpu.barrier_wait(turn)

    @pl.when(wg < 2)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        qo_smem, pos_smem = qo_smem2.at[wg], pos_smem2.at[wg]
        row0 = (tile * 2 + wg) * BLOCK_Q
        steps = pl.cdiv(bounds_ref[b, tile * 2 + wg, 0], block_kv)   # key blocks it needs
        unmasked = bounds_ref[b, tile * 2 + wg, 1] // block_kv
        plgpu.copy_gmem_to_smem(q_ref.at[b, kh, pl.ds(row0, BLOCK_Q)], qo_smem, q_full.at[wg])
        plgpu.copy_gmem_to_smem(pos_ref.at[b, pl.ds(row0, BLOCK_Q)], pos_smem, q_full.at[wg])
        plgpu.barrier_wait(q_full.at[wg])
        # Padding rows (position -1) see key 0, so no row's softmax is empty; they are zeroed
        # by the caller.
        pos = jnp.maximum(plgpu.load(pos_smem, layout=plgpu.Layout.WGMMA.reduce(1)), 0)
        m_i = plgpu.layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32),
                                plgpu.Layout.WGMMA.reduce(1))
        l_i = plgpu.layout_cast(jnp.full((BLOCK_Q,), 0, jnp.float32),
                                plgpu.Layout.WGMMA.reduce(1))
        acc = plgpu.layout_cast(jnp.full((BLOCK_Q, head_dim), 0, jnp.float32),
                                plgpu.Layout.WGMMA)

        @pl.when(steps > 0)
        def _():
            plgpu.barrier_wait(k_full.at[0])

        pl.when(wg == 1)(take_turn)

        def block(step, carry, masked: bool):
            acc, m_i, l_i = carry
            slot = lax.rem(step, stages)

            def logits_of(acc_ref):
                plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                take_turn()
                return acc_ref[...]

            s = pl.run_scoped(logits_of, plgpu.ACC((BLOCK_Q, block_kv), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            s_scale = scale        # without a cap, scaled where the max and exp2 need it
            if cap is not None:
                s, s_scale = cap * jnp.tanh(s * scale), 1.0
            if masked:
                keys = plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, block_kv), 1,
                                              layout=plgpu.Layout.WGMMA) + step * block_kv
                s = jnp.where(keys <= lax.broadcast_in_dim(pos, s.shape, [0]), s, -jnp.inf)
            m_new = jnp.maximum(m_i, s.max(axis=1) * s_scale)
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s * s_scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l_i = l_i * alpha + p.sum(axis=1)
            p16 = p.astype(dtype)
            alpha, l_i, m_new, p16 = lax.optimization_barrier((alpha, l_i, m_new, p16))
            plgpu.barrier_arrive(turn)                 # softmax done
            plgpu.barrier_wait(v_full.at[slot])
            plgpu.barrier_wait(turn)                   # the tensor cores are ours

            if p_smem2 is not None:
                p_smem2.at[wg][...] = p16
                plgpu.commit_smem()

            def weigh_values(pv_ref):
                plgpu.wgmma(pv_ref, p16 if p_smem2 is None else p_smem2.at[wg],
                            v_smem.at[slot])

                @pl.when(step + 1 < steps)
                def _():
                    plgpu.barrier_wait(k_full.at[lax.rem(step + 1, stages)])

                return pv_ref[...]

            pv = pl.run_scoped(weigh_values, plgpu.ACC((BLOCK_Q, head_dim), jnp.float32))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l_i

        def drain(step, _):
            # Blocks only the other consumer needs: see each one arrive (every barrier phase
            # is observed by every warpgroup that waits on the barrier; the interpreter checks
            # this), release its slot and keep the turns in step with the other consumer.
            slot = lax.rem(step, stages)
            plgpu.barrier_wait(k_full.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_wait(v_full.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            take_turn()
            take_turn()

        carry = lax.fori_loop(0, unmasked, functools.partial(block, masked=False),
                              (acc, m_i, l_i))
        acc, m_i, l_i = lax.fori_loop(unmasked, steps, functools.partial(block, masked=True),
                                      carry)
        lax.fori_loop(steps, max_steps, drain, None)
        pl.when(wg == 0)(take_turn)

        acc /= lax.broadcast_in_dim(l_i, acc.shape, [0])
        qo_smem[...] = acc.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[b, kh, pl.ds(row0, BLOCK_Q)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        # Pages past the last key any row of the program sees are replaced by the row's first
        # page: their keys are masked, but their values meet weights of 0, and a page that
        # holds no live token (the trash page) may hold anything, NaN included.
        live_pages = pl.cdiv(need, g)
        first_page = table_ref[b, 0]

        def fetch(ref, smem, barrier, step, slot):
            for j in range(ppb):
                page = jnp.where(step * ppb + j < live_pages, table_ref[b, step * ppb + j],
                                 first_page)
                plgpu.copy_gmem_to_smem(ref.at[page, :, kh], smem.at[slot, pl.ds(j * g, g)],
                                        barrier.at[slot])

        def fill(i):
            fetch(k_ref, k_smem, k_full, i, i)
            fetch(v_ref, v_smem, v_full, i, i)

        for i in range(stages):
            pl.when(i < max_steps)(functools.partial(fill, i))

        @pl.loop(stages, max_steps)
        def _(step):
            slot = lax.rem(step, stages)
            plgpu.barrier_wait(k_free.at[slot])
            fetch(k_ref, k_smem, k_full, step, slot)
            plgpu.barrier_wait(v_free.at[slot])
            fetch(v_ref, v_smem, v_full, step, slot)

        # Observe the consumers' last releases, so every barrier phase is seen before the
        # barriers go away (the interpreter checks this).
        @pl.loop(jnp.maximum(max_steps - stages, 0), max_steps)
        def _(step):
            slot = lax.rem(step, stages)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])


@functools.partial(jax.jit, static_argnames=("logit_softcap", "interpret", "block_kv", "stages",
                                             "p_in_smem"))
def paged_prefill_mgpu(q, k_pages, v_pages, page_table, q_positions, kv_lens, *,
                       logit_softcap=None, interpret=False, block_kv=128, stages=2,
                       p_in_smem=None):
    """Same contract as kernels.paged_attention (see there), for calls `supports` accepts.

    block_kv: keys per block (a multiple of the page size); stages: blocks in flight; p_in_smem:
    stage the softmax weights through shared memory (default: only in interpret mode)."""
    b, t, n, h = q.shape
    _, g, k, _ = k_pages.shape
    q_per_kv = n // k
    ppb = block_kv // g
    tile_rows = 2 * BLOCK_Q
    rows = pl.cdiv(t * q_per_kv, tile_rows) * tile_rows
    n_tiles = rows // tile_rows

    qg = q.reshape(b, t, k, q_per_kv, h).transpose(0, 2, 1, 3, 4).reshape(b, k, t * q_per_kv, h)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - t * q_per_kv), (0, 0)))
    pos = jnp.repeat(q_positions.astype(jnp.int32), q_per_kv, axis=1)      # [B,T*Q]
    pos = jnp.pad(pos, ((0, 0), (0, rows - t * q_per_kv)), constant_values=-1)
    # Per consumer tile: keys its rows need (the last live position + 1), and keys every
    # live row of it sees (the first live position + 1), both capped at the row's length.
    live = pos >= 0
    kv = kv_lens.astype(jnp.int32)[:, None]
    tiled = pos.reshape(b, rows // BLOCK_Q, BLOCK_Q)
    live_t = live.reshape(tiled.shape)
    need = jnp.minimum(jnp.max(jnp.where(live_t, tiled, -1), axis=2) + 1, kv)
    seen = jnp.minimum(jnp.min(jnp.where(live_t, tiled, jnp.iinfo(jnp.int32).max), axis=2) + 1,
                       kv)
    bounds = jnp.stack([need, jnp.where(need > 0, seen, 0)], axis=-1)      # [B,tiles*2,2]
    m_pad = pl.cdiv(page_table.shape[1], ppb) * ppb
    table = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, m_pad - page_table.shape[1])))

    def entry(q_ref, pos_ref, bounds_ref, table_ref, k_ref, v_ref, o_ref):
        tiled_smem = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = (
            plgpu.SMEM((2, BLOCK_Q, h), q.dtype, transforms=tiled_smem),
            plgpu.SMEM((2, BLOCK_Q), jnp.int32),
            plgpu.SMEM((stages, block_kv, h), q.dtype, transforms=tiled_smem),
            plgpu.SMEM((stages, block_kv, h), q.dtype, transforms=tiled_smem),
            plgpu.SMEM((2, BLOCK_Q, block_kv), q.dtype, transforms=tiled_smem)
            if (interpret if p_in_smem is None else p_in_smem) else None,
        )
        full = (plgpu.Barrier(num_arrivals=ppb, num_barriers=stages),
                plgpu.Barrier(num_arrivals=ppb, num_barriers=stages),
                plgpu.Barrier(num_arrivals=2, num_barriers=2))
        free = (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2
        pl.run_scoped(
            lambda *scoped: _kernel(q_ref, pos_ref, bounds_ref, table_ref, k_ref, v_ref, o_ref,
                                    scoped, block_kv=block_kv, stages=stages,
                                    n_tiles=n_tiles, logit_softcap=logit_softcap),
            smem, full, free, plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    out = plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((b, k, rows, h), q.dtype),
        grid=(b, k, n_tiles),
        grid_names=("rows", "heads", "tiles"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams(detect_races=True) if interpret else None,
    )(qg, pos, bounds, table, k_pages, v_pages)
    out = jnp.where(live[:, None, :, None], out, 0)[:, :, :t * q_per_kv]
    return out.reshape(b, k, t, q_per_kv, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)


ROWS = 64           # wgmma M tile: a decode program's query heads, repeated to fill it


# Below this many key slots a decode call (rows x pages a row x page size), the Triton kernel's
# smaller fixed cost wins. Per call on the H100, 32 query heads, 8 KV heads, page 16: 1 row x
# 2048 keys 12.9 us (Triton) vs 14.7; 2 x 2048 16.9 vs 15.8; 1 x 4096 17.7 vs 16.3.
DECODE_MIN_KEYS = 4096


def supports_decode(q, k_pages, page_table) -> bool:
    """Whether paged_decode_mgpu takes a decode call (one query token a row) with these operands:
    fp16/bf16, head_dim 64/128, at most 64 query heads in a multiple of 8, a page of all KV heads
    (G * K slots x heads) of 8 to 256 rows that divides 64 or that 64 divides, and a table of at
    least DECODE_MIN_KEYS key slots."""
    n, h = q.shape[-2:]
    _, g, k, _ = k_pages.shape
    cols = g * k
    return (q.dtype in (jnp.float16, jnp.bfloat16) and k_pages.dtype == q.dtype
            and h in (64, 128) and n <= ROWS and n % 8 == 0
            and 8 <= cols <= 256 and (64 % cols == 0 or cols % 64 == 0)
            and q.shape[0] * page_table.shape[1] * g >= DECODE_MIN_KEYS)


def _decode_kernel(q_ref, pos_ref, lens_ref, plan_ref, table_ref, k_ref, v_ref, o_ref, lse_ref,
                   scoped, *, g: int, q_per_kv: int, ppb: int, stages: int, window: int | None,
                   logit_softcap: float | None):
    (q_smem, p_smem, ring), (k_full, v_full, q_full), (k_free, v_free) = scoped
    # With partials (more items than rows), the partial's staging shares its memory with the
    # copy ring (it is written only once the ring is done), so a program needs no more than the
    # ring and Q.
    (k_smem, v_smem), (o_smem, lse_smem) = (ring, (None, None)) if lse_ref is None else ring
    item = lax.axis_index("items")
    b = jnp.minimum(plan_ref[0, item], q_ref.shape[0] - 1)    # an empty item reads row B - 1's
    wg = lax.axis_index("wg")
    n, head_dim = q_ref.shape[1:]
    page_cols = k_ref.shape[1]                         # G * K: (slot, KV head) pairs a page
    kv_heads = page_cols // g
    cols = ppb * page_cols
    dtype = q_ref.dtype
    scale, cap = log2_logits(head_dim, logit_softcap)  # logits in base-2 units

    # Keys the row's query sees, cut to this item's pages: [first, last).
    pos = pos_ref[b, 0]
    last = jnp.minimum(pos + 1, lens_ref[b])
    first = jnp.int32(0) if window is None else jnp.maximum(pos - window + 1, 0)
    lo = jnp.maximum(first // g, plan_ref[1, item])
    hi = jnp.minimum(pl.cdiv(last, g), plan_ref[2, item])
    steps = jnp.maximum(pl.cdiv(hi - lo, ppb), 0)
    first = jnp.maximum(first, lo * g)
    last = jnp.minimum(last, hi * g)

    @pl.when(wg == 0)
    def _consumer():
        for off in range(0, ROWS, n):                  # the heads, repeated down the tile
            rows = min(n, ROWS - off)
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(0, rows)], q_smem.at[pl.ds(off, rows)],
                                    q_full)
        plgpu.barrier_wait(q_full)

        # Column c of a key block is (page c // (G*K), slot c % (G*K) // K, KV head c % K); row
        # r is query head r % N, of KV head r % N // Q. A row keeps only its own KV head's keys.
        shape = (ROWS, cols)
        row = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
        col = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
        own = lax.rem(col, kv_heads) == lax.div(lax.rem(row, n), q_per_kv)
        key_of_col = lax.div(col, page_cols) * g + lax.div(lax.rem(col, page_cols), kv_heads)

        def block(step, carry, masked: bool):
            acc, m_i, l_i = carry
            slot = lax.rem(step, stages)
            plgpu.barrier_wait(k_full.at[slot])

            def logits_of(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                return acc_ref[...]

            s = pl.run_scoped(logits_of, plgpu.ACC(shape, jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            if masked:                 # a block that holds first or last
                key = key_of_col + (lo + step * ppb) * g
                visible = own & (key < last) & (key >= first)
            else:
                visible = own
            s = jnp.where(visible, s * scale if cap is None else cap * jnp.tanh(s * scale),
                          -jnp.inf)
            m_new = jnp.maximum(m_i, s.max(axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, shape, [0]))
            l_i = l_i * alpha + p.sum(axis=1)
            p16 = p.astype(dtype)
            if p_smem is not None:
                p_smem[...] = p16
                plgpu.commit_smem()
            plgpu.barrier_wait(v_full.at[slot])

            def weigh_values(pv_ref):
                plgpu.wgmma(pv_ref, p16 if p_smem is None else p_smem, v_smem.at[slot])
                return pv_ref[...]

            pv = pl.run_scoped(weigh_values, plgpu.ACC((ROWS, head_dim), jnp.float32))
            plgpu.barrier_arrive(v_free.at[slot])
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv
            return acc, m_new, l_i

        rows_layout = plgpu.Layout.WGMMA.reduce(1)
        carry = (
            plgpu.layout_cast(jnp.full((ROWS, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA),
            plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), rows_layout),
            plgpu.layout_cast(jnp.full((ROWS,), 0, jnp.float32), rows_layout))
        # Only blocks that hold the first or the last visible key need the key mask.
        inner_lo = jnp.minimum((first > lo * g).astype(jnp.int32), steps)
        inner_hi = jnp.maximum(steps - (last < (lo + steps * ppb) * g).astype(jnp.int32),
                               inner_lo)
        masked = functools.partial(block, masked=True)
        carry = lax.fori_loop(0, inner_lo, masked, carry)
        carry = lax.fori_loop(inner_lo, inner_hi, functools.partial(block, masked=False), carry)
        acc, m_i, l_i = lax.fori_loop(inner_hi, steps, masked, carry)
        acc /= lax.broadcast_in_dim(jnp.where(l_i > 0, l_i, 1.0), acc.shape, [0])
        if lse_ref is None:            # an item a row: the output itself, in q's dtype
            q_smem[...] = acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem.at[pl.ds(0, n)], o_ref.at[b])
        else:                          # normalised partial and its log2-sum-exp2, merged in XLA
            o_smem[...] = acc
            lse_smem[...] = m_i + jnp.log2(l_i)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, n)], o_ref.at[item])
            plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, n)], lse_ref.at[item])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _producer():
        def pages_of(step):
            # Pages past the item's last are replaced by its first: their keys are masked
            # and their values meet weights of 0 (an unused page may hold NaN). Reads ahead of
            # the last step stay inside the table.
            idx = [lo + step * ppb + j for j in range(ppb)]
            return tuple(table_ref[b, jnp.minimum(jnp.where(i < hi, i, lo), table_ref.shape[1] - 1)]
                         for i in idx)

        def fetch(ref, smem, barrier, pages, slot):
            for j, page in enumerate(pages):
                plgpu.copy_gmem_to_smem(ref.at[page], smem.at[slot, pl.ds(j * page_cols,
                                                                          page_cols)],
                                        barrier.at[slot])

        def fill(i):
            pages = pages_of(i)
            fetch(k_ref, k_smem, k_full, pages, i)
            fetch(v_ref, v_smem, v_full, pages, i)

        for i in range(stages):
            pl.when(i < steps)(functools.partial(fill, i))

        def refill(step, pages):
            # The next step's page ids are read before this step waits for its slot, so the
            # table read's latency hides behind the wait.
            ahead = pages_of(step + 1)
            slot = lax.rem(step, stages)
            plgpu.barrier_wait(k_free.at[slot])
            fetch(k_ref, k_smem, k_full, pages, slot)
            plgpu.barrier_wait(v_free.at[slot])
            fetch(v_ref, v_smem, v_full, pages, slot)
            return ahead

        lax.fori_loop(stages, steps, refill, pages_of(stages))

        # Observe the consumer's last releases, so every barrier phase is seen before the
        # barriers go away (the interpreter checks this).
        @pl.loop(jnp.maximum(steps - stages, 0), steps)
        def _(step):
            slot = lax.rem(step, stages)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])


def decode_work(q_shape, k_shape, q_positions, kv_lens, *, sliding_window=None, items=None):
    """paged_decode_mgpu's work plan (kernels/worklist.py) for q [B,1,N,H] and pages [P,G,K,H]
    of these shapes, with `items` items (default worklist.default_items)."""
    g, k = k_shape[1], k_shape[2]
    return worklist.plan(q_positions[:, 0], kv_lens, page_size=g, block_pages=_block_pages(g, k),
                         items=items or worklist.default_items(q_shape[0]),
                         window=sliding_window)


def _block_pages(page_size: int, kv_heads: int) -> int:
    """Pages a decode key block: ~64 (slot, KV head) columns, one wgmma tile."""
    return max(1, 64 // (page_size * kv_heads))


@functools.partial(jax.jit, static_argnames=("sliding_window", "logit_softcap", "interpret",
                                             "items", "stages", "p_in_smem"))
def paged_decode_mgpu(q, k_pages, v_pages, page_table, q_positions, kv_lens, *,
                      sliding_window=None, logit_softcap=None, interpret=False, items=None,
                      stages=None, p_in_smem=None, work=None):
    """Same contract as kernels.paged_attention (see there), for decode calls (T = 1) that
    `supports_decode` accepts.

    items: programs of the call (default: worklist.default_items, one wave over the GPU's SMs).
    With as many items as rows, item b is row b whole and writes the output itself; with more,
    the keys are cut into items by kernels/worklist.py's plan and the partials merge in XLA.
    work: decode_work's plan, when the caller made it (once for every layer of a step); it
    sets the items. stages: key blocks in flight."""
    b, t, n, h = q.shape
    p, g, k, _ = k_pages.shape
    assert t == 1, "paged_decode_mgpu takes one query token a row"
    page_cols = g * k
    ppb = _block_pages(g, k)
    if work is None:
        work = decode_work(q.shape, k_pages.shape, q_positions, kv_lens,
                           sliding_window=sliding_window, items=items)
    items = work.shape[1]
    split = items > b
    # Measured on the H100 (BENCHMARKS.md): with splits, one slot a program reads as fast as
    # two or more (the programs of a wave keep enough in flight between them); without, two.
    stages = stages or (1 if split else 2)
    # [P,G,K,H] -> [P,G*K,H]: a page of all KV heads is one contiguous TMA copy.
    k_flat, v_flat = k_pages.reshape(p, page_cols, h), v_pages.reshape(p, page_cols, h)

    def entry(q_ref, pos_ref, lens_ref, plan_ref, table_ref, k_ref, v_ref, o_ref, lse_ref=None):
        tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        cols = ppb * page_cols
        ring = [plgpu.SMEM((stages, cols, h), q.dtype, transforms=tiled)] * 2   # K, V
        if split:
            ring = plgpu.RefUnion(ring, [plgpu.SMEM((ROWS, h), jnp.float32),
                                         plgpu.SMEM((ROWS,), jnp.float32)])
        smem = (
            plgpu.SMEM((ROWS, h), q.dtype, transforms=tiled),
            plgpu.SMEM((ROWS, cols), q.dtype, transforms=tiled)
            if (interpret if p_in_smem is None else p_in_smem) else None,
            ring,
        )
        full = (plgpu.Barrier(num_arrivals=ppb, num_barriers=stages),
                plgpu.Barrier(num_arrivals=ppb, num_barriers=stages),
                plgpu.Barrier(num_arrivals=pl.cdiv(ROWS, n)))
        free = (plgpu.Barrier(num_arrivals=1, num_barriers=stages),) * 2
        pl.run_scoped(
            lambda *scoped: _decode_kernel(
                q_ref, pos_ref, lens_ref, plan_ref, table_ref, k_ref, v_ref, o_ref, lse_ref,
                scoped, g=g, q_per_kv=n // k, ppb=ppb, stages=stages, window=sliding_window,
                logit_softcap=logit_softcap),
            smem, full, free, collective_axes="wg")

    if split:
        out_type = (jax.ShapeDtypeStruct((items, n, h), jnp.float32),
                    jax.ShapeDtypeStruct((items, n), jnp.float32))
    else:
        out_type = jax.ShapeDtypeStruct((b, n, h), q.dtype)
    out = plgpu.kernel(
        entry,
        out_type=out_type,
        grid=(items,),
        grid_names=("items",),
        num_threads=2,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams(detect_races=True) if interpret else None,
    )(q.reshape(b, n, h), q_positions.astype(jnp.int32), kv_lens.astype(jnp.int32), work,
      page_table.astype(jnp.int32), k_flat, v_flat)
    if not split:
        return out.reshape(b, 1, n, h)
    o, lse = out
    # Normalised partials: lse is their max and their sum is 1.
    return worklist.merge(o, lse, jnp.ones_like(lse), work[0], b, precision=lax.Precision.HIGH) \
        .reshape(b, 1, n, h).astype(q.dtype)
