"""The page-table and allocator updates that ride in a launch ahead of its model steps, in
arrays of fixed sizes (so they add no compiled shapes), carried out in this order:

1. shares: one more holder for each page id (the prefix cache adopting a finished prefill's
   pages); 0, the trash page, is no page;
2. drops: one holder fewer for each page id (the prefix cache evicting); 0 is no page;
3. releases: rows freed; each row's references to the pages in page-table columns
   [keep_from, keep_to) go to the prefix cache, the others are dropped; row -1 is no release;
4. admissions: `kvcache.admit_rows` (layout LAYOUT_NONE is no admission).

Shares come first, so that a row released in the same launch cannot free a page the cache is
about to hold, and admissions last, so that they may take the pages freed.

PageOpQueue keeps the operations decided between launches until the next launch takes them,
or runs them in calls of their own when none comes (idle, before a pool resize, host moves).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import kvcache
from engine import packing
from engine.plan import Plan
from engine.shapes import bucket
from kvcache.allocator import TRASH_PAGE


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["rows", "keep_from", "keep_to"], meta_fields=[])
@dataclasses.dataclass
class Releases:
    rows: jax.Array        # [R] int32, -1: none
    keep_from: jax.Array   # [R] int32
    keep_to: jax.Array     # [R] int32


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["rows", "layouts", "reserve", "prefix_len", "prefix"],
                   meta_fields=[])
@dataclasses.dataclass
class Admits:
    rows: jax.Array        # [A] int32
    layouts: jax.Array     # [A] int32 layout codes, LAYOUT_NONE: none
    reserve: jax.Array     # [A] int32 fresh pages to reserve
    prefix_len: jax.Array  # [A] int32 tokens the prefix pages hold
    prefix: jax.Array      # [A,M] int32 the prefix-cache hit's page ids, 0 past them


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["shares", "drops", "releases", "admits"], meta_fields=[])
@dataclasses.dataclass
class PageOpsArrays:
    shares: jax.Array      # [S] int32 page ids
    drops: jax.Array       # [D] int32 page ids
    releases: Releases
    admits: Admits


@dataclasses.dataclass(frozen=True)
class PageOps:
    """The sizes of a launch's page operations: at most `shares` shares, and so on."""
    shares: int
    drops: int
    releases: int
    admits: int
    width: int              # page-table columns

    def fits(self, shares: int, drops: int, releases: int, admits: int = 0) -> bool:
        return (shares <= self.shares and drops <= self.drops and releases <= self.releases
                and admits <= self.admits)

    def fill(self, shares=(), drops=(), releases=(), admits=()) -> PageOpsArrays:
        """The arrays, on the host, padded with no-ops. releases: (row, keep_from, keep_to);
        admits: (row, layout, pages to reserve, prefix length, prefix page ids)."""
        if not self.fits(len(shares), len(drops), len(releases), len(admits)):
            raise ValueError(f"{len(shares)} shares, {len(drops)} drops, {len(releases)} releases"
                             f" and {len(admits)} admissions do not fit in {self}")
        rel = np.zeros((3, self.releases), np.int32)
        rel[0] = -1
        rel[:, :len(releases)] = np.asarray(releases, np.int32).reshape(-1, 3).T
        adm = np.zeros((4, self.admits), np.int32)
        prefix = np.zeros((self.admits, self.width), np.int32)
        for i, (row, layout, reserve, prefix_len, pages) in enumerate(admits):
            adm[:, i] = row, layout, reserve, prefix_len
            prefix[i, :len(pages)] = pages
        return PageOpsArrays(shares=_padded(shares, self.shares), drops=_padded(drops, self.drops),
                             releases=Releases(*rel), admits=Admits(*adm, prefix))

    def apply(self, cache: kvcache.KVCache, ops: PageOpsArrays):
        """Carries out the operations (in a jitted call). Returns (cache', ok [A]: the admission
        got its reservation or was none, pages [A,M]: the admission rows' page-table rows)."""
        cache = kvcache.share_pages(cache, ops.shares, ops.shares != TRASH_PAGE)
        cache = kvcache.drop_pages(cache, ops.drops, ops.drops != TRASH_PAGE)
        rel = ops.releases
        col = jnp.arange(self.width)[None, :]
        keep = (col >= rel.keep_from[:, None]) & (col < rel.keep_to[:, None])
        cache = kvcache.release_rows(cache, jnp.maximum(rel.rows, 0), rel.rows >= 0, keep)
        adm = ops.admits
        cache, ok = kvcache.admit_rows(cache, adm.rows, adm.layouts, adm.reserve, self.width,
                                       adm.prefix, adm.prefix_len)
        return cache, ok, cache.page_table[adm.rows]


