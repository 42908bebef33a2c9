"""The hot path as pure functions of explicit pytrees: prefill, one decode step, and a
multi-step decode loop on the device. Jit them with the graphdef static and the cache donated:

    loop = jax.jit(decode_loop, static_argnums=0, static_argnames=("num_steps", "attn_impl"),
                   donate_argnames="cache")
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

import kvcache
from engine.sampling import sample


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["temperature", "top_k", "top_p", "seed"], meta_fields=[])
@dataclasses.dataclass
class SamplingArrays:
    temperature: jax.Array  # [B] float32
    top_k: jax.Array        # [B] int32, <= 0: off
    top_p: jax.Array        # [B] float32
    seed: jax.Array         # [B] uint32


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["rows", "tokens", "prompt_lens", "layout", "reserve",
                                "sampling"], meta_fields=[])
@dataclasses.dataclass
class PrefillBatch:
    rows: jax.Array         # [B] int32 cache rows to fill
    tokens: jax.Array       # [B,T] int32 prompts, right-padded
    prompt_lens: jax.Array  # [B] int32
    layout: jax.Array       # [B] int32 LAYOUT_STATIC / LAYOUT_PAGED, LAYOUT_NONE = padding
    reserve: jax.Array      # [B] int32 pages to reserve at admission
    sampling: SamplingArrays


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


def prefill(graphdef, params, cache: kvcache.KVCache, batch: PrefillBatch, *, max_pages: int,
            attn_impl: str = "auto", all_logits: bool = False):
    """Admits batch.rows, reserves their first pages, writes the prompts' K/V and samples each
    row's first token. Returns (tokens [B], logits [B,V] or [B,T,V] with all_logits, cache',
    ok [B]); a row that could not get its pages has ok False and was left untouched."""
    model = nnx.merge(graphdef, params)
    cache, ok = kvcache.admit_rows(cache, batch.rows, batch.layout, batch.reserve, max_pages)
    live = (batch.layout != kvcache.LAYOUT_NONE) & ok
    t = jnp.arange(batch.tokens.shape[1])[None, :]
    positions = jnp.where(live[:, None] & (t < batch.prompt_lens[:, None]), t, -1)  # [B,T]
    kv_lens = jnp.where(live, batch.prompt_lens, 0)
    hidden, k, v = model(batch.tokens, positions, cache.k, cache.v,
                         cache.page_table[batch.rows], kv_lens, attn_impl)
    idx = jnp.where(live, batch.rows, cache.lengths.shape[0])
    cache = dataclasses.replace(cache, k=k, v=v,
                                lengths=cache.lengths.at[idx].set(batch.prompt_lens, mode="drop"))
    last = jnp.maximum(batch.prompt_lens - 1, 0)
    logits = model.logits(hidden[jnp.arange(hidden.shape[0]), last])         # [B,V]
    s = batch.sampling
    tokens = sample(logits, s.temperature, s.top_k, s.top_p, s.seed, batch.prompt_lens)
    return tokens, (model.logits(hidden) if all_logits else logits), cache, ok


def decode_step(graphdef, params, cache: kvcache.KVCache, rows, tokens, active,
                sampling: SamplingArrays, *, attn_impl: str = "auto"):
    """Feeds tokens [B] to the active rows: a row whose next position starts an unreserved
    page takes one from the pool first (paged layout). Returns (next [B], logits [B,V],
    cache', ok [B]); ok is False where the pool had no page left, and such a row did not move."""
    model = nnx.merge(graphdef, params)
    cache, ok = kvcache.ensure_next_slot(cache, rows, active)
    active = active & ok
    pos = jnp.where(active, cache.lengths[rows], -1)                          # [B]
    hidden, k, v = model(tokens[:, None], pos[:, None], cache.k, cache.v,
                         cache.page_table[rows], jnp.where(active, pos + 1, 0), attn_impl)
    idx = jnp.where(active, rows, cache.lengths.shape[0])
    cache = dataclasses.replace(cache, k=k, v=v,
                                lengths=cache.lengths.at[idx].add(1, mode="drop"))
    logits = model.logits(hidden[:, 0])
    nxt = sample(logits, sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed,
                 pos + 1)
    return nxt, logits, cache, ok


def decode_loop(graphdef, params, cache: kvcache.KVCache, state: DecodeState, *,
                num_steps: int, attn_impl: str = "auto"):
    """Up to num_steps decode steps on the device (lax.while_loop), each row stopping at a
    stop token or when its `remaining` budget is spent; ends early once no row is active.

    Returns (out [B,num_steps] int32 with -1 where a row produced nothing, cache', state',
    stalled [B] bool: rows that found the pool empty and wait, still active, for pages).
    """
    b = state.rows.shape[0]

    def cond(carry):
        i, _, st, _, stalled = carry
        return (i < num_steps) & jnp.any(st.active & ~stalled)

    def body(carry):
        i, cache, st, out, stalled = carry
        nxt, _, cache, ok = decode_step(graphdef, params, cache, st.rows, st.tokens,
                                        st.active & ~stalled, st.sampling, attn_impl=attn_impl)
        emitted = st.active & ~stalled & ok
        out = out.at[:, i].set(jnp.where(emitted, nxt, -1))
        remaining = st.remaining - emitted
        stop = jnp.any(nxt[:, None] == st.stop_ids, axis=-1) | (remaining <= 0)
        st = dataclasses.replace(st, tokens=jnp.where(emitted, nxt, st.tokens),
                                 active=st.active & ~(emitted & stop), remaining=remaining)
        return i + 1, cache, st, out, stalled | (st.active & ~ok)

    out = jnp.full((b, num_steps), -1, jnp.int32)
    init = (jnp.int32(0), cache, state, out, jnp.zeros(b, bool))
    _, cache, state, out, stalled = jax.lax.while_loop(cond, body, init)
    return out, cache, state, stalled
