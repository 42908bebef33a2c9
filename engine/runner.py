"""The device side of an engine: the model's weights, the KV cache, and the jitted calls that
carry out the scheduler's plans. `launch(plan)` packs a plan into one host buffer
(engine.packing), queues one jitted call and returns at once; `read(flight)` waits for that
call's one result and opens it. Page operations decided between launches (prefix-cache shares
and evictions, row releases) wait in `pages` and ride in the next launch (engine.page_ops);
host-tier copies run as calls of their own. Every launch is padded to a shape (engine.shapes) and
runs as that shape's compiled program (engine.programs; `warmup` compiles them ahead).
"""

import collections
import concurrent.futures
import dataclasses
import functools
import logging
import time

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kvcache
from engine import guided, launch_io, packing, parallel, sampling
from engine.config import EngineConfig
from engine.page_ops import PageOpQueue, PageOps, padded_ids, page_op, without_kv
from engine.plan import Plan
from engine.programs import Programs
from engine.request import Request
from engine.shapes import Buckets, Shape, bucket
from engine.step import DecodeState, loop_launch, mixed_launch

log = logging.getLogger("hybridkv")

# XLA compilations in this process, any function (persistent-cache hits included): a server
# that has compiled everything its traffic needs stops adding to it.
compiles = collections.Counter()


