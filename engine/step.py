"""The hot path as pure functions of explicit pytrees: admission, one mixed step (decode rows and
prefill chunks together), and a multi-step decode loop on the device. Jit them with the graphdef
static and the cache donated:

    loop = jax.jit(decode_loop, static_argnums=0, static_argnames=("num_steps", "attn_impl"),
                   donate_argnames="cache")

A row feeds the tokens it has not stored yet: a decode row its last sampled token, a prefill
row the next chunk of its prompt. Every fed row samples the token after its last fed one and
keeps it in the cache (`next_token`), where a decode row's next step finds it: the host need
not have read it (engine.Engine queues a launch before reading the one before). The host keeps
a sample only when the row has no prompt left to feed.
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
    tokens: jax.Array  # [B,T] int32, left-aligned; -1: the row's next_token (decode rows)
    num: jax.Array     # [B] int32 tokens fed, <= T
    sampling: SamplingArrays


def pack_sampling(s: SamplingArrays) -> np.ndarray:
    """[B, 4] int32 on the host: top_k, then the bits of seed, temperature and top_p."""
    return np.stack([np.asarray(s.top_k, np.int32), np.asarray(s.seed, np.uint32).view(np.int32),
                     np.asarray(s.temperature, np.float32).view(np.int32),
                     np.asarray(s.top_p, np.float32).view(np.int32)], 1)


def unpack_sampling(cols, filtering: bool) -> SamplingArrays:
    bits = jax.lax.bitcast_convert_type
    return SamplingArrays(temperature=bits(cols[:, 2], jnp.float32), top_k=cols[:, 0],
                          top_p=bits(cols[:, 3], jnp.float32), seed=bits(cols[:, 1], jnp.uint32),
                          filtering=filtering)


# A launch's host inputs travel as one int32 buffer and its results come back as one: on the
# H100 machine each numpy argument of a jitted call cost 0.1-0.3 ms of dispatch, each result
# read about as much, and each extra call more (a mixed step used to make four calls and move
# fourteen arrays).
def pack_feed(rows, tokens, num, sampling: SamplingArrays) -> np.ndarray:
    """A Feed as [B, 6 + T] int32 on the host: rows, num, pack_sampling's 4, then the tokens."""
    return np.concatenate([np.stack([rows, num], 1), pack_sampling(sampling), tokens],
                          1).astype(np.int32)


def unpack_feed(ints, filtering: bool) -> Feed:
    return Feed(rows=ints[:, 0], tokens=ints[:, 6:], num=ints[:, 1],
                sampling=unpack_sampling(ints[:, 2:6], filtering))


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["rows", "tokens", "active", "remaining", "stop_ids",
                                "sampling"], meta_fields=[])
@dataclasses.dataclass
class DecodeState:
    rows: jax.Array       # [B] int32 cache rows
    tokens: jax.Array     # [B] int32 last sampled token, not yet in the cache (-1: next_token)
    active: jax.Array     # [B] bool, False for finished rows and padding
    remaining: jax.Array  # [B] int32 tokens each row may still produce
    stop_ids: jax.Array   # [B,E] int32 tokens that end a row (EOS included), -1 = none
    sampling: SamplingArrays


STATE_HEAD = 7     # pack_state's columns before the stop ids


def pack_state(rows, tokens, remaining, stop_ids, sampling: SamplingArrays) -> np.ndarray:
    """A decode launch's DecodeState as [B, STATE_HEAD + E] int32 on the host: rows, tokens
    (-1: the row's next_token, as in a Feed), remaining (0: padding), pack_sampling's 4, then
    the stop ids."""
    return np.concatenate([np.stack([rows, tokens, remaining], 1), pack_sampling(sampling),
                           stop_ids], 1).astype(np.int32)


