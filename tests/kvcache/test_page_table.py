"""kvcache.page_table against a Python model of the rows: admit, grow, ensure_slots and
release in random order, with padding entries mixed in; the whole cache is checked after every
step. Shapes are fixed so each jitted function compiles once for the module."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from helpers import assert_cache_empty
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import kvcache
from kvcache import LAYOUT_NONE, LAYOUT_PAGED, LAYOUT_STATIC, allocator
from kvcache.allocator import TRASH_PAGE

SPEC = kvcache.PoolSpec(num_layers=2, num_pages=12, page_size=4, num_kv_heads=2, head_dim=3,
                        dtype="float32")
P, G = SPEC.num_pages, SPEC.page_size
R, M = 4, 4   # cache rows, page-table width: R * M > P - 1, so the pool runs out
B = 3         # entries per batched call

_admit = jax.jit(kvcache.admit_rows, static_argnums=4)
_grow = jax.jit(kvcache.grow_rows, static_argnums=3)
_ensure = jax.jit(lambda cache, rows, active: kvcache.ensure_slots(
    cache, rows, active.astype(jnp.int32), 1))
_release = jax.jit(kvcache.release_rows)
_slots = jax.jit(kvcache.slot_addresses, static_argnums=2)
_write = jax.jit(kvcache.write_kv)
_take = jax.jit(allocator.alloc, static_argnums=2)
_give = jax.jit(allocator.decref)


def i32(x):
    return jnp.asarray(x, jnp.int32)


def assert_trees_equal(a, b, what=""):
    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=f"{what}: {jax.tree_util.keystr(path)} differs")


def set_lengths(cache, rows, lengths):
    return dataclasses.replace(cache, lengths=cache.lengths.at[i32(rows)].set(i32(lengths)))


def expected_ok(need, free):
    need = np.asarray(need)
    return (need == 0) | (np.cumsum(need) <= free)


def popped(cache_before, count):
    """The next `count` pages the allocator hands out, in order."""
    top = int(cache_before.alloc.top)
    return np.asarray(cache_before.alloc.free_stack)[top - count:top][::-1].tolist()


class PageTableMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.cache = kvcache.init_cache(SPEC, R, M)
        self.rows: dict[int, dict] = {}   # row -> {"layout", "pages", "length"}
        self.outside: list[int] = []      # pages held outside the page table (drain)

    def _live_entries(self, data, candidates, label):
        k = data.draw(st.integers(0, min(B, len(candidates))), label=f"{label}: live entries")
        return data.draw(st.permutations(candidates), label=f"{label}: rows")[:k]

    def _garbage(self, data, label):
        """A padding entry's row: any row, taken or not."""
        return data.draw(st.integers(0, R - 1), label=label)

    def _twice(self, fn, data, build, label):
        """Runs fn on the batch build(garbage) for two independent draws of padding garbage and
        checks that both give the same cache: padding entries must not matter."""
        out1 = fn(*build(lambda what: self._garbage(data, f"{label} {what} #1")))
        out2 = fn(*build(lambda what: self._garbage(data, f"{label} {what} #2")))
        assert_trees_equal(out1, out2, f"{label}: padding entries changed the result")
        return out1

    # -- rules ------------------------------------------------------------------------------
    @rule(data=st.data())
    def admit(self, data):
        free_rows = [r for r in range(R) if r not in self.rows]
        live = self._live_entries(data, free_rows, "admit")
        spec = [(r, data.draw(st.sampled_from([LAYOUT_STATIC, LAYOUT_PAGED]), label="layout"),
                 data.draw(st.integers(0, M), label="reserve")) for r in live]
        slots = data.draw(st.permutations(range(B)), label="admit: order")[:len(spec)]
        by_slot = dict(zip(slots, spec))

        def build(garbage):
            entries = [by_slot.get(b, (garbage("row"), LAYOUT_NONE, garbage("reserve")))
                       for b in range(B)]
            rows, layout, reserve = zip(*entries)
            return self.cache, i32(rows), i32(layout), i32(reserve), M

        before = self.cache
        need = [by_slot[b][2] if b in by_slot else 0 for b in range(B)]
        ok_want = expected_ok(need, int(before.alloc.top))
        self.cache, ok = self._twice(_admit, data, build, "admit")
        np.testing.assert_array_equal(np.asarray(ok), ok_want, err_msg=f"need={need}")
        event(f"admit: {'a row was refused' if not ok_want.all() else 'all served'}")
        granted = popped(before, sum(n for n, o in zip(need, ok_want) if o))
        table = np.asarray(self.cache.page_table)
        prompt = {}
        for b in sorted(by_slot):
            r, code, n = by_slot[b]
            if ok_want[b]:
                pages, granted = granted[:n], granted[n:]
                assert table[r, :n].tolist() == pages, f"row {r} did not get the popped pages"
                length = data.draw(st.integers(0, n * G), label=f"row {r} prompt")
                self.rows[r] = {"layout": code, "pages": pages, "length": length}
                prompt[r] = length
        # The prefill writes the prompt and sets the lengths (engine.step.prefill).
        if prompt:
            self.cache = set_lengths(self.cache, list(prompt), list(prompt.values()))

    @precondition(lambda self: self.rows)
    @rule(data=st.data())
    def grow(self, data):
        live = self._live_entries(data, sorted(self.rows), "grow")
        need_of = {r: data.draw(st.integers(0, M - len(self.rows[r]["pages"])), label="need")
                   for r in live}
        slots = data.draw(st.permutations(range(B)), label="grow: order")[:len(live)]
        by_slot = dict(zip(slots, live))

        def build(garbage):
            rows = [by_slot[b] if b in by_slot else garbage("row") for b in range(B)]
            need = [need_of[by_slot[b]] if b in by_slot else 0 for b in range(B)]
            return self.cache, i32(rows), i32(need), M

        self._apply_growth(data, build, by_slot, need_of, _grow, "grow")

    @precondition(lambda self: self.rows)
    @rule(data=st.data())
    def step(self, data):
        """One decode step: ensure_slots, then each served active row stores one token."""
        movable = [r for r in sorted(self.rows) if self.rows[r]["length"] < M * G]
        live = self._live_entries(data, movable, "step")
        active_of = {r: data.draw(st.booleans(), label=f"row {r} active") for r in live}
        slots = data.draw(st.permutations(range(B)), label="step: order")[:len(live)]
        by_slot = dict(zip(slots, live))

        def build(garbage):
            rows = [by_slot[b] if b in by_slot else garbage("row") for b in range(B)]
            active = [active_of[by_slot[b]] if b in by_slot else False for b in range(B)]
            return self.cache, i32(rows), jnp.asarray(active)

        # A new page exactly when the next position lies past the row's pages.
        need_of = {r: int(active_of[r] and self.rows[r]["length"] >= G * len(self.rows[r]["pages"]))
                   for r in live}
        ok = self._apply_growth(data, build, by_slot, need_of, _ensure, "ensure_slots")
        moved = [r for b, r in by_slot.items() if active_of[r] and ok[b]]
        for r in moved:
            self.rows[r]["length"] += 1
        if moved:
            self.cache = set_lengths(self.cache, moved, [self.rows[r]["length"] for r in moved])

    def _apply_growth(self, data, build, by_slot, need_of, fn, label):
        before = self.cache
        need = [need_of[by_slot[b]] if b in by_slot else 0 for b in range(B)]
        ok_want = expected_ok(need, int(before.alloc.top))
        self.cache, ok = self._twice(fn, data, build, label)
        ok = np.asarray(ok)
        np.testing.assert_array_equal(ok, ok_want, err_msg=f"{label}: need={need}")
        event(f"{label}: {'a row was refused' if not ok_want.all() else 'all served'}, "
              f"{sum(need)} pages asked")
        granted = popped(before, sum(n for n, o in zip(need, ok_want) if o))
        for b in range(B):
            if b in by_slot and ok[b]:
                n = need[b]
                self.rows[by_slot[b]]["pages"] += granted[:n]
                granted = granted[n:]
        return ok

    @precondition(lambda self: self.rows)
    @rule(data=st.data())
    def release(self, data):
        live = self._live_entries(data, sorted(self.rows), "release")
        slots = data.draw(st.permutations(range(B)), label="release: order")[:len(live)]
        by_slot = dict(zip(slots, live))

        def build(garbage):
            rows = [by_slot[b] if b in by_slot else garbage("row") for b in range(B)]
            mask = [b in by_slot for b in range(B)]
            return self.cache, i32(rows), jnp.asarray(mask)

        top = int(self.cache.alloc.top)
        self.cache = self._twice(_release, data, build, "release")
        returned = sum(len(self.rows.pop(r)["pages"]) for r in live)
        assert int(self.cache.alloc.top) == top + returned

    @precondition(lambda self: self.rows)
    @rule(data=st.data())
    def advance(self, data):
        """Stores more tokens in a row's pages (a prefill chunk, or steps of a static row)."""
        r = data.draw(st.sampled_from(sorted(self.rows)), label="row")
        row = self.rows[r]
        full = len(row["pages"]) * G   # the next step then needs a page: favour it
        row["length"] = data.draw(st.one_of(st.just(full), st.integers(row["length"], full)),
                                  label="new length")
        self.cache = set_lengths(self.cache, [r], [row["length"]])

    @precondition(lambda self: int(self.cache.alloc.top) > 0)
    @rule(data=st.data())
    def drain(self, data):
        """Someone else (e.g. the prefix cache) takes pages: drives the pool towards empty."""
        top = int(self.cache.alloc.top)
        n = data.draw(st.one_of(st.just(top), st.integers(1, top)), label="pages taken")
        alloc, pages, ok = _take(self.cache.alloc, i32([n]), P)
        assert bool(ok[0])
        self.outside += np.asarray(pages)[0, :n].tolist()
        self.cache = dataclasses.replace(self.cache, alloc=alloc)

    @precondition(lambda self: self.outside)
    @rule()
    def refill(self):
        pages = self.outside + [TRASH_PAGE] * (P - len(self.outside))
        mask = [True] * len(self.outside) + [False] * (P - len(self.outside))
        alloc = _give(self.cache.alloc, i32(pages), jnp.asarray(mask))
        self.cache = dataclasses.replace(self.cache, alloc=alloc)
        self.outside = []

    @rule(data=st.data())
    def padding_only(self, data):
        """Batches made only of padding entries leave the whole cache as it was."""
        rows = i32([self._garbage(data, "pad row") for _ in range(B)])
        junk = i32([data.draw(st.integers(0, M), label="pad reserve") for _ in range(B)])
        none = jnp.full(B, LAYOUT_NONE, jnp.int32)
        off = jnp.zeros(B, bool)
        for name, (out, ok) in {
            "admit_rows": _admit(self.cache, rows, none, junk, M),
            "grow_rows": _grow(self.cache, rows, jnp.zeros(B, jnp.int32), M),
            "ensure_slots": _ensure(self.cache, rows, off),
        }.items():
            assert np.asarray(ok).all(), name
            assert_trees_equal(out, self.cache, f"{name} with padding only")
        assert_trees_equal(_release(self.cache, rows, off), self.cache, "release_rows, no mask")

    @precondition(lambda self: self.rows)
    @rule()
    def release_everything(self):
        for start in range(0, R, B):
            rows = [(start + b) % R for b in range(B)]
            mask = [start + b < R for b in range(B)]
            self.cache = _release(self.cache, i32(rows), jnp.asarray(mask))
        self.rows.clear()
        if not self.outside:
            assert_cache_empty(self.cache)

    # -- invariants -------------------------------------------------------------------------
    @invariant()
    def rows_match_model(self):
        table = np.asarray(self.cache.page_table)
        lengths = np.asarray(self.cache.lengths)
        layout = np.asarray(self.cache.layout)
        for r in range(R):
            if r in self.rows:
                row = self.rows[r]
                n = len(row["pages"])
                assert table[r, :n].tolist() == row["pages"], f"row {r}: {table[r]} vs {row}"
                assert (table[r, n:] == TRASH_PAGE).all(), f"row {r} has a gap: {table[r]}"
                assert layout[r] == row["layout"] and lengths[r] == row["length"], r
                assert row["length"] <= n * G, f"row {r} stores past its pages: {row}"
            else:
                assert (table[r] == TRASH_PAGE).all() and lengths[r] == 0, f"free row {r}"
                assert layout[r] == LAYOUT_NONE, f"free row {r} has layout {layout[r]}"

    @invariant()
    def pages_match_allocator(self):
        held = [p for row in self.rows.values() for p in row["pages"]] + self.outside
        assert len(set(held)) == len(held), f"a page is in two rows: {self.rows}"
        assert TRASH_PAGE not in held
        refcount = np.asarray(self.cache.alloc.refcount)
        want = np.zeros(P, np.int32)
        want[held] = 1
        want[TRASH_PAGE] = 1
        np.testing.assert_array_equal(refcount, want)
        top = int(self.cache.alloc.top)
        stack = np.asarray(self.cache.alloc.free_stack)[:top].tolist()
        assert top + len(held) == P - 1
        assert sorted(stack) == sorted(set(range(1, P)) - set(held))


PageTableMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestPageTableMachine = PageTableMachine.TestCase


# -- allocation schedules of the two layouts -----------------------------------------------

def exhaust(cache):
    """Hands every free page to nobody in particular: any further allocation must fail."""
    alloc, _, ok = _take(cache.alloc, i32([cache.alloc.top]), P)
    assert bool(ok[0]) and int(alloc.top) == 0
    return dataclasses.replace(cache, alloc=alloc)


@settings(max_examples=20, deadline=None, database=None)
@given(prompt=st.integers(1, M * G), max_new=st.integers(1, M * G), row=st.integers(0, R - 1))
def test_static_row_never_allocates_during_decode(prompt, max_new, row):
    """A static row reserves ceil((prompt + max_new - 1) / G) pages and then decodes to its
    end with an empty pool: no allocation, every step ok, the cache untouched but the length."""
    if prompt + max_new - 1 > M * G:
        max_new = M * G - prompt + 1
    reserve = kvcache.LayoutPolicy("static").admit(prompt, prompt + max_new, G).reserve
    cache = kvcache.init_cache(SPEC, R, M)
    cache, ok = _admit(cache, i32([row, 0, 0]), i32([LAYOUT_STATIC, 0, 0]), i32([reserve, 0, 0]),
                       M)
    assert bool(ok[0])
    cache = exhaust(set_lengths(cache, [row], [prompt]))
    for length in range(prompt, prompt + max_new - 1):   # positions the decode steps write
        before = cache
        cache, ok = _ensure(cache, i32([row, 0, 0]), jnp.asarray([True, False, False]))
        assert np.asarray(ok).all(), f"static row asked for a page at length {length}"
        assert_trees_equal(cache, before, f"ensure_slots at length {length}")
        cache = set_lengths(cache, [row], [length + 1])


