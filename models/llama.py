"""One decoder for the Llama family (Llama 3.x, Qwen2/2.5, Qwen3, Mistral), Gemma 2 / 3 (text)
and the mixtures of experts Qwen3-MoE and Mixtral in Flax NNX.

Module and parameter names follow the HF checkpoints (`model.layers.0.self_attn.q_proj`), so
loading is a rename plus a transpose. K/V go straight into the paged cache: every call writes
its new tokens into their pages and attends through `kernels.paged_attention`.

Gemma differs by switches of ModelConfig (`gemma`): embeddings times sqrt(hidden), (1 + w)
RMSNorm in float32, a norm after attention and around the MLP too, GeGLU, the kernels' logit
soft-cap, a final-logit soft-cap, and q.k over sqrt(query_pre_attn_scalar) (the query is
scaled so the kernels keep their 1/sqrt(head_dim)). Its local layers attend through a sliding
window with their own RoPE base (Gemma 3). Given ring pools (kvcache.page_table), the local
layers keep window-sized KV there, addressed by each group's `ring_table` (a prompt chunk
through scratch pages); otherwise they keep every page as the global layers do.

Qwen3-MoE's and Mixtral's sparse layers (`MoE`) route each token to its top-k experts: the
(token, expert) pairs are sorted by expert and the experts run as grouped matmuls
(`kernels.grouped_matmul`: a Pallas kernel on a GPU, `jax.lax.ragged_dot` elsewhere and under
a mesh), one per projection for all experts, with no loop over experts.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

import kernels
from kvcache import slot_addresses, write_kv
from models.config import ModelConfig
from models.parallel import TP


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["tokens", "positions", "page_table", "kv_lens", "work",
                                "ring_table", "ring_fill", "ring_back"],
                   meta_fields=[])
@dataclasses.dataclass
class Group:
    """Rows that run together in one attention call."""
    tokens: jax.Array      # [B,T] int32
    positions: jax.Array   # [B,T] int32 absolute positions, -1 = padding
    page_table: jax.Array  # [B,M] int32 the rows' pages
    kv_lens: jax.Array     # [B] int32 tokens each row holds once these are written
    # The decode kernel's work plans (kernels.decode_work), one per window of cfg.windows, made
    # once a step for every layer; None until the model makes them, and for calls that take
    # none.
    work: tuple | None = None
    # For calls with ring pools (kvcache.ring_group): [B,M] int32 the pages of the rows'
    # sliding-window layers; a prompt chunk's page copies (src, dst) into its scratch pages
    # before it is written and back into the ring after attention.
    ring_table: jax.Array | None = None
    ring_fill: tuple | None = None
    ring_back: tuple | None = None


class RMSNorm(nnx.Module):
    """Llama's: w * norm(x) in x's dtype. Gemma's (offset): norm(x) * (1 + w) in float32."""

    def __init__(self, dim: int, eps: float, dtype, offset: bool = False):
        self.weight = nnx.Param(jnp.zeros(dim, dtype) if offset else jnp.ones(dim, dtype))
        self.eps = eps
        self.offset = offset

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (xf * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...] * xf.astype(x.dtype)


