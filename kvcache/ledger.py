"""The host's mirror of the device's page refcounts: who holds each page (rows and the prefix
cache), so the scheduler knows how many pages are free without asking the device."""

import numpy as np

from kvcache.allocator import TRASH_PAGE


class Ledger:
    """Host mirror of the device refcounts: holders per page (rows and the prefix cache)."""

    def __init__(self, num_pages: int):
        self.refcount = np.zeros(num_pages, np.int32)
        self.refcount[TRASH_PAGE] = 1
        self.free = num_pages - 1

    # One call never names a page twice (a row holds a page once, the prefix cache once), so
    # fancy-index arithmetic counts right; np.add.at and np.unique cost ~10x more per call.
    @staticmethod
    def _distinct(pages) -> np.ndarray:
        if len(set(pages)) != len(pages):
            raise RuntimeError(f"a page is named twice in one ledger call: {sorted(pages)}")
        return np.asarray(pages, np.int64)

    # One gather and one scatter of the pages per call: these run on every admission, release,
    # finished prefill and eviction.
    def take(self, pages) -> None:
        """Fresh pages the device allocator handed out."""
        pages = self._distinct(pages)
        if self.refcount[pages].any():
            raise RuntimeError(f"the device handed out pages that are not free: {pages}")
        self.refcount[pages] = 1
        self.free -= len(pages)

    def share(self, pages) -> None:
        self.refcount[self._distinct(pages)] += 1

    def drop(self, pages) -> None:
        pages = self._distinct(pages)
        held = self.refcount[pages] - 1
        if len(held) and held.min() < 0:
            raise RuntimeError("a page was released more often than it was held")
        self.refcount[pages] = held
        self.free += len(held) - int(np.count_nonzero(held))

    def resize(self, num_pages: int, src=(), dst=()) -> None:
        """The pool's new size, held pages src[i] moved to dst[i] first (kvcache.elastic)."""
        src, dst = np.asarray(src, np.int64), np.asarray(dst, np.int64)
        self.refcount[dst] = self.refcount[src]
        self.refcount[src] = 0
        if np.any(self.refcount[num_pages:] != 0):
            raise RuntimeError("a shrink would cut off held pages")
        old = len(self.refcount)
        self.refcount = np.pad(self.refcount[:num_pages], (0, max(num_pages - old, 0)))
        self.free += num_pages - old