@settings(max_examples=20, deadline=None, database=None)
@given(prompt=st.integers(1, M * G), steps=st.integers(1, M * G), row=st.integers(0, R - 1))
def test_paged_row_allocates_exactly_at_page_boundaries(prompt, steps, row):
    admission = kvcache.LayoutPolicy("paged").admit(prompt, prompt + steps, G)
    kind, reserve = admission.layout, admission.take
    assert reserve == math.ceil(prompt / G)
    cache = kvcache.init_cache(SPEC, R, M)
    cache, ok = _admit(cache, i32([row, 0, 0]), i32([LAYOUT_PAGED, 0, 0]), i32([reserve, 0, 0]),
                       M)
    assert kind == "paged" and np.asarray(ok).all()
    cache = set_lengths(cache, [row], [prompt])
    for length in range(prompt, min(prompt + steps, M * G)):
        top = int(cache.alloc.top)
        cache, ok = _ensure(cache, i32([row, row, 0]), jnp.asarray([True, False, False]))
        assert np.asarray(ok).all()
        held = int(np.sum(np.asarray(cache.page_table[row]) != TRASH_PAGE))
        assert held == length // G + 1, f"length {length}: {held} pages"
        assert top - int(cache.alloc.top) == int(length % G == 0), f"length {length}"
        cache = set_lengths(cache, [row], [length + 1])