def _precision(dtype):
    """float32 models compute in float32 on every backend (GPUs would otherwise use TF32)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _linear(d_in, d_out, bias, dtype, rngs):
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=dtype,
                      precision=_precision(dtype), rngs=rngs)


def rope(x, cos, sin):
    """x [S,N,H] (S tokens); cos, sin [S,H/2] -> x rotated by HF's half-split convention."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype, rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = _linear(d, n * h, cfg.qkv_bias, dtype, rngs)
        self.k_proj = _linear(d, k * h, cfg.qkv_bias, dtype, rngs)
        self.v_proj = _linear(d, k * h, cfg.qkv_bias, dtype, rngs)
        self.o_proj = _linear(n * h, d, cfg.o_bias, dtype, rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg.rms_norm_eps, dtype, cfg.gemma)
            self.k_norm = RMSNorm(h, cfg.rms_norm_eps, dtype, cfg.gemma)
        self.window = cfg.window(layer)
        # fp8 pages' scales a KV head, (k, v), from the checkpoint (models/loader.py): a stored
        # value times its scale is the value. Static (part of the graph), read only when the
        # pages are fp8; None is scale 1.0.
        self.kv_scales: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        self.cfg = cfg

    def __call__(self, x, cos, sin, kv, ctx, ring=False):
        """x [S,D]: the tokens of every group, flattened. Attention runs group by group, each
        with the decode plan of this layer's window. ring: kv are ring pools (window-sized KV,
        addressed by the groups' ring_table)."""
        cfg = self.cfg
        s = x.shape[0]
        q = self.q_proj(x).reshape(s, cfg.num_heads, cfg.head_dim)         # [S,N,H]
        k = self.k_proj(x).reshape(s, cfg.num_kv_heads, cfg.head_dim)      # [S,K,H]
        v = self.v_proj(x).reshape(s, cfg.num_kv_heads, cfg.head_dim)      # [S,K,H]
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if cfg.query_pre_attn_scalar is not None:
            q = (q * (cfg.head_dim / cfg.query_pre_attn_scalar) ** 0.5).astype(q.dtype)
        scaled = self.kv_scales is not None and jnp.dtype(kv[0].dtype).itemsize == 1
        if scaled:
            q, k, v = self._scale(q, k, v)
        attend = functools.partial(_attend, impl=ctx["attn_impl"], sliding_window=self.window,
                                   logit_softcap=cfg.attn_logit_softcap,
                                   plan=cfg.windows.index(self.window), ring=ring)
        if ctx["mesh"] is not None:
            # Pallas kernels cannot be partitioned by XLA: each device runs them on its own
            # query heads and the KV heads they read (the K axis of q, k, v and the pages).
            # No collective runs inside; check_vma is off because pallas_call outputs carry no
            # varying-axes type.
            heads, pages = P(None, TP, None), P(None, None, TP, None)
            attend = jax.shard_map(attend, mesh=ctx["mesh"],
                                   in_specs=(heads, heads, heads, pages, pages, P(), P(), P()),
                                   out_specs=(heads, pages, pages), check_vma=False)
        groups = ctx["groups"]
        if ring:
            groups = tuple(dataclasses.replace(g, page_table=g.ring_table) for g in groups)
        out, k_pages, v_pages = attend(q, k, v, kv[0], kv[1], ctx["ring_page" if ring else "page"],
                                       ctx["slot"], groups)
        if scaled:
            out = (out.astype(jnp.float32) * self._per_query_head(1)).astype(out.dtype)
        return self.o_proj(out.reshape(s, -1)), (k_pages, v_pages)

    def _per_query_head(self, which: int):
        """kv_scales[which] [K] -> [N,1], each query head its KV head's scale."""
        scale = jnp.asarray(self.kv_scales[which], jnp.float32)
        return jnp.repeat(scale, self.cfg.num_heads // self.cfg.num_kv_heads)[:, None]

    def _scale(self, q, k, v):
        """Scales folded in around the kernels, which then read fp8 pages at scale 1.0: K and
        V are stored divided by their scales, q.(k / s) * s = (q * s).(k / s), and the output
        is multiplied by V's scale (softmax weights sum to one). Outside shard_map, so each
        device gets its heads' scales."""
        k_scale, v_scale = (jnp.asarray(x, jnp.float32)[:, None] for x in self.kv_scales)
        q = (q.astype(jnp.float32) * self._per_query_head(0)).astype(q.dtype)
        return q, k.astype(jnp.float32) / k_scale, v.astype(jnp.float32) / v_scale


def _attend(q, k, v, k_pages, v_pages, page, slot, groups, *, impl, sliding_window,
            logit_softcap, plan, ring):
    """Writes k, v [S,K,H] into their slots of k_pages, v_pages [P,G,K,H] (page, slot [S]), then
    attends q [S,N,H] group by group (with each group's work[plan]). Returns (out [S,N,H],
    k_pages', v_pages'). ring: the pages are ring pools, where a group's ring_fill copies go
    before the writes and its ring_back copies after attention (kvcache.ring_group)."""
    def copy(pages, src_dst):
        src, dst = (x.ravel() for x in src_dst)
        return pages.at[dst].set(pages[jnp.minimum(src, pages.shape[0] - 1)], mode="drop")

    for g in groups:
        if ring and g.ring_fill is not None:
            k_pages, v_pages = copy(k_pages, g.ring_fill), copy(v_pages, g.ring_fill)
    k_pages = write_kv(k_pages, page, slot, k)
    v_pages = write_kv(v_pages, page, slot, v)
    outs, start = [], 0
    for g in groups:
        b, t = g.tokens.shape
        qg = q[start:start + b * t].reshape(b, t, *q.shape[1:])                # [B,T,N,H]
        start += b * t
        out = kernels.paged_attention(qg, k_pages, v_pages, g.page_table, g.positions,
                                      g.kv_lens, impl=impl, sliding_window=sliding_window,
                                      logit_softcap=logit_softcap,
                                      work=None if g.work is None else g.work[plan])
        outs.append(out.reshape(b * t, *q.shape[1:]))
    for g in groups:
        if ring and g.ring_back is not None:
            k_pages, v_pages = copy(k_pages, g.ring_back), copy(v_pages, g.ring_back)
    return jnp.concatenate(outs), k_pages, v_pages


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(d, f, cfg.mlp_bias, dtype, rngs)
        self.up_proj = _linear(d, f, cfg.mlp_bias, dtype, rngs)
        self.down_proj = _linear(f, d, cfg.mlp_bias, dtype, rngs)
        self.gelu = cfg.gemma            # GeGLU (tanh GELU) in Gemma, SwiGLU elsewhere

    def __call__(self, x):
        gate = self.gate_proj(x)
        gate = jax.nn.gelu(gate, approximate=True) if self.gelu else jax.nn.silu(gate)
        return self.down_proj(gate * self.up_proj(x))


class Experts(nnx.Module):
    """E SwiGLU experts, their weights stacked: gate_proj, up_proj [E,D,F], down_proj [E,F,D]
    (HF keeps one [F,D] / [D,F] tensor an expert: models/loader.py stacks them)."""

    def __init__(self, cfg: ModelConfig, dtype, rngs):
        e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                    in_axis=-2, out_axis=-1, batch_axis=0)
        self.gate_proj = nnx.Param(init(rngs.params(), (e, d, f), dtype))
        self.up_proj = nnx.Param(init(rngs.params(), (e, d, f), dtype))
        self.down_proj = nnx.Param(init(rngs.params(), (e, f, d), dtype))

    def __call__(self, x, sizes, impl):
        """x [T,D]: tokens sorted by expert, sizes [E] of them each -> [T,D]. impl: the
        attention implementation's name, which picks the grouped product's too
        (kernels.grouped_matmul)."""
        dot = functools.partial(kernels.grouped_matmul, group_sizes=sizes, impl=impl)
        gate = dot(x, self.gate_proj[...])
        return dot(jax.nn.silu(gate) * dot(x, self.up_proj[...]), self.down_proj[...])


