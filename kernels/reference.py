"""Pure-jnp paged attention: the numerical reference for every kernel and the CPU path."""

import jax
import jax.numpy as jnp


def paged_attention_reference(q, k_pages, v_pages, page_table, q_positions, kv_lens, *,
                              sliding_window=None, logit_softcap=None):
    b, t, n, h = q.shape
    _, g, k, _ = k_pages.shape
    m = page_table.shape[1]
    keys = k_pages[page_table].reshape(b, m * g, k, h)    # [B,S,K,H]
    values = v_pages[page_table].reshape(b, m * g, k, h)  # [B,S,K,H]
    qg = q.reshape(b, t, k, n // k, h)                    # [B,T,K,Q,H]
    exact = jax.lax.Precision.HIGHEST      # no TF32 on GPUs: this is the numerical reference
    logits = jnp.einsum("btkqh,bskh->btkqs", qg.astype(jnp.float32),
                        keys.astype(jnp.float32), precision=exact) * (h ** -0.5)
    if logit_softcap is not None:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
    s_idx = jnp.arange(m * g)[None, None, :]              # [1,1,S]
    t_pos = q_positions[:, :, None]                       # [B,T,1]
    visible = (s_idx <= t_pos) & (s_idx < kv_lens[:, None, None]) & (t_pos >= 0)
    if sliding_window is not None:
        visible &= t_pos - s_idx < sliding_window
    visible = visible[:, :, None, None, :]                # [B,T,1,1,S]
    logits = jnp.where(visible, logits, -jnp.inf)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    weights = jnp.where(visible, jnp.exp(logits - peak), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom > 0, denom, 1.0)
    stored = (jnp.arange(m * g)[None, :] < kv_lens[:, None])[:, :, None, None]  # [B,S,1,1]
    values = jnp.where(stored, values.astype(jnp.float32), 0.0)  # 0 * NaN garbage would be NaN
    out = jnp.einsum("btkqs,bskh->btkqh", probs, values, precision=exact)
    return out.reshape(b, t, n, h).astype(q.dtype)