def _count_compile(event: str, seconds: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        compiles["xla"] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


@dataclasses.dataclass
class Flight:
    """A launch queued on the device whose result the host has not read yet."""
    out: jax.Array                   # its one int32 result
    key: tuple                       # its call signature: `result` opens `out` with it
    plan: Plan
    shape: Shape                     # the shape it ran as
    starts: tuple[int, ...] = ()     # where each of plan's chunks started


class ModelRunner:
    def __init__(self, graphdef, params, *, config: EngineConfig, spec: kvcache.PoolSpec,
                 pages_per_row: int, pool_pages: int, mesh, attn_impl: str, stop_ids: int,
                 vocab: int, precompile: str, ring: tuple[int, ...] = ()):
        """stop_ids: the most stop ids a request may carry (engine.limits, EOS included);
        vocab: the logits' width; precompile: when programs compile (engine.programs, "auto"
        resolved); ring: (layers, pages a row, scratch pages) of the ring pools
        (kvcache.page_table), if any."""
        self.config, self.spec, self.pages_per_row = config, spec, pages_per_row
        self.ring = ring
        self.vocab = vocab
        self.widths = launch_io.Widths(bucket(stop_ids, 4, 1 << 16), guided.mask_words(vocab))
        self.buckets = Buckets(config)
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
        ops = PageOps(shares=c.max_prefill_rows * pages_per_row,
                      drops=c.max_prefill_rows * pages_per_row,
                      releases=c.max_running_requests, admits=c.max_prefill_rows,
                      width=pages_per_row)
        self.pages = PageOpQueue(ops, self.host, None if cs is None else without_kv(cs))
        self._write_counts = page_op(lambda cache, rows, values: dataclasses.replace(
            cache, counts=cache.counts.at[rows].set(values, mode="drop")),
            out_shardings=None if cs is None else without_kv(cs))
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
        self.programs = Programs(self._compile, precompile)
        # Lazy compiles on a CPU may run two at a time: XLA's CPU compiler keeps one core busy a
        # program, and there is no autotuner timing kernels on a shared device (see warmup).
        self._overlap_compiles = precompile == "none" and jax.default_backend() == "cpu"
        self._timer = concurrent.futures.ThreadPoolExecutor(1, "hybridkv-timer")
        self._device_end = 0.0              # when the last timed launch ended
        self.device_busy_seconds = 0.0      # device time in model launches (the timer thread's)

    # -- the cache ------------------------------------------------------------------------------
    def _init_cache(self, num_pages: int) -> kvcache.KVCache:
        spec = dataclasses.replace(self.spec, num_pages=num_pages)
        return kvcache.init_cache(spec, self.config.max_running_requests, self.pages_per_row,
                                  self.vocab, *self.ring)

    def new_cache(self, num_pages: int) -> kvcache.KVCache:
        """An empty cache of num_pages pages, created where it lives (on a mesh, each device
        creates its share: none ever holds the whole pool)."""
        init = functools.partial(self._init_cache, num_pages)
        return jax.jit(init, out_shardings=self._cache_placement())()

    def _cache_placement(self):
        """The cache's shardings: the mesh's, or its one device (committed there, as the
        arrays that compiled programs return are, so page operations compile once)."""
        if self._cache_sharding is not None:
            return self._cache_sharding
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def _set_counts(self, reqs: list[Request]) -> None:
        """Sets the KVCache.counts rows of requests being admitted whose penalties read them,
        ahead of the launch that admits them (launches after it count what they draw)."""
        if reqs and self.cache.counts.shape[1]:
            c = self.config
            self.cache = self._write_counts(self.cache, *launch_io.counts_rows(
                reqs, c.max_prefill_rows, c.max_running_requests, self.vocab))

    def reset(self, num_pages: int) -> None:
        """A new empty cache of num_pages pages in place of one that cannot be trusted (a
        launch that held it failed); queued page operations and the host tier are dropped."""
        old, self.cache = self.cache, None
        for x in jax.tree.leaves(old):
            if not x.is_deleted():
                x.delete()
        self.pages.clear()
        self.host.clear()
        self.cache = self.new_cache(num_pages)

    def resize(self, num_pages: int, src=(), dst=()) -> None:
        """The pool at num_pages pages, held pages src -> dst moved first (kvcache.elastic)."""
        self.flush_ops()        # page ids queued before the move
        jax.block_until_ready(self.cache)   # resize deletes the old pages: not while in use
        log.info("KV pool: %d -> %d pages (%d moved)",
                 self.cache.num_pages, num_pages, len(src))
        cache, self.cache = self.cache, None
        cache = kvcache.elastic.resize(cache, num_pages, *padded_ids(src, dst))
        # On a mesh the page tables and allocator come back as XLA placed them: put them back
        # where every call expects them (the pages kept their sharding; a no-op for them).
        self.cache = cache if self.mesh is None else jax.device_put(cache, self._cache_sharding)
        if self.programs.mode == "background":     # the tight shapes of this size next
            self.programs.background(self.buckets.shapes_for(num_pages)[1], first=True)

    # -- page operations (engine.page_ops.PageOpQueue) ------------------------------------------
    def queue(self, plan: Plan) -> None:
        """Queues plan's releases and evictions for the next launch (its host moves run now)."""
        self.cache = self.pages.queue(self.cache, plan)

    def share(self, pages: list[int]) -> None:
        self.pages.share(pages)

    def flush_ops(self) -> None:
        """Runs the queued page operations now, in calls of their own."""
        self.cache = self.pages.flush(self.cache)

    # -- launches -------------------------------------------------------------------------------
    def launch(self, plan: Plan) -> Flight:
        """Queues plan's launch: a mixed step when it has chunks (every decode row feeds one
        token, every chunk its prompt tokens; the queued page operations and plan's admissions
        first), else plan.steps decode steps in one on-device loop. It runs as the compiled
        program that covers it at least cost (engine.programs)."""
        reqs = plan.decode + [r for r, _ in plan.chunks]
        level = max(sampling.level(r.params) for r in reqs)
        if any(r.params.prompt_logprobs is not None for r, _ in plan.chunks):
            level = sampling.PROMPT
        pages = self.cache.num_pages
        if not plan.chunks:
            need = self.buckets.loop(pages, len(plan.decode), plan.steps, level)
            shape, (program, key) = self.programs.get(need)
            state = launch_io.decode_state(plan.decode, shape.rows, shape.sampler,
                                            self.widths, plan.steps)
            out = self._run_loop(program, state)
            return Flight(out, key, plan, shape)
        need = self.buckets.step(pages, len(plan.decode), [n for _, n in plan.chunks], level)
        shape, (program, key) = self.programs.get(need)
        admits = [(req.row, kvcache.LAYOUT_CODES[req.layout], n, req.computed, hit)
                  for req, hit, n in plan.admit]
        self._set_counts([req for req, _, _ in plan.admit if sampling.penalizes(req.params)])
        feeds = []
        if shape.rows:
            tokens = np.zeros((shape.rows, 1), np.int32)
            tokens[:len(plan.decode), 0] = [launch_io.next_token(r) for r in plan.decode]
            feeds.append(launch_io.feed([(r, 1) for r in plan.decode], tokens, shape.sampler,
                                         self.widths))
        tokens = np.zeros((shape.chunk_rows, shape.chunk_len), np.int32)
        starts = tuple(r.computed for r, _ in plan.chunks)
        for i, ((r, n), start) in enumerate(zip(plan.chunks, starts)):
            tokens[i, :n] = r.tokens[start:start + n]
        targets = None
        if shape.sampler == sampling.PROMPT:
            targets = launch_io.prompt_targets(plan.chunks, starts, shape.chunk_len)
        feeds.append(launch_io.feed(plan.chunks, tokens, shape.sampler, self.widths,
                                    targets))
        self.cache, ops = self.pages.take(self.cache, admits)
        out, self.cache = self._timed(program, self.weights, self.cache,
                                      packing.pack((ops, tuple(feeds))))
        return Flight(out, key, plan, shape, starts)

    def _run_loop(self, program, state: DecodeState) -> jax.Array:
        """Queues a compiled decode loop over state, after the queued page operations."""
        ops_buf, _ = self._loop_ops()
        out, self.cache = self._timed(program, self.weights, self.cache, ops_buf,
                                      packing.pack(state))
        return out

    def _loop_ops(self) -> tuple:
        """(buffer, layout) of the queued page operations a decode loop carries out first."""
        if self.pages.pending():
            self.cache, ops = self.pages.take(self.cache)
            return packing.pack(ops), packing.layout_of(ops)
        return self._no_ops      # the empty operations, already on the device

    def decode(self, state: DecodeState, steps: int) -> tuple[jax.Array, tuple]:
        """Queues `steps` decode steps of state's rows (numpy arrays, any number of rows and
        stop ids) through the jitted loop, compiled when a shape is first met (for notebooks
        and benchmarks; the engine's launches go through `launch`). Returns (its packed
        result, the key `result` opens it with)."""
        layout = packing.layout_of(state)
        ops_buf, ops_layout = self._loop_ops()
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
        pages reserved), rows as (request, pages taken, tokens stored, tokens sampled, their
        log probabilities: per token (logprob, {token: logprob} of the most likely), or None
        where the request asked for none, and (prompt position, the same) of the prompt tokens
        a chunk predicts, for requests that want prompt_logprobs)); a row of a decode loop
        stores one token per token it samples, until a stop token or its budget. Raises if the
        pool refused pages that the scheduler counted as free."""
        plan = flight.plan
        result = self.result(flight.out, flight.key)
        if not plan.chunks:
            if result.stalled[:len(plan.decode)].any():
                raise RuntimeError("the pool ran out of pages the scheduler had counted")
            rows = []
            for i, (r, tokens, pages) in enumerate(zip(plan.decode, result.tokens,
                                                       result.pages)):
                steps = np.flatnonzero(tokens >= 0)
                lps = None if r.params.logprobs is None else [
                    launch_io.token_logprobs(r.params.logprobs, result.logprob[i, j],
                                             result.top_ids[i, j], result.top_logprobs[i, j])
                    for j in steps]
                rows.append((r, pages.tolist(), len(steps), tokens[steps].tolist(), lps, []))
            return [], rows
        if not result.admit_ok[:len(plan.admit)].all():
            raise RuntimeError("the pool refused pages that the scheduler had counted as free")
        admitted = [(req, row, n) for (req, _, n), row in
                    zip(plan.admit, result.admit_pages.tolist())]
        decode = bool(flight.shape.rows)
        groups = [[(r, 1) for r in plan.decode]] * decode + [plan.chunks]
        starts = [[0] * len(plan.decode)] * decode + [flight.starts]
        rows = []
        for group, feed, start in zip(groups, result.feeds, starts):
            if not feed.ok[:len(group)].all():
                raise RuntimeError("the pool ran out of pages the scheduler had counted")
            for i, ((r, n), c) in enumerate(zip(group, start)):
                lps = None if r.params.logprobs is None else [launch_io.token_logprobs(
                    r.params.logprobs, feed.logprob[i], feed.top_ids[i], feed.top_logprobs[i])]
                prompt = []
                if r.params.prompt_logprobs is not None and feed.prompt.logprob.shape[1]:
                    prompt = launch_io.read_prompt_logprobs(r, c, n, *(x[i] for x in feed.prompt))
                rows.append((r, feed.new_pages[i].tolist(), n, [int(feed.next[i])], lps,
                             prompt))
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

    # -- compiled programs (engine.programs) ----------------------------------------------------
    def _compile(self, shape: Shape) -> tuple:
        """shape's launch compiled ahead of time, on padding inputs and a pool of shape.pages
        pages that need not exist: (the program, the key its results open with)."""
        structs = jax.eval_shape(functools.partial(self._init_cache, shape.pages))
        placement = self._cache_placement()
        if not isinstance(placement, kvcache.KVCache):
            placement = jax.tree.map(lambda _: placement, structs)
        cache = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                             structs, placement)
        if shape.kind == "loop":
            state = launch_io.decode_state([], shape.rows, shape.sampler, self.widths)
            layout = packing.layout_of(state)
            ops_buf, ops_layout = self._no_ops
            traced = self._loop.trace(self.weights, cache, ops_buf, packing.pack(state),
                                      ops_layout=ops_layout, layout=layout,
                                      num_steps=shape.steps, attn_impl=self.attn_impl)
            key = ("loop", layout, shape.steps)
        else:
            groups = [(shape.rows, 1)] if shape.rows else []
            feeds = tuple(launch_io.feed([], np.zeros((b, n), np.int32), shape.sampler,
                                       self.widths)
                          for b, n in groups)
            chunk = (shape.chunk_rows, shape.chunk_len)
            feeds += (launch_io.feed([], np.zeros(chunk, np.int32), shape.sampler,
                                     self.widths, np.full(chunk, -1, np.int32)
                                     if shape.sampler == sampling.PROMPT else None),)
            inputs = (self.pages.ops.fill(), feeds)
            layout = packing.layout_of(inputs)
            traced = self._step.trace(self.weights, cache, packing.pack(inputs), layout=layout,
                                      attn_impl=self.attn_impl)
            key = ("step", layout)
        return traced.lower().compile(), key

    def expect_loop(self, rows: int, steps: int, level: int) -> None:
        """Says that a decode loop of `rows` rows, `steps` steps at this sampler level will
        likely follow the launch about to be made: where compiles are lazy and may overlap (a
        CPU), the compile thread compiles its program beside that launch's own."""
        need = self.buckets.loop(self.cache.num_pages, rows, steps, level)
        if self._overlap_compiles and not self.programs.has([need]):
            self.programs.background([need], first=True)

    def ready_for(self, pages: int) -> bool:
        """Whether launches at a pool of `pages` pages run without compiling first."""
        return self.programs.mode == "none" or self.programs.has(self.buckets.shapes_for(pages)[0])

    def warmup(self, sizes: tuple[int, ...], progress: bool = True) -> int:
        """Compiles programs ahead, as EngineConfig.precompile says (engine.programs), for the
        pool sizes `sizes` (one, or an elastic pool's, the current one among them), and the
        call that runs page operations on their own. "background": the largest shapes at the
        current size now; the largest at the other sizes and the rest at the current size in
        the compile thread. Returns the number of programs compiled before it returned.

        One at a time, never two compiles on one device: on the H100, compiling in 8 threads
        was slower (119 shapes in 268 s, against 74 in 97 s in one) and the server then
        decoded slower too (16.3k against 26.0k tokens/s at 64 rows), likely because XLA's
        autotuner timed its kernel candidates on a device shared by the other compiles. Still
        compiled when first met: an elastic pool's page copies when it resizes, and the host
        tier's copies and page drops."""
        mode = self.programs.mode
        if mode == "none":
            return 0
        self.cache = self.pages.run(self.cache, self.pages.ops.fill())
        pages = self.cache.num_pages
        first, rest = self.buckets.shapes_for(pages)
        others = [s for s in sizes if s != pages]
        if mode == "all":
            first += rest + [x for s in others for part in self.buckets.shapes_for(s) for x in part]
        self.programs.ahead(first, progress)
        if mode == "background":
            self.programs.background([x for s in others for x in self.buckets.shapes_for(s)[0]] + rest)
        return len(self.programs)

