"""The KV cache as one pytree: K/V pages of every layer, the page table and the allocator.

Rows are sequence slots. A row's pages fill its page-table columns from 0 up, with no gaps;
column c holds positions [c*G, (c+1)*G). Entries past the row's last page are the trash page 0.
Every function here is pure and jit-able; masked-out rows write nowhere (scatters drop them).

Sliding-window layers can keep window-sized KV instead (EngineConfig.local_kv "window"): each
of them stores its pages in a ring pool of its own, `ring` pages a row, where position s of row
r lives in ring page 1 + r * ring + (s // G) % ring. A row's ring is its own from the start (no
allocator, nothing to free) and holds its last (ring - 1) * G + 1 positions or more: the window
behind its next query when ring >= ceil((W - 1) / G) + 1 for a window W (ring_pages). A decode
token goes straight into the ring. A prompt chunk of several tokens would overwrite keys its
own first queries still need, so it goes to scratch pages after the rings (`scratch` pages for
all the chunks of a step), its first page copied in from the ring first, and the chunk's last
pages go back into the ring after attention (ring_group; the model does the copies, layer by
layer). The page table, the allocator and every page operation (prefix cache, host tier,
elastic pool) see the other layers only.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kvcache import allocator
from kvcache.pool import PoolSpec

LAYOUT_NONE, LAYOUT_STATIC, LAYOUT_PAGED = 0, 1, 2
LAYOUT_CODES = {"static": LAYOUT_STATIC, "paged": LAYOUT_PAGED}


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["k", "v", "page_table", "lengths", "next_token", "layout", "alloc",
                                "counts", "ring_k", "ring_v"],
                   meta_fields=["ring", "scratch"])
@dataclasses.dataclass
class KVCache:
    k: tuple[jax.Array, ...]   # L x [P,G,K,H]
    v: tuple[jax.Array, ...]   # L x [P,G,K,H]
    page_table: jax.Array  # [R,M] int32, 0 (trash) past a row's last page
    lengths: jax.Array     # [R] int32, tokens stored per row
    next_token: jax.Array  # [R] int32, the row's last sample: what its next decode step feeds
    layout: jax.Array      # [R] int32, LAYOUT_NONE for a free row
    alloc: allocator.AllocState
    # [R,V] int32 per row, what the sampler's penalties read: each token id's count among the
    # row's generated tokens, with a flag bit on its prompt's ids (engine.sampling.PROMPT_SEEN;
    # V = 0: no penalties).
    counts: jax.Array
    # The sliding-window layers' ring pools, one [1 + R * ring + scratch, G, K, H] array each
    # (page 0 the trash page, then every row's ring, then the scratch pages of a step's prompt
    # chunks), when they keep window-sized KV; () when every layer is in k / v.
    ring_k: tuple[jax.Array, ...] = ()
    ring_v: tuple[jax.Array, ...] = ()
    ring: int = 0       # static: ring pages a row (0: no ring pools)
    scratch: int = 0    # static: scratch pages of a step's chunks (0: chunks write the ring)

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1]

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]


def init_cache(spec: PoolSpec, max_rows: int, max_pages_per_row: int, vocab: int = 0,
               ring_layers: int = 0, ring: int = 0, scratch: int = 0) -> KVCache:
    """An empty cache: spec's pool for its layers, and ring_layers ring pools of `ring` pages
    a row and `scratch` pages for a step's prompt chunks (see the module)."""
    kv = spec.layer_struct
    ring_shape = (1 + max_rows * ring + scratch, *kv.shape[1:])
    return KVCache(
        k=tuple(jnp.zeros(kv.shape, kv.dtype) for _ in range(spec.num_layers)),
        v=tuple(jnp.zeros(kv.shape, kv.dtype) for _ in range(spec.num_layers)),
        page_table=jnp.zeros((max_rows, max_pages_per_row), jnp.int32),
        lengths=jnp.zeros(max_rows, jnp.int32),
        next_token=jnp.zeros(max_rows, jnp.int32),
        layout=jnp.zeros(max_rows, jnp.int32),
        alloc=allocator.init(spec.num_pages),
        counts=jnp.zeros((max_rows, vocab), jnp.int32),
        ring_k=tuple(jnp.zeros(ring_shape, kv.dtype) for _ in range(ring_layers)),
        ring_v=tuple(jnp.zeros(ring_shape, kv.dtype) for _ in range(ring_layers)),
        ring=ring if ring_layers else 0,
        scratch=scratch if ring_layers else 0,
    )


