"""kvcache.radix against examples and against a model of which page holds which prefix.

The examples pin the contract at small sizes: whole-page matching, ownership on insert, splits,
locks, LRU order, reset. A hypothesis state machine then drives random inserts (token sequences
grown from earlier ones, so prefixes are shared and diverge mid-page), matches, locks, unlocks,
evictions and resets; after every step the tree is walked and checked against the model (a dict
from each cached page-aligned prefix to its page id, and the step that last used it) and against
brute-force recounts of pages, evictable pages and lock counts.
"""

import random

import pytest
from helpers import assert_lru_current, nodes_below
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvcache.radix import Node, RadixCache


def path_of(cache: RadixCache, node: Node) -> tuple[list[int], list[int]]:
    """(tokens, pages) from the root down to node, read off the tree."""
    tokens, pages = [], []
    while node is not cache.root:
        tokens[:0], pages[:0] = node.key, node.value
        node = node.parent
    return tokens, pages


# -- examples (page_size 2 unless said) -----------------------------------------------------

def test_match_on_empty_tree():
    cache = RadixCache(2)
    for tokens in ([], [1], [1, 2, 3, 4]):
        pages, node = cache.match(tokens)
        assert pages == [] and node is cache.root
    assert cache.cached_pages() == cache.evictable_pages() == 0 and cache.pages() == []


def test_match_exact_longer_shorter_and_diverging():
    cache = RadixCache(2)
    assert cache.insert([1, 2, 3, 4, 5, 6, 7], [10, 11, 12]) == [10, 11, 12]  # token 7: no page
    assert cache.match([1, 2, 3, 4, 5, 6])[0] == [10, 11, 12]                   # exact
    assert cache.match([1, 2, 3, 4, 5, 6, 7, 8, 9])[0] == [10, 11, 12]          # longer
    assert cache.match([1, 2, 3, 4, 5])[0] == [10, 11]                          # shorter, mid-page
    assert cache.match([1, 2, 3, 4, 9, 9])[0] == [10, 11]                       # diverges at a page
    assert cache.match([1, 2, 3, 9, 5, 6])[0] == [10]                           # diverges mid-page
    assert cache.match([2, 1])[0] == []
    pages, node = cache.match([1, 2, 3, 4, 9])
    assert path_of(cache, node) == ([1, 2, 3, 4], [10, 11])


def test_insert_returns_only_newly_owned_pages():
    cache = RadixCache(2)
    assert cache.insert([1, 2, 3, 4], [10, 11]) == [10, 11]
    assert cache.insert([1, 2, 3, 4], [20, 21]) == []               # all cached: caller keeps both
    assert cache.insert([1, 2, 3, 4, 5, 6], [30, 31, 32]) == [32]   # tree keeps 10, 11
    assert cache.insert([1, 2, 7, 8], [40, 41]) == [41]             # diverges after one page
    assert cache.insert([1, 2, 3, 9], [50, 51]) == [51]             # diverges mid-page
    assert cache.insert([1, 2], []) == []
    assert sorted(cache.pages()) == [10, 11, 32, 41, 51]
    assert cache.match([1, 2, 3, 9])[0] == [10, 51]
    assert cache.match([1, 2, 3, 4, 5, 6])[0] == [10, 11, 32]
    with pytest.raises(ValueError, match="at least 6 tokens"):
        cache.insert([1, 2, 3, 4, 5], [1, 2, 3])


