"""Shared test helpers (tests/ is on sys.path through pyproject's pytest settings)."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_module(name: str):
    """bench/<name>.py loaded as the module bench_<name> (bench/ is scripts, not a package);
    registered in sys.modules first, where dataclasses look their module up while it runs.
    sys.path is put back after: scripts that import their neighbours put bench/ first on it,
    where bench/kernels.py would shadow the kernels package for every later import."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    path = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path
    return module


def nodes_below(root) -> list:
    """Every node of a kvcache.radix tree under root (root excluded), walked here rather than
    by the tree's own code, for checks."""
    out, stack = [], list(root.children.values())
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children.values())
    return out


def assert_lru_current(lru) -> None:
    """Every unlocked leaf of a kvcache.radix tier has an entry at its current last_access in
    the tier's LRU heap (other entries are stale, skipped on pop): evictions see every
    candidate, in LRU order."""
    current = {node for last_access, _, node in lru.heap if last_access == node.last_access}
    missing = [node for node in lru.leaves if not node.lock_count and node not in current]
    assert not missing, f"unlocked leaves missing from the LRU heap: {missing}"


def assert_cache_empty(cache, cached=()) -> None:
    """No row is taken and every page is free, but the trash page and `cached` (held once, by
    the prefix cache)."""
    pages = cache.num_pages
    refcount = np.asarray(cache.alloc.refcount)
    want = np.zeros(pages, np.int32)
    want[0] = 1
    want[list(cached)] = 1
    np.testing.assert_array_equal(refcount, want)
    top = int(cache.alloc.top)
    assert top == pages - 1 - len(cached)
    stack = np.asarray(cache.alloc.free_stack)
    assert stack[:top].tolist() == sorted(set(range(1, pages)) - set(cached), reverse=True)
    assert not stack[top:].any()
    assert not np.asarray(cache.page_table).any()
    assert not np.asarray(cache.lengths).any()
    assert not np.asarray(cache.layout).any()


def assert_host_tier_consistent(engine) -> None:
    """The host tier's store holds exactly the slots the prefix cache's host nodes name, within
    the tier's size, and memory for at least those."""
    radix = engine.scheduler.pool.radix
    slots = radix.host_slots() if radix is not None else []
    assert len(set(slots)) == len(slots), f"a host slot is held twice: {sorted(slots)}"
    assert sorted(engine.runner.host.slots()) == sorted(slots)
    assert len(slots) == engine.stats()["host_pages_cached"] <= engine.stats()["host_pages_total"]
    assert engine.runner.host.nbytes() >= len(slots) * engine.spec.bytes_per_page


def assert_pool_clean(llm_or_engine) -> None:
    """After every request finished: every page is free or held by the prefix cache, the
    scheduler's host mirror of the refcounts equals the device's, and the host tier is
    consistent."""
    engine = getattr(llm_or_engine, "engine", llm_or_engine)
    assert not engine.has_work(), "a launch is still in flight"
    sched = engine.scheduler
    assert not (sched.running or sched.waiting or sched.to_release), "requests are still live"
    cached = sched.pool.radix.pages() if sched.pool.radix is not None else []
    assert_cache_empty(engine.cache, cached)
    np.testing.assert_array_equal(np.asarray(engine.cache.alloc.refcount),
                                  sched.pool.ledger.refcount)
    assert sched.pool.ledger.free == int(engine.cache.alloc.top)
    assert sorted(sched.free_rows) == list(range(sched.max_rows))
    assert_host_tier_consistent(engine)


def scaled_checkpoint(directory, scales: bool):
    """The llama fixture with each layer's K and V made 4096x larger for KV head 0 and 64x
    smaller for head 1 (q_proj and o_proj undo it: the same model), so that fp8 pages at scale
    1.0 clip one head and round the other to zero. With scales, the per-head k_scale / v_scale
    tensors that bring both back in range."""
    shutil.copytree(FIXTURES / "llama", directory)
    weights = load_file(directory / "model.safetensors")
    cfg = json.loads((directory / "config.json").read_text())
    h, q_per_kv = cfg["head_dim"], cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    factor = np.array([4096.0, 1 / 64], np.float32)
    per_q_head = np.repeat(factor, q_per_kv * h)
    for i in range(cfg["num_hidden_layers"]):
        attn = f"model.layers.{i}.self_attn."
        for name in ("k_proj", "v_proj"):
            weights[attn + name + ".weight"] *= np.repeat(factor, h)[:, None]
        weights[attn + "q_proj.weight"] /= per_q_head[:, None]
        weights[attn + "o_proj.weight"] /= per_q_head[None, :]
        if scales:
            weights[attn + "k_scale"] = weights[attn + "v_scale"] = factor
    save_file(weights, directory / "model.safetensors")
    return directory
