"""The engine: a model, a KV pool, a scheduler, and a runner that carries out its plans.

`Engine.step()` plans one launch on the host (engine.scheduler), queues it on the device
(engine.runner) and returns the requests that advanced:

    plan = scheduler.schedule()  ->  runner.launch(plan)  ->  runner.read(flight)  ->  land

It is not thread-safe: one thread drives it (server.worker for the server, a plain loop for
`LLM.generate`).

Host work overlaps the device. A launch has no host sync inside (the sampler's filter choice is
static), so its call returns once its work is queued and the device runs it after. `step`
leaves its launch in flight; the next `step` plans and queues the following launch before it
reads that one's results (`Scheduler.schedule(lookahead=True)`: decode rows feed the tokens
the device sampled, `KVCache.next_token`), so the device has the next launch queued while the
host reads tokens, streams them and plans. A plan that needs the results first (preemption,
the prefix cache's host tier) reads every launch in flight before it goes on, as do `sync`,
`abort` and a shrink of the pool. A row that stopped in the launch being read is released
once the launch queued after it, which still feeds it, is read too. A guided row (structured
output, engine.guided) is the exception: its next draw needs the mask of its grammar after the
token in flight, so it sits out a plan made before that token is read.
"""

import collections
import dataclasses
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

import kernels
import kvcache
from engine import envs, limits, parallel, sampling
from engine.config import KV_CACHE_DTYPES, EngineConfig
from engine.front import Front
from engine.guided import Grammars
from engine.plan import Plan
from engine.request import Request
from engine.runner import Flight, ModelRunner, compiles
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.shapes import ring_plan
from models import load_model

log = logging.getLogger("hybridkv")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def use_compilation_cache(path: str | os.PathLike) -> None:
    """Turns on JAX's persistent compilation cache in `path` (~ expanded) for every compile,
    however quick, so a later process with the same step shapes loads them instead."""
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(os.fspath(path)))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def resolve_precompile(precompile: str) -> str:
    if precompile == "auto":
        return "none" if jax.default_backend() == "cpu" else "background"
    return precompile


def resolve_dtype(dtype: str):
    if dtype == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return DTYPES[dtype]


FP8 = {"fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}


def resolve_kv_dtype(kv_cache_dtype: str, dtype):
    """The KV pages' dtype: the model's for auto. fp8 needs a backend that converts it: any CPU
    or TPU, a GPU of compute capability 8.9 or later (the Triton path's fp8 loads)."""
    if kv_cache_dtype == "auto":
        return dtype
    if kv_cache_dtype not in FP8:
        return DTYPES[kv_cache_dtype]
    device = jax.devices()[0]
    if device.platform == "gpu" and kernels.compute_capability() < 8.9:
        others = [d for d in KV_CACHE_DTYPES if d not in FP8]
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} (--kv-cache-dtype) needs a GPU of "
                         f"compute capability 8.9 or later; {device.device_kind} has "
                         f"{kernels.compute_capability()}: choose one of {others}")
    return FP8[kv_cache_dtype]