class MoE(nnx.Module):
    """Routing as HF computes it: softmax of the router's logits in float32, the top k
    (renormalised with norm_topk_prob), weights in x's dtype."""

    def __init__(self, cfg: ModelConfig, dtype, rngs):
        self.gate = _linear(cfg.hidden_size, cfg.num_experts, False, dtype, rngs)
        self.experts = Experts(cfg, dtype, rngs)
        self.top_k, self.normalise = cfg.experts_per_token, cfg.norm_topk_prob

    def __call__(self, x, impl):
        probs = jax.nn.softmax(self.gate(x).astype(jnp.float32), axis=-1)       # [S,E]
        weight, expert = jax.lax.top_k(probs, self.top_k)                        # [S,k]
        if self.normalise:
            weight = weight / weight.sum(axis=-1, keepdims=True)
        expert = expert.reshape(-1)
        order = jnp.argsort(expert, stable=True)                # (token, expert) pairs by expert
        token = order // self.top_k
        sizes = jnp.bincount(expert, length=probs.shape[-1]).astype(jnp.int32)
        out = self.experts(x[token], sizes, impl) * weight.astype(x.dtype).reshape(-1)[order, None]
        return jnp.zeros_like(x).at[token].add(out)


class DecoderLayer(nnx.Module):
    """Llama: post_attention_layernorm is the MLP's input norm. Gemma: it normalises the
    attention output, and pre_/post_feedforward_layernorm surround the MLP."""

    def __init__(self, cfg: ModelConfig, layer: int, dtype, rngs):
        norm = functools.partial(RMSNorm, cfg.hidden_size, cfg.rms_norm_eps, dtype, cfg.gemma)
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer, dtype, rngs)
        self.post_attention_layernorm = norm()
        if cfg.gemma:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = MoE(cfg, dtype, rngs) if cfg.moe_layers and cfg.moe_layers[layer] else \
            MLP(cfg, dtype, rngs)
        self.rope = cfg.rope_of(layer)

    def __call__(self, x, kv, ctx, ring=False):
        cos, sin = ctx["rope"][self.rope]
        attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, kv, ctx, ring)
        mlp = self.mlp
        if isinstance(mlp, MoE):
            mlp = functools.partial(mlp, impl=ctx["moe_impl"])
        if not self.self_attn.cfg.gemma:
            x = x + attn
            return x + mlp(self.post_attention_layernorm(x)), kv
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(mlp(self.pre_feedforward_layernorm(x))), kv


