"""Functional page allocator: pure, jit-able functions over an explicit state pytree.

The free pages sit on a stack, `free_stack[:top]`, popped from the top. Page 0 is the trash
page: pinned with refcount 1, never on the stack, never handed out. Every function is
vectorised over the rows of a batch (ranks come from a cumsum) and costs O(B * max_need)
for `alloc` and O(P) for `decref`, with no loop over rows.
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
    free_stack: jax.Array  # [P] int32, free page ids in [0, top); the next page out is top - 1
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

    need [B] int32 (<= max_need, a static bound). Returns (state', pages [B,max_need] int32,
    ok [B] bool): row b got pages[b, :need[b]]; the rest of its entries are the trash page.
    A row that does not fit gets nothing and ok[b] = False, and so does every later row that
    needs pages (rows are served in order so the ranks stay a cumsum); a row that needs none is
    always ok. The state is never corrupted and no page is handed out twice.
    """
    need = jnp.maximum(need.astype(jnp.int32), 0)
    end = jnp.cumsum(need)                                      # [B]
    ok = (end <= state.top) | (need == 0)
    granted = jnp.where(ok, need, 0)
    start = end - need                                          # [B], exact for the ok prefix
    j = jnp.arange(max_need, dtype=jnp.int32)[None, :]          # [1,max_need]
    valid = j < granted[:, None]                                # [B,max_need]
    stack_pos = jnp.clip(state.top - 1 - (start[:, None] + j), 0, None)
    pages = jnp.where(valid, state.free_stack[stack_pos], TRASH_PAGE)
    refcount = state.refcount.at[pages.ravel()].add(valid.ravel().astype(jnp.int32))
    top = state.top - jnp.sum(granted)
    return AllocState(state.free_stack, top, refcount), pages, ok


def incref(state: AllocState, pages: jax.Array, mask: jax.Array) -> AllocState:
    """One more holder for every pages[i] with mask[i] (sharing, e.g. a prefix-cache hit)."""
    add = (mask & (pages != TRASH_PAGE)).astype(jnp.int32)
    return dataclasses.replace(state, refcount=state.refcount.at[pages].add(add))


def decref(state: AllocState, pages: jax.Array, mask: jax.Array) -> AllocState:
    """One holder fewer for every pages[i] with mask[i]; pages left with none go back on the
    stack, lowest id on top. A page already free stays free and is not pushed twice."""
    sub = (mask & (pages != TRASH_PAGE)).astype(jnp.int32)
    refcount = jnp.maximum(state.refcount.at[pages].add(-sub), 0)
    freed = (state.refcount > 0) & (refcount == 0)                 # [P]
    higher_freed = jnp.cumsum(freed[::-1])[::-1] - freed           # [P] freed ids above p
    num_pages = state.free_stack.shape[0]
    target = jnp.where(freed, state.top + higher_freed, num_pages)
    ids = jnp.arange(num_pages, dtype=jnp.int32)
    stack = state.free_stack.at[target].set(ids, mode="drop")
    return AllocState(stack, state.top + jnp.sum(freed, dtype=jnp.int32), refcount)


def num_free(state: AllocState) -> jax.Array:
    return state.top