def unpack_state(ints, filtering: bool) -> DecodeState:
    return DecodeState(rows=ints[:, 0], tokens=ints[:, 1], active=ints[:, 2] > 0,
                       remaining=ints[:, 2], stop_ids=ints[:, STATE_HEAD:],
                       sampling=unpack_sampling(ints[:, 3:STATE_HEAD], filtering))


@dataclasses.dataclass(frozen=True)
class PageOps:
    """The page-table and allocator updates that ride in a launch ahead of its model steps, as
    one fixed-size int32 buffer (so they add no compiled shapes), carried out in this order:

    1. shares: one more holder for each page id (the prefix cache adopting a finished prefill's
       pages); 0, the trash page, is no page;
    2. drops: one holder fewer for each page id (the prefix cache evicting), 0 is no page;
    3. releases: rows freed, each as (row, keep_from, keep_to): the row's references to the
       pages in page-table columns [keep_from, keep_to) go to the prefix cache, the others are
       dropped; row -1 is no release;
    4. admissions: `kvcache.admit_rows` over [admits, 4 + width] columns (row, layout code,
       pages to reserve, prefix length, then the prefix's page ids); layout LAYOUT_NONE is no
       admission.

    Shares come first, so that a row released in the same launch cannot free a page the cache
    is about to hold, and admissions last, so that they may take the pages freed."""
    shares: int
    drops: int
    releases: int
    admits: int
    width: int              # page-table columns

    @property
    def size(self) -> int:
        return self.shares + self.drops + 3 * self.releases + self.admits * (4 + self.width)

    def fits(self, shares: int, drops: int, releases: int, admits: int = 0) -> bool:
        return (shares <= self.shares and drops <= self.drops and releases <= self.releases
                and admits <= self.admits)

    def pack(self, shares=(), drops=(), releases=(), admits=None) -> np.ndarray:
        """The buffer, on the host. releases: (row, keep_from, keep_to) triples; admits: an
        [n, 4 + width] int32 array."""
        if admits is None:
            admits = np.zeros((0, 4 + self.width), np.int32)
        if not self.fits(len(shares), len(drops), len(releases), len(admits)):
            raise ValueError(f"{len(shares)} shares, {len(drops)} drops, {len(releases)} releases"
                             f" and {len(admits)} admissions do not fit in {self}")
        share = np.zeros(self.shares, np.int32)
        share[:len(shares)] = shares
        drop = np.zeros(self.drops, np.int32)
        drop[:len(drops)] = drops
        release = np.full((self.releases, 3), -1, np.int32)
        release[:len(releases)] = np.asarray(releases, np.int32).reshape(-1, 3)
        admit = np.zeros((self.admits, 4 + self.width), np.int32)
        admit[:len(admits)] = admits
        return np.concatenate([share, drop, release.ravel(), admit.ravel()])

    def apply(self, cache: kvcache.KVCache, buf):
        """Carries out the buffer's operations (in a jitted call). Returns (cache', ok [admits]:
        the admission got its reservation or was none, pages [admits, width]: the admission
        rows' page-table rows)."""
        shares, buf = buf[:self.shares], buf[self.shares:]
        drops, buf = buf[:self.drops], buf[self.drops:]
        release, admit = buf[:3 * self.releases].reshape(-1, 3), buf[3 * self.releases:]
        cache = kvcache.share_pages(cache, shares, shares != kvcache.allocator.TRASH_PAGE)
        cache = kvcache.drop_pages(cache, drops, drops != kvcache.allocator.TRASH_PAGE)
        col = jnp.arange(self.width)[None, :]
        keep = (col >= release[:, 1:2]) & (col < release[:, 2:3])
        cache = kvcache.release_rows(cache, jnp.maximum(release[:, 0], 0), release[:, 0] >= 0,
                                     keep)
        admit = admit.reshape(self.admits, 4 + self.width)
        rows = admit[:, 0]
        cache, ok = kvcache.admit_rows(cache, rows, admit[:, 1], admit[:, 2], self.width,
                                       admit[:, 4:], admit[:, 3])
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
        f = dataclasses.replace(f, tokens=jnp.where(f.tokens < 0, cache.next_token[f.rows][:, None],
                                                    f.tokens))
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
    lengths, next_token = cache.lengths, cache.next_token
    results = []
    for f, h, start, (new, ok, num) in zip(feeds, hidden, starts, grown):
        moved = jnp.where(num > 0, f.rows, lengths.shape[0])
        lengths = lengths.at[moved].add(num, mode="drop")
        logits = model.logits(h[jnp.arange(h.shape[0]), jnp.maximum(num - 1, 0)])   # [B,V]
        s = f.sampling
        nxt = sample(logits, s.temperature, s.top_k, s.top_p, s.seed, start + num,
                     filtering=s.filtering)
        next_token = next_token.at[moved].set(nxt, mode="drop")
        results.append((nxt, logits, new, ok))
    return results, dataclasses.replace(cache, k=k, v=v, lengths=lengths, next_token=next_token)


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