class Llama(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                      param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype, rngs)
                                for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, cfg.gemma)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, False, dtype, rngs)
        self.cfg = cfg

    def __call__(self, groups, k_pages, v_pages, attn_impl="auto", mesh=None, rings=((), ())):
        """Runs every Group of rows in one pass (the dense layers see all their tokens at once;
        attention runs per group, so decode rows and prefill chunks keep their own shapes).
        With a mesh, the params and pages are sharded over its "tp" axis (see models.parallel)
        and attention runs per device under shard_map.

        Writes every non-padding token's K/V into k_pages / v_pages (one [P,G,K,H] array per
        layer) and returns (hidden per group [B,T,D] after the final norm, k_pages', v_pages',
        rings'). rings: (k, v) ring pools of the sliding-window layers, in layer order (their
        pages then live there, at the groups' ring_table, and k_pages / v_pages hold the other
        layers'), or empty: every layer in k_pages / v_pages.
        """
        g = k_pages[0].shape[1]
        page, slot = zip(*(slot_addresses(x.page_table, x.positions, g) for x in groups))
        groups = self._planned(groups, k_pages[0], attn_impl, mesh)
        ctx = {"page": jnp.concatenate([p.ravel() for p in page]),
               "slot": jnp.concatenate([s.ravel() for s in slot]),
               "groups": groups, "attn_impl": attn_impl, "mesh": mesh,
               # A Pallas call cannot be partitioned by XLA: under a mesh the experts' product
               # stays ragged_dot, which XLA splits along F (models.parallel).
               "moe_impl": "reference" if mesh is not None else attn_impl}
        local = [layer.self_attn.window is not None for layer in self.layers]
        if rings[0]:
            if len(rings[0]) != sum(local) or all(local):
                raise ValueError(f"{len(rings[0])} ring pools for {sum(local)} sliding-window "
                                 f"layers of {len(local)}")
            ctx["ring_page"] = jnp.concatenate([
                slot_addresses(x.ring_table, x.positions, g)[0].ravel() for x in groups])
        positions = jnp.maximum(jnp.concatenate([g.positions.ravel() for g in groups]), 0)
        ctx["rope"] = {}                                  # RopeConfig -> cos, sin [S,H/2]
        for layer in self.layers:
            if layer.rope not in ctx["rope"]:
                inv_freq = jnp.asarray(layer.rope.inv_freq(self.cfg.head_dim))   # [H/2]
                angles = positions.astype(jnp.float32)[:, None] * inv_freq
                ctx["rope"][layer.rope] = jnp.cos(angles), jnp.sin(angles)
        x = self.embed_tokens(jnp.concatenate([g.tokens.ravel() for g in groups]))  # [S,D]
        if self.cfg.gemma:
            x = x * jnp.asarray(self.cfg.hidden_size ** 0.5, x.dtype)
        kv = {False: list(zip(k_pages, v_pages)), True: list(zip(*rings))}
        out = {False: [], True: []}
        for layer, in_ring in zip(self.layers, local):
            in_ring = in_ring and bool(rings[0])
            k, v = kv[in_ring][len(out[in_ring])]
            x, (k, v) = layer(x, (k, v), ctx, in_ring)
            out[in_ring].append((k, v))
        x = self.norm(x)
        hidden, start = [], 0
        for grp in groups:
            b, t = grp.tokens.shape
            hidden.append(x[start:start + b * t].reshape(b, t, -1))
            start += b * t
        k_out, v_out = (tuple(z) for z in zip(*out[False]))
        ring_out = tuple(tuple(z) for z in zip(*out[True])) or ((), ())
        return hidden, k_out, v_out, ring_out

    def _planned(self, groups, pages, attn_impl, mesh):
        """The groups with their decode work plans, one per window of cfg.windows, made here
        once for all layers (a plan depends on positions, lengths and the window only). Shapes
        are one device's under a mesh."""
        tp = mesh.shape[TP] if mesh is not None else 1
        p, g, k, h = pages.shape
        local = jax.ShapeDtypeStruct((p, g, k // tp, h), pages.dtype)
        def plans(group):
            q = jax.ShapeDtypeStruct((*group.tokens.shape, self.cfg.num_heads // tp, h),
                                     pages.dtype)
            work = tuple(kernels.decode_work(q, local, group.page_table, group.positions,
                                             group.kv_lens, impl=attn_impl, sliding_window=w)
                         for w in self.cfg.windows)
            return None if work[0] is None else work
        return tuple(dataclasses.replace(group, work=plans(group)) for group in groups)

    def logits(self, hidden):
        """hidden [...,D] -> float32 logits [...,V] (soft-capped where the model says)."""
        if self.cfg.tie_word_embeddings:
            table = self.embed_tokens.embedding[...]                          # [V,D]
            out = jnp.dot(hidden, table.T, precision=_precision(table.dtype)).astype(jnp.float32)
        else:
            out = self.lm_head(hidden).astype(jnp.float32)
        cap = self.cfg.final_logit_softcap
        return out if cap is None else cap * jnp.tanh(out / cap)
