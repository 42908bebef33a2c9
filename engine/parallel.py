"""Tensor parallelism in the engine: the "tp" mesh and where the params and the KV cache live.

Params are split as models.parallel says; the KV pages [P,G,K,H] are sharded along K, so each
device holds every page for its own KV heads. The page table, lengths, layouts, allocator state
and everything sampling reads are replicated: every device takes the same decisions.
"""

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import kvcache
from models.parallel import TP, kv_replicas, param_specs, replicate_kv_heads


def make_mesh(tp: int) -> Mesh:
    """A 1-D mesh named "tp" over the first `tp` devices."""
    devices = jax.devices()
    if tp > len(devices):
        hint = (" (on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N devices)"
                if devices[0].platform == "cpu" else "")
        raise ValueError(f"--tensor-parallel-size / tensor_parallel_size={tp} needs {tp} "
                         f"devices but JAX sees {len(devices)} {devices[0].platform} device(s); "
                         f"lower it{hint}")
    return Mesh(np.asarray(devices[:tp]), (TP,))


def shard_model(module, mesh: Mesh):
    """Repeats the module's KV heads if the mesh has more devices than KV heads, splits it and
    places its params on the mesh. Returns (graphdef, params)."""
    replicas = kv_replicas(module.cfg, mesh.size)
    if replicas > 1:
        replicate_kv_heads(module, replicas)
    graphdef, params = nnx.split(module)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params),
                             is_leaf=lambda x: isinstance(x, P))
    return graphdef, jax.device_put(params, shardings)


def cache_shardings(cache: kvcache.KVCache, mesh: Mesh) -> kvcache.KVCache:
    """A KVCache of shardings for `cache` (arrays or their shapes): pages (ring pools too)
    along K, the rest replicated."""
    pages = NamedSharding(mesh, P(None, None, TP, None))
    return dataclasses.replace(jax.tree.map(lambda _: NamedSharding(mesh, P()), cache),
                               k=tuple(pages for _ in cache.k), v=tuple(pages for _ in cache.v),
                               ring_k=tuple(pages for _ in cache.ring_k),
                               ring_v=tuple(pages for _ in cache.ring_v))


def device_bytes(tree, device: jax.Device) -> int:
    """Bytes of the arrays in `tree` that live on `device` (its shards of sharded arrays)."""
    return sum(shard.data.nbytes for x in jax.tree.leaves(tree)
               for shard in x.addressable_shards if shard.device == device)