def mixed_launch(graphdef, params, cache: kvcache.KVCache, buf, *, ops: PageOps,
                 feeds: tuple[tuple[int, int, bool], ...], attn_impl: str = "auto", mesh=None):
    """The engine's mixed-step call: `ops` carried out, then one `forward` step. buf [N] int32:
    the ops' buffer, then each feed's pack_feed array flattened; feeds (static): each feed's
    (rows, tokens, filtering). Returns (out [K] int32, cache'), out being the admissions' ok
    [admits] and page-table rows [admits, width], then per feed next [B], ok [B] and new pages
    [B, W], each flattened (`split_mixed` takes it apart on the host)."""
    cache, admit_ok, admit_pages = ops.apply(cache, buf[:ops.size])
    start, unpacked = ops.size, []
    for b, t, filtering in feeds:
        unpacked.append(unpack_feed(buf[start:start + b * (6 + t)].reshape(b, 6 + t), filtering))
        start += b * (6 + t)
    results, cache = forward(graphdef, params, cache, tuple(unpacked), attn_impl=attn_impl,
                             mesh=mesh)
    out = [admit_ok.astype(jnp.int32), admit_pages.ravel()]
    for nxt, _, new, ok in results:
        out += [nxt, ok.astype(jnp.int32), new.ravel()]
    return jnp.concatenate(out), cache


def split_mixed(out: np.ndarray, ops: PageOps, feeds, page_size: int):
    """mixed_launch's out, read on the host -> (admit ok [admits] bool, admit pages [admits,
    width], per feed (next [B], ok [B] bool, new pages [B, W]))."""
    a, m = ops.admits, ops.width
    admit_ok, admit_pages, start = out[:a] != 0, out[a:a + a * m].reshape(a, m), a + a * m
    results = []
    for b, t, _ in feeds:
        w = math.ceil(t / page_size)
        nxt, ok = out[start:start + b], out[start + b:start + 2 * b] != 0
        new = out[start + 2 * b:start + (2 + w) * b].reshape(b, w)
        results.append((nxt, ok, new))
        start += (2 + w) * b
    return admit_ok, admit_pages, results


def loop_launch(graphdef, params, cache: kvcache.KVCache, ops_buf, state, *, ops: PageOps,
                filtering: bool, num_steps: int, attn_impl: str = "auto", mesh=None):
    """The engine's decode call: `ops` carried out (no admissions among them), then
    `decode_loop` from state [B, STATE_HEAD + E] int32 (pack_state's layout). Returns (out [B, 2 * steps
    + 1] int32: decode_loop's out, then its pages, then stalled; cache')."""
    cache, _, _ = ops.apply(cache, ops_buf)
    out, pages, cache, _, stalled = decode_loop(
        graphdef, params, cache, unpack_state(state, filtering), num_steps=num_steps,
        attn_impl=attn_impl, mesh=mesh)
    return jnp.concatenate([out, pages, stalled[:, None].astype(jnp.int32)], 1), cache
