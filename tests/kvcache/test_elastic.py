"""kvcache.elastic: pool sizes, compaction moves, fragmentation, and resizing a cache whose rows
and extra holders (a prefix cache) hold pages scattered over the pool: every held page keeps
its contents under its new id, page tables follow, and the allocator is the one a pool of the
new size with the same holders would have."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvcache
from kvcache import allocator, elastic

SPEC = kvcache.PoolSpec(num_layers=2, num_pages=24, page_size=2, num_kv_heads=1, head_dim=2,
                        dtype="float32")


def test_pool_sizes_double_up_to_the_ceiling():
    assert elastic.pool_sizes(5, 40) == (5, 10, 20, 40)
    assert elastic.pool_sizes(5, 33) == (5, 10, 20, 33)
    assert elastic.pool_sizes(7, 7) == (7,)
    with pytest.raises(ValueError, match="min_pages <= max_pages"):
        elastic.pool_sizes(8, 7)


@given(st.lists(st.integers(0, 2), min_size=2, max_size=40), st.integers(2, 40))
def test_compaction_moves_bring_held_pages_below_the_cut(refs, cut):
    refcount = np.asarray([1] + refs, np.int32)
    cut = min(cut, len(refcount))
    held = int(np.sum(refcount[1:] > 0))
    if held > cut - 1:
        with pytest.raises(ValueError, match="held pages past page"):
            elastic.compaction_moves(refcount, cut)
        return
    src, dst = elastic.compaction_moves(refcount, cut)
    assert src.tolist() == (np.flatnonzero(refcount[cut:] > 0) + cut).tolist()
    assert len(set(dst.tolist())) == len(dst) and all(0 < d < cut for d in dst)
    assert all(refcount[d] == 0 for d in dst)
    free_below = np.flatnonzero(refcount[1:cut] == 0) + 1
    assert dst.tolist() == free_below[:len(dst)].tolist()     # the lowest free ids


def test_fragmentation_reports_free_pages_and_the_longest_free_run():
    refcount = np.asarray([1, 0, 0, 1, 0, 0, 0, 2, 0], np.int32)
    assert elastic.fragmentation(refcount) == {"free_pages": 6, "largest_free_run": 3}
    assert elastic.fragmentation(np.asarray([1, 1], np.int32)) == {
        "free_pages": 0, "largest_free_run": 0}


def scattered_cache(rng, rows: int):
    """A cache whose rows hold random pages (some shared), plus pages held by a prefix cache
    only; every page's contents are its id, so moves are visible."""
    cache = kvcache.init_cache(SPEC, rows, 4)
    p = SPEC.num_pages
    fill = jnp.broadcast_to(jnp.arange(p, dtype=jnp.float32)[:, None, None, None],
                            SPEC.layer_struct.shape)
    cache = dataclasses.replace(cache, k=(fill, fill + 100), v=(fill + 200, fill + 300))
    ids = rng.permutation(np.arange(1, p))
    table = np.zeros((rows, 4), np.int32)
    refcount = np.zeros(p, np.int32)
    refcount[0] = 1
    used = 0
    for r in range(rows):
        n = int(rng.integers(0, 4))
        table[r, :n] = ids[used:used + n]
        used += n
    if table[0, 0] and rows > 1:          # a shared page: row 1 starts with row 0's first page
        table[1, 0] = table[0, 0]
    cached = ids[used:used + 3]           # held by the prefix cache only
    np.add.at(refcount, table[table > 0], 1)
    refcount[cached] += 1
    return dataclasses.replace(cache, page_table=jnp.asarray(table),
                               alloc=allocator.from_refcount(jnp.asarray(refcount))), refcount


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([8, 12, 16, 24, 48]))
def test_resize_moves_contents_tables_and_refcounts(seed, num_pages):
    rng = np.random.default_rng(seed)
    cache, refcount = scattered_cache(rng, rows=4)
    held = int(np.sum(refcount[1:] > 0))
    if held > num_pages - 1:
        num_pages = SPEC.num_pages        # cannot shrink this far: resize in place instead
    src, dst = elastic.compaction_moves(refcount, num_pages)
    e = 16
    moves = np.zeros((2, e), np.int32)
    moves[:, :len(src)] = src, dst
    mask = np.arange(e) < len(src)
    old_table = np.asarray(cache.page_table)
    old_k0 = cache.k[0]
    new = elastic.resize(cache, num_pages, moves[0], moves[1], mask)
    assert old_k0.is_deleted()
    remap = np.arange(SPEC.num_pages)
    remap[src] = dst
    table = np.asarray(new.page_table)
    np.testing.assert_array_equal(table, remap[old_table])
    assert new.num_pages == num_pages and all(x.shape[0] == num_pages for x in new.k + new.v)
    want = np.zeros(num_pages, np.int32)
    kept = np.flatnonzero(refcount > 0)
    want[remap[kept]] = refcount[kept]
    np.testing.assert_array_equal(np.asarray(new.alloc.refcount), want)
    top = int(new.alloc.top)
    assert top == int(np.sum(want == 0))
    assert np.asarray(new.alloc.free_stack)[:top].tolist() == \
        np.flatnonzero(want == 0)[::-1].tolist()
    for old_id in kept[1:]:                # every held page's contents under its new id
        for layer, base in ((new.k[0], 0), (new.k[1], 100), (new.v[0], 200), (new.v[1], 300)):
            np.testing.assert_array_equal(np.asarray(layer[remap[old_id]]),
                                          np.full(layer.shape[1:], old_id + base, np.float32))
    if num_pages > SPEC.num_pages:         # growth: fresh pages are zero and free
        assert not np.asarray(new.k[0][SPEC.num_pages:]).any()
