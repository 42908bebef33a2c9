"""Abstract description of the page pool and its sizing, before anything is allocated."""

import dataclasses
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


class PoolDoesNotFit(ValueError):
    """The requested pool is larger than the memory that can hold it."""


@dataclasses.dataclass(frozen=True)
class PoolSpec:
    num_layers: int
    num_pages: int      # page 0, the trash page, included
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    def __post_init__(self):
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if self.num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is the trash page), "
                             f"got {self.num_pages}")

    @property
    def layer_struct(self) -> jax.ShapeDtypeStruct:
        """K (and, alike, V) of one layer: [P,G,K,H]. The cache holds one array per layer, so
        a kernel reads a layer's pages in place (a slice of an [L,P,G,K,H] array would be
        copied into a buffer of its own before every custom call)."""
        shape = (self.num_pages, self.page_size, self.num_kv_heads, self.head_dim)
        return jax.ShapeDtypeStruct(shape, jnp.dtype(self.dtype))

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * jnp.dtype(
            self.dtype).itemsize

    @property
    def bytes_per_page(self) -> int:
        return self.bytes_per_token * self.page_size

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_page * self.num_pages

    @property
    def capacity_tokens(self) -> int:
        return (self.num_pages - 1) * self.page_size


# A CPU pool's default budget, when --max-total-tokens does not set it: the host's memory is
# shared with everything else on it (vLLM's CPU backend defaults its KV cache to 4 GiB). 1 GiB
# holds ~23k tokens of SmolLM2-135M (46 KiB a token in float32), ~8k of a Llama-3-8B in
# bfloat16; a laptop's chat then peaks near 2 GB, not 5.5 (measured: serve.py --chat with the
# SmolLM2 GGUF).
CPU_POOL_BYTES = 1 << 30


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of host memory: /proc/meminfo's MemTotal and MemAvailable
    (what can be allocated without swapping), or sysconf's total and free pages elsewhere."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return (int(info["MemTotal"].split()[0]) * 1024,
                int(info["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")


def _unbounded_allocator() -> bool:
    return os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR") in ("cuda_async", "platform")


def device_memory_bytes(device: jax.Device) -> int:
    """Memory the device can give its arrays: the allocator's limit; on a GPU whose allocator
    has none (cuda_async or platform, which the elastic pool uses), the GPU's total memory from
    NVML; host RAM on a CPU."""
    if device.platform == "cpu":
        return host_memory()[0]
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit", 0) > 0 and not _unbounded_allocator():
        return int(stats["bytes_limit"])
    if device.platform == "gpu":
        import pynvml
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.local_hardware_id)
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        finally:
            pynvml.nvmlShutdown()
    raise ValueError(f"{device} reports no memory limit: size the pool with --max-total-tokens")


def free_memory_bytes(device: jax.Device) -> int | None:
    """Memory new arrays can take now (the weights already loaded): the host's available
    memory on a CPU; an allocator's limit less what it holds; None where unknown."""
    if device.platform == "cpu":
        return host_memory()[1]
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit", 0) > 0 and not _unbounded_allocator():
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return None


def size_pool(*, num_layers: int, page_size: int, num_kv_heads: int, head_dim: int,
              dtype: str, weight_bytes: int, device: jax.Device, mem_fraction_static: float,
              max_total_tokens: int | None, default_tokens: int) -> PoolSpec:
    """Pages for `max_total_tokens`, or else for what `mem_fraction_static` of the device leaves
    after the weights (weight_bytes: with whatever else the engine keeps there), capped at
    `default_tokens` (what the rows could ever hold) and, on a CPU, at CPU_POOL_BYTES. Never
    more than the memory free now.

    Raises PoolDoesNotFit, with bytes needed, bytes available and the flag to change.
    """
    if not 0.0 < mem_fraction_static <= 1.0:
        raise ValueError(f"mem_fraction_static must be in (0, 1], got {mem_fraction_static}")
    probe = PoolSpec(num_layers, 2, page_size, num_kv_heads, head_dim, dtype)
    budget = int(device_memory_bytes(device) * mem_fraction_static) - weight_bytes
    where = (f"are available on {device} (mem_fraction_static={mem_fraction_static} minus "
             f"{weight_bytes:,} bytes of weights and per-row state)")
    free = free_memory_bytes(device)
    if free is not None and free < budget:
        budget, where = free, f"are free on {device} now"
    if max_total_tokens is not None:
        if max_total_tokens < page_size:
            raise ValueError(f"max_total_tokens must be >= page_size ({page_size}), "
                             f"got {max_total_tokens}")
        pages = math.ceil(max_total_tokens / page_size) + 1
        needed = pages * probe.bytes_per_page
        if needed > budget:
            raise PoolDoesNotFit(
                f"a KV pool of {max_total_tokens} tokens needs {needed:,} bytes but "
                f"{max(budget, 0):,} bytes {where}; lower --max-total-tokens or "
                "raise --mem-fraction-static")
    else:
        if device.platform == "cpu":
            budget = min(budget, CPU_POOL_BYTES)
        pages = min(budget // probe.bytes_per_page, math.ceil(default_tokens / page_size) + 1)
        if pages < 2:
            raise PoolDoesNotFit(
                f"no room for a KV pool: one page needs {probe.bytes_per_page:,} bytes plus the "
                f"trash page, but {max(budget, 0):,} bytes {where}; raise "
                "--mem-fraction-static")
    return dataclasses.replace(probe, num_pages=int(pages))


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))
