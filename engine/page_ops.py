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
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import kvcache
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
