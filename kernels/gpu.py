"""Paged attention for NVIDIA GPUs in Pallas, through the Triton lowering.

Why Triton and not Mosaic GPU: the Triton lowering gathers a block of pages with one indexed
load (`k_ref[page_ids]`), runs in `interpret=True` mode on a CPU (so CI checks the very kernel
that runs on the GPU), and lets us set warps and pipeline stages per call. jax 0.11 deprecates
it in favour of Mosaic GPU, whose paged gathers need TMA descriptors per page; that port is the
next step if the Triton version cannot reach the bandwidth target (see BENCHMARKS.md).

One kernel serves decode rows (one query token) and chunked-prefill rows (many query tokens at
arbitrary positions) in the same batch. A program owns one (row, KV head, query block, split):

    rows of the program: block_t query tokens x Qp query heads of one KV head (GQA folded in);
          decode rows read their heads straight from q and, with one split, write o in place
    keys: the row's pages [split * pages_per_split, ...), ppb pages (one gather) at a time,
          stopping at the last position any of its queries can see
    out:  with one split, o normalised, in q's dtype; with several, unnormalised o, running
          max m and softmax sum per split (in base 2: the scale folds log2(e) in and the
          kernel uses exp2), which merge in XLA

Split-K gives a long sequence several programs when the batch alone cannot fill the GPU.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _kernel(lens_ref, table_ref, pos_ref, q_ref, k_ref, v_ref, o_ref, *stat_refs,
            ppb: int, pages_per_split: int, scale: float, cap: float | None,
            window: int | None, group: tuple[int, int] | None):
    """stat_refs: (m_ref, sum_ref) when the splits merge outside; none with one split, whose
    o_ref takes the normalised output.

    group: None for prefill rows: q_ref, pos_ref and o_ref hold the program's own rows. For
    decode, (Q, Qp): q_ref [N,H] and o_ref [N,H] hold the token's every head and pos_ref [1] its
    position; the program reads query heads [KV head * Q, + Q) padded to Qp rows, and with one
    split writes them straight into o_ref, so no XLA op regroups q or o around the call.

    Logits are q.k * scale, or with a soft-cap cap * tanh(q.k * scale): both in log2 units."""
    g = k_ref.shape[1]
    block_k = ppb * g
    kv_len = lens_ref[0]
    if group is None:
        pos = pos_ref[...]                                             # [R]
        q = q_ref[...]                                                 # [R,H]
    else:
        q_per_kv, qp = group
        heads = pl.ds(pl.program_id(1) * q_per_kv, qp)       # may run past N: masked
        own = jnp.broadcast_to((jnp.arange(qp) < q_per_kv)[:, None], (qp, q_ref.shape[1]))
        q = plgpu.load(q_ref.at[heads], mask=own, other=0)             # [Qp,H]
        pos = jnp.broadcast_to(pos_ref[...], (qp,))
    live = pos >= 0
    exact = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None  # float32: no TF32
    rows, head_dim = q.shape
    split_start = pl.program_id(3) * pages_per_split
    last = jnp.minimum(jnp.max(pos) + 1, kv_len)                       # keys s < last
    end_page = jnp.minimum(pl.cdiv(last, g), split_start + pages_per_split)
    start_page = split_start
    if window is not None:
        lowest = jnp.min(jnp.where(live, pos, jnp.iinfo(jnp.int32).max))
        skip = jnp.maximum((lowest - window + 1) // g - split_start, 0) // ppb * ppb
        start_page = split_start + skip        # whole blocks, so reads stay inside the table
    num_blocks = jnp.maximum(pl.cdiv(end_page - start_page, ppb), 0)

    def block(j, carry, masked: bool):
        o, m, total = carry
        first = start_page + j * ppb
        ids = table_ref[pl.ds(first, ppb)]                             # [ppb]
        k = k_ref[ids].reshape(block_k, head_dim)                      # [BK,H]
        v = v_ref[ids].reshape(block_k, head_dim)                      # [BK,H]
        logits = plgpu.dot(q, k.T, precision=exact).astype(jnp.float32) * scale   # log2 units
        if cap is not None:
            logits = cap * jnp.tanh(logits)
        if masked:
            s_pos = first * g + jnp.arange(block_k, dtype=jnp.int32)   # [BK]
            stored = s_pos < kv_len
            visible = (s_pos[None, :] <= pos[:, None]) & stored[None, :]   # [R,BK]
            if window is not None:
                visible &= pos[:, None] - s_pos[None, :] < window
            logits = jnp.where(visible, logits, -jnp.inf)
            v = jnp.where(stored[:, None], v, jnp.zeros_like(v))       # garbage past kv_len
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        correction = jnp.exp2(m - m_safe)
        p = jnp.exp2(logits - m_safe[:, None])
        o = o * correction[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=exact).astype(
            jnp.float32)
        return o, m_new, total * correction + jnp.sum(p, axis=1)

    # Prefill: leading blocks that every live row sees whole need no mask; the rest (the
    # diagonal, the end of the row, a sliding window) do. Decode keeps one loop: measured on
    # the H100, splitting it cost ~9% of its bandwidth (BENCHMARKS.md).
    num_full = 0
    if window is None and group is None:
        seen_by_all = jnp.minimum(jnp.min(jnp.where(live, pos, kv_len)) + 1, kv_len)
        num_full = jnp.clip((seen_by_all // g - start_page) // ppb, 0, num_blocks)
    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    carry = jax.lax.fori_loop(0, num_full, functools.partial(block, masked=False), init)
    o, m, total = jax.lax.fori_loop(num_full, num_blocks, functools.partial(block, masked=True),
                                    carry)
    if not stat_refs:                  # one split: the output itself
        o = o / jnp.where(total > 0, total, 1.0)[:, None]
        o = jnp.where(live[:, None], o, 0.0).astype(o_ref.dtype)     # padding rows: 0
        if group is None:
            o_ref[...] = o
        else:                          # only the group's own heads
            plgpu.store(o_ref.at[heads], o, mask=own)
        return
    m_ref, sum_ref = stat_refs
    o_ref[...] = jnp.where(live[:, None], o, 0.0)
    m_ref[...] = jnp.where(live, m, -jnp.inf)
    sum_ref[...] = jnp.where(live, total, 0.0)


@functools.partial(jax.jit, static_argnames=("sliding_window", "logit_softcap", "interpret",
                                             "pages_per_block", "num_splits", "block_rows",
                                             "num_warps", "num_stages"))
def paged_attention_gpu(q, k_pages, v_pages, page_table, q_positions, kv_lens, *,
                        sliding_window=None, logit_softcap=None, interpret=False,
                        pages_per_block=None, num_splits=None, block_rows=128, num_warps=None,
                        num_stages=None):
    """Same contract as kernels.paged_attention (see there). The tuning knobs default to the
    best of bench/kernels.py's sweep on the H100 (BENCHMARKS.md); block_rows: query rows
    (tokens x heads of a GQA group) per program when T > 1."""
    b, t, n, h = q.shape
    _, g, k, _ = k_pages.shape
    m_width = page_table.shape[1]
    q_per_kv = n // k
    if t == 1:                     # decode: one token, the whole GQA group, at least 16 rows
        block_t, qp = 1, max(16, _pow2(q_per_kv))
        num_warps, num_stages = num_warps or 2, num_stages or 4
    else:                          # prefill chunk: ~block_rows query rows a program
        qp = _pow2(q_per_kv)
        block_t = max(1, block_rows // qp)
        num_warps, num_stages = num_warps or 4, num_stages or 2
    # ~64 keys a block; never under 16, the smallest dot dimension Triton handles (measured on
    # the H100: 4-key blocks in bfloat16 gave outputs 4x too large)
    ppb = max(min(pages_per_block or max(1, 64 // g), _pow2(m_width)), pl.cdiv(16, g))
    t_pad = pl.cdiv(t, block_t) * block_t
    blocks = pl.cdiv(m_width, ppb)
    if num_splits is None:         # enough programs for ~4 waves over 132 SMs
        num_splits = 1 if t > 1 else max(1, min(blocks, 528 // (b * k)))
    blocks_per_split = pl.cdiv(blocks, num_splits)
    pages_per_split = blocks_per_split * ppb
    table = jnp.pad(page_table, ((0, 0), (0, num_splits * pages_per_split - m_width)))

    scale, cap = log2_logits(h, logit_softcap)
    kv_specs = [pl.BlockSpec((1,), lambda i, j, r, s: (i,)),                     # kv_lens
                pl.BlockSpec((None, table.shape[1]), lambda i, j, r, s: (i, 0))]  # table
    page_specs = [pl.BlockSpec((k_pages.shape[0], g, None, h), lambda i, j, r, s: (0, 0, j, 0)),
                  pl.BlockSpec((v_pages.shape[0], g, None, h), lambda i, j, r, s: (0, 0, j, 0))]
    params = dict(compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
                  interpret=interpret, name="hybridkv_paged_attention")
    lens = kv_lens.astype(jnp.int32)
    kernel = functools.partial(_kernel, ppb=ppb, pages_per_split=pages_per_split, scale=scale,
                               cap=cap, window=sliding_window)
    if t == 1:                     # decode: q, positions and (one split) o as they are
        kernel = functools.partial(kernel, group=(q_per_kv, qp))
        token = pl.BlockSpec((None, None, n, h), lambda i, j, r, s: (i, 0, 0, 0))   # [N,H]
        in_specs = [*kv_specs, pl.BlockSpec((None, 1), lambda i, j, r, s: (i, 0)), token,
                    *page_specs]
        if num_splits == 1:
            return pl.pallas_call(kernel, grid=(b, k, 1, 1), in_specs=in_specs, out_specs=token,
                                  out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), **params)(
                lens, table, q_positions, q, k_pages, v_pages)
        part = (b, k, num_splits, qp)
        outs = pl.pallas_call(
            kernel, grid=(b, k, 1, num_splits), in_specs=in_specs,
            out_specs=[pl.BlockSpec((None, None, None, qp, h), lambda i, j, r, s: (i, j, s, 0, 0)),
                       *[pl.BlockSpec((None, None, None, qp), lambda i, j, r, s: (i, j, s, 0))] * 2],
            out_shape=[jax.ShapeDtypeStruct((*part, h), jnp.float32),
                       *[jax.ShapeDtypeStruct(part, jnp.float32)] * 2],
            **params)(lens, table, q_positions, q, k_pages, v_pages)
        return merge_splits(*outs)[:, :, :q_per_kv].reshape(b, 1, n, h).astype(q.dtype)

    rows = block_t * qp
    qg = q.reshape(b, t, k, q_per_kv, h).transpose(0, 2, 1, 3, 4)           # [B,K,T,Q,H]
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, t_pad - t), (0, qp - q_per_kv), (0, 0)))
    qg = qg.reshape(b, k, t_pad * qp, h)
    pos = jnp.pad(q_positions, ((0, 0), (0, t_pad - t)), constant_values=-1)
    pos = jnp.repeat(pos, qp, axis=1)                                        # [B,Tp*Qp]
    # Later query blocks see more keys: launch them first so the short ones fill the tail.
    n_t = t_pad // block_t
    kernel = functools.partial(kernel, group=None)
    part = (b, k, num_splits, t_pad * qp)
    o_spec = pl.BlockSpec((None, None, None, rows, h), lambda i, j, r, s: (i, j, s, n_t - 1 - r, 0))
    stat_spec = pl.BlockSpec((None, None, None, rows), lambda i, j, r, s: (i, j, s, n_t - 1 - r))
    if num_splits == 1:
        out_specs, out_shape = [o_spec], [jax.ShapeDtypeStruct((*part, h), q.dtype)]
    else:
        out_specs = [o_spec, stat_spec, stat_spec]
        out_shape = [jax.ShapeDtypeStruct((*part, h), jnp.float32),
                     jax.ShapeDtypeStruct(part, jnp.float32),
                     jax.ShapeDtypeStruct(part, jnp.float32)]
    outs = pl.pallas_call(
        kernel,
        grid=(b, k, n_t, num_splits),
        in_specs=[
            *kv_specs,
            pl.BlockSpec((None, rows), lambda i, j, r, s: (i, n_t - 1 - r)),      # positions
            pl.BlockSpec((None, None, rows, h), lambda i, j, r, s: (i, j, n_t - 1 - r, 0)),
            *page_specs,
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        **params,
    )(lens, table, pos, qg, k_pages, v_pages)
    o = outs[0][:, :, 0] if num_splits == 1 else merge_splits(*outs)
    return o.reshape(b, k, t_pad, qp, h)[:, :, :t, :q_per_kv] \
        .transpose(0, 2, 1, 3, 4).reshape(b, t, n, h).astype(q.dtype)


def log2_logits(head_dim: int, logit_softcap: float | None) -> tuple[float, float | None]:
    """(scale, cap) with which a kernel turns q.k into logits in log2 units (for exp2): x * scale
    without a soft-cap c; with one, cap * tanh(x * scale), which is log2(e) * c * tanh(x /
    (sqrt(H) * c))."""
    if logit_softcap is None:
        return math.log2(math.e) / math.sqrt(head_dim), None
    return 1 / (math.sqrt(head_dim) * logit_softcap), math.log2(math.e) * logit_softcap


def merge_splits(o, m, total):
    """o [...,S,R,H], m and total [...,S,R]: partial results over disjoint key ranges (running
    max in log2 units, and softmax denominator) -> [...,R,H].
    Rows that saw no key at all are zero."""
    peak = jnp.max(m, axis=-2, keepdims=True)
    peak = jnp.where(peak == -jnp.inf, 0.0, peak)
    w = jnp.exp2(m - peak)                                                   # [...,S,R]
    denom = jnp.sum(w * total, axis=-2)
    out = jnp.sum(w[..., None] * o, axis=-3)
    return out / jnp.where(denom > 0, denom, 1.0)[..., None]
