"""The hot path as pure functions of explicit pytrees: admission, one mixed step (decode rows and
prefill chunks together), and a multi-step decode loop on the device. Jit them with the graphdef
static and the cache donated:

    loop = jax.jit(decode_loop, static_argnums=0, static_argnames=("num_steps", "attn_impl"),
                   donate_argnames="cache")

A row feeds the tokens it has not stored yet: a decode row its last sampled token, a prefill
row the next chunk of its prompt. Every fed row samples the token after its last fed one; the
host keeps that sample only when the row has no prompt left to feed.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kvcache
from engine.sampling import sample
from models import Group


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["temperature", "top_k", "top_p", "seed"],
                   meta_fields=["filtering"])
@dataclasses.dataclass
class SamplingArrays:
    temperature: jax.Array  # [B] float32
    top_k: jax.Array        # [B] int32, <= 0: off
    top_p: jax.Array        # [B] float32
    seed: jax.Array         # [B] uint32
    filtering: bool = True  # static: some row may filter by top-k / top-p (engine.sampling)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["rows", "tokens", "num", "sampling"], meta_fields=[])
@dataclasses.dataclass
class Feed:
    """Rows that store new tokens in one step: num[b] tokens of tokens[b] from the row's length
    on (num 0 = padding). Paged rows take the pages those positions lack inside the step."""
    rows: jax.Array    # [B] int32 cache rows
    tokens: jax.Array  # [B,T] int32, left-aligned
    num: jax.Array     # [B] int32 tokens fed, <= T
    sampling: SamplingArrays


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["ints", "floats"], meta_fields=["filtering"])
@dataclasses.dataclass
class PackedFeed:
    """A Feed as two arrays, so that a launch moves two host buffers to the device instead of
    seven (each numpy argument of a jitted call cost ~60 us of dispatch on the H100). Built on
    the host by `pack_feed`, opened inside the jitted step by `unpack_feed`."""
    ints: jax.Array     # [B, 4 + T] int32: rows, num, top_k, seed (bits), then the tokens
    floats: jax.Array   # [B, 2] float32: temperature, top_p
    filtering: bool = True

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, tokens per row) of the Feed it packs."""
        return self.ints.shape[0], self.ints.shape[1] - 4


def pack_feed(rows, tokens, num, sampling: SamplingArrays) -> PackedFeed:
    """numpy arrays of a Feed -> PackedFeed (on the host)."""
    ints = np.concatenate([np.stack([rows, num, sampling.top_k,
                                     np.asarray(sampling.seed, np.uint32).view(np.int32)], 1),
                           tokens], 1).astype(np.int32)
    floats = np.stack([sampling.temperature, sampling.top_p], 1).astype(np.float32)
    return PackedFeed(ints, floats, sampling.filtering)


def unpack_feed(p: PackedFeed) -> Feed:
    i = p.ints
    sampling = SamplingArrays(temperature=p.floats[:, 0], top_k=i[:, 2], top_p=p.floats[:, 1],
                              seed=jax.lax.bitcast_convert_type(i[:, 3], jnp.uint32),
                              filtering=p.filtering)
    return Feed(rows=i[:, 0], tokens=i[:, 4:], num=i[:, 1], sampling=sampling)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["rows", "tokens", "active", "remaining", "stop_ids",
                                "sampling"], meta_fields=[])
@dataclasses.dataclass
class DecodeState:
    rows: jax.Array       # [B] int32 cache rows
    tokens: jax.Array     # [B] int32 last sampled token, not yet in the cache
    active: jax.Array     # [B] bool, False for finished rows and padding
    remaining: jax.Array  # [B] int32 tokens each row may still produce
    stop_ids: jax.Array   # [B,E] int32 tokens that end a row (EOS included), -1 = none
    sampling: SamplingArrays


def admit(cache: kvcache.KVCache, packed, *, max_need: int):
    """kvcache.admit_rows over packed [B, 4 + M] int32 columns (rows, layout, reserve,
    prefix_len, then the prefix's page ids: one host buffer, not five), also returning the
    admitted rows' page-table rows [B,M] so the host learns which page ids were reserved.
    Returns (cache', ok [B], pages [B,M])."""
    rows, layout, reserve, prefix_len = (packed[:, i] for i in range(4))
    cache, ok = kvcache.admit_rows(cache, rows, layout, reserve, max_need, packed[:, 4:],
                                   prefix_len)
    return cache, ok, cache.page_table[rows]


