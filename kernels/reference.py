"""Pure-jnp paged attention: the numerical reference for every kernel and the CPU path.

Keys are read a block of pages at a time with an online softmax (float32 throughout), and only
the blocks below the longest row's `kv_len` are visited: the cost follows the live pages, not
the page table's width (a 10M-token context length costs nothing until a row is long), and the
memory is one block's, whatever the width.
"""

import math

import jax
import jax.numpy as jnp

BLOCK_KEYS = 1024     # key positions per block (rounded down to whole pages, at least one)


def paged_attention_reference(q, k_pages, v_pages, page_table, q_positions, kv_lens, *,
                              sliding_window=None, logit_softcap=None):
    b, t, n, h = q.shape
    _, g, k, _ = k_pages.shape
    m = page_table.shape[1]
    c = max(1, min(m, BLOCK_KEYS // g))                   # pages per block
    blocks = math.ceil(m / c)
    table = jnp.pad(page_table, ((0, 0), (0, blocks * c - m)))   # [B,blocks*C], trash page 0
    qg = q.reshape(b, t, k, n // k, h).astype(jnp.float32)       # [B,T,K,Q,H]
    t_pos = q_positions[:, :, None]                               # [B,T,1]
    exact = jax.lax.Precision.HIGHEST      # no TF32 on GPUs: this is the numerical reference

    def block(j, carry):
        peak, denom, acc = carry       # [B,T,K,Q], [B,T,K,Q], [B,T,K,Q,H]
        pages = jax.lax.dynamic_slice_in_dim(table, j * c, c, axis=1)          # [B,C]
        keys = k_pages[pages].reshape(b, c * g, k, h).astype(jnp.float32)      # [B,S,K,H]
        values = v_pages[pages].reshape(b, c * g, k, h).astype(jnp.float32)   # [B,S,K,H]
        logits = jnp.einsum("btkqh,bskh->btkqs", qg, keys, precision=exact) * (h ** -0.5)
        if logit_softcap is not None:
            logits = logit_softcap * jnp.tanh(logits / logit_softcap)
        s_idx = j * c * g + jnp.arange(c * g)[None, None, :]                  # [1,1,S]
        visible = (s_idx <= t_pos) & (s_idx < kv_lens[:, None, None]) & (t_pos >= 0)
        if sliding_window is not None:
            visible &= t_pos - s_idx < sliding_window
        visible = visible[:, :, None, None, :]                                 # [B,T,1,1,S]
        logits = jnp.where(visible, logits, -jnp.inf)
        new_peak = jnp.maximum(peak, jnp.max(logits, axis=-1))
        base = jnp.where(jnp.isfinite(new_peak), new_peak, 0.0)
        weights = jnp.where(visible, jnp.exp(logits - base[..., None]), 0.0)
        scale = jnp.exp(peak - base)          # 0 while nothing was visible (peak -inf)
        stored = (s_idx[0, 0] < kv_lens[:, None])[:, :, None, None]            # [B,S,1,1]
        values = jnp.where(stored, values, 0.0)   # 0 * NaN garbage would be NaN
        acc = acc * scale[..., None] + jnp.einsum("btkqs,bskh->btkqh", weights, values,
                                                  precision=exact)
        return new_peak, denom * scale + jnp.sum(weights, axis=-1), acc

    live = jnp.minimum((jnp.max(kv_lens) + c * g - 1) // (c * g), blocks)
    init = (jnp.full((b, t, k, n // k), -jnp.inf, jnp.float32),
            jnp.zeros((b, t, k, n // k), jnp.float32),
            jnp.zeros((b, t, k, n // k, h), jnp.float32))
    _, denom, acc = jax.lax.fori_loop(0, live, block, init)
    out = acc / jnp.where(denom > 0, denom, 1.0)[..., None]
    return out.reshape(b, t, n, h).astype(q.dtype)
