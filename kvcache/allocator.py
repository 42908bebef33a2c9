"""Functional page allocator: pure, jit-able functions over an explicit state pytree.

The free pages sit on a stack, `free_stack[:top]`, sorted so that the lowest id is on top:
allocation always takes the lowest free ids, so the tail of the pool empties first. Page 0 is
the trash page: pinned with refcount 1, never on the stack, never handed out. A page is on the
stack iff its refcount is 0. Every function is vectorised over the rows of a batch (ranks come
from a cumsum) and costs O(B * max_need) for `alloc` and O(P) for `decref`, with no loop over
rows.

Preconditions the callers keep: `incref` only pages that are held; never `decref` one holder's
page twice in one call.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

TRASH_PAGE = 0


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["free_stack", "top", "refcount"], meta_fields=[])
@dataclasses.dataclass
class AllocState:
    free_stack: jax.Array  # [P] int32, free page ids in [0, top), descending; zeros above top
    top: jax.Array         # [] int32, number of free pages
    refcount: jax.Array    # [P] int32, holders of each page; the trash page is pinned at 1


def init(num_pages: int) -> AllocState:
    """All pages but the trash page free; the lowest ids come out first."""
    if num_pages < 2:
        raise ValueError(f"a pool needs at least 2 pages (one is the trash page), got {num_pages}")
    stack = jnp.arange(num_pages - 1, -1, -1, dtype=jnp.int32)  # [P-1, ..., 1, 0]
    refcount = jnp.zeros(num_pages, jnp.int32).at[TRASH_PAGE].set(1)
    return AllocState(stack, jnp.int32(num_pages - 1), refcount)


def alloc(state: AllocState, need: jax.Array, max_need: int):
    """Takes need[b] pages for every row b at once, all or nothing per row, in row order.

    need [B] int32; max_need is a static bound, and a row asking for more is refused. Returns
    (state', pages [B,max_need] int32, ok [B] bool): row b got pages[b, :need[b]]; the rest of
    its entries are the trash page. A row that does not fit gets nothing and ok[b] = False, and
    so does every later row that needs pages (rows are served in order so the ranks stay a
    cumsum); a row that needs none is always ok. The state is never corrupted and no page is
    handed out twice.
    """
    need = jnp.maximum(need.astype(jnp.int32), 0)
    too_many = need > max_need
    need = jnp.where(too_many, 0, need)
    end = jnp.cumsum(need)                                      # [B]
    ok = ((end <= state.top) | (need == 0)) & ~too_many
    granted = jnp.where(ok, need, 0)
    start = end - need                                          # [B], exact for the ok prefix
    j = jnp.arange(max_need, dtype=jnp.int32)[None, :]          # [1,max_need]
    valid = j < granted[:, None]                                # [B,max_need]
    stack_pos = jnp.clip(state.top - 1 - (start[:, None] + j), 0, None)
    pages = jnp.where(valid, state.free_stack[stack_pos], TRASH_PAGE)
    refcount = state.refcount.at[pages.ravel()].add(valid.ravel().astype(jnp.int32))
    num_pages = state.free_stack.shape[0]
    stack = state.free_stack.at[jnp.where(valid, stack_pos, num_pages)].set(0, mode="drop")
    top = state.top - jnp.sum(granted)
    return AllocState(stack, top, refcount), pages, ok


def incref(state: AllocState, pages: jax.Array, mask: jax.Array) -> AllocState:
    """One more holder for every pages[i] with mask[i] (sharing, e.g. a prefix-cache hit)."""
    add = (mask & (pages != TRASH_PAGE)).astype(jnp.int32)
    return dataclasses.replace(state, refcount=state.refcount.at[pages].add(add))


def decref(state: AllocState, pages: jax.Array, mask: jax.Array) -> AllocState:
    """One holder fewer for every pages[i] with mask[i]; pages left with none go back on the
    stack, which is rebuilt sorted (lowest id on top). A page already free stays free."""
    sub = (mask & (pages != TRASH_PAGE)).astype(jnp.int32)
    return from_refcount(jnp.maximum(state.refcount.at[pages].add(-sub), 0))


def from_refcount(refcount: jax.Array) -> AllocState:
    """The state whose free pages are those with refcount 0, stacked lowest id on top (also
    what a pool of another size starts from: see kvcache.elastic)."""
    free = refcount == 0                                           # [P]
    higher_free = jnp.cumsum(free[::-1])[::-1] - free              # [P] free ids above p
    num_pages = refcount.shape[0]
    target = jnp.where(free, higher_free, num_pages)
    ids = jnp.arange(num_pages, dtype=jnp.int32)
    stack = jnp.zeros(num_pages, jnp.int32).at[target].set(ids, mode="drop")
    return AllocState(stack, jnp.sum(free, dtype=jnp.int32), refcount)


def num_free(state: AllocState) -> jax.Array:
    return state.top
