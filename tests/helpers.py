"""Shared test helpers (tests/ is on sys.path through pyproject's pytest settings)."""

from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures" / "hf"


def assert_pool_clean(llm) -> None:
    """Every page is free again, no row is taken, and only the trash page is referenced."""
    cache = llm.cache
    pages = cache.k.shape[1]
    assert int(cache.alloc.top) == pages - 1
    refcount = np.asarray(cache.alloc.refcount)
    assert refcount[0] == 1 and not refcount[1:].any()
    assert sorted(np.asarray(cache.alloc.free_stack).tolist()) == list(range(pages))
    assert not np.asarray(cache.page_table).any()
    assert not np.asarray(cache.lengths).any()
    assert not np.asarray(cache.layout).any()
