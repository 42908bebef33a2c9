"""Decode work cut by length: the key pages of a call split into pieces of about equal size,
one program each, however the pages are spread over the rows.

A grid of (row, split) gives every row the same number of programs, so a batch that mixes one
long row with short ones leaves the long row's programs working long after the others are done
(on the H100, 1 x 1M keys beside 3 x 2k keys read at 1.12 TB/s against 2.75 alone: the long
row had 33 of 132 SMs). Here the grid is a list of `items` work items, each (row, first page,
end page), planned on the device from the rows' positions and lengths inside the same jit:

    pages a row's query sees: [first, end), first = 0 (or the window's first key's page)
    chunk = ceil(all rows' key blocks / (items - rows))          (at least one block)
    row r gets ceil(blocks_r / chunk) items, its blocks dealt out evenly (sizes differ by at
        most one block); items past the last row's are empty (row index = rows: dropped)

The number of items is static (one compiled program), and sum ceil(blocks_r / chunk) <=
blocks / chunk + rows <= items, so the plan always fits. A short row gets one item and a long
row as many as its share of the keys, which is FlashDecoding's split-K with the split count
chosen per row, as FlashInfer's load-balanced scheduler does.
"""

import jax
import jax.numpy as jnp
from jax import lax


def plan(q_positions, kv_lens, *, page_size: int, block_pages: int, items: int,
         window: int | None = None):
    """q_positions [B] (one query token a row, -1 padding), kv_lens [B] -> int32 [3, items]:
    each item's row (B for an empty item), first page and end page (exclusive). Every page a
    row's query can see is in exactly one of the row's items. With as many items as rows, item
    b is row b, padding rows included, its pages [0, int32 max) (the kernel stops at the row's
    last key): a kernel then writes each row's output itself, with no merge."""
    b = q_positions.shape[0]
    assert items >= b, f"a plan needs at least one item a row ({items} items, {b} rows)"
    if items == b:
        return jnp.stack([jnp.arange(b, dtype=jnp.int32), jnp.zeros(b, jnp.int32),
                          jnp.full(b, jnp.iinfo(jnp.int32).max, jnp.int32)])
    pos = q_positions.astype(jnp.int32)
    last = jnp.minimum(pos + 1, kv_lens.astype(jnp.int32))           # keys s < last
    first = jnp.zeros_like(pos) if window is None else jnp.maximum(pos - window + 1, 0)
    first_page = first // page_size
    end_page = -(-last // page_size)
    blocks = jnp.where((pos >= 0) & (last > first), -(-(end_page - first_page) // block_pages), 0)
    chunk = jnp.maximum(-(-blocks.sum() // max(items - b, 1)), 1)
    count = -(-blocks // chunk)                                       # items of each row
    ends = jnp.cumsum(count)
    item = jnp.arange(items, dtype=jnp.int32)
    # Rows ending at or before the item (B past the last): a compare of every pair, one fused
    # op. jnp.searchsorted's default is a loop, which on a GPU syncs with the host each turn
    # (measured on the H100: 189 us a call against 46 us, at 64 rows and 132 items).
    row = jnp.sum(ends[None, :] <= item[:, None], axis=1, dtype=jnp.int32)
    r = jnp.minimum(row, b - 1)
    j = item - (ends[r] - count[r])                                    # index within its row
    n = jnp.maximum(count[r], 1)
    lo = first_page[r] + j * blocks[r] // n * block_pages
    hi = jnp.minimum(first_page[r] + (j + 1) * blocks[r] // n * block_pages, end_page[r])
    empty = row >= b
    return jnp.stack([row, jnp.where(empty, 0, lo), jnp.where(empty, 0, hi)])


def merge(o, m, total, rows, num_rows: int, precision=lax.Precision.HIGHEST):
    """Partial results of the items -> [num_rows, R, H] float32. o [I,R,H] (unnormalised, or
    normalised with total = 1), m [I,R] running max in log2 units, total [I,R] softmax sums;
    rows [I] the items' rows, in order (num_rows: an empty item, dropped). Rows that no item
    saw are zero. precision: of the sum over a row's items (HIGH is exact enough for an output
    in bf16 or fp16).

    The row maxima are a scatter-max (order-free); the sums a one-hot matmul, not a
    scatter-add, so every run gives the same result (no atomics)."""
    peak = jax.ops.segment_max(m, rows, num_rows, indices_are_sorted=True)        # [B,R]
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    w = jnp.exp2(m - jnp.take(peak, rows, axis=0, mode="fill", fill_value=0.0))     # [I,R]
    w = jnp.where(jnp.isfinite(m), w, 0.0)
    both = jnp.concatenate([jnp.where(w[..., None] > 0, w[..., None] * o, 0.0),   # empty: 0
                            (w * total)[..., None]], axis=-1)                     # [I,R,H+1]
    onehot = (rows[None, :] == jnp.arange(num_rows, dtype=rows.dtype)[:, None]).astype(
        jnp.float32)                                                              # [B,I]
    sums = jnp.einsum("bi,irh->brh", onehot, both, precision=precision)
    denom = sums[..., -1:]
    return sums[..., :-1] / jnp.where(denom > 0, denom, 1.0)


def default_items(batch: int) -> int:
    """Items of a decode call: one wave over the GPU's SMs (one program an SM), at least one a
    row."""
    sms = getattr(jax.devices()[0], "core_count", None) or 132     # an H100 SXM's, off-GPU
    return max(batch, sms)
