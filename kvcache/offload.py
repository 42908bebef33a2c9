"""Host tier data: copies of KV pages in host memory, moved as kvcache.radix logs them.

The radix tree decides which pages go to which host slots (`HostMove`); `HostStore.apply`
carries the moves out on a cache. An offload gathers the pages of every layer on the device
into one block [n,L,2,G,K,H] (n pages, K and V of every layer) and copies it to host memory: a
`pinned_host` array where the device offers that memory kind (jax.device_put, which returns
before the copy ends), a numpy array otherwise (np.asarray, which waits for it). Blocks are
whole pages of a power-of-two count: an offload of 13 pages makes blocks of 8, 4 and 1, so the
gather compiles once per power of two and no block holds padding. A slot names (block, index);
a block is freed with its last slot, so host memory may exceed the slots held by the dead
slots of live blocks (`nbytes` reports the memory).

A load hands each block it reads from to one jitted call (the cache donated) that scatters the
slots asked for into their pages and gives every page its one holder, the prefix cache
(refcount + 1, free stack rebuilt). The block goes in as numpy (a pinned one is read out
first), and the call copies it to the device: a block placed there explicitly would be
committed to the device, and jit keys compiled calls on commitment, so every step shape would
compile again on the (uncommitted) cache a load returned.

What overlaps: an offload's gather and its copy into pinned memory are dispatched
asynchronously, so the host goes on planning and the copy can run while the next launch
computes (the launch does not read the block); a numpy offload waits for its copy. A load
reads its blocks on the host thread, and the launch that reads the loaded pages depends on
their scatter, so a load overlaps neither. None of this has been measured on a GPU yet; on a
CPU host and device memory are the same.

Not for a tensor-parallel mesh: its pages are sharded over devices (the engine refuses).
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from kvcache import allocator
from kvcache.page_table import KVCache
from kvcache.pool import PoolSpec
from kvcache.radix import HostMove


def host_tier_pages(tokens: int, spec: PoolSpec) -> int:
    """Pages a host tier of `tokens` tokens holds; ValueError if that is not a whole page or
    more than the host's memory."""
    if tokens < 0 or 0 < tokens < spec.page_size:
        raise ValueError(f"host_kv_size (--host-kv-size) must be 0 (off) or at least one page "
                         f"({spec.page_size} tokens), got {tokens}")
    pages = tokens // spec.page_size
    need = pages * spec.bytes_per_page
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > ram:
        raise ValueError(f"a host tier of {tokens} tokens needs {need:,} bytes of host memory "
                         f"({spec.bytes_per_page:,} per page of {spec.page_size}) but the host "
                         f"has {ram:,}; lower --host-kv-size")
    return pages


def host_memory_kind(device: jax.Device) -> str | None:
    """'pinned_host' where the device offers it, else None (host numpy arrays)."""
    kinds = {m.kind for m in device.addressable_memories()}
    return "pinned_host" if "pinned_host" in kinds else None


@jax.jit
def _gather(k, v, pages):
    """k, v: L x [P,G,K,H]; pages [n] -> [n,L,2,G,K,H]."""
    return jnp.stack([jnp.stack([kl[pages], vl[pages]], 1) for kl, vl in zip(k, v)], 1)


@functools.partial(jax.jit, donate_argnums=0)
def _scatter(cache: KVCache, block, src, dst, mask) -> KVCache:
    """block [n,L,2,G,K,H]; src, dst, mask [n]: block[src[i]] -> page dst[i] where mask[i], and
    one more holder for each such page."""
    at = jnp.where(mask, dst, cache.num_pages)
    k = tuple(kl.at[at].set(block[src, i, 0], mode="drop") for i, kl in enumerate(cache.k))
    v = tuple(vl.at[at].set(block[src, i, 1], mode="drop") for i, vl in enumerate(cache.v))
    refcount = cache.alloc.refcount.at[at].add(1, mode="drop")
    return dataclasses.replace(cache, k=k, v=v, alloc=allocator.from_refcount(refcount))


class HostStore:
    """Host slots' K/V, kept in blocks. memory_kind: 'pinned_host' (jax arrays in that memory
    of `device`) or None (numpy)."""

    def __init__(self, device: jax.Device, memory_kind: str | None):
        self._host = None
        if memory_kind is not None:
            self._host = jax.sharding.SingleDeviceSharding(device, memory_kind=memory_kind)
        self._blocks: dict[int, list] = {}            # id -> [block [n,L,2,G,K,H], live slots]
        self._where: dict[int, tuple[int, int]] = {}  # slot -> (block id, index in the block)
        self._next = 0

    def apply(self, cache: KVCache, moves: list[HostMove]) -> KVCache:
        """Carries out the moves in order; returns the cache (donated if a load ran)."""
        for move in moves:
            if move.op == "offload":
                self._offload(cache, move.pages, move.slots)
            elif move.op == "load":
                cache = self._load(cache, move.slots, move.pages)
            elif move.op == "discard":
                self._discard(move.slots)
            else:
                raise ValueError(f"unknown host move {move.op!r}")
        return cache

    def clear(self) -> None:
        """Drops every slot (the prefix cache that named them was reset)."""
        self._blocks.clear()
        self._where.clear()

    def slots(self) -> list[int]:
        return list(self._where)

    def nbytes(self) -> int:
        """Host memory the blocks hold."""
        return sum(block.nbytes for block, _ in self._blocks.values())

    def _offload(self, cache: KVCache, pages: list[int], slots: list[int]) -> None:
        held = [s for s in slots if s in self._where]
        if held or len(pages) != len(slots):
            raise RuntimeError(f"offload of {len(pages)} pages into {len(slots)} host slots, "
                               f"of which {held} are already held")
        start = 0
        for bit in reversed(range(len(pages).bit_length())):
            n = 1 << bit
            if not len(pages) & n:
                continue
            block = _gather(cache.k, cache.v, np.asarray(pages[start:start + n], np.int32))
            if self._host is not None:
                block = jax.device_put(block, self._host)
            else:
                block = np.asarray(block)
            self._blocks[self._next] = [block, n]
            for i, slot in enumerate(slots[start:start + n]):
                self._where[slot] = (self._next, i)
            self._next += 1
            start += n

    def _load(self, cache: KVCache, slots: list[int], pages: list[int]) -> KVCache:
        by_block: dict[int, list[tuple[int, int]]] = {}
        for slot, page in zip(slots, pages, strict=True):
            block_id, i = self._where[slot]
            by_block.setdefault(block_id, []).append((i, page))
        for block_id, items in by_block.items():
            block = self._blocks[block_id][0]
            src, dst, mask = (np.zeros(block.shape[0], t) for t in (np.int32, np.int32, bool))
            src[:len(items)], dst[:len(items)] = zip(*items)
            mask[:len(items)] = True
            cache = _scatter(cache, np.asarray(block), src, dst, mask)
        self._discard(slots)
        return cache

    def _discard(self, slots: list[int]) -> None:
        for slot in slots:
            block_id, _ = self._where.pop(slot)
            entry = self._blocks[block_id]
            entry[1] -= 1
            if entry[1] == 0:
                del self._blocks[block_id]