def test_exhausted_admission_is_reported_and_changes_nothing():
    cache = kvcache.init_cache(SPEC, R, M)
    cache, ok = _admit(cache, i32([0, 1, 2]), i32([LAYOUT_STATIC] * 3), i32([4, 4, 2]), M)
    np.testing.assert_array_equal(np.asarray(ok), [True, True, True])
    assert int(cache.alloc.top) == 1
    before = cache
    cache, ok = _admit(cache, i32([3, 0, 0]), i32([LAYOUT_PAGED, 0, 0]), i32([2, 0, 0]), M)
    np.testing.assert_array_equal(np.asarray(ok), [False, True, True])
    assert_trees_equal(cache, before, "failed admission")
    cache, ok = _ensure(set_lengths(cache, [2], [2 * G]), i32([2, 0, 1]),
                        jnp.asarray([True, False, False]))
    assert bool(ok[0]) and int(cache.alloc.top) == 0
    before = set_lengths(cache, [0], [4 * G - 1])
    cache, ok = _ensure(set_lengths(before, [2], [3 * G]), i32([2, 0, 1]),
                        jnp.asarray([True, True, False]))
    np.testing.assert_array_equal(np.asarray(ok), [False, True, True])
    assert_trees_equal(cache, set_lengths(before, [2], [3 * G]), "failed ensure_slots")