def forward(graphdef, params, cache: kvcache.KVCache, feeds: tuple[Feed, ...], *,
            attn_impl: str = "auto", mesh=None):
    """One step over every feed at once. Returns (results, cache'), one result per feed:
    (next [B] sampled after each row's last fed token, logits [B,V] float32 there,
    new_pages [B,W] page ids taken this step from column 0, trash past them, ok [B]). A row
    with ok False found the pool empty (or its page table full) and did not move. mesh: the
    tensor-parallel mesh the params and pages are sharded over (None: one device)."""
    model = nnx.merge(graphdef, params)
    g = cache.page_size
    groups, starts, grown = [], [], []
    for f in feeds:
        width = math.ceil(f.tokens.shape[1] / g)
        held = jnp.sum(cache.page_table[f.rows] != kvcache.allocator.TRASH_PAGE, axis=1)  # [B]
        cache, ok = kvcache.ensure_slots(cache, f.rows, f.num, width)
        num = jnp.where(ok, f.num, 0)
        start = cache.lengths[f.rows]                                          # [B]
        t = jnp.arange(f.tokens.shape[1])[None, :]
        positions = jnp.where(t < num[:, None], start[:, None] + t, -1)       # [B,T]
        row_pages = cache.page_table[f.rows]                                   # [B,M]
        groups.append(Group(f.tokens, positions, row_pages, jnp.where(num > 0, start + num, 0)))
        cols = jnp.minimum(held[:, None] + jnp.arange(width)[None, :], row_pages.shape[1] - 1)
        new = jnp.take_along_axis(row_pages, cols, axis=1)                     # [B,W]
        after = jnp.sum(row_pages != kvcache.allocator.TRASH_PAGE, axis=1)
        fresh = held[:, None] + jnp.arange(width)[None, :] < after[:, None]
        grown.append((jnp.where(fresh, new, kvcache.allocator.TRASH_PAGE), ok, num))
        starts.append(start)
    hidden, k, v = model(tuple(groups), cache.k, cache.v, attn_impl, mesh)
    lengths = cache.lengths
    results = []
    for f, h, start, (new, ok, num) in zip(feeds, hidden, starts, grown):
        lengths = lengths.at[jnp.where(num > 0, f.rows, lengths.shape[0])].add(num, mode="drop")
        logits = model.logits(h[jnp.arange(h.shape[0]), jnp.maximum(num - 1, 0)])   # [B,V]
        s = f.sampling
        nxt = sample(logits, s.temperature, s.top_k, s.top_p, s.seed, start + num,
                     filtering=s.filtering)
        results.append((nxt, logits, new, ok))
    return results, dataclasses.replace(cache, k=k, v=v, lengths=lengths)


def decode_step(graphdef, params, cache: kvcache.KVCache, rows, tokens, active,
                sampling: SamplingArrays, *, attn_impl: str = "auto", mesh=None):
    """Feeds tokens [B] to the active rows. Returns (next [B], logits [B,V], cache', ok [B],
    new_page [B]: the page a row took this step, or the trash page)."""
    feed = Feed(rows, tokens[:, None], active.astype(jnp.int32), sampling)
    [(nxt, logits, new, ok)], cache = forward(graphdef, params, cache, (feed,),
                                              attn_impl=attn_impl, mesh=mesh)
    return nxt, logits, cache, ok, new[:, 0]


def decode_loop(graphdef, params, cache: kvcache.KVCache, state: DecodeState, *,
                num_steps: int, attn_impl: str = "auto", mesh=None):
    """num_steps decode steps on the device, each row stopping at a stop token or when its
    `remaining` budget is spent (later steps leave it alone).

    The trip count is fixed (a fori_loop, no early exit), so XLA knows it and need not read a
    condition back each step (measured 0-8% faster than a while_loop on the H100). On a GPU
    the call still returns only when the loop is done.

    Returns (out [B,num_steps] int32 with -1 where a row produced nothing, pages [B,num_steps]
    int32 the page each step took or the trash page, cache', state', stalled [B] bool: rows that
    found the pool empty and wait, still active, for pages).
    """
    b = state.rows.shape[0]

    def body(i, carry):
        cache, st, out, pages, stalled = carry
        live = st.active & ~stalled
        nxt, _, cache, ok, new = decode_step(graphdef, params, cache, st.rows, st.tokens, live,
                                             st.sampling, attn_impl=attn_impl, mesh=mesh)
        emitted = live & ok
        out = out.at[:, i].set(jnp.where(emitted, nxt, -1))
        pages = pages.at[:, i].set(new)
        remaining = st.remaining - emitted
        stop = jnp.any(nxt[:, None] == st.stop_ids, axis=-1) | (remaining <= 0)
        st = dataclasses.replace(st, tokens=jnp.where(emitted, nxt, st.tokens),
                                 active=st.active & ~(emitted & stop), remaining=remaining)
        return cache, st, out, pages, stalled | (live & ~ok)

    out = jnp.full((b, num_steps), -1, jnp.int32)
    pages = jnp.zeros((b, num_steps), jnp.int32)
    init = (cache, state, out, pages, jnp.zeros(b, bool))
    cache, state, out, pages, stalled = jax.lax.fori_loop(0, num_steps, body, init)
    return out, pages, cache, state, stalled