def test_insert_locked_equals_insert_match_lock():
    """One walk in place of insert, match and lock: the same pages taken, the same node locked,
    the same evictions in the same order afterwards."""
    rng = random.Random(0)
    one, three = RadixCache(2), RadixCache(2)
    locked, next_page = [], 0
    for _ in range(400):
        op = rng.random()
        if op < 0.4:
            tokens = [rng.randint(0, 1) for _ in range(rng.randint(0, 10))]
            pages = list(range(next_page, next_page + len(tokens) // 2))
            next_page += len(pages)
            taken, node = one.insert_locked(tokens, pages)
            assert taken == three.insert(tokens, pages)
            _, same = three.match(tokens[:len(pages) * 2])
            three.lock(same)
            assert path_of(one, node) == path_of(three, same)
            locked.append((node, same))
        elif op < 0.7 and locked:
            a, b = locked.pop(rng.randrange(len(locked)))
            one.unlock(a)
            three.unlock(b)
        else:
            want = rng.randint(0, 4)
            assert one.evict(want) == three.evict(want)
        assert one.evictable_pages() == three.evictable_pages()
        assert sorted(one.pages()) == sorted(three.pages())


def test_split_keeps_handles_locks_and_counts():
    cache = RadixCache(2)
    cache.insert([1, 2, 3, 4, 5, 6], [10, 11, 12])
    _, whole = cache.match([1, 2, 3, 4, 5, 6])
    cache.lock(whole)
    pages, upper = cache.match([1, 2, 3, 4, 8, 8])                  # splits after two pages
    assert pages == [10, 11] and upper is not whole
    assert upper.key == (1, 2, 3, 4) and upper.value == [10, 11] and upper.parent is cache.root
    assert whole.key == (5, 6) and whole.value == [12] and whole.parent is upper
    assert upper.children == {(5, 6): whole} and cache.root.children == {(1, 2): upper}
    assert upper.lock_count == whole.lock_count == 1                 # the old lock covers both
    assert path_of(cache, whole) == ([1, 2, 3, 4, 5, 6], [10, 11, 12])
    assert cache.cached_pages() == 3 and cache.evictable_pages() == 0
    cache.unlock(whole)
    assert upper.lock_count == whole.lock_count == 0 and cache.evictable_pages() == 3
    assert cache.match([1, 2, 3, 4])[1] is upper                     # exact: no further split


def test_lock_prevents_eviction():
    cache = RadixCache(2)
    cache.insert([1, 2, 3, 4], [10, 11])
    cache.insert([1, 2, 5, 6], [20, 21])                            # tree keeps 10, takes 21
    _, node = cache.match([1, 2, 3, 4])
    cache.lock(node)
    cache.lock(node)
    assert cache.evictable_pages() == 1                              # only [5 6] -> 21
    assert cache.evict(0) == []
    assert cache.evict(10) == [21]
    assert cache.evict(10) == [] and sorted(cache.pages()) == [10, 11]
    cache.unlock(node)
    assert cache.evict(10) == []                                     # still locked once
    cache.unlock(node)
    assert cache.evict(1) == [11]                                    # the leaf goes first
    assert cache.evict(1) == [10] and cache.cached_pages() == 0
    with pytest.raises(ValueError, match="not in this cache"):
        cache.lock(node)


def test_evict_takes_least_recently_used_leaves_and_then_their_parents():
    cache = RadixCache(1)
    cache.insert([1, 2], [10, 12])
    cache.insert([1, 3], [99, 13])
    cache.insert([4], [14])
    cache.match([1, 2])                                              # [1 2] is now the newest
    assert cache.evict(1) == [13]                                    # oldest leaf
    assert cache.evict(1) == [14]
    assert cache.evict(2) == [12, 10]                                # [1] is a leaf now, and next
    cache.insert([5, 6, 7], [15, 16, 17])
    assert cache.evict(1) == [15, 16, 17]                            # whole nodes go


def test_lru_order_survives_many_uses_and_locks():
    """Every use or unlock of a leaf queues it again in the LRU heap: the stale entries are
    skipped and the heap is rebuilt before it outgrows the leaves."""
    cache = RadixCache(1)
    cache.insert([1], [10])
    cache.insert([2], [20])
    for _ in range(500):
        _, node = cache.match([1])
        cache.lock(node)
        cache.unlock(node)
    assert len(cache._lru.heap) <= 2 * 2 + 64 + 1
    assert cache.evict(1) == [20] and cache.evict(1) == [10] and cache.evict(1) == []


def test_unlock_without_lock_changes_nothing():
    cache = RadixCache(2)
    cache.insert([1, 2, 3, 4], [10, 11])
    _, node = cache.match([1, 2, 3, 4])
    with pytest.raises(ValueError, match="not locked"):
        cache.unlock(node)
    assert node.lock_count == 0 and cache.evictable_pages() == 2
    cache.lock(cache.root)                                           # the root holds no lock
    assert cache.root.lock_count == 0


def test_reset_refuses_while_locked():
    cache = RadixCache(2)
    cache.insert([1, 2, 3, 4], [10, 11])
    cache.insert([7, 8], [12])
    _, node = cache.match([1, 2])
    cache.lock(node)
    with pytest.raises(ValueError, match="locked"):
        cache.reset()
    assert sorted(cache.pages()) == [10, 11, 12]
    cache.unlock(node)
    assert sorted(cache.reset()) == [10, 11, 12]
    assert cache.pages() == [] and cache.cached_pages() == cache.evictable_pages() == 0
    assert cache.match([1, 2, 3, 4]) == ([], cache.root)
    with pytest.raises(ValueError, match="not in this cache"):
        cache.lock(node)


@pytest.mark.parametrize("page_size", [0, -1, 1.5, None])
def test_rejects_bad_page_size(page_size):
    with pytest.raises(ValueError, match="page_size"):
        RadixCache(page_size)


# -- state machine --------------------------------------------------------------------------

MAX_TOKENS = 14
tokens_strategy = st.lists(st.integers(0, 1), max_size=MAX_TOKENS)  # two symbols: much sharing


class RadixMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.cache: RadixCache | None = None
        self.model: dict[tuple[int, ...], int] = {}  # cached page-aligned prefix -> its last page
        self.used: dict[tuple[int, ...], int] = {}   # cached prefix -> step that last covered it
        self.step = 0
        self.locks: list[tuple[Node, list[int]]] = []  # (locked node, pages on its path)
        self.seen: list[list[int]] = [[]]            # token sequences used so far
        self.next_page = 0

    @initialize(page_size=st.sampled_from([1, 2, 3]))
    def start(self, page_size):
        self.g = page_size
        self.cache = RadixCache(page_size)

    # -- model helpers ----------------------------------------------------------------------
    def _draw_tokens(self, data) -> list[int]:
        """An earlier sequence cut anywhere, plus a random tail: shared prefixes, odd divergences."""
        base = data.draw(st.sampled_from(self.seen), label="base")
        cut = data.draw(st.one_of(st.just(len(base)), st.integers(0, len(base))), label="cut")
        tail = data.draw(st.one_of(st.just([]), tokens_strategy), label="tail")
        tokens = (base[:cut] + tail)[:MAX_TOKENS]
        self.seen.append(tokens)
        return tokens

    def _model_match(self, tokens) -> list[int]:
        pages = []
        for k in range(1, len(tokens) // self.g + 1):
            page = self.model.get(tuple(tokens[:k * self.g]))
            if page is None:
                break
            pages.append(page)
        return pages

    def _locked_pages(self) -> set[int]:
        return {p for _, pages in self.locks for p in pages}

    def _touch(self, tokens, num_pages: int) -> None:
        self.step += 1
        for k in range(1, num_pages + 1):
            self.used[tuple(tokens[:k * self.g])] = self.step

    def _unlocked_leaf_ages(self) -> list[int]:
        """When each unlocked cached prefix with no cached extension was last used."""
        parents = {prefix[:-self.g] for prefix in self.model}
        locked = self._locked_pages()
        return [self.used[q] for q, p in self.model.items() if q not in parents and p not in locked]

    # -- rules ------------------------------------------------------------------------------
    @rule(data=st.data(), lock=st.booleans())
    def insert(self, data, lock):
        tokens = self._draw_tokens(data)
        full = len(tokens) // self.g
        k = data.draw(st.one_of(st.just(full), st.integers(0, full)), label="pages")
        pages = list(range(self.next_page, self.next_page + k))
        self.next_page += k
        expect = []
        for i in range(k):
            prefix = tuple(tokens[:(i + 1) * self.g])
            if prefix not in self.model:
                self.model[prefix] = pages[i]
                expect.append(pages[i])
        if lock:        # insert_locked: the node of the inserted prefix comes back locked
            taken, node = self.cache.insert_locked(tokens, pages)
            path = self._model_match(tokens[:k * self.g])
            assert path_of(self.cache, node) == (tokens[:k * self.g], path)
            self.locks.append((node, path))
        else:
            taken = self.cache.insert(tokens, pages)
        self._touch(tokens, k)
        assert taken == expect, f"insert {tokens} {pages}: took {taken}, want {expect}"
        assert taken == pages[k - len(taken):], "the taken pages are not a suffix"
        held = set(self.cache.pages())
        assert held.issuperset(taken)

    @rule(data=st.data())
    def match(self, data):
        tokens = self._draw_tokens(data)
        pages, node = self.cache.match(tokens)
        self._touch(tokens, len(pages))
        expect = self._model_match(tokens)
        assert pages == expect, f"match {tokens}: {pages}, want {expect}"
        assert (node is self.cache.root) == (not pages)
        assert path_of(self.cache, node) == (tokens[:len(pages) * self.g], pages)

    @rule(data=st.data())
    def lock(self, data):
        tokens = self._draw_tokens(data)
        pages, node = self.cache.match(tokens)
        self._touch(tokens, len(pages))
        self.cache.lock(node)
        self.locks.append((node, pages))

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data):
        i = data.draw(st.integers(0, len(self.locks) - 1), label="lock")
        node, _ = self.locks.pop(i)
        self.cache.unlock(node)

    @rule(data=st.data())
    def evict(self, data):
        want = data.draw(st.one_of(st.integers(0, 2), st.integers(0, self.cache.cached_pages() + 2)),
                         label="pages to evict")  # often a few, so the LRU order shows
        evictable = self.cache.evictable_pages()
        before = set(self.cache.pages())
        freed = self.cache.evict(want)
        assert len(set(freed)) == len(freed) and before.issuperset(freed)
        assert not set(freed) & self._locked_pages(), "a locked page was evicted"
        assert set(self.cache.pages()) == before - set(freed)
        assert len(freed) >= min(want, evictable)
        if len(freed) < want:
            assert self.cache.evictable_pages() == 0
        prefix_of = {p: q for q, p in self.model.items()}
        ages = [self.used[prefix_of[p]] for p in freed]
        self.model = {q: p for q, p in self.model.items() if p not in set(freed)}
        self.used = {q: t for q, t in self.used.items() if q in self.model}
        # LRU: victims go oldest first, and none is younger than an unlocked leaf left behind.
        assert ages == sorted(ages), f"evicted out of LRU order: ages {ages}"
        if ages and self._unlocked_leaf_ages():
            assert ages[-1] <= min(self._unlocked_leaf_ages())

    @precondition(lambda self: self.cache is not None and self.cache.cached_pages() > 8)
    @rule()
    def reset(self):
        if any(node is not self.cache.root for node, _ in self.locks):
            with pytest.raises(ValueError, match="locked"):
                self.cache.reset()
            return
        held = self.cache.reset()  # locks on the root (nothing matched) hold nothing and stay
        assert sorted(held) == sorted(self.model.values())
        self.model.clear()
        self.used.clear()

    # -- invariants, checked after every step -----------------------------------------------
    @invariant()
    def tree_matches_model(self):
        if self.cache is None:
            return
        held = self.cache.pages()
        assert len(set(held)) == len(held), f"a page is held twice: {sorted(held)}"
        assert sorted(held) == sorted(self.model.values())
        for prefix in self.model:  # only leaves go, so the cached prefixes stay prefix-closed
            assert len(prefix) == self.g or prefix[:-self.g] in self.model
        for node, pages in self.locks:  # a held handle names the same prefix after any split
            assert path_of(self.cache, node)[1] == pages

    @invariant()
    def structure_and_counts(self):
        if self.cache is None:
            return
        root = self.cache.root
        assert root.key == () and root.value == [] and root.lock_count == 0
        nodes = nodes_below(root)
        locks_through = {id(n): 0 for n in nodes}
        for node, _ in self.locks:
            while node is not root:
                locks_through[id(node)] += 1
                node = node.parent
        for node in [root] + nodes:
            for first, child in node.children.items():
                assert child.parent is node and child.key[:self.g] == first
                assert len(child.key) >= self.g and len(child.key) % self.g == 0
                assert len(child.value) == len(child.key) // self.g
        clock = {}  # node.last_access -> model step of every page in that node
        for node in nodes:
            assert node.lock_count == locks_through[id(node)]
            assert node.last_access <= node.parent.last_access
            tokens, pages = path_of(self.cache, node)
            for i in range(len(pages) - len(node.value), len(pages)):
                step = self.used[tuple(tokens[:(i + 1) * self.g])]
                assert clock.setdefault(node.last_access, step) == step, "LRU clock off the model"
        steps = [clock[t] for t in sorted(clock)]
        assert steps == sorted(set(steps)), "the LRU clock orders nodes unlike the model"
        assert self.cache.cached_pages() == sum(len(n.value) for n in nodes)
        assert self.cache.evictable_pages() == sum(len(n.value) for n in nodes if not n.lock_count)
        assert_lru_current(self.cache._lru)


# No explain phase: it traces every line while shrinking, and takes minutes to report a failure.
RadixMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, database=None,
    phases=[p for p in Phase if p is not Phase.explain], suppress_health_check=[HealthCheck.too_slow])
TestRadixMachine = RadixMachine.TestCase
