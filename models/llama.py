"""One Llama-family decoder (Llama 3.x, Qwen2/2.5, Qwen3, Mistral) in Flax NNX.

Module and parameter names follow the HF checkpoints (`model.layers.0.self_attn.q_proj`), so
loading is a rename plus a transpose. K/V go straight into the paged cache: every call writes
its new tokens into their pages and attends through `kernels.paged_attention`.
"""

import jax
import jax.numpy as jnp
from flax import nnx

import kernels
from kvcache import slot_addresses, write_kv
from models.config import ModelConfig


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones(dim, dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


def _precision(dtype):
    """float32 models compute in float32 on every backend (GPUs would otherwise use TF32)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _linear(d_in, d_out, bias, dtype, rngs):
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=dtype,
                      precision=_precision(dtype), rngs=rngs)


def rope(x, cos, sin):
    """x [B,T,N,H]; cos, sin [B,T,H/2] -> x rotated by HF's half-split convention."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype, rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = _linear(d, n * h, cfg.qkv_bias, dtype, rngs)
        self.k_proj = _linear(d, k * h, cfg.qkv_bias, dtype, rngs)
        self.v_proj = _linear(d, k * h, cfg.qkv_bias, dtype, rngs)
        self.o_proj = _linear(n * h, d, cfg.o_bias, dtype, rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        self.layer, self.cfg = layer, cfg

    def __call__(self, x, cos, sin, kv, ctx):
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim)      # [B,T,N,H]
        k = self.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)   # [B,T,K,H]
        v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)   # [B,T,K,H]
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        k_pages = write_kv(kv[0], self.layer, ctx["page"], ctx["slot"], k)
        v_pages = write_kv(kv[1], self.layer, ctx["page"], ctx["slot"], v)
        out = kernels.paged_attention(
            q, k_pages[self.layer], v_pages[self.layer], ctx["page_table"], ctx["positions"],
            ctx["kv_lens"], impl=ctx["attn_impl"], sliding_window=cfg.sliding_window)
        return self.o_proj(out.reshape(b, t, -1)), (k_pages, v_pages)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(d, f, cfg.mlp_bias, dtype, rngs)
        self.up_proj = _linear(d, f, cfg.mlp_bias, dtype, rngs)
        self.down_proj = _linear(f, d, cfg.mlp_bias, dtype, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype, rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, layer, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, rngs)

    def __call__(self, x, cos, sin, kv, ctx):
        attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, kv, ctx)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class Llama(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                      param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype, rngs)
                                for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, False, dtype, rngs)
        self.cfg = cfg

    def __call__(self, tokens, positions, k_pages, v_pages, page_table, kv_lens,
                 attn_impl="auto"):
        """Runs tokens [B,T] at positions [B,T] (-1 = padding) over rows whose pages are
        page_table [B,M] and who hold kv_lens [B] tokens once these are written.

        Writes every non-padding token's K/V into k_pages / v_pages [L,P,G,K,H] and returns
        (hidden [B,T,D] after the final norm, k_pages', v_pages').
        """
        page, slot = slot_addresses(page_table, positions, k_pages.shape[2])
        ctx = {"page": page, "slot": slot, "page_table": page_table, "positions": positions,
               "kv_lens": kv_lens, "attn_impl": attn_impl}
        inv_freq = jnp.asarray(self.cfg.rope.inv_freq(self.cfg.head_dim))     # [H/2]
        angles = jnp.maximum(positions, 0).astype(jnp.float32)[..., None] * inv_freq
        cos, sin = jnp.cos(angles), jnp.sin(angles)                           # [B,T,H/2]
        x = self.embed_tokens(tokens)                                         # [B,T,D]
        kv = (k_pages, v_pages)
        for layer in self.layers:
            x, kv = layer(x, cos, sin, kv, ctx)
        return self.norm(x), kv[0], kv[1]

    def logits(self, hidden):
        """hidden [...,D] -> float32 logits [...,V]."""
        if self.cfg.tie_word_embeddings:
            table = self.embed_tokens.embedding[...]                          # [V,D]
            return jnp.dot(hidden, table.T, precision=_precision(table.dtype)).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)
