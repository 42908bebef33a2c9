"""The scheduler's view of the KV pool, on the host: who holds each page (`Ledger`, the mirror
of the device's refcounts), the radix prefix cache with its host tier, and the pool's size
(`PoolSizes`: an elastic pool grows and shrinks). The device never has to be asked how many
pages are free.

While a launch is planned, `make_room` commits pages to it, evicting prefix-cache leaves or
growing the pool as needed; `begin(unread)` starts the next plan from the pages taken by
launches the host has not read yet.
"""

import numpy as np

from engine.plan import Plan
from kvcache.elastic import PoolSizes, compaction_moves, fragmentation
from kvcache.ledger import Ledger
from kvcache.radix import HostMove, RadixCache


class PoolView:
    def __init__(self, sizes: PoolSizes, page_size: int, radix_cache: bool, host_pages: int = 0):
        self.g, self.sizes = page_size, sizes
        self.ledger = Ledger(sizes.sizes[0])
        self.radix = RadixCache(page_size, host_pages) if radix_cache else None
        self.host_io = {"offload": 0, "load": 0}  # pages moved to and from the host tier
        self._committed = 0                       # pages promised to the launch being planned
        self.usable = lambda size: True           # sizes the pool may move to (the engine's
                                                  # programs for them are compiled)

    @property
    def num_pages(self) -> int:
        return len(self.ledger.refcount)

    @property
    def capacity(self) -> int:
        """Pages the pool holds now (the trash page excluded)."""
        return self.num_pages - 1

    @property
    def max_capacity(self) -> int:
        """Pages the pool may ever hold."""
        return self.sizes.largest - 1

    def evictable(self) -> int:
        return self.radix.evictable_pages() if self.radix else 0

    # -- planning a launch ----------------------------------------------------------------------
    def begin(self, unread: int) -> None:
        """A new plan starts with the pages launches not read yet will take committed."""
        self._committed = unread

    def make_room(self, pages: int, plan: Plan) -> bool:
        """Commits `pages` more of the pool to this launch, evicting prefix-cache leaves (into
        plan) or growing the pool as needed; False (and nothing committed) if the pool cannot
        cover them."""
        want = self._committed + pages
        short = want - self.ledger.free - self.evictable()
        if short > 0 and not self._grow(short, plan):
            return False
        if want > self.ledger.free:
            freed = self.radix.evict(want - self.ledger.free)
            self.ledger.drop(freed)
            plan.evict += freed
        self._committed = want
        return True

    def take_fresh(self, n: int) -> np.ndarray:
        """n free pages the host picks itself (for pages filled from the host tier), taken
        now and no longer counted as committed."""
        fresh = np.flatnonzero(self.ledger.refcount == 0)[:n]
        self.ledger.take(fresh)
        self._committed -= n
        return fresh

    def _grow(self, pages: int, plan: Plan) -> bool:
        """Grows the pool by at least `pages` pages, to the smallest size that does."""
        size = self.sizes.grow(self.num_pages, pages, self.usable)
        if size is None:
            return False
        self.ledger.resize(size)
        plan.grow_to = size
        return True

    def host_moves(self) -> list[HostMove]:
        """Copies between the pool and the host tier decided since the last call, oldest first
        (plans carry theirs). The device carries them out in this order, before the pages
        evicted with them are dropped or reused."""
        moves = self.radix.take_moves() if self.radix is not None else []
        for move in moves:
            if move.op in self.host_io:
                self.host_io[move.op] += len(move.slots)
        return moves

    # -- the pool's size ------------------------------------------------------------------------
    def shrink_due(self, now: float) -> tuple[int | None, float | None]:
        """(the size to shrink the pool to now, or None; seconds until a shrink may be due, or
        None while the pool is not oversized)."""
        pinned = self.capacity - self.ledger.free - self.evictable()
        return self.sizes.shrink_due(self.num_pages, pinned, now, self.usable)

    def shrink(self, num_pages: int, plan: Plan, running) -> tuple[np.ndarray, np.ndarray]:
        """Shrinks the pool to num_pages: evicts prefix-cache leaves (least recently used
        first) until the held pages fit, into plan (its evictions and host moves), then picks
        moves that compact the held pages below num_pages and rewrites every copy of a page id
        (the running requests', the prefix cache's). Returns (src, dst): the device moves pages
        after carrying out plan (leaves evicted to the host tier are read before anything
        moves)."""
        over = self.capacity - self.ledger.free - (num_pages - 1)
        evicted = self.radix.evict(over) if over > 0 and self.radix else []
        self.ledger.drop(evicted)
        plan.evict += evicted
        plan.host += self.host_moves()
        src, dst = compaction_moves(self.ledger.refcount, num_pages)
        remap = dict(zip(src.tolist(), dst.tolist()))
        for req in running:
            req.pages = [remap.get(p, p) for p in req.pages]
        if self.radix is not None:
            self.radix.remap(remap)
        self.ledger.resize(num_pages, src, dst)
        self.sizes.shrunk(len(src))
        return src, dst

    def reset(self) -> None:
        """Forgets every page (the device's pool was lost): a new ledger at the same size, an
        empty prefix cache."""
        self.ledger = Ledger(self.num_pages)
        if self.radix is not None:
            self.radix = RadixCache(self.g, self.radix.host_capacity)
        self._committed = 0
        self.sizes.reset_clock()

    def flush(self) -> Plan:
        """Drops every prefix-cache page. Only while nothing runs (the caller checks)."""
        plan = Plan()
        if self.radix is not None:
            plan.evict = self.radix.reset()
            self.ledger.drop(plan.evict)
            plan.host = self.host_moves()
        return plan

    def report(self) -> dict:
        """The pool's size and fragmentation: O(pages), for reports, not every step."""
        return {"pages": self.capacity, "max_pages": self.max_capacity,
                **fragmentation(self.ledger.refcount), **self.sizes.counts}

    def stats(self) -> dict:
        radix = self.radix
        return {
            "pages_total": self.capacity,
            "pages_max": self.max_capacity,
            "pages_free": self.ledger.free,
            "pool_grows": self.sizes.counts["grows"],
            "pool_shrinks": self.sizes.counts["shrinks"],
            "pages_moved": self.sizes.counts["pages_moved"],
            "pages_cached": radix.cached_pages() if radix else 0,
            "host_pages_total": radix.host_capacity if radix else 0,
            "host_pages_cached": radix.host_pages() if radix else 0,
            "host_pages_offloaded": self.host_io["offload"],
            "host_pages_loaded": self.host_io["load"],
        }
