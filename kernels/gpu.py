"""Paged attention for NVIDIA GPUs in Pallas, through the Triton lowering.

Why Triton and not Mosaic GPU: the Triton lowering gathers a block of pages with one indexed
load (`k_ref[page_ids]`), runs in `interpret=True` mode on a CPU (so CI checks the very kernel
that runs on the GPU), and lets us set warps and pipeline stages per call. jax 0.11 deprecates
it in favour of Mosaic GPU, whose paged gathers need TMA descriptors per page; that port is the
next step if the Triton version cannot reach the bandwidth target (see BENCHMARKS.md).

Two kernels share one key loop (`_attend`: ppb pages, one gather, at a time, online softmax in
base 2 (the scale folds log2(e) in and the kernels use exp2)):

    prefill (rows of many query tokens at arbitrary positions): a program owns one (row, KV
          head, query block) of block_t tokens x Qp query heads of one KV head (GQA folded
          in), and writes its normalised output
    decode (one query token a row): a program owns one (work item, KV head), the items cut by
          length over the whole call (kernels/worklist.py: a long row gets many, a short row
          one); the GQA group's heads are read straight from q. With an item a row, o goes in
          place, normalised, in q's dtype; with more, each item's unnormalised o, running max
          and softmax sum merge in XLA
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import worklist


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _attend(q, pos, kv_len, table_at, k_ref, v_ref, start_page, end_page, num_full, *,
            ppb: int, scale: float, cap: float | None, window: int | None):
    """Online softmax of q [R,H] (rows at positions pos [R], -1 padding) over the keys of pages
    [start_page, end_page), ppb pages (one gather) a block; the first num_full blocks, which
    every live row sees whole, unmasked. Returns unnormalised o [R,H], running max m [R] and
    softmax sum [R], in base 2. table_at(first) -> the ppb page ids from table column first."""
    g = k_ref.shape[1]
    block_k = ppb * g
    exact = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None  # float32: no TF32
    rows, head_dim = q.shape
    num_blocks = jnp.maximum(pl.cdiv(end_page - start_page, ppb), 0)

    def block(j, carry, masked: bool):
        o, m, total = carry
        first = start_page + j * ppb
        ids = table_at(first)                                          # [ppb]
        k = k_ref[ids].reshape(block_k, head_dim).astype(q.dtype)      # [BK,H] (fp8 pages)
        v = v_ref[ids].reshape(block_k, head_dim).astype(q.dtype)      # [BK,H]
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

    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    carry = jax.lax.fori_loop(0, num_full, functools.partial(block, masked=False), init)
    return jax.lax.fori_loop(num_full, num_blocks, functools.partial(block, masked=True), carry)


def _prefill_kernel(lens_ref, table_ref, pos_ref, q_ref, k_ref, v_ref, o_ref, *, ppb: int,
                    scale: float, cap: float | None, window: int | None):
    """One (row, KV head, query block): q_ref, pos_ref and o_ref hold the program's own rows.
    Leading key blocks that every live row sees whole need no mask; the rest (the diagonal,
    the end of the row, a sliding window) do."""
    g = k_ref.shape[1]
    kv_len = lens_ref[0]
    pos = pos_ref[...]                                                 # [R]
    live = pos >= 0
    last = jnp.minimum(jnp.max(pos) + 1, kv_len)                       # keys s < last
    start_page = 0
    if window is not None:
        lowest = jnp.min(jnp.where(live, pos, jnp.iinfo(jnp.int32).max))
        # whole blocks, so reads stay inside the table
        start_page = jnp.maximum((lowest - window + 1) // g, 0) // ppb * ppb
    end_page = pl.cdiv(last, g)
    num_full = 0
    if window is None:
        seen_by_all = jnp.minimum(jnp.min(jnp.where(live, pos, kv_len)) + 1, kv_len)
        num_full = jnp.clip(seen_by_all // g // ppb, 0, pl.cdiv(end_page, ppb))
    o, _, total = _attend(q_ref[...], pos, kv_len, lambda first: table_ref[pl.ds(first, ppb)],
                          k_ref, v_ref, start_page, end_page, num_full, ppb=ppb, scale=scale,
                          cap=cap, window=window)
    o = o / jnp.where(total > 0, total, 1.0)[:, None]
    o_ref[...] = jnp.where(live[:, None], o, 0.0).astype(o_ref.dtype)     # padding rows: 0


def _decode_kernel(plan_ref, lens_ref, table_ref, pos_ref, q_ref, k_ref, v_ref, o_ref,
                   *stat_refs, ppb: int, scale: float, cap: float | None, window: int | None,
                   q_per_kv: int, qp: int):
    """One (work item, KV head): the item's row and pages [lo, hi) come from plan_ref [3,I]
    (kernels/worklist.py); lens_ref [B], table_ref [B,M+ppb], pos_ref [B,1] and q_ref [B,N,H]
    are whole. Query heads [KV head * Q, + Q), padded to Qp rows, read straight from q. With
    an item a row (no stat_refs), the normalised output of the group's heads goes straight into
    o_ref [N,H]; else the item's unnormalised o, running max and sum, merged in XLA. Decode
    keeps one masked loop: measured on the H100, splitting it cost ~9% of its bandwidth."""
    item = pl.program_id(0)
    row = jnp.minimum(plan_ref[0, item], lens_ref.shape[0] - 1)   # an empty item: no block
    heads = pl.ds(pl.program_id(1) * q_per_kv, qp)           # may run past N: masked
    own = jnp.broadcast_to((jnp.arange(qp) < q_per_kv)[:, None], (qp, q_ref.shape[-1]))
    q = plgpu.load(q_ref.at[row, heads], mask=own, other=0)            # [Qp,H]
    at, kv_len = pos_ref[row, 0], lens_ref[row]
    pos = jnp.broadcast_to(at, (qp,))
    g = k_ref.shape[1]
    start = plan_ref[1, item]
    if window is not None:
        start = jnp.maximum(start, (at - window + 1) // g)
    end = jnp.minimum(plan_ref[2, item], pl.cdiv(jnp.minimum(at + 1, kv_len), g))
    o, m, total = _attend(q, pos, kv_len, lambda first: table_ref[row, pl.ds(first, ppb)],
                          k_ref, v_ref, start, end, 0, ppb=ppb, scale=scale, cap=cap,
                          window=window)
    live = pos >= 0
    if not stat_refs:
        o = o / jnp.where(total > 0, total, 1.0)[:, None]
        plgpu.store(o_ref.at[heads], jnp.where(live[:, None], o, 0.0).astype(o_ref.dtype),
                    mask=own)
        return
    m_ref, sum_ref = stat_refs
    o_ref[...] = jnp.where(live[:, None], o, 0.0)
    m_ref[...] = jnp.where(live, m, -jnp.inf)
    sum_ref[...] = jnp.where(live, total, 0.0)


@functools.partial(jax.jit, static_argnames=("sliding_window", "logit_softcap", "interpret",
                                             "pages_per_block", "items", "block_rows",
                                             "num_warps", "num_stages"))
def paged_attention_gpu(q, k_pages, v_pages, page_table, q_positions, kv_lens, *,
                        sliding_window=None, logit_softcap=None, interpret=False,
                        pages_per_block=None, items=None, block_rows=128, num_warps=None,
                        num_stages=None, work=None):
    """Same contract as kernels.paged_attention (see there). The tuning knobs default to the
    best of bench/kernels.py's sweep on the H100 (BENCHMARKS.md); block_rows: query rows
    (tokens x heads of a GQA group) per program when T > 1; items: decode work items (default
    enough for ~4 waves of programs over 132 SMs, at least one a row); work: decode_work's plan,
    when the caller made it (once for every layer of a step)."""
    b, t, n, h = q.shape
    _, g, k, _ = k_pages.shape
    m_width = page_table.shape[1]
    q_per_kv = n // k
    ppb = _block_pages(g, pages_per_block)
    scale, cap = log2_logits(h, logit_softcap)
    decode = t == 1
    params = dict(compiler_params=plgpu.CompilerParams(
        num_warps=num_warps or (2 if decode else 4), num_stages=num_stages or (4 if decode else 2)),
        interpret=interpret, name="hybridkv_paged_attention")
    options = dict(ppb=ppb, scale=scale, cap=cap, window=sliding_window)
    lens = kv_lens.astype(jnp.int32)
    if decode:
        if work is None:
            work = decode_work(q.shape, k_pages.shape, q_positions, lens,
                               sliding_window=sliding_window, items=items,
                               pages_per_block=pages_per_block)
        return _decode(q, k_pages, v_pages, page_table, q_positions, lens, work=work,
                       params=params, options=options)
    assert work is None, "work plans are for decode calls (T = 1)"

    qp = _pow2(q_per_kv)
    block_t = max(1, block_rows // qp)
    t_pad = pl.cdiv(t, block_t) * block_t
    table = jnp.pad(page_table, ((0, 0), (0, pl.cdiv(m_width, ppb) * ppb - m_width)))
    rows = block_t * qp
    qg = q.reshape(b, t, k, q_per_kv, h).transpose(0, 2, 1, 3, 4)           # [B,K,T,Q,H]
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, t_pad - t), (0, qp - q_per_kv), (0, 0)))
    qg = qg.reshape(b, k, t_pad * qp, h)
    pos = jnp.pad(q_positions, ((0, 0), (0, t_pad - t)), constant_values=-1)
    pos = jnp.repeat(pos, qp, axis=1)                                        # [B,Tp*Qp]
    # Later query blocks see more keys: launch them first so the short ones fill the tail.
    n_t = t_pad // block_t
    o = pl.pallas_call(
        functools.partial(_prefill_kernel, **options),
        grid=(b, k, n_t),
        in_specs=[
            pl.BlockSpec((1,), lambda i, j, r: (i,)),                                # kv_lens
            pl.BlockSpec((None, table.shape[1]), lambda i, j, r: (i, 0)),            # table
            pl.BlockSpec((None, rows), lambda i, j, r: (i, n_t - 1 - r)),            # positions
            pl.BlockSpec((None, None, rows, h), lambda i, j, r: (i, j, n_t - 1 - r, 0)),
            *_page_specs(k_pages, v_pages, lambda i, j, r: (0, 0, j, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, rows, h), lambda i, j, r: (i, j, n_t - 1 - r, 0)),
        out_shape=jax.ShapeDtypeStruct((b, k, t_pad * qp, h), q.dtype),
        **params,
    )(lens, table, pos, qg, k_pages, v_pages)
    return o.reshape(b, k, t_pad, qp, h)[:, :, :t, :q_per_kv] \
        .transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)


def _page_specs(k_pages, v_pages, index):
    """The whole pool, one KV head (grid axis 1) of it."""
    return [pl.BlockSpec((pages.shape[0], pages.shape[1], None, pages.shape[3]), index)
            for pages in (k_pages, v_pages)]


def decode_work(q_shape, k_shape, q_positions, kv_lens, *, sliding_window=None, items=None,
                pages_per_block=None):
    """The decode kernel's work plan (kernels/worklist.py) for q [B,1,N,H] and pages [P,G,K,H]
    of these shapes: `items` items, by default enough for ~4 waves of programs (one a KV head
    an item) over 132 SMs, at least one a row."""
    b, (g, k) = q_shape[0], k_shape[1:3]
    return worklist.plan(q_positions[:, 0], kv_lens, page_size=g,
                         block_pages=_block_pages(g, pages_per_block),
                         items=items or max(b, 528 // k), window=sliding_window)


def _block_pages(page_size: int, pages_per_block: int | None) -> int:
    """~64 keys a block; never under 16, the smallest dot dimension Triton handles (measured on
    the H100: 4-key blocks in bfloat16 gave outputs 4x too large)."""
    return max(pages_per_block or max(1, 64 // page_size), pl.cdiv(16, page_size))


def _decode(q, k_pages, v_pages, page_table, q_positions, lens, *, work, params, options):
    """Decode calls (one query token a row): a program per (work item, KV head), the items cut
    by length over the call (`work`, kernels/worklist.py); the whole GQA group a program, at
    least 16 rows."""
    b, _, n, h = q.shape
    _, g, k, _ = k_pages.shape
    q_per_kv, qp = n // k, max(16, _pow2(n // k))
    ppb = options["ppb"]
    items = work.shape[1]
    # ppb more columns (trash page 0): an item's last block may run past the table's end.
    table = jnp.pad(page_table, ((0, 0), (0, ppb))).astype(jnp.int32)
    whole = lambda x: pl.BlockSpec(x.shape, lambda i, j: (0,) * x.ndim)   # noqa: E731
    qs = q.reshape(b, n, h)
    inputs = (work, lens, table, q_positions.astype(jnp.int32), qs)
    kernel = functools.partial(_decode_kernel, **options, q_per_kv=q_per_kv, qp=qp)
    in_specs = [*map(whole, inputs), *_page_specs(k_pages, v_pages, lambda i, j: (0, 0, j, 0))]
    if items == b:            # item i is row i: the output in place
        return pl.pallas_call(
            kernel, grid=(b, k), in_specs=in_specs,
            out_specs=pl.BlockSpec((None, n, h), lambda i, j: (i, 0, 0)),
            out_shape=jax.ShapeDtypeStruct(qs.shape, q.dtype), **params)(
            *inputs, k_pages, v_pages).reshape(q.shape)
    part = (items, k, qp)
    o, m, total = pl.pallas_call(
        kernel, grid=(items, k), in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, qp, h), lambda i, j: (i, j, 0, 0)),
                   *[pl.BlockSpec((None, None, qp), lambda i, j: (i, j, 0))] * 2],
        out_shape=[jax.ShapeDtypeStruct((*part, h), jnp.float32),
                   *[jax.ShapeDtypeStruct(part, jnp.float32)] * 2],
        **params)(*inputs, k_pages, v_pages)
    # The GQA group's padding heads (qp - q_per_kv of each KV head's rows) go before the merge,
    # which reads every partial a few times: at 32 query and 8 KV heads, a quarter of the bytes.
    flat = lambda x: x[:, :, :q_per_kv].reshape(items, n, *x.shape[3:])  # noqa: E731
    exact = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else jax.lax.Precision.HIGH
    out = worklist.merge(flat(o), flat(m), flat(total), work[0], b, exact)   # [B,N,H]
    return out.reshape(q.shape).astype(q.dtype)


def log2_logits(head_dim: int, logit_softcap: float | None) -> tuple[float, float | None]:
    """(scale, cap) with which a kernel turns q.k into logits in log2 units (for exp2): x * scale
    without a soft-cap c; with one, cap * tanh(x * scale), which is log2(e) * c * tanh(x /
    (sqrt(H) * c))."""
    if logit_softcap is None:
        return math.log2(math.e) / math.sqrt(head_dim), None
    return 1 / (math.sqrt(head_dim) * logit_softcap), math.log2(math.e) * logit_softcap
