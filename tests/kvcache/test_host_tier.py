"""The prefix cache's host tier: kvcache.radix's tiering and the moves it logs, and
kvcache.offload's copies.

Examples pin the contract (eviction to the host, host LRU, match stopping at the host, load,
insert over host nodes, reset, remap). A hypothesis state machine drives random inserts,
matches with loads, locks, evictions and resets through a tree with a small host tier, and
carries the logged moves out on a model of page and slot contents (each holds the prefix it
stores): after every step every node's pages, on either tier, hold exactly its prefix, and the
counts and leaf sets equal brute-force recounts. The store round-trips K/V bit-exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_lru_current, nodes_below
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import kvcache
from kvcache.radix import HostMove, Node, RadixCache


def path_of(cache: RadixCache, node: Node) -> tuple[list[int], list[Node]]:
    """(tokens, nodes) from the root down to node."""
    tokens, nodes = [], []
    while node is not cache.root:
        tokens[:0], nodes[:0] = node.key, [node]
        node = node.parent
    return tokens, nodes


# -- examples (page_size 2) -----------------------------------------------------------------

def test_without_a_host_tier_eviction_drops_and_logs_nothing():
    cache = RadixCache(2)
    cache.insert([1, 2, 3, 4], [10, 11])
    assert cache.evict(2) == [10, 11]
    assert cache.take_moves() == [] and cache.host_pages() == 0 and cache.cached_pages() == 0


def test_evicted_leaves_move_to_the_host_and_come_back_on_a_match():
    cache = RadixCache(2, host_pages=4)
    cache.insert([1, 2, 3, 4, 5, 6], [10, 11, 12])
    cache.insert([1, 2, 7, 8], [20, 21])                  # splits: [1 2] -> [3 4 5 6], [7 8]
    cache.take_moves()
    assert cache.evict(1) == [11, 12]                     # the older leaf, whole
    assert cache.take_moves() == [HostMove("offload", [11, 12], [0, 1])]
    assert cache.cached_pages() == 2 and cache.host_pages() == 2
    assert cache.match([1, 2, 3, 4, 5, 6]) == ([10], cache.match([1, 2])[1])  # stops at the host
    pages, node, hosted = cache.match_host([1, 2, 3, 4, 9, 9])  # splits the host node
    assert pages == [10] and hosted == [node] and node.host and node.value == [0]
    cache.lock(node)
    assert cache.load(hosted, [30]) == [30]
    assert cache.take_moves() == [HostMove("load", [30], [0])]
    assert cache.match([1, 2, 3, 4, 5, 6])[0] == [10, 30]  # [5 6] is still on the host
    assert cache.evictable_pages() == 1                   # [7 8]: the path to node is locked
    cache.unlock(node)
    assert sorted(cache.pages()) == [10, 21, 30] and cache.host_slots() == [1]


def test_the_host_tier_drops_its_least_recently_used_leaves_for_room():
    cache = RadixCache(2, host_pages=3)
    for i, first in enumerate([1, 2, 3]):
        cache.insert([first, 0], [10 + i])
    cache.evict(3)                                        # all three to the host, oldest first
    assert cache.take_moves() == [HostMove("offload", [10], [0]), HostMove("offload", [11], [1]),
                                  HostMove("offload", [12], [2])]
    cache.match_host([1, 0])                              # [1 0] is now the most recent
    cache.insert([4, 0, 5, 0], [13, 14])
    assert cache.evict(2) == [13, 14]                     # needs two slots: drops [2 0], [3 0]
    drop2, drop3, offload = cache.take_moves()
    assert (drop2, drop3) == (HostMove("discard", [], [1]), HostMove("discard", [], [2]))
    assert offload.op == "offload" and offload.pages == [13, 14]
    assert sorted(offload.slots) == [1, 2]
    assert cache.match_host([1, 0])[2][0].value == [0]
    assert cache.match_host([2, 0]) == ([], cache.root, [])


def test_a_node_larger_than_the_host_tier_is_dropped_with_its_host_subtree():
    cache = RadixCache(2, host_pages=1)
    cache.insert([1, 2, 3, 4, 5, 6], [10, 11, 12])
    cache.insert([1, 2, 3, 4, 7, 8], [10, 11, 20])
    cache.evict(2)                                        # [5 6], then [7 8] in its place
    assert cache.take_moves() == [HostMove("offload", [12], [0]), HostMove("discard", [], [0]),
                                  HostMove("offload", [20], [0])]
    assert cache.evict(1) == [10, 11]                     # two pages never fit in one slot
    assert cache.take_moves() == [HostMove("discard", [], [0])]
    assert cache.root.children == {} and cache.host_pages() == 0


def test_insert_over_host_nodes_takes_the_callers_pages_and_drops_the_copies():
    cache = RadixCache(2, host_pages=4)
    cache.insert([1, 2, 3, 4, 5, 6], [10, 11, 12])
    cache.evict(3)
    cache.take_moves()
    assert cache.insert([1, 2, 3, 4, 9, 9], [20, 21, 22]) == [20, 21, 22]  # taken: a suffix
    assert cache.take_moves() == [HostMove("discard", [], [0, 1])]
    assert cache.match([1, 2, 3, 4, 5, 6])[0] == [20, 21]
    assert cache.match_host([1, 2, 3, 4, 5, 6])[2][0].value == [2]
    assert cache.remap({20: 5, 2: 99}) is None and cache.match([1, 2])[0] == [5]
    assert cache.host_slots() == [2]                      # host ids are not page ids: not remapped
    assert sorted(cache.reset()) == [5, 21, 22]
    assert cache.take_moves() == [HostMove("discard", [], [2])] and cache.host_pages() == 0


def test_load_refuses_what_match_host_did_not_return():
    cache = RadixCache(2, host_pages=4)
    cache.insert([1, 2], [10])
    _, node, _ = cache.match_host([1, 2])
    with pytest.raises(ValueError, match="host nodes of one match_host"):
        cache.load([node], [5])
    with pytest.raises(ValueError, match="host_pages"):
        RadixCache(2, host_pages=-1)


# -- state machine ----------------------------------------------------------------------------

MAX_TOKENS = 12


class TierMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.cache: RadixCache | None = None
        self.device: dict[int, tuple[int, ...]] = {}  # device page -> the prefix it stores
        self.host: dict[int, tuple[int, ...]] = {}    # host slot -> the prefix it stores
        self.locks: list[tuple[Node, list[int]]] = []
        self.seen: list[list[int]] = [[]]
        self.next_page = 1

    @initialize(page_size=st.sampled_from([1, 2]), host_pages=st.integers(1, 6))
    def start(self, page_size, host_pages):
        self.g = page_size
        self.cache = RadixCache(page_size, host_pages)

    def _tokens(self, data) -> list[int]:
        base = data.draw(st.sampled_from(self.seen), label="base")
        cut = data.draw(st.one_of(st.just(len(base)), st.integers(0, len(base))), label="cut")
        tail = data.draw(st.lists(st.integers(0, 1), max_size=MAX_TOKENS), label="tail")
        tokens = (base[:cut] + tail)[:MAX_TOKENS]
        self.seen.append(tokens)
        return tokens

    def _fresh(self, tokens, start: int, k: int) -> list[int]:
        """k new device pages storing tokens' pages start .. start + k - 1."""
        pages = list(range(self.next_page, self.next_page + k))
        self.next_page += k
        for i, p in enumerate(pages):
            self.device[p] = tuple(tokens[:(start + i + 1) * self.g])
        return pages

    def _apply(self) -> None:
        """Carries the logged moves out on the content model, as kvcache.offload does."""
        for move in self.cache.take_moves():
            if move.op == "offload":
                assert len(move.pages) == len(move.slots)
                for p, s in zip(move.pages, move.slots):
                    assert s not in self.host, f"slot {s} offloaded into while held"
                    self.host[s] = self.device[p]
            elif move.op == "load":
                for s, p in zip(move.slots, move.pages, strict=True):
                    self.device[p] = self.host.pop(s)
            else:
                assert move.op == "discard" and not move.pages
                for s in move.slots:
                    del self.host[s]

    def _drop_untracked(self) -> None:
        held = set(self.cache.pages())
        self.device = {p: c for p, c in self.device.items() if p in held}

    @rule(data=st.data(), lock=st.booleans())
    def insert(self, data, lock):
        tokens = self._tokens(data)
        full = len(tokens) // self.g
        k = data.draw(st.one_of(st.just(full), st.integers(0, full)), label="pages")
        pages = self._fresh(tokens, 0, k)
        if lock:        # insert_locked: the whole inserted prefix is on the device, locked
            taken, node = self.cache.insert_locked(tokens, pages)
            nodes = path_of(self.cache, node)[1]
            assert path_of(self.cache, node)[0] == tokens[:k * self.g]
            assert not any(n.host for n in nodes)
            self.locks.append((node, [p for n in nodes for p in n.value]))
        else:
            taken = self.cache.insert(tokens, pages)
        assert taken == pages[k - len(taken):], "the taken pages are not a suffix"
        self._apply()
        self._drop_untracked()                    # the caller frees what the tree did not take

    @rule(data=st.data(), keep_lock=st.booleans())
    def match_and_load(self, data, keep_lock):
        tokens = self._tokens(data)
        pages, node, hosted = self.cache.match_host(tokens)
        assert all(not n.host for n in path_of(self.cache, node)[1][:-len(hosted) or None])
        assert [n for n in path_of(self.cache, node)[1] if n.host] == hosted
        if node is self.cache.root:
            return
        self.cache.lock(node)
        before = self.cache.take_moves()          # a match splits, never moves data
        assert before == []
        loads = sum(len(n.value) for n in hosted)
        fresh = list(range(self.next_page, self.next_page + loads))
        self.next_page += loads
        assert self.cache.load(hosted, fresh) == fresh
        self._apply()
        assert self.cache.match(tokens)[0] == pages + fresh
        if keep_lock:
            self.locks.append((node, pages + fresh))
        else:
            self.cache.unlock(node)

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data):
        node, _ = self.locks.pop(data.draw(st.integers(0, len(self.locks) - 1), label="lock"))
        self.cache.unlock(node)

    @rule(want=st.integers(0, 6))
    def evict(self, want):
        locked = {p for _, pages in self.locks for p in pages}
        evictable = self.cache.evictable_pages()
        freed = self.cache.evict(want)
        assert len(freed) >= min(want, evictable) and not set(freed) & locked
        self._apply()                             # offloads read the pages before they go
        assert not set(freed) & set(self.cache.pages())
        self._drop_untracked()

    @precondition(lambda self: self.cache is not None and not self.locks)
    @rule()
    def reset(self):
        assert sorted(self.cache.reset()) == sorted(self.device)
        self._apply()
        self.device.clear()
        assert self.host == {}

    @invariant()
    def every_page_holds_its_prefix(self):
        if self.cache is None:
            return
        nodes = nodes_below(self.cache.root)
        for node in nodes:
            tokens, path = path_of(self.cache, node)
            store = self.host if node.host else self.device
            first = len(tokens) // self.g - len(node.value)
            for i, ident in enumerate(node.value):
                assert store[ident] == tuple(tokens[:(first + i + 1) * self.g])
            if node.host:
                assert all(c.host for c in node.children.values()), "a device node below a host one"
        for node, pages in self.locks:
            assert [p for n in path_of(self.cache, node)[1] for p in n.value] == pages
        assert sorted(self.cache.pages()) == sorted(self.device)
        assert sorted(self.cache.host_slots()) == sorted(self.host)
        assert self.cache.host_pages() == len(self.host) <= self.cache.host_capacity
        dev = [n for n in nodes if not n.host]
        host = [n for n in nodes if n.host]
        assert self.cache.cached_pages() == sum(len(n.value) for n in dev)
        assert self.cache.evictable_pages() == sum(len(n.value) for n in dev if not n.lock_count)
        assert self.cache._host_evictable == sum(len(n.value) for n in host if not n.lock_count)
        assert self.cache._leaves == {n for n in dev if all(c.host for c in n.children.values())}
        assert self.cache._host_leaves == {n for n in host if not n.children}
        assert_lru_current(self.cache._lru)
        assert_lru_current(self.cache._host_lru)


TierMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None, database=None,
    phases=[p for p in Phase if p is not Phase.explain], suppress_health_check=[HealthCheck.too_slow])
TestTierMachine = TierMachine.TestCase


# -- the store ------------------------------------------------------------------------------

SPEC = kvcache.PoolSpec(num_layers=3, num_pages=16, page_size=2, num_kv_heads=2, head_dim=4,
                        dtype="bfloat16")


@pytest.mark.parametrize("memory_kind", ["pinned_host", None])
def test_store_round_trip_is_bit_exact(memory_kind):
    """13 pages to the host (blocks of 8, 4 and 1), back in two loads into other pages, some
    reading part of a block: the K/V of every layer come back bit for bit, each loaded page
    gets one holder, and the cache stays uncommitted."""
    device = jax.devices()[0]
    if memory_kind is not None:
        assert kvcache.host_memory_kind(device) == memory_kind   # the CPU backend offers it
    cache = kvcache.init_cache(SPEC, 2, 4)
    keys = jax.random.split(jax.random.key(0), 2 * SPEC.num_layers)
    rand = [jax.random.normal(k, SPEC.layer_struct.shape, jnp.bfloat16) for k in keys]
    cache.k, cache.v = tuple(rand[:SPEC.num_layers]), tuple(rand[SPEC.num_layers:])
    want_k = [np.asarray(x) for x in cache.k]
    want_v = [np.asarray(x) for x in cache.v]
    store = kvcache.HostStore(device, memory_kind)
    src = list(range(1, 14))
    slots = [20 + i for i in range(13)]
    store.apply(cache, [HostMove("offload", src, slots)])
    assert sorted(store.slots()) == slots
    assert store.nbytes() == 13 * SPEC.bytes_per_page
    cache.k = tuple(jnp.zeros_like(x) for x in cache.k)
    cache.v = tuple(jnp.zeros_like(x) for x in cache.v)
    first, second = [1, 9, 12, 13], [2, 3, 4, 5, 6, 7, 8, 10, 11]   # page ids in src order
    dst = {p: 15 - i for i, p in enumerate(src)}                     # each to another page
    for part in (first, second):
        cache = store.apply(cache, [HostMove("load", [dst[p] for p in part],
                                             [slots[p - 1] for p in part])])
    assert store.slots() == [] and store.nbytes() == 0                 # every block freed
    assert not cache.k[0].committed      # as it came: step shapes compile once, not per commitment
    for layer in range(SPEC.num_layers):
        k, v = np.asarray(cache.k[layer]), np.asarray(cache.v[layer])
        for p in src:
            np.testing.assert_array_equal(k[dst[p]], want_k[layer][p])
            np.testing.assert_array_equal(v[dst[p]], want_v[layer][p])
    refcount = np.asarray(cache.alloc.refcount)
    assert refcount[[dst[p] for p in src]].tolist() == [1] * 13
    assert int(cache.alloc.top) == SPEC.num_pages - 1 - 13


def test_store_frees_a_block_with_its_last_slot():
    cache = kvcache.init_cache(SPEC, 2, 4)
    store = kvcache.HostStore(jax.devices()[0], None)
    store.apply(cache, [HostMove("offload", [1, 2], [0, 1]), HostMove("offload", [3], [2])])
    store.apply(cache, [HostMove("discard", [], [0, 2])])
    assert store.slots() == [1] and store.nbytes() == 2 * SPEC.bytes_per_page
    with pytest.raises(RuntimeError, match="already held"):
        store.apply(cache, [HostMove("offload", [4], [1])])
    store.apply(cache, [HostMove("discard", [], [1])])
    assert store.nbytes() == 0


def test_host_tier_size_is_checked():
    assert kvcache.host_tier_pages(0, SPEC) == 0 and kvcache.host_tier_pages(9, SPEC) == 4
    with pytest.raises(ValueError, match="at least one page"):
        kvcache.host_tier_pages(1, SPEC)
    with pytest.raises(ValueError, match="bytes of host memory"):
        kvcache.host_tier_pages(1 << 50, SPEC)