def _padded(ids, n: int) -> np.ndarray:
    out = np.zeros(n, np.int32)
    out[:len(ids)] = ids
    return out


def padded_ids(*ids) -> tuple[np.ndarray, ...]:
    """Equal-length id lists, each zero-padded to one bucket (calls compile once per bucket),
    then the mask of the real entries."""
    k = len(ids[0])
    n = bucket(k, 16, 1 << 30)
    out = np.zeros((len(ids), n), np.int32)
    out[:, :k] = ids
    return (*out, np.arange(n) < k)


def without_kv(cache: kvcache.KVCache) -> kvcache.KVCache:
    return dataclasses.replace(cache, k=(), v=(), ring_k=(), ring_v=())


def page_op(fn, **jit_kwargs):
    """jit(fn) for a page operation fn(cache, ...) -> cache' that reads and writes only the
    page tables and the allocator: the call gets the cache without its K/V arrays (two per
    layer, most of its leaves; a donated argument costs dispatch time per array), and they are
    put back into what it returns. The rest of the cache is donated."""
    jitted = jax.jit(fn, donate_argnums=0, **jit_kwargs)

    def call(cache: kvcache.KVCache, *args):
        return dataclasses.replace(jitted(without_kv(cache), *args), k=cache.k, v=cache.v,
                                   ring_k=cache.ring_k, ring_v=cache.ring_v)
    return call


class PageOpQueue:
    """Page operations waiting for the next launch. Methods that may run operations now take
    the cache and return it (the calls donate it). out_shardings: the cache's, without K/V, on
    a mesh (None: one device)."""

    def __init__(self, ops: PageOps, host: kvcache.HostStore, out_shardings=None):
        self.ops, self.host = ops, host
        self._shares: list[int] = []
        self._drops: list[int] = []
        self._releases: list[tuple[int, int, int]] = []
        self._apply = page_op(lambda cache, buf, layout: ops.apply(
            cache, packing.unpack(buf, layout))[0], out_shardings=out_shardings,
            static_argnums=2)
        self._drop = page_op(kvcache.drop_pages, out_shardings=out_shardings)

    def pending(self) -> bool:
        return bool(self._shares or self._drops or self._releases)

    def clear(self) -> None:
        self._shares, self._drops, self._releases = [], [], []

    def share(self, pages: list[int]) -> None:
        """One more holder (the prefix cache) for each page, in the next launch."""
        self._shares += pages

    def queue(self, cache: kvcache.KVCache, plan: Plan) -> kvcache.KVCache:
        """Queues plan's releases and evictions. Host moves (evicted leaves copied to the host
        tier, hits copied back) run now, after what was queued, and then their evictions: a
        copy reads its pages before anything reuses them."""
        self._releases += [(r.row, r.keep_from, r.keep_to) for r in plan.release]
        if not plan.host:
            self._drops += plan.evict
            return cache
        cache = self.host.apply(self.flush(cache), plan.host)
        return self._drop(cache, *padded_ids(plan.evict)) if plan.evict else cache

    def take(self, cache: kvcache.KVCache, admits=()) -> tuple[kvcache.KVCache, PageOpsArrays]:
        """(cache, the queued operations and admits as arrays for the next launch); queued ones
        that do not fit beside the admissions run first, in calls of their own."""
        if not self.ops.fits(len(self._shares), len(self._drops), len(self._releases),
                             len(admits)):
            cache = self.flush(cache)
        arrays = self.ops.fill(self._shares, self._drops, self._releases, admits)
        self.clear()
        return cache, arrays

    def flush(self, cache: kvcache.KVCache) -> kvcache.KVCache:
        """Runs the queued operations now, in calls of their own: every share before any drop
        (an eviction may drop the reference a share adds) and every drop before any release, as
        in one launch."""
        ops = self.ops
        while self.pending():
            shares, self._shares = self._shares[:ops.shares], self._shares[ops.shares:]
            drops = [] if self._shares else self._drops[:ops.drops]
            self._drops = self._drops[len(drops):]
            releases = [] if self._shares or self._drops else self._releases[:ops.releases]
            self._releases = self._releases[len(releases):]
            cache = self.run(cache, ops.fill(shares, drops, releases))
        return cache

    def run(self, cache: kvcache.KVCache, arrays: PageOpsArrays) -> kvcache.KVCache:
        return self._apply(cache, packing.pack(arrays), packing.layout_of(arrays))
