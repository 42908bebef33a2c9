"""The device side of an engine: the model's weights, the KV cache, and the jitted calls that
carry out the scheduler's plans. `launch(plan)` packs a plan into one host buffer
(engine.packing), queues one jitted call and returns at once; `read(flight)` waits for that
call's one result and opens it. Page operations decided between launches (prefix-cache shares
and evictions, row releases) wait here and ride in the next launch (engine.page_ops); host-tier
copies run as calls of their own. Shapes are padded to buckets, so the calls compile a bounded
number of times (`step_shapes`, compiled ahead by `warmup`).
"""

import collections
import concurrent.futures
import dataclasses
import functools
import logging
import time

import jax
import numpy as np
import tqdm
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kvcache
from engine import packing, parallel
from engine.config import EngineConfig
from engine.page_ops import PageOps, PageOpsArrays
from engine.plan import Plan
from engine.request import Request
from engine.sampling import filters
from engine.step import DecodeState, Feed, SamplingArrays, loop_launch, mixed_launch

log = logging.getLogger("hybridkv")

# XLA compilations in this process, any function (persistent-cache hits included): a server
# that has compiled everything its traffic needs stops adding to it.
compiles = collections.Counter()


def _count_compile(event: str, seconds: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        compiles["xla"] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


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


@dataclasses.dataclass
class Flight:
    """A launch queued on the device whose result the host has not read yet."""
    out: jax.Array                   # its one int32 result
    key: tuple                       # its call signature, under which the result's layout is
    plan: Plan


class ModelRunner:
    def __init__(self, graphdef, params, *, config: EngineConfig, spec: kvcache.PoolSpec,
                 pages_per_row: int, pool_pages: int, mesh, attn_impl: str, stop_ids: int):
        """stop_ids: the most stop ids a request may carry (engine.limits, EOS included)."""
        self.config, self.spec, self.pages_per_row = config, spec, pages_per_row
        # Every decode launch carries this many stop ids a row: one compiled shape for all.
        self.stop_width = bucket(stop_ids, 4, 1 << 16)
        self.mesh, self.attn_impl = mesh, attn_impl
        c = config
        cs = rep = None     # the cache's and replicated out_shardings; None: XLA's choice
        if mesh is not None:
            shapes = jax.eval_shape(functools.partial(self._init_cache, pool_pages))
            cs = parallel.cache_shardings(shapes, mesh)
            rep = NamedSharding(mesh, P())
        self._cache_sharding = cs
        self.cache = self.new_cache(pool_pages)
        device = jax.devices()[0]
        self.host = kvcache.HostStore(device, kvcache.host_memory_kind(device))
        # Page operations wait in _shares, _drops and _releases for the next launch.
        self.ops = ops = PageOps(shares=c.max_prefill_rows * pages_per_row,
                                 drops=c.max_prefill_rows * pages_per_row,
                                 releases=c.max_running_requests, admits=c.max_prefill_rows,
                                 width=pages_per_row)
        self._shares: list[int] = []
        self._drops: list[int] = []
        self._releases: list[tuple[int, int, int]] = []
        no_ops = ops.fill()
        self._no_ops = (jax.device_put(packing.pack(no_ops), rep), packing.layout_of(no_ops))
        # Each launch's result layout, by its inputs' layout: recorded when the launch is traced
        # (a trace-time constant), read by the host to open the result.
        self._out_layouts: dict[tuple, packing.Layout] = {}
        # The graphdef and mesh are bound, not passed: a static argument is hashed on every call.
        # The params go in as their list of leaves: jit flattens a list in C++, nnx's State in
        # Python (~130 us a call for a 16-layer model, measured on a CPU).
        self.weights, treedef = jax.tree.flatten(params)
        out_layouts = self._out_layouts

        def step(weights, cache, buf, *, layout, attn_impl):
            ops_arrays, feeds = packing.unpack(buf, layout)
            result, cache = mixed_launch(graphdef, jax.tree.unflatten(treedef, weights), cache,
                                         ops_arrays, feeds, ops=ops, attn_impl=attn_impl,
                                         mesh=mesh)
            out_layouts["step", layout] = packing.layout_of(result)
            return packing.pack(result), cache

        def loop(weights, cache, ops_buf, buf, *, ops_layout, layout, num_steps, attn_impl):
            result, cache = loop_launch(graphdef, jax.tree.unflatten(treedef, weights), cache,
                                        packing.unpack(ops_buf, ops_layout),
                                        packing.unpack(buf, layout), ops=ops,
                                        num_steps=num_steps, attn_impl=attn_impl, mesh=mesh)
            out_layouts["loop", layout, num_steps] = packing.layout_of(result)
            return packing.pack(result), cache
        self._step = jax.jit(step, out_shardings=(rep, cs), donate_argnames="cache",
                             static_argnames=("layout", "attn_impl"))
        self._loop = jax.jit(loop, out_shardings=(rep, cs), donate_argnames="cache",
                             static_argnames=("ops_layout", "layout", "num_steps", "attn_impl"))
        pages_cs = None if cs is None else without_kv(cs)
        self._page_ops = page_op(lambda cache, buf, layout: ops.apply(
            cache, packing.unpack(buf, layout))[0], out_shardings=pages_cs,
            static_argnums=2)
        self._drop = page_op(kvcache.drop_pages, out_shardings=pages_cs)
        self.shapes: set[tuple] = set()
        self._timer = concurrent.futures.ThreadPoolExecutor(1, "hybridkv-timer")
        self._device_end = 0.0              # when the last timed launch ended
        self.device_busy_seconds = 0.0      # device time in model launches (the timer thread's)

    # -- the cache ------------------------------------------------------------------------------
    def _init_cache(self, num_pages: int) -> kvcache.KVCache:
        spec = dataclasses.replace(self.spec, num_pages=num_pages)
        return kvcache.init_cache(spec, self.config.max_running_requests, self.pages_per_row)

    def new_cache(self, num_pages: int) -> kvcache.KVCache:
        """An empty cache of num_pages pages, created where it lives (on a mesh, each device
        creates its share: none ever holds the whole pool)."""
        if self.mesh is None:
            return self._init_cache(num_pages)
        init = functools.partial(self._init_cache, num_pages)
        return jax.jit(init, out_shardings=self._cache_sharding)()

    def reset(self) -> None:
        """A new empty cache at the current size in place of one that cannot be trusted (a
        launch that held it failed); queued page operations and the host tier are dropped."""
        num_pages = self.spec.num_pages if self.cache is None else self.cache.num_pages
        old, self.cache = self.cache, None
        for x in jax.tree.leaves(old):
            if not x.is_deleted():
                x.delete()
        self._shares, self._drops, self._releases = [], [], []
        self.host.clear()
        self.cache = self.new_cache(num_pages)

    def resize(self, num_pages: int, src=(), dst=()) -> None:
        """The pool at num_pages pages, held pages src -> dst moved first (kvcache.elastic)."""
        self.flush_ops()        # page ids queued before the move
        jax.block_until_ready(self.cache)   # resize deletes the old pages: not while in use
        log.info("KV pool: %d -> %d pages (%d moved); steps compile once per pool size",
                 self.cache.num_pages, num_pages, len(src))
        cache, self.cache = self.cache, None
        cache = kvcache.elastic.resize(cache, num_pages, *padded_ids(src, dst))
        # On a mesh the page tables and allocator come back as XLA placed them: put them back
        # where every call expects them (the pages kept their sharding; a no-op for them).
        self.cache = cache if self.mesh is None else jax.device_put(cache, self._cache_sharding)

    # -- page operations ------------------------------------------------------------------------
    def queue(self, plan: Plan) -> None:
        """Queues plan's releases and evictions for the next launch. Host moves (evicted leaves
        copied to the host tier, hits copied back) run now, after what was queued, and then
        their evictions: a copy reads its pages before anything reuses them."""
        self._releases += [(r.row, r.keep_from, r.keep_to) for r in plan.release]
        if not plan.host:
            self._drops += plan.evict
            return
        self.flush_ops()
        self.cache = self.host.apply(self.cache, plan.host)
        if plan.evict:
            self.cache = self._drop(self.cache, *padded_ids(plan.evict))

    def share(self, pages: list[int]) -> None:
        """One more holder (the prefix cache) for each page, in the next launch."""
        self._shares += pages

    def _take_ops(self, admits=()) -> PageOpsArrays:
        """The queued page operations and admits as PageOps arrays for the next launch; queued
        ones that do not fit beside the admissions run first, in calls of their own."""
        if not self.ops.fits(len(self._shares), len(self._drops), len(self._releases),
                             len(admits)):
            self.flush_ops()
        arrays = self.ops.fill(self._shares, self._drops, self._releases, admits)
        self._shares, self._drops, self._releases = [], [], []
        return arrays

    def _ops_pending(self) -> bool:
        return bool(self._shares or self._drops or self._releases)

    def flush_ops(self) -> None:
        """Runs the queued page operations now, in calls of their own: every share before any
        drop (an eviction may drop the reference a share adds) and every drop before any
        release, as in one launch."""
        while self._ops_pending():
            shares, self._shares = self._shares[:self.ops.shares], self._shares[self.ops.shares:]
            drops = [] if self._shares else self._drops[:self.ops.drops]
            self._drops = self._drops[len(drops):]
            releases = [] if self._shares or self._drops else self._releases[:self.ops.releases]
            self._releases = self._releases[len(releases):]
            arrays = self.ops.fill(shares, drops, releases)
            self.cache = self._page_ops(self.cache, packing.pack(arrays),
                                        packing.layout_of(arrays))

    # -- launches -------------------------------------------------------------------------------
    def launch(self, plan: Plan) -> Flight:
        """Queues plan's launch: a mixed step when it has chunks (every decode row feeds one
        token, every chunk its prompt tokens; the queued page operations and plan's admissions
        first), else plan.steps decode steps in one on-device loop."""
        if not plan.chunks:
            return self._launch_decode(plan)
        admits = [(req.row, kvcache.LAYOUT_CODES[req.layout], n, req.computed, hit)
                  for req, hit, n in plan.admit]
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
        inputs = (self._take_ops(admits), tuple(feeds))
        layout = packing.layout_of(inputs)
        self._log_shape(("step", *((f.tokens.shape, f.sampling.filtering) for f in feeds)))
        out, self.cache = self._timed(self._step, self.weights, self.cache,
                                      packing.pack(inputs), layout=layout,
                                      attn_impl=self.attn_impl)
        return Flight(out, ("step", layout), plan)

    def _launch_decode(self, plan: Plan) -> Flight:
        state = self._decode_state(plan.decode, self._loop_rows(len(plan.decode)))
        return Flight(*self.decode(state, plan.steps), plan)

    def decode(self, state: DecodeState, steps: int) -> tuple[jax.Array, tuple]:
        """Queues `steps` decode steps of state's rows (numpy arrays; padded to a bucket),
        after the queued page operations. Returns (its packed result, the key `result`
        opens it with)."""
        layout = packing.layout_of(state)
        if self._ops_pending():
            ops = self._take_ops()
            ops_buf, ops_layout = packing.pack(ops), packing.layout_of(ops)
        else:        # the empty operations, already on the device
            ops_buf, ops_layout = self._no_ops
        self._log_shape(("decode loop", *state.stop_ids.shape, state.sampling.filtering, steps))
        out, self.cache = self._timed(self._loop, self.weights, self.cache, ops_buf,
                                      packing.pack(state), ops_layout=ops_layout, layout=layout,
                                      num_steps=steps, attn_impl=self.attn_impl)
        return out, ("loop", layout, steps)

    def result(self, out: jax.Array, key: tuple):
        """A launch's packed result read (waiting for it) and opened: a LoopResult or a
        MixedResult of numpy arrays (engine.step)."""
        return packing.unpack(np.asarray(out), self._out_layouts[key])

    def read(self, flight: Flight) -> tuple[list[tuple], list[tuple]]:
        """Waits for a launch's result. Returns (admissions as (request, its page-table row,
        pages reserved), rows as (request, pages taken, tokens stored, tokens sampled)); a row
        of a decode loop stores one token per token it samples, until a stop token or its
        budget. Raises if the pool refused pages that the scheduler counted as free."""
        plan = flight.plan
        result = self.result(flight.out, flight.key)
        if not plan.chunks:
            if result.stalled[:len(plan.decode)].any():
                raise RuntimeError("the pool ran out of pages the scheduler had counted")
            rows = []
            for r, tokens, pages in zip(plan.decode, result.tokens, result.pages):
                emitted = [int(t) for t in tokens if t >= 0]
                rows.append((r, pages.tolist(), len(emitted), emitted))
            return [], rows
        if not result.admit_ok[:len(plan.admit)].all():
            raise RuntimeError("the pool refused pages that the scheduler had counted as free")
        admitted = [(req, row, n) for (req, _, n), row in
                    zip(plan.admit, result.admit_pages.tolist())]
        groups = ([[(r, 1) for r in plan.decode]] if plan.decode else []) + [plan.chunks]
        rows = []
        for group, feed in zip(groups, result.feeds):
            if not feed.ok[:len(group)].all():
                raise RuntimeError("the pool ran out of pages the scheduler had counted")
            rows += [(r, feed.new_pages[i].tolist(), n, [int(feed.next[i])])
                     for i, (r, n) in enumerate(group)]
        return admitted, rows

    def _timed(self, fn, *args, **kwargs) -> tuple:
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
        self.device_busy_seconds += end - max(queued, self._device_end)
        self._device_end = end

    # -- inputs ---------------------------------------------------------------------------------
    @staticmethod
    def _sampling(reqs: list[Request], width: int) -> SamplingArrays:
        pad = width - len(reqs)
        p = [r.params for r in reqs]
        return SamplingArrays(
            temperature=np.asarray([x.temperature for x in p] + [0.0] * pad, np.float32),
            top_k=np.asarray([x.top_k for x in p] + [0] * pad, np.int32),
            top_p=np.asarray([x.top_p for x in p] + [1.0] * pad, np.float32),
            seed=np.asarray([r.seed for r in reqs] + [0] * pad, np.uint32),
            filtering=any(filters(x) for x in p))

    def _feed(self, group, tokens: np.ndarray, b: int) -> Feed:
        """A Feed of group's (request, tokens fed) rows, padded to b rows."""
        reqs = [r for r, _ in group]
        pad = b - len(group)
        return Feed(rows=np.asarray([r.row for r in reqs] + [0] * pad, np.int32), tokens=tokens,
                    num=np.asarray([n for _, n in group] + [0] * pad, np.int32),
                    sampling=self._sampling(reqs, b))

    @staticmethod
    def _next_token(r: Request) -> int:
        """What decode row r feeds: -1 for its row's next_token when that is a sample the host
        has not read, else its last token (a prompt's last token, when a chunk left just that)."""
        return -1 if r.pending else (r.output[-1] if r.output else r.prompt[-1])

    def _decode_state(self, reqs: list[Request], b: int) -> DecodeState:
        """The DecodeState of a decode launch over reqs, padded to b rows."""
        stop = np.full((b, self.stop_width), -1, np.int32)
        for i, r in enumerate(reqs):
            stop[i, :len(r.stop_ids)] = r.stop_ids
        pad = b - len(reqs)
        remaining = np.asarray([r.budget for r in reqs] + [0] * pad, np.int32)
        return DecodeState(
            rows=np.asarray([r.row for r in reqs] + [0] * pad, np.int32),
            tokens=np.asarray([self._next_token(r) for r in reqs] + [0] * pad, np.int32),
            active=remaining > 0, remaining=remaining, stop_ids=stop,
            sampling=self._sampling(reqs, b))

    # -- compiled shapes ------------------------------------------------------------------------
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
                [(b, s) for b in loops for s in sorted({1, c.num_continuous_decode_steps})])

    def _log_shape(self, shape: tuple) -> None:
        if shape not in self.shapes:
            self.shapes.add(shape)
            log.info("compiling a %s for shape %s (lazily, once per bucket)", shape[0],
                     shape[1:])

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
        no_ops = self.ops.fill()
        for d, r, t in mixed:
            feeds = tuple(self._feed([], np.zeros((b, n), np.int32), b)
                          for b, n in ([(d, 1)] if d else []) + [(r, t)])
            inputs = (no_ops, feeds)
            key = ("step", *((f.tokens.shape, f.sampling.filtering) for f in feeds))
            calls.append((key, self._step, (packing.pack(inputs),),
                          {"layout": packing.layout_of(inputs)}))
        for b, steps in loops:
            state = self._decode_state([], b)
            key = ("decode loop", *state.stop_ids.shape, state.sampling.filtering, steps)
            # with page operations, and without (their buffer already on the device: a call
            # signature of its own, though no new compile)
            for ops in ((packing.pack(no_ops), packing.layout_of(no_ops)), self._no_ops):
                calls.append((key, self._loop, (ops[0], packing.pack(state)),
                              {"ops_layout": ops[1], "layout": packing.layout_of(state),
                               "num_steps": steps}))
        self.cache = self._page_ops(self.cache, packing.pack(no_ops), packing.layout_of(no_ops))
        for key, fn, args, kw in tqdm.tqdm(calls, desc="compiling step shapes",
                                           disable=not progress):
            _, self.cache = fn(self.weights, self.cache, *args, attn_impl=self.attn_impl, **kw)
            self.shapes.add(key)
        jax.block_until_ready(self.cache)
        return len({key for key, *_ in calls})
