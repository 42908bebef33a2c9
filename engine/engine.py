"""The engine: a model, a KV pool, a scheduler, and the jitted calls that carry out its plans.

`Engine.step()` plans one launch on the host, runs it on the device and returns the requests
that advanced. It is not thread-safe: one thread drives it (engine.async_engine for the
server, a plain loop for `LLM.generate`).

Host work overlaps the device. A launch has no host sync inside (the sampler's filter choice is
static), so its call returns once its work is queued and the device runs it after. `step`
leaves its launch in flight; the next `step` plans and queues the following launch before it
reads that one's results (`Scheduler.schedule(lookahead=True)`: decode rows feed the tokens
the device sampled, `KVCache.next_token`), so the device has the next launch queued while the
host reads tokens, streams them and plans. A plan that needs the results first (preemption,
the prefix cache's host tier) reads every launch in flight before it goes on, as do `sync`,
`abort` and a shrink of the pool. A row that stopped in the launch being read is released
once the launch queued after it, which still feeds it, is read too.

Each launch is one call with one host buffer in and one array out: the page-table and
allocator updates decided since the last launch (prefix-cache shares and evictions, releases,
admissions) ride ahead of its model steps (engine.step.PageOps). Host-tier copies, and the
evictions that go with them, run as calls of their own, after what is queued; so does whatever
is queued when the engine goes idle.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kernels
import kvcache
from engine import envs, parallel
from engine.front import Front
from engine.sampling import SamplingParams, filters
from engine.scheduler import Plan, Request, Scheduler
from engine.step import (
    STATE_HEAD,
    PageOps,
    SamplingArrays,
    loop_launch,
    mixed_launch,
    pack_feed,
    pack_state,
    split_mixed,
)
from models import load_model

log = logging.getLogger("hybridkv")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
KV_POOLS = ("static", "elastic")

# XLA compilations in this process, any function (persistent-cache hits included): a server
# that has compiled everything its traffic needs stops adding to it.
_compiles = collections.Counter()


def _count_compile(event: str, seconds: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _compiles["xla"] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


@dataclasses.dataclass
class _Flight:
    """A launch queued on the device whose results the host has not read yet."""
    out: jax.Array                      # its one int32 result
    plan: Plan                          # what it runs (plan.chunks: a mixed step, or a loop)
    feeds: tuple = ()                   # a mixed step's feed shapes (split_mixed)


def use_compilation_cache(path: str | os.PathLike) -> None:
    """Turns on JAX's persistent compilation cache in `path` (~ expanded) for every compile,
    however quick, so a later process with the same step shapes loads them instead."""
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(os.fspath(path)))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def without_kv(cache: kvcache.KVCache) -> kvcache.KVCache:
    return dataclasses.replace(cache, k=(), v=())


def page_op(fn, **jit_kwargs):
    """jit(fn) for a page operation fn(cache, ...) -> cache' that reads and writes only the
    page tables and the allocator: the call gets the cache without its K/V arrays (two per
    layer, most of its leaves; a donated argument costs dispatch time per array), and they are
    put back into what it returns. The rest of the cache is donated."""
    jitted = jax.jit(fn, donate_argnums=0, **jit_kwargs)

    def call(cache: kvcache.KVCache, *args):
        return dataclasses.replace(jitted(without_kv(cache), *args), k=cache.k, v=cache.v)
    return call


def resolve_dtype(dtype: str):
    if dtype == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {['auto', *DTYPES]}")
    return DTYPES[dtype]


def bucket(n: int, lo: int, hi: int, factor: int = 2) -> int:
    """Smallest power of factor >= max(n, lo), capped at hi: shapes compile once per bucket."""
    b = 1
    while b < max(n, lo):
        b *= factor
    return min(b, hi)


def padded_ids(*ids) -> tuple[np.ndarray, ...]:
    """Equal-length id lists, each zero-padded to one bucket (calls compile once per bucket),
    then the mask of the real entries."""
    k = len(ids[0])
    n = bucket(k, 16, 1 << 30)
    out = np.zeros((len(ids), n), np.int32)
    out[:, :k] = ids
    return (*out, np.arange(n) < k)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes an engine. Defaults serve the embedded model on any backend."""
    model: str = "tiny-random"
    dtype: str = "auto"
    layout: str = "hybrid"
    static_max_tokens: int = 2048
    page_size: int = 16
    kv_pool: str = "static"
    kv_pool_min_tokens: int = 2048
    kv_pool_growth: int = 2
    kv_shrink_after: float = 5.0
    max_total_tokens: int | None = None
    mem_fraction_static: float = 0.9
    context_length: int | None = None
    max_running_requests: int = 32
    chunked_prefill_size: int = 512
    max_prefill_rows: int = 4
    decode_steps: int = 4
    disable_radix_cache: bool = False
    attention_impl: str | None = None
    tensor_parallel_size: int = 1
    host_kv_size: int = 0     # tokens of the prefix cache's host tier (kvcache.offload); 0: off

    def __post_init__(self):
        for name in ("max_running_requests", "chunked_prefill_size", "max_prefill_rows",
                     "decode_steps", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_pool not in KV_POOLS:
            raise ValueError(f"unknown kv_pool {self.kv_pool!r}; choose one of {list(KV_POOLS)}")
        if self.host_kv_size and (self.disable_radix_cache or self.tensor_parallel_size > 1):
            raise ValueError("host_kv_size (--host-kv-size) is a tier of the prefix cache: it "
                             "needs the radix cache on and does not support "
                             "tensor_parallel_size > 1 yet")
        if self.kv_pool_min_tokens < 1 or self.kv_pool_growth < 2 or self.kv_shrink_after < 0:
            raise ValueError(
                "need kv_pool_min_tokens >= 1, kv_pool_growth >= 2 and kv_shrink_after >= 0, got "
                f"{self.kv_pool_min_tokens}, {self.kv_pool_growth} and {self.kv_shrink_after}")
        if not 0 < self.mem_fraction_static <= 1:
            raise ValueError(f"mem_fraction_static must be in (0, 1], got "
                             f"{self.mem_fraction_static}")


class Engine:
    def __init__(self, config: EngineConfig = EngineConfig()):
        self.config = c = config
        self.policy = kvcache.LayoutPolicy(c.layout, c.static_max_tokens)
        self.attn_impl = kernels.resolve_impl(c.attention_impl or envs.ATTENTION)
        dtype = resolve_dtype(c.dtype)
        module, self.tokenizer = load_model(c.model, dtype)
        tp = c.tensor_parallel_size
        self.mesh = parallel.make_mesh(tp) if tp > 1 else None    # None: one device, no mesh
        if self.mesh is None:
            self.graphdef, self.params = nnx.split(module)
        else:
            self.graphdef, self.params = parallel.shard_model(module, self.mesh)
        self.model_config = cfg = module.cfg     # its KV heads repeated if tp > num_kv_heads
        self.context_length = c.context_length or cfg.max_position_embeddings
        if self.context_length > cfg.max_position_embeddings:
            raise ValueError(f"context_length={self.context_length} exceeds the model's "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        # Sized on one device, which holds its share of the weights and K/tp heads of each page.
        device = jax.devices()[0]
        spec = kvcache.size_pool(
            num_layers=cfg.num_layers, page_size=c.page_size, num_kv_heads=cfg.num_kv_heads // tp,
            head_dim=cfg.head_dim, dtype=jnp.dtype(dtype).name,
            weight_bytes=parallel.device_bytes(self.params, device), device=device,
            mem_fraction_static=c.mem_fraction_static, max_total_tokens=c.max_total_tokens,
            default_tokens=c.max_running_requests * self.context_length)
        self.spec = dataclasses.replace(spec, num_kv_heads=cfg.num_kv_heads)
        # spec is the largest pool; an elastic one starts at the smallest of its sizes.
        sizes = (self.spec.num_pages,)
        if c.kv_pool == "elastic":
            least = min(math.ceil(c.kv_pool_min_tokens / c.page_size) + 1, self.spec.num_pages)
            sizes = kvcache.pool_sizes(least, self.spec.num_pages, c.kv_pool_growth)
        # A row never holds more pages than the largest pool: the page table is no wider.
        self.pages_per_row = min(math.ceil(self.context_length / c.page_size),
                                 self.spec.num_pages - 1)
        cs = rep = None     # the cache's and replicated out_shardings; None: XLA's choice
        if self.mesh is not None:
            shapes = jax.eval_shape(functools.partial(self._init_cache, sizes[0]))
            cs = parallel.cache_shardings(shapes, self.mesh)
            rep = NamedSharding(self.mesh, P())
        self._cache_sharding = cs
        self.cache = self._new_cache(sizes[0])
        self.scheduler = Scheduler(
            pool_sizes=sizes, shrink_after=c.kv_shrink_after, page_size=c.page_size,
            max_rows=c.max_running_requests, row_width=self.pages_per_row, policy=self.policy,
            chunk_size=c.chunked_prefill_size, max_prefill_rows=c.max_prefill_rows,
            decode_steps=c.decode_steps, radix_cache=not c.disable_radix_cache,
            host_pages=kvcache.host_tier_pages(c.host_kv_size, self.spec))
        self.front = Front(tokenizer=self.tokenizer, vocab_size=cfg.vocab_size,
                           eos_token_ids=tuple(cfg.eos_token_ids),
                           context_length=self.context_length, page_size=c.page_size,
                           bytes_per_page=self.spec.bytes_per_page,
                           max_pages=self.scheduler.max_capacity)
        self.host = kvcache.HostStore(device, kvcache.host_memory_kind(device))
        # On a mesh every call returns the cache in the shardings it came in, so its donated
        # buffers are reused and no call reshards the pool.
        pages_cs = None if cs is None else without_kv(cs)
        # Page-table and allocator updates ride in the next model launch (engine.step.PageOps):
        # prefix-cache shares, evictions and row releases wait in _shares, _drops and _releases
        # until then.
        self.ops = ops = PageOps(shares=c.max_prefill_rows * self.pages_per_row,
                                 drops=c.max_prefill_rows * self.pages_per_row,
                                 releases=c.max_running_requests, admits=c.max_prefill_rows,
                                 width=self.pages_per_row)
        self._shares: list[int] = []
        self._drops: list[int] = []
        self._releases: list[tuple[int, int, int]] = []
        self._no_ops = jax.device_put(ops.pack(), rep)
        # The graphdef and mesh are bound, not passed: a static argument is hashed on every call.
        # The params go in as their list of leaves: jit flattens a list in C++, nnx's State in
        # Python (~130 us a call for a 16-layer model, measured on a CPU).
        self.weights, treedef = jax.tree.flatten(self.params)
        graphdef, mesh = self.graphdef, self.mesh

        def step(weights, cache, buf, *, feeds, attn_impl):
            return mixed_launch(graphdef, jax.tree.unflatten(treedef, weights), cache, buf,
                                ops=ops, feeds=feeds, attn_impl=attn_impl, mesh=mesh)

        def loop(weights, cache, ops_buf, state, *, filtering, num_steps, attn_impl):
            return loop_launch(graphdef, jax.tree.unflatten(treedef, weights), cache, ops_buf,
                               state, ops=ops, filtering=filtering, num_steps=num_steps,
                               attn_impl=attn_impl, mesh=mesh)
        self._forward = jax.jit(step, out_shardings=(rep, cs), donate_argnames="cache",
                                static_argnames=("feeds", "attn_impl"))
        self._loop = jax.jit(loop, out_shardings=(rep, cs), donate_argnames="cache",
                             static_argnames=("filtering", "num_steps", "attn_impl"))
        self._page_ops = page_op(lambda cache, buf: ops.apply(cache, buf)[0],
                                 out_shardings=pages_cs)
        self._drop = page_op(kvcache.drop_pages, out_shardings=pages_cs)
        self._shapes: set[tuple] = set()
        self.requests: dict[str, Request] = {}
        self._timer = concurrent.futures.ThreadPoolExecutor(1, "hybridkv-timer")
        self._device_end = 0.0              # when the last timed launch ended
        self._flights: collections.deque[_Flight] = collections.deque()   # oldest first
        self._ready: list[Request] = []     # advanced while draining, for the next step
        self._last_end: float | None = None
        # Wall time the engine was busy (steps, and gaps between steps while a launch ran), the
        # device's time in model launches (timed on the timer thread), model steps run, and
        # launches queued before the host read the one ahead. Busy minus device time is host
        # work the device waited for.
        self.timing = {"step_seconds": 0.0, "device_busy_seconds": 0.0, "device_steps": 0,
                       "overlapped_launches": 0}
        self._planned: Plan | None = None   # the plan `step` is carrying out
        # Calls that raised and were recovered from, and the requests they failed.
        self.errors = {"recoveries": 0, "failed_requests": 0}

    def _init_cache(self, num_pages: int) -> kvcache.KVCache:
        spec = dataclasses.replace(self.spec, num_pages=num_pages)
        return kvcache.init_cache(spec, self.config.max_running_requests, self.pages_per_row)

    def _new_cache(self, num_pages: int) -> kvcache.KVCache:
        """An empty cache of num_pages pages, created where it lives (on a mesh, each device
        creates its share: none ever holds the whole pool)."""
        if self.mesh is None:
            return self._init_cache(num_pages)
        init = functools.partial(self._init_cache, num_pages)
        return jax.jit(init, out_shardings=self._cache_sharding)()

    # -- requests ---------------------------------------------------------------------------
    def make_request(self, rid: str, prompt, params: SamplingParams) -> Request:
        """Validates a prompt (text or token ids) against the model, the context and the pool
        (engine.front.Front); raises InvalidRequest naming what is wrong."""
        return self.front.make_request(rid, prompt, params)

    def add(self, req: Request) -> None:
        if req.rid in self.requests:
            raise ValueError(f"request id {req.rid!r} is already in use")
        self.requests[req.rid] = req
        self.scheduler.add(req)

    def abort(self, rid: str) -> None:
        """Ends a request; a running one gives its row and pages back at once (after the
        launches in flight are read)."""
        req = self.requests.pop(rid, None)
        if req is not None:
            self.sync()
            self.scheduler.abort(req)
            self._apply_releases(self.scheduler.release_pending())
            self._flush_ops()

    def has_work(self) -> bool:
        return bool(self.scheduler.has_work() or self._flights or self._ready)

    def sync(self) -> None:
        """Reads every launch in flight and does its bookkeeping (the requests they advanced
        come out of the next `step`): afterwards `cache` and the scheduler agree."""
        while self._flights:
            self._ready += self._land(self._flights.popleft())
        self._flush_ops()

    def recover(self, error: BaseException) -> list[Request]:
        """After a call of this engine raised (a device error in a launch, say): fails the
        requests of the launches in flight and of the one being queued (finish_reason "error",
        `error` naming the cause) and makes the engine able to serve again. The pool is not
        trusted any more (its arrays went to the launch that failed, donated): it is created
        anew at its size, the prefix cache and its host tier are emptied, and every other
        running request goes back to the head of the queue, to run again from its tokens so
        far (greedy: the same tokens). Returns the failed requests and those that advanced but
        were not yet returned by `step`, for the caller to report."""
        cause = f"{type(error).__name__}: {error}"
        if len(cause) > 1000:                      # XLA's messages can run to pages
            cause = cause[:1000] + " ..."
        plan, self._planned = self._planned, None
        blamed = {r for r in self.scheduler.running if r.inflight}
        if plan is not None:
            blamed.update(plan.decode, (r for r, _ in plan.chunks))
        self._flights.clear()
        self._shares, self._drops, self._releases = [], [], []
        old, self.cache = self.cache, None
        for x in jax.tree.leaves(old):
            if not x.is_deleted():
                x.delete()
        running = self.scheduler.reset()
        self.host.clear()
        self.cache = self._new_cache(self.scheduler.num_pages)
        failed = []
        for req in reversed(running):
            if req in blamed:
                req.finish_reason = "error"
                req.error = f"a launch that held this request failed: {cause}"
                self.requests.pop(req.rid, None)
                failed.append(req)
            else:
                self.scheduler.requeue(req)
        self.errors["recoveries"] += 1
        self.errors["failed_requests"] += len(failed)
        log.error("recovered from %s: %d request(s) failed, %d requeued", cause, len(failed),
                  len(running) - len(failed))
        ready, self._ready = self._ready, []
        return list(dict.fromkeys(ready + failed[::-1]))

    # -- one launch -------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Plans and queues one launch, then reads the one queued before it; returns the
        requests that advanced (new tokens or finished). Finished requests leave `requests`;
        their rows go back once no launch that holds them is in flight. The launch queued
        here still runs when step returns."""
        start = time.perf_counter()
        if self._flights and self._last_end is not None:
            self.timing["step_seconds"] += start - self._last_end   # the device kept working
        advanced, self._ready = self._ready, []
        self.maintain()
        plan = self._planned = self.scheduler.schedule(lookahead=bool(self._flights))
        if plan.grow_to is not None:
            self._resize(plan.grow_to)
        self._apply_releases(plan)
        if plan.runs:
            self.timing["overlapped_launches"] += bool(self._flights)
            self._flights.append(self._run_mixed(plan) if plan.chunks else
                                 self._start_decode(plan))
        # Read what ran before this launch; everything, when the plan waits for it or ran
        # nothing (the next plan is then made on read results).
        keep = 1 if plan.runs and not plan.wait else 0
        while len(self._flights) > keep:
            advanced += self._land(self._flights.popleft())
        if not self.has_work():      # idle: the device agrees with the scheduler
            self._flush_ops()
        self._planned = None
        end = time.perf_counter()
        self.timing["step_seconds"] += end - start
        self._last_end = end
        return advanced

    def _finish(self, done: list[Request]) -> None:
        """Finished requests leave; their rows go back once no launch in flight holds them."""
        for req in done:
            self.requests.pop(req.rid, None)
            self.scheduler.finished(req)
        self._apply_releases(self.scheduler.release_pending())

    def _launch(self, fn, *args, **kwargs) -> tuple:
        """fn(*args, **kwargs), a model launch: returns its outputs once they are queued, not
        computed. The timer thread waits for each launch's first output (never donated) in
        turn: a launch keeps the device busy from the end of its dispatch, or the previous
        launch's end if later, to its own end. The dispatch itself (~2 ms for a 1B model's ~200
        arguments on a GPU) counts as host time when the device is idle meanwhile."""
        out = fn(*args, **kwargs)
        self._timer.submit(self._time_launch, time.perf_counter(), out[0])
        return out

    def _time_launch(self, queued: float, first) -> None:
        jax.block_until_ready(first)
        end = time.perf_counter()
        self.timing["device_busy_seconds"] += end - max(queued, self._device_end)
        self._device_end = end

    def _apply_releases(self, plan: Plan) -> None:
        """Queues plan's releases and evictions for the next launch. Host moves (evicted leaves
        copied to the host tier, hits copied back) run now, after what was queued, and then
        their evictions: a copy reads its pages before anything reuses them."""
        self._releases += [(r.row, r.keep_from, r.keep_to) for r in plan.release]
        if not plan.host:
            self._drops += plan.evict
            return
        self._flush_ops()
        self.cache = self.host.apply(self.cache, plan.host)
        if plan.evict:
            self.cache = self._drop(self.cache, *padded_ids(plan.evict))

    def _take_ops(self, admits=None):
        """The queued page operations, and admits, as one PageOps buffer for the next launch;
        queued ones that do not fit beside the admissions run first, in calls of their own.
        With none, the empty buffer already on the device."""
        if admits is None and not (self._shares or self._drops or self._releases):
            return self._no_ops
        if not self.ops.fits(len(self._shares), len(self._drops), len(self._releases),
                             0 if admits is None else len(admits)):
            self._flush_ops()
        buf = self.ops.pack(self._shares, self._drops, self._releases, admits)
        self._shares, self._drops, self._releases = [], [], []
        return buf

    def _flush_ops(self) -> None:
        """Runs the queued page operations now, in calls of their own: every share before any
        drop (an eviction may drop the reference a share adds) and every drop before any
        release, as in one buffer."""
        while self._shares or self._drops or self._releases:
            shares, self._shares = self._shares[:self.ops.shares], self._shares[self.ops.shares:]
            drops = [] if self._shares else self._drops[:self.ops.drops]
            self._drops = self._drops[len(drops):]
            releases = [] if self._shares or self._drops else self._releases[:self.ops.releases]
            self._releases = self._releases[len(releases):]
            self.cache = self._page_ops(self.cache, self.ops.pack(shares, drops, releases))

    def _sampling(self, reqs: list[Request], width: int) -> SamplingArrays:
        pad = width - len(reqs)
        p = [r.params for r in reqs]
        return SamplingArrays(
            temperature=np.asarray([x.temperature for x in p] + [0.0] * pad, np.float32),
            top_k=np.asarray([x.top_k for x in p] + [0] * pad, np.int32),
            top_p=np.asarray([x.top_p for x in p] + [1.0] * pad, np.float32),
            seed=np.asarray([r.seed for r in reqs] + [0] * pad, np.uint32),
            filtering=any(filters(x) for x in p))

    @staticmethod
    def _loop_shape(state: np.ndarray, filtering: bool, steps: int) -> tuple:
        """(rows, stop ids per row, filtering, steps) of a decode launch, its kind first."""
        return ("decode loop", state.shape[0], state.shape[1] - STATE_HEAD, filtering, steps)

    def _log_shape(self, shape: tuple) -> None:
        if shape not in self._shapes:
            self._shapes.add(shape)
            log.info("compiling a %s for shape %s (lazily, once per bucket)", shape[0],
                     shape[1:])

    # -- compiled shapes --------------------------------------------------------------------
    # A mixed step compiles once per (decode rows, chunk rows, chunk length) bucket, a decode
    # loop once per (rows, steps) bucket, per pool size. Decode rows in a mixed step go up in
    # powers of 4 (they cost one token each, so padding them is cheap), chunk lengths in powers
    # of 2 from 64: with the defaults 5 x 3 x 4 mixed shapes and 2 x 7 loops, which `warmup`
    # compiles at start-up.
    def _mixed_rows(self, n: int) -> int:
        return bucket(n, 1, self.config.max_running_requests, factor=4) if n else 0

    def _chunk_rows(self, n: int) -> int:
        return bucket(n, 1, self.config.max_prefill_rows)

    def _chunk_len(self, n: int) -> int:
        return bucket(n, 64, bucket(self.config.chunked_prefill_size, 16, 1 << 30))

    def _loop_rows(self, n: int) -> int:
        return bucket(n, 1, self.config.max_running_requests)

    def step_shapes(self) -> tuple[list, list]:
        """Every (decode rows, chunk rows, chunk length) of a mixed step and every (rows, steps)
        of a decode loop that the scheduler's plans can take, as padded to their buckets."""
        c = self.config
        dec = sorted({self._mixed_rows(n) for n in range(c.max_running_requests + 1)})
        rows = sorted({self._chunk_rows(n) for n in range(1, c.max_prefill_rows + 1)})
        lens = sorted({self._chunk_len(n) for n in range(1, c.chunked_prefill_size + 1)})
        loops = sorted({self._loop_rows(n) for n in range(1, c.max_running_requests + 1)})
        return ([(d, r, t) for d in dec for r in rows for t in lens],
                [(b, s) for b in loops for s in sorted({1, c.decode_steps})])

    def warmup(self, progress: bool = True) -> int:
        """Compiles every model launch of `step_shapes` at the current pool size, each run once
        on padding rows (which change no state), so that serving does not stop to compile.
        One at a time: on the H100, compiling in 8 threads was slower (119 shapes in 268 s,
        against 74 in 97 s in one) and the server then decoded slower too (16.3k against 26.0k
        tokens/s at 64 rows), likely because XLA's autotuner timed its kernel candidates on a
        device shared by the other compiles. Still compiled lazily, with a log line: sampling
        with top-k / top-p, other pool sizes of an elastic pool, requests with many stop ids,
        and the host tier's copies and page drops. Returns the shape count."""
        mixed, loops = self.step_shapes()
        calls = []
        for d, r, t in mixed:
            feeds = [self._feed([], np.zeros((b, n), np.int32), b)
                     for b, n in ([(d, 1)] if d else []) + [(r, t)]]
            buf = np.concatenate([self.ops.pack()] + [f.ravel() for f, _ in feeds])
            shapes = tuple(shape for _, shape in feeds)
            calls.append((("step", *shapes), self._forward, (buf,), {"feeds": shapes}))
        for b, steps in loops:
            state, filtering = self._decode_state([], b)
            # with page operations, and without (their buffer already on the device: a call
            # signature of its own, though no new compile)
            for ops in (self.ops.pack(), self._no_ops):
                calls.append((self._loop_shape(state, filtering, steps), self._loop,
                              (ops, state), {"filtering": filtering, "num_steps": steps}))
        self.cache = self._page_ops(self.cache, self.ops.pack())
        for key, fn, args, kw in tqdm.tqdm(calls, desc="compiling step shapes",
                                           disable=not progress):
            _, self.cache = fn(self.weights, self.cache, *args, attn_impl=self.attn_impl, **kw)
            self._shapes.add(key)
        jax.block_until_ready(self.cache)
        return len({key for key, *_ in calls})

    def _run_mixed(self, plan: Plan) -> _Flight:
        """Queues one step: every decode row feeds one token (`_next_token`), every chunk its
        prompt tokens; the queued page operations and plan's admissions go first, in the same
        launch."""
        m = self.pages_per_row
        admits = np.zeros((len(plan.admit), 4 + m), np.int32)   # PageOps' admission columns
        for i, (req, hit, n) in enumerate(plan.admit):
            admits[i, :4] = req.row, kvcache.LAYOUT_CODES[req.layout], n, req.computed
            admits[i, 4:4 + len(hit)] = hit
        feeds = []
        if plan.decode:
            b = self._mixed_rows(len(plan.decode))
            tokens = np.zeros((b, 1), np.int32)
            tokens[:len(plan.decode), 0] = [self._next_token(r) for r in plan.decode]
            feeds.append(self._feed([(r, 1) for r in plan.decode], tokens, b))
        b = self._chunk_rows(len(plan.chunks))
        tokens = np.zeros((b, self._chunk_len(max(n for _, n in plan.chunks))), np.int32)
        for i, (r, n) in enumerate(plan.chunks):
            tokens[i, :n] = r.tokens[r.computed:r.computed + n]
        feeds.append(self._feed(plan.chunks, tokens, b))
        shapes = tuple(shape for _, shape in feeds)
        self._log_shape(("step", *shapes))
        buf = np.concatenate([self._take_ops(admits)] + [f.ravel() for f, _ in feeds])
        self.scheduler.launched(plan)
        out, self.cache = self._launch(self._forward, self.weights, self.cache, buf,
                                       feeds=shapes, attn_impl=self.attn_impl)
        return _Flight(out, plan, shapes)

    def _feed(self, group, tokens, b) -> tuple[np.ndarray, tuple[int, int, bool]]:
        """(pack_feed's array, its (rows, tokens, filtering) for mixed_launch)."""
        reqs = [r for r, _ in group]
        pad = b - len(group)
        sampling = self._sampling(reqs, b)
        ints = pack_feed(rows=np.asarray([r.row for r in reqs] + [0] * pad, np.int32),
                         tokens=tokens,
                         num=np.asarray([n for _, n in group] + [0] * pad, np.int32),
                         sampling=sampling)
        return ints, (b, tokens.shape[1], sampling.filtering)

    @staticmethod
    def _next_token(r: Request) -> int:
        """What decode row r feeds: -1 for its row's next_token when that is a sample the host
        has not read, else its last token (a prompt's last token, when a chunk left just that)."""
        return -1 if r.pending else (r.output[-1] if r.output else r.prompt[-1])

    def _decode_state(self, reqs: list[Request], b: int) -> tuple[np.ndarray, bool]:
        """(pack_state's array, filtering) for a decode launch over reqs, padded to b rows."""
        e = bucket(max((len(r.stop_ids) for r in reqs), default=0), 4, 1 << 16)
        stop = np.full((b, e), -1, np.int32)
        for i, r in enumerate(reqs):
            stop[i, :len(r.stop_ids)] = r.stop_ids
        pad = b - len(reqs)
        sampling = self._sampling(reqs, b)
        return pack_state(rows=np.asarray([r.row for r in reqs] + [0] * pad, np.int32),
                          tokens=np.asarray([self._next_token(r) for r in reqs] + [0] * pad,
                                            np.int32),
                          remaining=np.asarray([r.budget for r in reqs] + [0] * pad, np.int32),
                          stop_ids=stop, sampling=sampling), sampling.filtering

    def _start_decode(self, plan: Plan) -> _Flight:
        """Queues plan.steps decode steps in one on-device loop."""
        b = self._loop_rows(len(plan.decode))
        state, filtering = self._decode_state(plan.decode, b)
        shape = self._loop_shape(state, filtering, plan.steps)
        self._log_shape(shape)
        self.scheduler.launched(plan)
        out, self.cache = self._launch(self._loop, self.weights, self.cache, self._take_ops(),
                                       state, filtering=filtering, num_steps=plan.steps,
                                       attn_impl=self.attn_impl)
        return _Flight(out, plan)

    def _land(self, flight: _Flight) -> list[Request]:
        """Reads a launch's results (waiting for it) and does the host's bookkeeping: page ids,
        tokens, finished requests. Returns the requests it advanced."""
        plan, out = flight.plan, np.asarray(flight.out)
        rows = self._read_mixed(flight, out) if plan.chunks else self._read_loop(plan, out)
        self.timing["device_steps"] += plan.steps
        chunked = {r for r, _ in plan.chunks}
        advanced = []
        for r, pages, stored, emitted in rows:
            if not self.scheduler.landed(plan, r, pages, stored) or r.finish_reason is not None:
                continue        # a chunk with prompt left to feed, or a row already finished
            if r in chunked:    # its prompt is stored: the prefix cache takes its full pages
                self._shares += self.scheduler.prefilled(r)
            for token in emitted:
                r.emit(token)
            advanced.append(r)
        self._finish([r for r in advanced if r.finish_reason is not None])
        return advanced

    def _read_mixed(self, flight: _Flight, out: np.ndarray) -> list[tuple]:
        """A mixed step's rows as (request, pages taken, tokens stored, tokens sampled); its
        admissions' reservations go to the scheduler first."""
        plan = flight.plan
        admit_ok, admit_pages, results = split_mixed(out, self.ops, flight.feeds,
                                                     self.config.page_size)
        if not admit_ok[:len(plan.admit)].all():
            raise RuntimeError("the pool refused pages that the scheduler had counted as free")
        for (req, _, n), row in zip(plan.admit, admit_pages.tolist()):
            self.scheduler.admitted(req, row, n)
        groups = ([[(r, 1) for r in plan.decode]] if plan.decode else []) + [plan.chunks]
        rows = []
        for group, (nxt, ok, new) in zip(groups, results):
            if not ok[:len(group)].all():
                raise RuntimeError("the pool ran out of pages the scheduler had counted")
            rows += [(r, new[i].tolist(), n, [int(nxt[i])]) for i, (r, n) in enumerate(group)]
        return rows

    @staticmethod
    def _read_loop(plan: Plan, out: np.ndarray) -> list[tuple]:
        """A decode loop's rows, as _read_mixed's: a row stores one token per token it
        samples, until a stop token or its budget."""
        steps = plan.steps
        tokens, pages, stalled = out[:, :steps], out[:, steps:2 * steps], out[:, 2 * steps]
        if stalled[:len(plan.decode)].any():
            raise RuntimeError("the pool ran out of pages the scheduler had counted")
        rows = []
        for i, r in enumerate(plan.decode):
            emitted = [int(t) for t in tokens[i] if t >= 0]
            rows.append((r, pages[i].tolist(), len(emitted), emitted))
        return rows

    # -- maintenance ------------------------------------------------------------------------
    def maintain(self) -> float | None:
        """Shrinks an elastic pool that has been oversized long enough (see Scheduler), after
        reading the launches in flight. Returns the seconds until a shrink may be due (for an
        idle caller to sleep on), or None when none is pending."""
        target, wait = self.scheduler.shrink_due(time.monotonic())
        if target is not None and self._flights:
            self.sync()
            target, wait = self.scheduler.shrink_due(time.monotonic())
        if target is None:
            return wait
        plan = self.scheduler.release_pending()
        src, dst = self.scheduler.shrink(target, plan)
        self._apply_releases(plan)
        self._resize(target, src, dst)
        return None

    def _resize(self, num_pages: int, src=(), dst=()) -> None:
        """The pool at num_pages pages, held pages src -> dst moved first (kvcache.elastic)."""
        self._flush_ops()       # page ids queued before the move
        jax.block_until_ready(self.cache)   # resize deletes the old pages: not while in use
        log.info("KV pool: %d -> %d pages (%d moved); steps compile once per pool size",
                 self.cache.num_pages, num_pages, len(src))
        cache, self.cache = self.cache, None
        cache = kvcache.elastic.resize(cache, num_pages, *padded_ids(src, dst))
        # On a mesh the page tables and allocator come back as XLA placed them: put them back
        # where every call expects them (the pages kept their sharding; a no-op for them).
        self.cache = cache if self.mesh is None else jax.device_put(cache, self._cache_sharding)

    def flush_cache(self) -> bool:
        """Empties the prefix cache; refuses (False) while requests are queued or running."""
        if self.has_work():
            return False
        self._apply_releases(self.scheduler.flush())
        self._flush_ops()
        return True

    def stats(self) -> dict:
        return self.scheduler.stats() | self.timing | self.errors | {
            "compiled_shapes": len(self._shapes), "xla_compiles": _compiles["xla"],
            "host_bytes": self.host.nbytes()}