def ring_pages(window: int, page_size: int, max_pages_per_row: int) -> int:
    """Pages a row's ring needs for a window of W keys: the W - 1 positions before a query
    span at most ceil((W - 1) / G) + 1 pages, the query's own among them; no more than a row
    can ever hold."""
    return min(-(-(window - 1) // page_size) + 1, max_pages_per_row)


def ring_group(cache: KVCache, rows, start, num, tokens: int,
               scratch_from: int = 0) -> tuple[dict, int]:
    """(The ring fields of a models.Group of rows feeding num[b] tokens from position start[b]
    (tokens: the feed's static width): `ring_table` [B,M], the pages holding each page-table
    column; for a chunk of several tokens (with scratch pages), also `ring_fill` (src, dst
    [B]): each row's ring page holding the chunk's first column, copied to its first scratch
    page before the chunk is written, and `ring_back` (src, dst [B,Y]): the chunk's last
    columns, copied from scratch into the ring after attention (an index past the pool where
    there is nothing to copy); the scratch pages taken so far). Each row takes
    ceil(tokens / G) + 1 scratch pages, from page scratch_from of the scratch on (other groups
    of the same step took those before)."""
    num_rows, width = cache.page_table.shape
    g, ring = cache.page_size, cache.ring
    col = jnp.arange(width)[None, :]
    home = (1 + rows[:, None] * ring + col % ring).astype(jnp.int32)               # [B,M]
    if tokens == 1 or not cache.scratch:
        return {"ring_table": home}, scratch_from
    b, x = rows.shape[0], -(-tokens // g) + 1
    size = cache.ring_k[0].shape[0]
    if scratch_from + b * x > cache.scratch:
        raise ValueError(f"prompt chunks of this step need {scratch_from + b * x} scratch "
                         f"pages; the ring pools have {cache.scratch}")
    base = (1 + num_rows * ring + scratch_from + jnp.arange(b) * x).astype(jnp.int32)
    first = start // g                                                             # [B]
    table = jnp.where(col < first[:, None], home,
                      base[:, None] + jnp.clip(col - first[:, None], 0, x - 1))
    fill = (jnp.take_along_axis(home, jnp.minimum(first, width - 1)[:, None], axis=1)[:, 0],
            base)
    last = -(-(start + num) // g)                            # past the chunk's last column
    back_col = jnp.maximum(first, last - ring)[:, None] + jnp.arange(min(x, ring))[None, :]
    valid = (back_col < last[:, None]) & (num[:, None] > 0)
    back = (jnp.where(valid, base[:, None] + back_col - first[:, None], size),
            jnp.where(valid, 1 + rows[:, None] * ring + back_col % ring, size))
    return {"ring_table": table, "ring_fill": fill, "ring_back": back}, scratch_from + b * x


def grow_rows(cache: KVCache, rows, need, max_need: int):
    """Appends need[b] fresh pages to row rows[b] (need [B] int32 <= max_need, static).

    Returns (cache', ok [B]); a row that could not be served (pool empty, see allocator.alloc,
    or its page-table row full) got no page.
    """
    num_rows, width = cache.page_table.shape
    held = jnp.sum(cache.page_table[rows] != allocator.TRASH_PAGE, axis=1)   # [B]
    fits = held + need <= width
    alloc, pages, ok = allocator.alloc(cache.alloc, jnp.where(fits, need, 0), max_need)
    ok &= fits
    j = jnp.arange(max_need)[None, :]                                          # [1,max_need]
    valid = (j < need[:, None]) & ok[:, None]                                  # [B,max_need]
    row_idx = jnp.where(valid, rows[:, None], num_rows)
    page_table = cache.page_table.at[row_idx, held[:, None] + j].set(pages, mode="drop")
    return dataclasses.replace(cache, page_table=page_table, alloc=alloc), ok


def admit_rows(cache: KVCache, rows, layout, reserve, max_need: int, prefix=None,
               prefix_len=None):
    """Marks rows as taken with their layout codes, gives them their cached prefix and reserves
    their first pages after it.

    rows, layout, reserve [B]; layout LAYOUT_NONE marks a padding entry that changes nothing.
    prefix [B,M] (optional): page ids of the row's cached prefix from column 0, the trash page
    past it; each gets one more holder. prefix_len [B]: tokens those pages hold (the row's
    length). Returns (cache', ok [B]); a row refused its reservation gets no prefix either.
    """
    live = layout != LAYOUT_NONE
    num_rows = cache.layout.shape[0]
    if prefix is None:
        prefix = jnp.zeros((rows.shape[0], cache.page_table.shape[1]), jnp.int32)
        prefix_len = jnp.zeros(rows.shape[0], jnp.int32)
    # Reserve as if the prefix were in place: the row's page count decides what fits.
    held = jnp.sum(prefix != allocator.TRASH_PAGE, axis=1)                     # [B]
    fits = held + reserve <= cache.page_table.shape[1]
    alloc, pages, ok = allocator.alloc(cache.alloc, jnp.where(live & fits, reserve, 0), max_need)
    ok &= fits | ~live
    take = live & ok
    alloc = allocator.incref(alloc, prefix.ravel(),
                             jnp.broadcast_to(take[:, None], prefix.shape).ravel())
    j = jnp.arange(max_need)[None, :]                                          # [1,max_need]
    valid = (j < reserve[:, None]) & take[:, None]
    idx = jnp.where(take, rows, num_rows)
    page_table = cache.page_table.at[idx].set(prefix, mode="drop")
    page_table = page_table.at[jnp.where(valid, rows[:, None], num_rows),
                               held[:, None] + j].set(pages, mode="drop")
    return dataclasses.replace(
        cache,
        page_table=page_table,
        alloc=alloc,
        layout=cache.layout.at[idx].set(layout, mode="drop"),
        lengths=cache.lengths.at[idx].set(prefix_len, mode="drop"),
    ), ok


def ensure_slots(cache: KVCache, rows, num, max_need: int):
    """Gives every row the pages that positions [length, length + num[b]) still lack: the paged
    layout's allocation, inside the step (num [B] int32, 0 for rows that do not move; max_need
    static >= any row's need). A row whose positions would pass its page-table width is refused.
    Returns (cache', ok [B])."""
    g = cache.page_size
    width = cache.page_table.shape[1]
    end = cache.lengths[rows] + num                                            # [B]
    held = jnp.sum(cache.page_table[rows] != allocator.TRASH_PAGE, axis=1)     # [B]
    need = jnp.where(num > 0, jnp.maximum(-(-end // g) - held, 0), 0)
    full = end > width * g
    cache, ok = grow_rows(cache, rows, jnp.where(full, 0, need), max_need)
    return cache, ok & ~((num > 0) & full)


def release_rows(cache: KVCache, rows, mask, keep=None) -> KVCache:
    """Drops one reference to every page of rows[b] with mask[b] and frees those rows (each row
    at most once per call). keep [B,M] bool (optional) marks page-table entries whose reference
    is handed to another holder (the prefix cache) instead of dropped."""
    pages = cache.page_table[rows]                                             # [B,M]
    drop = jnp.broadcast_to(mask[:, None], pages.shape)
    if keep is not None:
        drop = drop & ~keep
    alloc = allocator.decref(cache.alloc, pages.ravel(), drop.ravel())
    idx = jnp.where(mask, rows, cache.layout.shape[0])
    return dataclasses.replace(
        cache,
        alloc=alloc,
        page_table=cache.page_table.at[idx].set(allocator.TRASH_PAGE, mode="drop"),
        lengths=cache.lengths.at[idx].set(0, mode="drop"),
        layout=cache.layout.at[idx].set(LAYOUT_NONE, mode="drop"),
    )


def share_pages(cache: KVCache, pages, mask) -> KVCache:
    """One more holder for pages[i] with mask[i] (pages [E]): the prefix cache adopting."""
    return dataclasses.replace(cache, alloc=allocator.incref(cache.alloc, pages, mask))


def drop_pages(cache: KVCache, pages, mask) -> KVCache:
    """One holder fewer for pages[i] with mask[i] (pages [E]): the prefix cache evicting."""
    return dataclasses.replace(cache, alloc=allocator.decref(cache.alloc, pages, mask))


def slot_addresses(row_pages, positions, page_size: int):
    """row_pages [B,M], positions [B,T] (-1 = padding) -> (page [B,T], slot [B,T]).
    Padding goes to the trash page."""
    col = jnp.clip(positions // page_size, 0, row_pages.shape[1] - 1)
    page = jnp.where(positions >= 0, jnp.take_along_axis(row_pages, col, axis=1),
                     allocator.TRASH_PAGE)
    return page, jnp.maximum(positions, 0) % page_size


def write_kv(pages, page, slot, new):
    """pages [P,G,K,H] (one layer); page, slot [...]; new [...,K,H] -> pages with new stored.
    Into fp8 pages values are rounded as they are (scale 1.0), clipped to the type's range
    first (e4m3 has no infinity: an out-of-range value would become NaN)."""
    if jnp.dtype(pages.dtype).itemsize == 1:
        big = float(jnp.finfo(pages.dtype).max)
        new = jnp.clip(new, -big, big)
    return pages.at[page, slot].set(new.astype(pages.dtype))