def test_growing_past_the_table_width_fails_or_leaks_nothing():
    cache = kvcache.init_cache(SPEC, R, M)
    cache, ok = _grow(cache, i32([0, 1, 2]), i32([M, 1, 0]), M)
    before = cache
    cache, ok = _grow(cache, i32([0, 1, 2]), i32([1, 0, 0]), M)
    if not bool(ok[0]):
        assert_trees_equal(cache, before, "refused growth")
    cache = _release(cache, i32([0, 1, 2]), jnp.asarray([True, True, False]))
    assert_cache_empty(cache)


# -- slot addresses and K/V writes ----------------------------------------------------------

T = 5


@settings(max_examples=30, deadline=None, database=None)
@given(data=st.data())
def test_write_kv_stores_each_token_at_its_page_and_slot(data):
    """Positions scattered over randomly placed pages: every live token lands where the page
    table says, a dense read-back of the row returns it, padding touches only the trash page,
    and nothing else (other pages, other slots) changes."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    ids = rng.permutation(np.arange(1, P))
    table = np.zeros((B, M), np.int32)
    lengths = data.draw(st.lists(st.integers(0, M * G), min_size=B, max_size=B), label="lengths")
    used = 0
    for b, n in enumerate(lengths):
        k = math.ceil(n / G)
        if used + k > P - 1:
            lengths[b], k = 0, 0
        table[b, :k] = ids[used:used + k]
        used += k
    positions = np.full((B, T), -1, np.int32)
    for b, n in enumerate(lengths):
        pos = data.draw(st.lists(st.integers(0, max(n - 1, 0)), max_size=min(T, n), unique=True),
                        label=f"row {b} positions")
        slots = data.draw(st.permutations(range(T)), label=f"row {b} order")[:len(pos)]
        positions[b, slots] = pos

    page, slot = (np.asarray(x) for x in _slots(i32(table), i32(positions), G))
    live = positions >= 0
    want_page = np.take_along_axis(table, np.clip(positions // G, 0, M - 1), axis=1)
    np.testing.assert_array_equal(page[live], want_page[live])
    np.testing.assert_array_equal(slot[live], positions[live] % G)
    assert (page[~live] == TRASH_PAGE).all()

    pages = rng.standard_normal(SPEC.layer_struct.shape).astype(np.float32)
    new = rng.standard_normal((B, T, SPEC.num_kv_heads, SPEC.head_dim)).astype(np.float32)
    out = np.asarray(_write(jnp.asarray(pages), i32(page), i32(slot), jnp.asarray(new)))
    dense = out[table].reshape(B, M * G, SPEC.num_kv_heads, SPEC.head_dim)
    for b, t in zip(*np.nonzero(live)):
        np.testing.assert_array_equal(dense[b, positions[b, t]], new[b, t])
    touched = np.zeros(out.shape[:2], bool)
    touched[page[live], slot[live]] = True
    touched[TRASH_PAGE] = True   # padding tokens write there
    np.testing.assert_array_equal(out[~touched], pages[~touched])
