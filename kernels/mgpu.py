"""Paged attention for rows of many query tokens (chunked prefill, mixed batches) on Hopper, in
Pallas Mosaic GPU.

Why a second GPU kernel: the Triton-lowered kernel (kernels/gpu.py) gathers a block of pages
with pointer loads, so its tensor-core matmuls are not fed the way a contiguous kernel's are;
on the H100 its 8192-token prefill reached 63% of PyTorch SDPA (BENCHMARKS.md). Here each page
of a key block arrives in shared memory by its own TMA copy, issued by a producer warpgroup
while two consumer warpgroups run wgmma on the block before it: the FlashAttention-3 plan,
with a page table between the producer and the pool.

A program owns one (row, KV head, tile of 2 x BLOCK_Q query rows); query rows are tokens x
the Q heads of one KV head (GQA folded into rows, as in kernels/gpu.py):

    producer warpgroup: for each key block (BLOCK_KV keys = BLOCK_KV / G pages), one TMA per
        page for K, then one per page for V, into a ring of STAGES slots
    consumer warpgroup w (0, 1): its BLOCK_Q rows; blocks every live row sees whole run
        unmasked, the rest with the causal mask (key s visible from position t iff s <= t);
        online softmax in base 2; the output is normalised and stored by TMA

The two consumers take turns on the tensor cores (a shared barrier), so one's softmax overlaps
the other's matmuls. Constraints, checked by `supports`: fp16/bf16, head_dim 64 or 128, page
size a multiple of 8 dividing BLOCK_KV, no sliding window; other calls use kernels/gpu.py.
CI runs this kernel on a CPU in Mosaic GPU interpret mode (`InterpretGPUParams` with race
detection on), which simulates the warpgroups, barriers and TMA copies. Two differences from the
GPU: the interpreter's wgmma takes both operands from shared memory, so the softmax weights P
go through shared memory there (on the H100, P in registers measured 4% faster on the 8192-token
prefill); and jax 0.11.2's race detector does not track wgmma's reads of shared memory.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BLOCK_Q = 64        # query rows per consumer warpgroup (one wgmma M tile)


def supports(q, k_pages, sliding_window, block_kv: int = 128) -> bool:
    """Whether this kernel takes a call with these operands."""
    g, h = k_pages.shape[1], q.shape[-1]
    return (q.dtype in (jnp.float16, jnp.bfloat16) and k_pages.dtype == q.dtype
            and h in (64, 128) and g % 8 == 0 and block_kv % g == 0
            and sliding_window is None)


def _kernel(q_ref, pos_ref, bounds_ref, table_ref, k_ref, v_ref, o_ref, scoped, *,
            block_kv: int, stages: int, n_tiles: int):
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
    scale = math.log2(math.e) / math.sqrt(head_dim)    # logits in base-2 units

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
            if masked:
                keys = plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, block_kv), 1,
                                              layout=plgpu.Layout.WGMMA) + step * block_kv
                s = jnp.where(keys <= lax.broadcast_in_dim(pos, s.shape, [0]), s, -jnp.inf)
            m_new = jnp.maximum(m_i, s.max(axis=1) * scale)
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s * scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
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


@functools.partial(jax.jit, static_argnames=("interpret", "block_kv", "stages", "p_in_smem"))
def paged_prefill_mgpu(q, k_pages, v_pages, page_table, q_positions, kv_lens, *,
                       interpret=False, block_kv=128, stages=2, p_in_smem=None):
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
                                    n_tiles=n_tiles),
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
