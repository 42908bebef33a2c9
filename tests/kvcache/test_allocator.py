"""kvcache.allocator against a Python model of who holds which page.

A hypothesis state machine drives random sequences of alloc (several rows at once, some asking
for more than is free), free (decref a holder's pages), share (incref a prefix of a holder's
pages for a new holder), exhaust and double free; every step checks the whole device state
against the model. Shapes are fixed (pool P, batch B, pad width W) so each jitted function
compiles once for the module.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvcache import allocator
from kvcache.allocator import TRASH_PAGE

P = 16        # pages in the pool, the trash page included: 15 can be handed out
B = 4         # rows per alloc call
MAX_NEED = 6  # static bound on pages per row: B * MAX_NEED > P - 1, so some calls fail
W = 2 * MAX_NEED  # width of the page lists given to incref / decref (padded, masked)

_alloc = jax.jit(allocator.alloc, static_argnums=2)
_incref = jax.jit(allocator.incref)
_decref = jax.jit(allocator.decref)

needs_strategy = st.lists(st.integers(0, MAX_NEED), min_size=B, max_size=B)


def host(state: allocator.AllocState) -> dict:
    return {"free_stack": np.asarray(state.free_stack), "top": int(state.top),
            "refcount": np.asarray(state.refcount)}


def assert_same_state(a: allocator.AllocState, b: allocator.AllocState) -> None:
    ha, hb = host(a), host(b)
    assert ha["top"] == hb["top"]
    np.testing.assert_array_equal(ha["refcount"], hb["refcount"])
    np.testing.assert_array_equal(ha["free_stack"], hb["free_stack"])


def padded(pages, data, *, pad_with_live: list[int]):
    """pages (mask True) as a [W] list, padded at random positions with held pages under mask
    False and with the trash page under mask True: the trash page must be ignored even when
    unmasked."""
    entries = [(p, True) for p in pages]
    for _ in range(W - len(pages)):
        if data.draw(st.booleans(), label="pad with trash"):
            entries.append((TRASH_PAGE, True))
        else:
            entries.append((data.draw(st.sampled_from(pad_with_live or [TRASH_PAGE]),
                                      label="pad page"), False))
    order = data.draw(st.permutations(range(W)), label="pad order")
    entries = [entries[i] for i in order]
    return (jnp.asarray([p for p, _ in entries], jnp.int32),
            jnp.asarray([m for _, m in entries], bool))


def check_alloc_result(before: dict, need, pages, ok, after: dict) -> list[list[int]]:
    """Checks one alloc call against its contract; returns the pages granted per row."""
    need = np.asarray(need)
    pages, ok = np.asarray(pages), np.asarray(ok)
    assert pages.shape == (len(need), MAX_NEED)
    expected_ok = (need == 0) | (np.cumsum(need) <= before["top"])
    np.testing.assert_array_equal(ok, expected_ok, err_msg=f"need={need} free={before['top']}")
    assert ok[need == 0].all(), "a row that needs no page is always ok"
    first_fail = np.flatnonzero(~ok)
    if first_fail.size:
        later = np.arange(len(need)) > first_fail[0]
        assert not ok[later & (need > 0)].any(), "a later row that needs pages got them"
    granted = []
    for b in range(len(need)):
        n = int(need[b]) if ok[b] else 0
        assert (pages[b, n:] == TRASH_PAGE).all(), f"row {b} got pages past its grant: {pages[b]}"
        assert (pages[b, :n] != TRASH_PAGE).all(), f"row {b} got the trash page: {pages[b]}"
        granted.append(pages[b, :n].tolist())
    flat = [p for row in granted for p in row]
    assert len(set(flat)) == len(flat), f"a page was handed out twice in one call: {granted}"
    # Pages come off the top of the stack, in row order.
    top = before["top"]
    popped = before["free_stack"][top - len(flat):top][::-1].tolist()
    assert flat == popped, f"granted {flat}, stack top was {popped}"
    assert after["top"] == top - len(flat)
    delta = after["refcount"] - before["refcount"]
    expect_delta = np.zeros(P, np.int32)
    expect_delta[flat] = 1
    np.testing.assert_array_equal(delta, expect_delta, err_msg="refcounts moved beyond grants")
    return granted


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.state = allocator.init(P)
        self.holders: dict[int, list[int]] = {}  # holder -> pages it holds (one ref each)
        self.group: dict[int, int] = {}          # holder -> id of the alloc it shares pages of
        self.next_id = 0

    # -- model helpers ----------------------------------------------------------------------
    def _new_holder(self, pages, group=None) -> None:
        self.holders[self.next_id] = list(pages)
        self.group[self.next_id] = self.next_id if group is None else group
        self.next_id += 1

    def _counts(self) -> np.ndarray:
        counts = np.zeros(P, np.int64)
        for pages in self.holders.values():
            for p in pages:
                counts[p] += 1
        return counts

    def _held_pages(self) -> list[int]:
        return sorted({p for pages in self.holders.values() for p in pages})

    def _do_alloc(self, need) -> np.ndarray:
        before = host(self.state)
        self.state, pages, ok = _alloc(self.state, jnp.asarray(need, jnp.int32), MAX_NEED)
        granted = check_alloc_result(before, need, pages, ok, host(self.state))
        for row in granted:
            if row:
                self._new_holder(row)
        return np.asarray(ok)

    # -- rules ------------------------------------------------------------------------------
    @rule(need=needs_strategy)
    def alloc(self, need):
        self._do_alloc(need)

    @precondition(lambda self: int(self.state.top) < MAX_NEED)
    @rule(need=needs_strategy, row=st.integers(0, B - 1))
    def alloc_more_than_free(self, need, row):
        """One row asks for one page more than is free: it and every later row with a need fail."""
        need = list(need)
        need[row] = int(self.state.top) + 1
        self._do_alloc(need)

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def free(self, data):
        holder = data.draw(st.sampled_from(sorted(self.holders)), label="holder")
        pages = self.holders.pop(holder)
        self.group.pop(holder)
        before = host(self.state)
        counts_after = self._counts()
        pages_arr, mask = padded(pages, data, pad_with_live=self._held_pages())
        self.state = _decref(self.state, pages_arr, mask)
        after = host(self.state)
        newly_free = sorted(p for p in set(pages) if counts_after[p] == 0)
        assert after["top"] == before["top"] + len(newly_free)
        free_ids = sorted(set(before["free_stack"][:before["top"]].tolist()) | set(newly_free))
        stack = after["free_stack"][:after["top"]].tolist()
        assert stack == free_ids[::-1], f"stack {stack}: want every free id, lowest on top"
        assert not after["free_stack"][after["top"]:].any(), "entries above top are not zero"

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def share(self, data):
        holder = data.draw(st.sampled_from(sorted(self.holders)), label="holder")
        pages = self.holders[holder]
        k = data.draw(st.integers(1, len(pages)), label="shared prefix")
        before = host(self.state)
        pages_arr, mask = padded(pages[:k], data, pad_with_live=self._held_pages())
        self.state = _incref(self.state, pages_arr, mask)
        self._new_holder(pages[:k], group=self.group[holder])
        after = host(self.state)
        assert after["top"] == before["top"]
        np.testing.assert_array_equal(after["free_stack"], before["free_stack"])

    @rule(data=st.data())
    def exhaust(self, data):
        """Takes every free page, then checks that any further need fails and changes nothing."""
        free = int(self.state.top)
        need = [0] * B
        for b in range(B):
            need[b] = min(MAX_NEED, free - sum(need))
        order = data.draw(st.permutations(range(B)), label="row order")
        need = [need[i] for i in order]
        assert sum(need) == free  # B * MAX_NEED >= P - 1
        ok = self._do_alloc(need)
        assert ok.all() and int(self.state.top) == 0
        again = data.draw(st.lists(st.integers(0, MAX_NEED), min_size=B, max_size=B),
                          label="need on an empty pool")
        before = self.state
        new, pages, ok = _alloc(self.state, jnp.asarray(again, jnp.int32), MAX_NEED)
        np.testing.assert_array_equal(np.asarray(ok), np.asarray(again) == 0)
        assert (np.asarray(pages) == TRASH_PAGE).all()
        assert_same_state(new, before)
        self.state = new

    @precondition(lambda self: int(self.state.top) > 0)
    @rule(data=st.data())
    def double_free(self, data):
        """decref of a page that is already free leaves the whole state as it was."""
        counts = self._counts()
        free_pages = [p for p in range(1, P) if counts[p] == 0]
        pages = data.draw(st.lists(st.sampled_from(free_pages), min_size=1, max_size=3),
                          label="free pages")
        before = self.state
        pages_arr, mask = padded(pages, data, pad_with_live=self._held_pages())
        self.state = _decref(self.state, pages_arr, mask)
        assert_same_state(self.state, before)

    # -- invariants, checked after every step -----------------------------------------------
    @invariant()
    def device_matches_model(self):
        h = host(self.state)
        refcount, top, stack = h["refcount"], h["top"], h["free_stack"]
        counts = self._counts()
        assert refcount[TRASH_PAGE] == 1, f"trash page refcount {refcount[TRASH_PAGE]}"
        assert all(TRASH_PAGE not in pages for pages in self.holders.values())
        np.testing.assert_array_equal(refcount[1:], counts[1:],
                                      err_msg="device refcount != number of holders")
        on_stack = stack[:top].tolist()
        assert 0 <= top <= P - 1
        assert len(set(on_stack)) == top, f"free stack has duplicates: {on_stack}"
        assert TRASH_PAGE not in on_stack, "the trash page is on the free stack"
        assert (refcount[on_stack] == 0).all(), "a page on the free stack is held"
        held = self._held_pages()
        assert top + len(held) == P - 1, f"free {top} + held {len(held)} != {P - 1}"
        assert set(on_stack) | set(held) == set(range(1, P))
        assert int(allocator.num_free(self.state)) == top

    @invariant()
    def pages_shared_only_through_incref(self):
        owner_group: dict[int, int] = {}
        for holder, pages in self.holders.items():
            assert len(set(pages)) == len(pages)
            for p in pages:
                g = owner_group.setdefault(p, self.group[holder])
                assert g == self.group[holder], (
                    f"page {p} is held by two holders that did not share it through incref")


AllocatorMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow])
TestAllocatorMachine = AllocatorMachine.TestCase


# -- lowest ids first -----------------------------------------------------------------------

@settings(max_examples=25, deadline=None, database=None)
@given(rounds=st.lists(needs_strategy, min_size=1, max_size=4), data=st.data())
def test_lowest_ids_first_after_freeing_everything_at_once(rounds, data):
    """After any allocs (with sharing) and one decref of everything, pages come out 1, 2, ..."""
    state = allocator.init(P)
    held: list[int] = []
    for need in rounds:
        state, pages, ok = _alloc(state, jnp.asarray(need, jnp.int32), MAX_NEED)
        pages = np.asarray(pages)
        held += pages[pages != TRASH_PAGE].tolist()
    shared = data.draw(st.lists(st.sampled_from(held or [TRASH_PAGE]), max_size=4), label="shared")
    w = P - 1 + 4
    pad = [TRASH_PAGE] * (w - len(shared))
    state = _incref(state, jnp.asarray(shared + pad, jnp.int32),
                         jnp.asarray([True] * len(shared) + [False] * len(pad)))
    everything = held + shared
    order = data.draw(st.permutations(range(len(everything))), label="free order")
    everything = [everything[i] for i in order]
    pad = [TRASH_PAGE] * (w - len(everything))
    state = _decref(state, jnp.asarray(everything + pad, jnp.int32),
                         jnp.asarray([True] * len(everything) + [False] * len(pad)))
    assert int(state.top) == P - 1
    state, pages, ok = _alloc(state, jnp.asarray([P - 1], jnp.int32), P - 1)
    assert bool(ok[0])
    assert np.asarray(pages)[0].tolist() == list(range(1, P))


def test_lowest_ids_first_after_freeing_everything_in_two_calls():
    state = allocator.init(8)
    state, pages, _ = allocator.alloc(state, jnp.asarray([5]), 5)
    assert np.asarray(pages)[0].tolist() == [1, 2, 3, 4, 5]
    state = allocator.decref(state, jnp.asarray([1, 2]), jnp.ones(2, bool))
    state = allocator.decref(state, jnp.asarray([3, 4, 5]), jnp.ones(3, bool))
    assert int(state.top) == 7
    state, pages, _ = allocator.alloc(state, jnp.asarray([3]), 3)
    assert np.asarray(pages)[0].tolist() == [1, 2, 3]


def test_init_rejects_a_pool_without_a_usable_page():
    with pytest.raises(ValueError, match="at least 2 pages"):
        allocator.init(1)
