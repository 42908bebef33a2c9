"""Tensor parallelism for a Llama: which weight axis each device holds on the "tp" mesh axis.

Megatron's split: q/k/v and gate/up are column-sharded (each device computes its own heads and
its own slice of F), o_proj and down_proj are row-sharded (each device multiplies its slice and
XLA sums the partial products over "tp"); MoE experts alike, each expert's F split over the
devices (every device holds a slice of every expert). Embeddings, norms, the router and
lm_head are replicated. With
more devices than KV heads, every KV head is repeated so that each device holds one (vLLM's
rule); the KV pages are then sharded along their K axis like the k/v projections.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

TP = "tp"
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


def kv_replicas(cfg, tp: int) -> int:
    """How many times each KV head is repeated for `tp` devices (1: the heads split evenly).
    Raises ValueError, naming the flag, when the model's heads or MLP do not split over tp."""
    flag = f"--tensor-parallel-size / tensor_parallel_size={tp}"
    if cfg.num_heads % tp:
        raise ValueError(f"{flag}: the model's {cfg.num_heads} attention heads do not split "
                         f"evenly over {tp} devices; choose a divisor of {cfg.num_heads}")
    for width in (cfg.intermediate_size, cfg.moe_intermediate_size):
        if width % tp:
            raise ValueError(f"{flag}: the model's MLP width {width} does not split evenly "
                             f"over {tp} devices; choose a divisor of it")
    k = cfg.num_kv_heads
    if k % tp == 0:
        return 1
    if tp % k == 0:
        return tp // k
    raise ValueError(f"{flag}: the model's {k} KV heads neither split evenly over {tp} devices "
                     f"nor divide {tp} (to be repeated on each); choose a divisor or a multiple "
                     f"of {k}")


def replicate_kv_heads(model, times: int) -> None:
    """Repeats every KV head of `model` `times` times in a row (in place): KV head k becomes
    heads k*times .. k*times + times - 1, so query head n, which read head n // Q, now reads
    head n // (Q / times), one of k's copies. The model computes the same function."""
    cfg = dataclasses.replace(model.cfg, num_kv_heads=model.cfg.num_kv_heads * times)
    for layer in model.layers:
        attn = layer.self_attn
        for proj in (attn.k_proj, attn.v_proj):
            kernel = proj.kernel[...]                                   # [D,K*H]
            d = kernel.shape[0]
            heads = kernel.reshape(d, -1, cfg.head_dim)                 # [D,K,H]
            proj.kernel.set_value(jnp.repeat(heads, times, axis=1).reshape(d, -1))
            if proj.bias is not None:
                bias = proj.bias[...].reshape(-1, cfg.head_dim)         # [K,H]
                proj.bias.set_value(jnp.repeat(bias, times, axis=0).ravel())
            proj.out_features *= times
        if attn.kv_scales is not None:                       # fp8 scales follow their heads
            attn.kv_scales = tuple(tuple(x for x in scales for _ in range(times))
                                   for scales in attn.kv_scales)
        attn.cfg = cfg
    model.cfg = cfg


def param_specs(params):
    """A PartitionSpec for every leaf of a Llama's nnx state (see the module docstring)."""
    def spec(path, x):
        module, leaf = (str(k.key) for k in path[-3:-1])   # (..., 'q_proj', 'kernel', .value)
        if module == "experts":                            # [E,D,F] / [E,F,D]: F split
            return P(None, TP, None) if leaf == "down_proj" else P(None, None, TP)
        if module in COLUMN:
            return P(None, TP) if leaf == "kernel" else P(TP)
        if module in ROW and leaf == "kernel":
            return P(TP, None)
        return P()
    return jax.tree_util.tree_map_with_path(spec, params)