class Engine:
    def __init__(self, config: EngineConfig | None = None):
        self.config = c = config or EngineConfig()
        self.policy = kvcache.LayoutPolicy(c.layout, c.static_max_tokens)
        attn_impl = kernels.resolve_impl(c.attention_impl)
        dtype = resolve_dtype(c.dtype)
        kv_dtype = resolve_kv_dtype(c.kv_cache_dtype, dtype)
        module, self.tokenizer = load_model(c.model, dtype)
        tp = c.tensor_parallel_size
        mesh = parallel.make_mesh(tp) if tp > 1 else None    # None: one device, no mesh
        if mesh is None:
            self.graphdef, self.params = nnx.split(module)
        else:
            self.graphdef, self.params = parallel.shard_model(module, mesh)
        self.model_config = cfg = module.cfg     # its KV heads repeated if tp > num_kv_heads
        self.context_length = c.context_length or cfg.max_position_embeddings
        if self.context_length > cfg.max_position_embeddings and not envs.ALLOW_LONGER_CONTEXT:
            raise ValueError(f"context_length={self.context_length} exceeds the model's "
                             f"max_position_embeddings={cfg.max_position_embeddings}; set "
                             "HYBRIDKV_ALLOW_LONGER_CONTEXT=1 to serve positions past those "
                             "it was trained on")
        ring_layers, ring, scratch = ring_plan(cfg, c, self.context_length)
        if ring_layers and c.host_kv_size:
            raise ValueError("host_kv_size (--host-kv-size) is a tier of the prefix cache, which "
                             "is off for a model whose sliding-window layers keep window-sized "
                             "KV; pass local_kv='full' (--local-kv full) to keep both")
        # Sized on one device, which holds its share of the weights and K/tp heads of each page.
        device = jax.devices()[0]
        counts_bytes = c.max_running_requests * cfg.vocab_size * 4     # KVCache.counts
        ring_bytes = kvcache.PoolSpec(
            ring_layers, 1 + c.max_running_requests * ring + scratch, c.page_size,
            cfg.num_kv_heads // tp, cfg.head_dim, jnp.dtype(kv_dtype).name).total_bytes \
            if ring_layers else 0
        spec = kvcache.size_pool(
            num_layers=cfg.num_layers - ring_layers, page_size=c.page_size,
            num_kv_heads=cfg.num_kv_heads // tp, head_dim=cfg.head_dim,
            dtype=jnp.dtype(kv_dtype).name, device=device,
            weight_bytes=parallel.device_bytes(self.params, device) + counts_bytes + ring_bytes,
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
        if ring >= self.pages_per_row:     # the pool is narrower than the context
            ring, scratch = self.pages_per_row, 0
        self.ring = (ring_layers, ring, scratch)
        self.runner = ModelRunner(self.graphdef, self.params, config=c, spec=self.spec,
                                  pages_per_row=self.pages_per_row, pool_pages=sizes[0],
                                  mesh=mesh, attn_impl=attn_impl,
                                  stop_ids=limits.MAX_STOP_TOKEN_IDS + len(cfg.eos_token_ids),
                                  vocab=cfg.vocab_size,
                                  precompile=resolve_precompile(c.precompile),
                                  ring=self.ring)
        self.scheduler = Scheduler(
            sizes=kvcache.elastic.PoolSizes(sizes, c.kv_shrink_after), page_size=c.page_size,
            max_rows=c.max_running_requests, row_width=self.pages_per_row, policy=self.policy,
            chunk_size=c.chunked_prefill_size, max_prefill_rows=c.max_prefill_rows,
            decode_steps=c.num_continuous_decode_steps,
            radix_cache=not (c.disable_radix_cache or ring_layers),
            host_pages=kvcache.host_tier_pages(c.host_kv_size, self.spec))
        if ring_layers:
            log.info("%d sliding-window layers keep window-sized KV: a ring of %d pages a row "
                     "(%.1f MiB in all); the prefix cache is off (--local-kv full keeps it)",
                     ring_layers, ring,
                     kvcache.nbytes((self.cache.ring_k, self.cache.ring_v)) / 2**20)
        # An elastic pool moves only to sizes whose programs are compiled (engine.programs).
        self.scheduler.pool.usable = self.runner.ready_for
        spec, pages = self.spec, sizes[0]
        log.info("KV pool (%s): %d tokens (%.1f MiB) in pages of %d, at most %d tokens "
                 "(%.1f MiB)", c.kv_pool, (pages - 1) * spec.page_size,
                 pages * spec.bytes_per_page / 2**20, spec.page_size, spec.capacity_tokens,
                 spec.total_bytes / 2**20)
        self.front = Front(tokenizer=self.tokenizer, vocab_size=cfg.vocab_size,
                           eos_token_ids=tuple(cfg.eos_token_ids),
                           context_length=self.context_length, page_size=c.page_size,
                           bytes_per_page=self.spec.bytes_per_page,
                           max_pages=self.scheduler.pool.max_capacity,
                           grammars=None if self.tokenizer is None else Grammars(
                               self.tokenizer, cfg.vocab_size, tuple(cfg.eos_token_ids)))
        self.requests: dict[str, Request] = {}
        self._flights: collections.deque[Flight] = collections.deque()   # oldest first
        self._ready: list[Request] = []     # advanced while draining, for the next step
        self._planned: Plan | None = None   # the plan `step` is carrying out
        self._last_end: float | None = None
        # Wall time the engine was busy (steps, and gaps between steps while a launch ran),
        # model steps run, and launches queued before the host read the one ahead. Busy minus
        # the runner's device time is host work the device waited for.
        self.timing = {"step_seconds": 0.0, "device_steps": 0, "overlapped_launches": 0}
        # Calls that raised and were recovered from, and the requests they failed.
        self.errors = {"recoveries": 0, "failed_requests": 0}

    @property
    def cache(self) -> kvcache.KVCache:
        """The KV cache: pages, page tables, allocator (a pytree of device arrays)."""
        return self.runner.cache

    @cache.setter
    def cache(self, cache: kvcache.KVCache) -> None:
        self.runner.cache = cache

    def warmup(self, progress: bool = True) -> int:
        """Compiles the step programs that EngineConfig.precompile says to compile before
        serving, and queues the rest for the compile thread (ModelRunner.warmup); returns the
        number compiled."""
        return self.runner.warmup(self.scheduler.pool.sizes.sizes, progress)

    # -- requests -------------------------------------------------------------------------------
    def make_request(self, rid: str, prompt, params: SamplingParams) -> Request:
        """Validates a prompt (text or token ids) against the model, the context and the pool
        (engine.front.Front); raises InvalidRequest naming what is wrong."""
        return self.front.make_request(rid, prompt, params)

    def add(self, req: Request) -> None:
        if req.rid in self.requests:
            raise ValueError(f"request id {req.rid!r} is already in use")
        if req.params.guided and req.matcher is None:
            req.matcher = self.front.grammars.matcher(req.params)
        self.requests[req.rid] = req
        self.scheduler.add(req)

    def abort(self, rid: str) -> None:
        """Ends a request; a running one gives its row and pages back at once (after the
        launches in flight are read)."""
        req = self.requests.pop(rid, None)
        if req is not None:
            self.sync()
            self.scheduler.abort(req)
            self.runner.queue(self.scheduler.release_pending())
            self.runner.flush_ops()

    def has_work(self) -> bool:
        return bool(self.scheduler.has_work() or self._flights or self._ready)

    def sync(self) -> None:
        """Reads every launch in flight and does its bookkeeping (the requests they advanced
        come out of the next `step`): afterwards `cache` and the scheduler agree."""
        while self._flights:
            self._ready += self._land(self._flights.popleft())
        self.runner.flush_ops()

    # -- one launch -----------------------------------------------------------------------------
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
            self.runner.resize(plan.grow_to)
        self.runner.queue(plan)
        if plan.chunks:
            self._expect_decode(plan)
        if plan.runs:
            self.timing["overlapped_launches"] += bool(self._flights)
            self._flights.append(self.runner.launch(plan))
            self.scheduler.launched(plan)
        # Read what ran before this launch; everything, when the plan waits for it or ran
        # nothing (the next plan is then made on read results).
        keep = 1 if plan.runs and not plan.wait else 0
        while len(self._flights) > keep:
            advanced += self._land(self._flights.popleft())
        if not self.has_work():      # idle: the device agrees with the scheduler
            self.runner.flush_ops()
        self._planned = None
        end = time.perf_counter()
        self.timing["step_seconds"] += end - start
        self._last_end = end
        return advanced

    def _expect_decode(self, plan: Plan) -> None:
        """A mixed step whose chunks end their prompts, with no request queued behind them, is
        followed by a decode loop of its rows: the runner is told, to compile that loop while
        the step's own program compiles (ModelRunner.expect_loop)."""
        if self.scheduler.waiting or any(r.computed + n < r.num_tokens for r, n in plan.chunks):
            return
        rows = [r for r in plan.decode + [r for r, _ in plan.chunks] if r.budget > 1]
        if not rows:
            return          # nothing left to decode after this launch's one draw a row
        steps = 1 if all(r.params.guided for r in rows) else self.scheduler.decode_steps
        self.runner.expect_loop(len(rows), steps, max(sampling.level(r.params) for r in rows))

    def _land(self, flight: Flight) -> list[Request]:
        """Reads a launch's results (waiting for it) and does the host's bookkeeping: page ids,
        tokens, finished requests. Returns the requests it advanced."""
        admitted, rows = self.runner.read(flight)
        plan = flight.plan
        for req, row_pages, reserve in admitted:
            self.scheduler.admitted(req, row_pages, reserve)
        self.timing["device_steps"] += plan.steps
        chunked = {r for r, _ in plan.chunks}
        advanced = []
        for r, pages, stored, emitted, logprobs, prompt_logprobs in rows:
            for position, lp in prompt_logprobs:
                r.prompt_logprob(position, lp)
            if not self.scheduler.landed(plan, r, pages, stored) or r.finish_reason is not None:
                continue        # a chunk with prompt left to feed, or a row already finished
            if r in chunked:    # its prompt is stored: the prefix cache takes its full pages
                self.runner.share(self.scheduler.prefilled(r))
            for token, lp in zip(emitted, logprobs or [None] * len(emitted)):
                r.emit(token, lp)
            advanced.append(r)
        self._finish([r for r in advanced if r.finish_reason is not None])
        return advanced

    def _finish(self, done: list[Request]) -> None:
        """Finished requests leave; their rows go back once no launch in flight holds them."""
        for req in done:
            self.requests.pop(req.rid, None)
            self.scheduler.finished(req)
        self.runner.queue(self.scheduler.release_pending())

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
        running = self.scheduler.reset()
        self.runner.reset(self.scheduler.pool.num_pages)   # the size the new ledger has
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

    # -- maintenance ----------------------------------------------------------------------------
    def maintain(self) -> float | None:
        """Shrinks an elastic pool that has been oversized long enough (see Scheduler), after
        reading the launches in flight. Returns the seconds until a shrink may be due (for an
        idle caller to sleep on), or None when none is pending."""
        target, wait = self.scheduler.pool.shrink_due(time.monotonic())
        if target is not None and self._flights:
            self.sync()
            target, wait = self.scheduler.pool.shrink_due(time.monotonic())
        if target is None:
            return wait
        plan = self.scheduler.release_pending()
        src, dst = self.scheduler.shrink(target, plan)
        self.runner.queue(plan)
        self.runner.resize(target, src, dst)
        return None

    def flush_cache(self) -> bool:
        """Empties the prefix cache; refuses (False) while requests are queued or running."""
        if self.has_work():
            return False
        self.runner.queue(self.scheduler.pool.flush())
        self.runner.flush_ops()
        return True

    def stats(self) -> dict:
        return self.scheduler.stats() | self.timing | self.errors | {
            "device_busy_seconds": self.runner.device_busy_seconds,
            "compiled_shapes": len(self.runner.programs), "xla_compiles": compiles["xla"],
            "shapes_pending": self.runner.programs.pending(),
            "request_path_compiles": self.runner.programs.request_path_compiles,
            "host_bytes": self.runner.host.nbytes()}
