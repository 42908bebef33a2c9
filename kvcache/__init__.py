"""KV cache: page pool description, functional allocator, page tables, layout policy, host tier."""

from kvcache import allocator, elastic
from kvcache.accounting import usage
from kvcache.elastic import pool_sizes
from kvcache.ledger import Ledger
from kvcache.offload import HostStore, host_memory_kind, host_tier_pages
from kvcache.page_table import (
    LAYOUT_CODES,
    LAYOUT_NONE,
    LAYOUT_PAGED,
    LAYOUT_STATIC,
    KVCache,
    admit_rows,
    drop_pages,
    ensure_slots,
    grow_rows,
    init_cache,
    release_rows,
    ring_group,
    ring_pages,
    share_pages,
    slot_addresses,
    write_kv,
)
from kvcache.policy import LAYOUTS, Admission, LayoutPolicy, max_pages
from kvcache.pool import PoolDoesNotFit, PoolSpec, device_memory_bytes, nbytes, size_pool

__all__ = [
    "allocator",
    "elastic",
    "pool_sizes",
    "usage",
    "HostStore",
    "host_memory_kind",
    "host_tier_pages",
    "LAYOUT_CODES",
    "LAYOUT_NONE",
    "LAYOUT_PAGED",
    "LAYOUT_STATIC",
    "KVCache",
    "admit_rows",
    "drop_pages",
    "ensure_slots",
    "grow_rows",
    "init_cache",
    "release_rows",
    "ring_group",
    "ring_pages",
    "share_pages",
    "slot_addresses",
    "write_kv",
    "LAYOUTS",
    "Admission",
    "LayoutPolicy",
    "Ledger",
    "max_pages",
    "PoolDoesNotFit",
    "PoolSpec",
    "device_memory_bytes",
    "nbytes",
    "size_pool",
]
