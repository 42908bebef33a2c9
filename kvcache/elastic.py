"""Elastic pool: the page pool changes size between steps, among a fixed set of sizes.

JAX cannot map more memory into an existing array, so a pool of another size is a new array per
layer and a copy. Growth copies pages [0, P) into the larger pool; page ids do not change.
Shrinking first compacts: every held page at an id >= P' moves to a free id below P' (the
allocator hands out the lowest ids first, so the tail is mostly empty already), the page
tables, the refcounts and the host's copies of page ids are rewritten through the same map, and
the pool is cut to P'. Sizes come from `pool_sizes` (geometric), so every jitted step compiles
at most once per size (JAX's persistent compilation cache, JAX_COMPILATION_CACHE_DIR, keeps the
executables across restarts).

Layers are resized one jitted call at a time and the old layer is deleted right after its call
is queued, so the peak is the new pool plus one old layer, not old + new.
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from kvcache import allocator
from kvcache.page_table import KVCache


def use_returning_allocator() -> None:
    """Selects XLA's cuda_async allocator without preallocation, unless the environment already
    chose one. Call before JAX starts its backend: XLA's default allocator reserves most of the
    GPU and never gives memory back, while cuda_async returns freed memory at the next stream
    sync (DESIGN.md's allocator table). No effect off GPUs."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_ALLOCATOR", "cuda_async")


def pool_sizes(min_pages: int, max_pages: int, factor: int = 2) -> tuple[int, ...]:
    """Page counts (trash page included) the pool may take: min_pages * factor**i, then
    max_pages itself."""
    if not 2 <= min_pages <= max_pages:
        raise ValueError(f"need 2 <= min_pages <= max_pages, got {min_pages} and {max_pages}")
    sizes, p = [], min_pages
    while p < max_pages:
        sizes.append(p)
        p *= factor
    return (*sizes, max_pages)


class PoolSizes:
    """When an elastic pool changes size, among `sizes` (page counts, trash page included,
    ascending; one size is a static pool): it grows to the smallest size that covers a
    shortfall, and shrinks to the smallest size that holds twice its pinned pages (those no
    eviction can free) once some smaller size has done so for `shrink_after` seconds. Counts
    its growths, shrinks and the pages compaction moved."""

    def __init__(self, sizes: tuple[int, ...], shrink_after: float = 5.0):
        self.sizes, self.shrink_after = tuple(sizes), shrink_after
        self.counts = {"grows": 0, "shrinks": 0, "pages_moved": 0}
        self._oversized_since: float | None = None

    @property
    def largest(self) -> int:
        return self.sizes[-1]

    def grow(self, current: int, short: int, usable=lambda size: True) -> int | None:
        """The size to grow a pool of `current` pages to, for `short` more pages; None if no
        size that covers them is usable (the engine: its programs are compiled) or none
        does."""
        size = next((s for s in self.sizes if s - current >= short and usable(s)), None)
        if size is not None:
            self.counts["grows"] += 1
        return size

    def shrink_due(self, current: int, pinned: int, now: float,
                   usable=lambda size: True) -> tuple[int | None, float | None]:
        """(the usable size to shrink to now, or None; seconds until a shrink may be due, or
        None while the pool is not oversized)."""
        smaller = [s for s in self.sizes if s < current and s - 1 >= 2 * pinned and usable(s)]
        if not smaller:
            self._oversized_since = None
            return None, None
        if self._oversized_since is None:
            self._oversized_since = now
        wait = self._oversized_since + self.shrink_after - now
        return (smaller[0], None) if wait <= 0 else (None, wait)

    def shrunk(self, moved: int) -> None:
        self._oversized_since = None
        self.counts["shrinks"] += 1
        self.counts["pages_moved"] += moved

    def reset_clock(self) -> None:
        self._oversized_since = None


def compaction_moves(refcount: np.ndarray, num_pages: int) -> tuple[np.ndarray, np.ndarray]:
    """Moves (src, dst) that bring every held page (refcount > 0) below num_pages, each to the
    lowest free id there. ValueError if the held pages do not fit."""
    src = np.flatnonzero(refcount[num_pages:] > 0) + num_pages
    free = np.flatnonzero(refcount[1:num_pages] == 0) + 1
    if len(src) > len(free):
        raise ValueError(f"{len(src)} held pages past page {num_pages} but only {len(free)} free "
                         "pages below it")
    return src.astype(np.int32), free[:len(src)].astype(np.int32)


def fragmentation(refcount: np.ndarray) -> dict:
    """Free pages and the largest run of consecutive free ids (the trash page is held)."""
    free = np.concatenate([[False], refcount == 0, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(free))             # run starts, then ends, alternating
    runs = edges[1::2] - edges[::2]
    return {"free_pages": int(free.sum()), "largest_free_run": int(runs.max(initial=0))}


@functools.partial(jax.jit, static_argnames=("num_pages", "sharding"))
def _resize_layer(pages, src, dst, mask, *, num_pages: int, sharding=None):
    """pages [P,G,K,H] -> [num_pages,G,K,H]: pages[src[i]] copied to dst[i] where mask[i], then
    cut or zero-padded to num_pages, laid out as `sharding` (None: XLA's choice)."""
    p = pages.shape[0]
    moved = pages.at[jnp.where(mask, dst, p)].set(pages[src], mode="drop")
    if num_pages <= p:
        out = moved[:num_pages]
    else:
        out = jnp.pad(moved, ((0, num_pages - p),) + ((0, 0),) * (pages.ndim - 1))
    return out if sharding is None else jax.lax.with_sharding_constraint(out, sharding)


@functools.partial(jax.jit, static_argnames="num_pages")
def _resize_tables(cache: KVCache, src, dst, mask, *, num_pages: int) -> KVCache:
    """Page tables and allocator of a pool resized to num_pages with pages src -> dst moved."""
    p = cache.alloc.refcount.shape[0]
    remap = jnp.arange(p, dtype=jnp.int32).at[jnp.where(mask, src, p)].set(dst, mode="drop")
    refcount = cache.alloc.refcount
    moved = refcount[src]
    refcount = refcount.at[jnp.where(mask, src, p)].set(0, mode="drop")
    refcount = refcount.at[jnp.where(mask, dst, p)].set(moved, mode="drop")
    if num_pages <= p:
        refcount = refcount[:num_pages]
    else:
        refcount = jnp.pad(refcount, (0, num_pages - p))
    return dataclasses.replace(cache, page_table=remap[cache.page_table],
                               alloc=allocator.from_refcount(refcount))


def resize(cache: KVCache, num_pages: int, src, dst, mask) -> KVCache:
    """The cache with a pool of num_pages pages, held pages src[i] moved to dst[i] first (where
    mask[i]; src, dst, mask [E], padded). Every page held after the moves must lie below
    num_pages (see compaction_moves). Each layer keeps its sharding (a tensor-parallel pool
    stays split along its KV heads, each device resizing its own share). Consumes `cache`: its
    K/V arrays are deleted (ring pools, kvcache.page_table, are kept as they are)."""
    k, v = list(cache.k), list(cache.v)
    for layers in (k, v):
        for i, old in enumerate(layers):
            layers[i] = _resize_layer(old, src, dst, mask, num_pages=num_pages,
                                      sharding=old.sharding)
            old.delete()
    tables = _resize_tables(dataclasses.replace(cache, k=(), v=(), ring_k=(), ring_v=()), src,
                            dst, mask, num_pages=num_pages)
    return dataclasses.replace(tables, k=tuple(k), v=tuple(v), ring_k=cache.ring_k,
                               ring_v=cache.ring_v)
