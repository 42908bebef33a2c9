"""kernels/worklist.py: the decode plan over random mixes of row lengths (every visible key page
in exactly one item of its row, items balanced within one key block), and the merge of
partials against attention over all of a row's keys at once."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import worklist

PLAN = jax.jit(worklist.plan, static_argnames=("page_size", "block_pages", "items", "window"))


def visible_pages(pos, length, page_size, window):
    """Pages row's query sees, as a set: keys [first, last)."""
    last = min(pos + 1, length)
    first = 0 if window is None else max(pos - window + 1, 0)
    if pos < 0 or last <= first:
        return set()
    return set(range(first // page_size, math.ceil(last / page_size)))


def check_plan(lengths, positions, *, page_size, block_pages, items, window=None):
    work = np.asarray(PLAN(jnp.asarray(positions, jnp.int32), jnp.asarray(lengths, jnp.int32),
                           page_size=page_size, block_pages=block_pages, items=items,
                           window=window))
    rows, lo, hi = work
    b = len(lengths)
    assert work.shape == (3, items) and np.all((rows >= 0) & (rows <= b))
    if items == b:                  # one item a row, the row whole: the kernel writes it
        assert rows.tolist() == list(range(b)) and np.all(lo == 0)
        assert np.all(hi == np.iinfo(np.int32).max)
        return rows
    assert np.all(np.diff(rows) >= 0), "items are in row order"
    assert np.all(hi[rows == b] == lo[rows == b])
    blocks = {r: math.ceil(len(visible_pages(positions[r], lengths[r], page_size, window))
                           / block_pages) for r in range(b)}
    chunk = max(math.ceil(sum(blocks.values()) / max(items - b, 1)), 1)
    for r in range(b):
        mine = np.flatnonzero(rows == r)
        covered = [p for i in mine for p in range(lo[i], hi[i])]
        want = visible_pages(positions[r], lengths[r], page_size, window)
        assert sorted(covered) == sorted(want), f"row {r}: every visible page exactly once"
        assert len(mine) == math.ceil(blocks[r] / chunk)
        sizes = [math.ceil((hi[i] - lo[i]) / block_pages) for i in mine]
        if sizes:
            assert max(sizes) - min(sizes) <= 1 and max(sizes) <= chunk, sizes
    return rows


@pytest.mark.parametrize("items", [24, 25, 60, 156])
def test_plan_random_mixes(items):
    """24 rows with lengths log-uniform in [1, 2^21], some of them padding rows, some with the
    query before their last stored key; with and without a window; 1 or 3 pages a key block;
    as many items as rows (one each, padding rows too), one more, and several times more."""
    for trial in range(6):
        rng = np.random.default_rng([items, trial])
        lengths = np.exp(rng.uniform(0, math.log(2**21), 24)).astype(int)
        lengths[rng.random(24) < rng.random()] = 0
        positions = np.maximum(np.where(lengths > 0, lengths - 1 - rng.integers(0, 3, 24), -1),
                               -1)
        window = None if trial % 2 else 3000
        check_plan(lengths.tolist(), positions.tolist(), page_size=16,
                   block_pages=1 + 2 * (trial % 3 == 0), items=items, window=window)


def test_plan_long_row_beside_short_ones():
    """1 x 1M keys beside 3 x 2k over 132 items (an H100's SMs): the long row gets 128 items and
    each short row one (a grid of rows x splits gave the long row 33)."""
    rows = check_plan([2**20, 2048, 2048, 2048], [2**20 - 1, 2047, 2047, 2047], page_size=16,
                      block_pages=1, items=132)
    assert np.bincount(rows, minlength=5).tolist() == [128, 1, 1, 1, 1]


def test_merge_equals_one_softmax():
    """Partial softmax results over disjoint key ranges merge to the softmax over all of them;
    rows with no item, and empty items whose partials hold NaN, give zeros / are ignored."""
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((3, 50, 4))      # row, key, head: logits in log2 units
    vals = rng.standard_normal((3, 50, 4, 8))
    cuts = {0: [0, 50], 1: [0, 7, 20, 50]}      # row 2 has no item
    o, m, total, rows = [], [], [], []
    for r, edges in cuts.items():
        for a, z in zip(edges, edges[1:]):
            peak = keys[r, a:z].max(axis=0)
            p = np.exp2(keys[r, a:z] - peak)
            o.append(np.einsum("sn,snh->nh", p, vals[r, a:z]))
            m.append(peak)
            total.append(p.sum(axis=0))
            rows.append(r)
    o.append(np.full((4, 8), np.nan))           # an empty item
    m.append(np.full(4, -np.inf))
    total.append(np.zeros(4))
    rows.append(3)
    out = np.asarray(worklist.merge(*(jnp.asarray(np.stack(x), jnp.float32)
                                      for x in (o, m, total)),
                                    jnp.asarray(rows, jnp.int32), 3))
    for r in (0, 1):
        p = np.exp2(keys[r] - keys[r].max(axis=0))
        want = np.einsum("sn,snh->nh", p / p.sum(axis=0), vals[r])
        np.testing.assert_allclose(out[r], want, rtol=1e-5, atol=1e-6)
    assert np.all(out[2] == 0)
