"""Host-side scheduling: which requests run in the next launch, with exact page accounting.

The device allocates pages inside the step; the host never asks it how many are free. Page
demand is a function of sequence lengths, so the scheduler keeps a mirror of every page's
holders (engine.pool_view: the ledger, the prefix cache, the pool's size) and plans each
launch so that the pool covers it:

    release finished / aborted / preempted rows  ->  evict prefix-cache leaves  ->
    admit waiting requests (prefix hit, static reservation)  ->  run (chunks + decode rows)

A request's tokens are its prompt followed by its output; `computed` of them are in the cache.
Each launch feeds a row some of tokens[computed:]: a decode row its one last token, a prefill
row a chunk. When a feed reaches the end of the tokens, the token sampled after it is kept.
Preemption frees a paged request's row (its full pages go to the prefix cache) and puts it back
at the head of the queue; on resume it prefills prompt + output again, mostly from the cache.

The engine may plan a launch before it has read the one in flight (`schedule(lookahead=True)`).
The scheduler counts what a queued launch will do as done (`launched`): its tokens stored, its
pages taken (by number: their ids come with its results) and its samples drawn (their values
are on the device, where the next decode step reads them). A row that hit a stop token in the
launch in flight is planned again: the host finds out on reading it, drops what the row did
after, and releases the row once no queued launch holds it. What needs page ids or the device's
results (preemption, filling pages from the host tier) makes the plan wait (`Plan.wait`): the
engine reads every launch in flight first.

With a host tier (host_pages > 0), evicted prefix-cache leaves move to host memory, preempted
requests' pages included, and an admission whose match reaches them takes fresh pages for them
(counted like any other) that the engine fills from the host before the launch
(kvcache.radix, kvcache.offload).
"""

import collections

import numpy as np

from engine.plan import Plan, Release
from engine.pool_view import PoolView
from engine.request import Request
from engine.shapes import shared_chunk_len
from kvcache.allocator import TRASH_PAGE
from kvcache.elastic import PoolSizes
from kvcache.policy import LayoutPolicy


class Scheduler:
    """sizes: the page counts the pool may take (one: a static pool), starting at the first;
    an elastic pool grows when free and evictable pages do not cover a launch and shrinks when
    oversized (kvcache.elastic.PoolSizes). policy: the layout of each request and the pages it
    takes. host_pages: the prefix cache's host tier (0: none). `pool` is the host's view of
    the pool (engine.pool_view.PoolView)."""

    def __init__(self, *, sizes: PoolSizes, page_size: int, max_rows: int, row_width: int,
                 policy: LayoutPolicy, chunk_size: int, max_prefill_rows: int,
                 decode_steps: int, radix_cache: bool, host_pages: int = 0):
        self.g, self.policy = page_size, policy
        self.row_width, self.max_rows = row_width, max_rows
        self.chunk_size, self.max_prefill_rows = chunk_size, max_prefill_rows
        self.shared_len = shared_chunk_len(chunk_size, max_prefill_rows)
        self.decode_steps = decode_steps
        self.pool = PoolView(sizes, page_size, radix_cache, host_pages)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []   # in admission order: the last is preempted first
        self.free_rows = list(range(max_rows - 1, -1, -1))
        self.to_release: list[Request] = []
        self.preemptions = 0
        self.unread_pages = 0             # pages taken in launches the host has not read
        self.prompt_tokens = 0            # tokens looked up in the prefix cache, first admissions
        self.hit_tokens = 0               # of which found there
        self.host_hit_tokens = 0          # of which in the host tier

    # -- queue ------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def abort(self, req: Request) -> None:
        if req.finish_reason is not None:
            return
        req.finish_reason = "abort"
        if req in self.waiting:
            self.waiting.remove(req)
        elif req in self.running:
            self.running.remove(req)
            self.to_release.append(req)

    def finished(self, req: Request) -> None:
        self.running.remove(req)
        self.to_release.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.to_release)

    # -- pages ------------------------------------------------------------------------------
    def _need(self, req: Request, tokens: int) -> int:
        """Pages req must take to store `tokens` more (none for static rows: reserved)."""
        return self.policy.grow(req.layout, req.computed + tokens,
                                len(req.pages) + req.unread_pages, self.g)

    def _release(self, req: Request, plan: Plan) -> None:
        if req.inflight:
            raise RuntimeError("a row was released while a launch the host has not read holds it")
        release = Release(req.row)
        if self.pool.radix is not None:
            if req.node is not None:
                self.pool.radix.unlock(req.node)
            # A row planned past its stop token stored more than its tokens: those are garbage.
            full = min(req.computed, req.num_tokens) // self.g
            adopted = self.pool.radix.insert(req.prefix(full * self.g), req.pages[:full])
            release = Release(req.row, full - len(adopted), full)   # adopted: a suffix
        self.pool.ledger.drop(req.pages[:release.keep_from] + req.pages[release.keep_to:])
        plan.release.append(release)
        self.free_rows.append(req.row)
        req.row, req.pages, req.computed, req.node = -1, [], 0, None

    def shrink(self, num_pages: int, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        """Shrinks the pool to num_pages (PoolView.shrink). Only between launches, with no
        release pending."""
        if self.to_release:
            raise RuntimeError("shrink with releases pending")
        return self.pool.shrink(num_pages, plan, self.running)

    def _preempt(self, plan: Plan) -> Request | None:
        """The newest paged request gives its row back and waits at the head of the queue."""
        victims = [r for r in self.running if self.policy.preemptible(r.layout)]
        if not victims:
            return None
        req = victims[-1]
        self.running.remove(req)
        self._release(req, plan)
        self.requeue(req)
        return req

    # -- planning ---------------------------------------------------------------------------
    def release_pending(self, plan: Plan | None = None) -> Plan:
        """Releases the rows of finished and aborted requests (into plan, or a new one)."""
        plan = plan or Plan()
        for req in self.to_release:
            if not req.inflight:
                self._release(req, plan)
        self.to_release = [r for r in self.to_release if r.inflight]
        plan.host += self.pool.host_moves()
        return plan

    def schedule(self, lookahead: bool = False) -> Plan:
        """The next launch. lookahead: a launch the host has not read is in flight; the plan
        stops, with wait set, at what would need its results."""
        plan = self.release_pending()
        while True:
            self.pool.begin(self.unread_pages)
            self._plan_run(plan, lookahead)
            if plan.runs or plan.wait or not self._live():
                plan.host += self.pool.host_moves()
                return plan
            # Every running row waits for pages that only a preemption can free.
            if lookahead:
                plan.wait = True
            elif self._preempt(plan) is None:
                raise RuntimeError("static rows hold more pages than they reserved")

    def _live(self) -> list[Request]:
        """Running requests with tokens left to sample (the others finish when read)."""
        return [r for r in self.running if r.budget > 0]

    def _plan_run(self, plan: Plan, lookahead: bool) -> None:
        live = self._live()
        prefilling = [r for r in live if r.to_feed > 1]
        # A guided row's next draw needs its last token read (its grammar's mask): it sits out
        # plans made before that (engine.guided).
        decoding = [r for r in live if r.to_feed == 1 and not (r.pending and r.params.guided)]
        # Always decode_steps (rows that finish early idle in the loop): each distinct step
        # count would be one more compiled shape per batch bucket. Guided rows alone: one.
        plan.steps = self.decode_steps
        if prefilling or all(r.params.guided for r in decoding):
            plan.steps = 1
        # Decode rows first: the oldest requests keep running, the newest paged one yields.
        while not self.pool.make_room(sum(self._need(r, r.draws(plan.steps))
                                          for r in decoding), plan):
            if plan.steps > 1:
                plan.steps = 1
                continue
            if lookahead:
                plan.wait = True
                return
            victim = self._preempt(plan)
            if victim is None:
                raise RuntimeError("static rows hold more pages than they reserved")
            for group in (decoding, prefilling):
                if victim in group:
                    group.remove(victim)
        plan.decode = decoding
        for req in prefilling:
            room = self._chunk_room(plan)
            n = min(req.num_tokens - req.computed, room)
            if room == 0 or not self.pool.make_room(self._need(req, n), plan):
                return      # the queue waits behind a prefill that could not go on
            plan.chunks.append((req, n))
        while self.waiting and self.free_rows and self._chunk_room(plan) > 0:
            if not self._admit(self.waiting[0], self._chunk_room(plan), plan, lookahead):
                break
            self.waiting.popleft()
        if plan.chunks:
            plan.steps = 1

    def _chunk_room(self, plan: Plan) -> int:
        """Tokens the next prompt chunk of plan may have: a first chunk up to the step's budget;
        more chunks only beside short ones, each at most shared_len tokens (engine.shapes: a
        step's chunks are one long one or a few short ones)."""
        if not plan.chunks:
            return self.chunk_size
        lengths = [n for _, n in plan.chunks]
        if len(lengths) == self.max_prefill_rows or max(lengths) > self.shared_len:
            return 0
        return min(self.shared_len, self.chunk_size - sum(lengths))

    def _admit(self, req: Request, budget: int, plan: Plan, lookahead: bool) -> bool:
        """Admits req if the pool covers its reservation (static) or its whole remaining prompt
        (paged), evicting prefix-cache leaves as needed; the host tier's part of its prefix hit
        comes back into fresh pages (not while planning ahead: the host picks their ids); its
        first chunk, of at most `budget` tokens, joins plan. Returns whether it was admitted."""
        num_tokens = req.num_tokens
        hit, node, hosted = [], None, []
        # A request that wants its prompt's log probabilities computes the whole prompt.
        if self.pool.radix is not None and req.params.prompt_logprobs is None:
            keep = (num_tokens - 1) // self.g             # keep one token to feed
            hit, node, hosted = self.pool.radix.match_host(req.prefix(keep * self.g))
            if hosted and lookahead:
                plan.wait = True
                return False
            if hit or hosted:
                self.pool.radix.lock(node)
            else:
                node = None
        loads = sum(len(n.value) for n in hosted)
        adm = self.policy.admit(num_tokens, req.max_len, self.g, len(hit) + loads, req.layout)
        if not self.pool.make_room(adm.take + loads, plan):
            if node is not None:
                self.pool.radix.unlock(node)
            return False
        if loads:
            hit += self.pool.radix.load(hosted, self.pool.take_fresh(loads))
        req.layout, req.row, req.node = adm.layout, self.free_rows.pop(), node
        req.pages, req.computed = list(hit), len(hit) * self.g
        if not req.admitted_once:
            req.admitted_once, req.cached_tokens = True, req.computed
            req.host_cached_tokens = loads * self.g
            self.prompt_tokens += len(req.prompt)
            self.hit_tokens += req.computed
            self.host_hit_tokens += req.host_cached_tokens
        self.pool.ledger.share(hit)
        plan.admit.append((req, list(hit), adm.reserve))
        self.running.append(req)
        n = min(num_tokens - req.computed, budget)
        plan.chunks.append((req, n))
        return True

    def launched(self, plan: Plan) -> None:
        """The engine queued plan's launch: what it does counts as done from now on, for plans
        made before the host reads it; plan.expect keeps each row's part for `landed`."""
        reserve = {req: n for req, _, n in plan.admit}
        rows = [(r, r.draws(plan.steps), None) for r in plan.decode]
        rows += [(r, n, int(r.computed + n == r.num_tokens)) for r, n in plan.chunks]
        for req, n, samples in rows:
            pages = reserve.get(req, 0) + self._need(req, n)
            plan.expect[req] = (n, pages, n if samples is None else samples)
            req.computed += n
            req.pending += plan.expect[req][2]
            req.unread_pages += pages
            req.inflight += 1
            self.unread_pages += pages

    # -- results ----------------------------------------------------------------------------
    def landed(self, plan: Plan, req: Request, pages: list[int], stored: int) -> int:
        """req's part of plan's launch, read: the pages the device gave it (after its
        reservation, which `admitted` took) and the tokens it stored. A decode row that met a
        stop token stored fewer than planned. Returns the tokens it was planned to sample."""
        n, planned, samples = plan.expect[req]
        pages = [p for p in pages if p != TRASH_PAGE]
        if len(pages) > planned:
            raise RuntimeError(f"the device gave a row {len(pages)} pages where the plan "
                               f"counted {planned}")
        if pages:       # most decode steps take none: skip the ledger call (~10 us)
            self.pool.ledger.take(pages)
            req.pages += pages
        req.unread_pages -= planned
        self.unread_pages -= planned
        req.computed -= n - stored
        req.pending -= samples
        req.inflight -= 1
        return samples

    def admitted(self, req: Request, row_pages: list[int], reserve: int) -> None:
        """The admit call's page-table row: the hit pages, then `reserve` fresh ones."""
        fresh = row_pages[len(req.pages):len(req.pages) + reserve]
        self.pool.ledger.take(fresh)
        req.pages += fresh

    def prefilled(self, req: Request) -> list[int]:
        """req stored its whole prompt: its full pages join the prefix cache now, so requests
        admitted while it decodes share them. Returns the pages the cache took a reference to
        (the caller adds it on the device); req keeps its own until it is released."""
        if self.pool.radix is None:
            return []
        full = req.num_tokens // self.g
        adopted, node = self.pool.radix.insert_locked(req.prefix(full * self.g), req.pages[:full])
        self.pool.ledger.share(adopted)
        if req.node is not None:
            self.pool.radix.unlock(req.node)
        req.node = node if full else None
        return adopted

    def reset(self) -> list[Request]:
        """Forgets every page, after the device's pool was lost (engine.Engine.recover): a new
        ledger at the same pool size, an empty prefix cache, every row free. Returns the
        requests that held rows, in admission order, each as if it had never been admitted
        (with its output so far); the caller fails or requeues them. Requests that finished
        while a launch still held their rows are dropped."""
        running = self.running
        for req in running:
            req.row, req.pages, req.computed, req.node = -1, [], 0, None
            req.pending = req.unread_pages = req.inflight = 0
        self.pool.reset()
        self.running, self.to_release = [], []
        self.free_rows = list(range(self.max_rows - 1, -1, -1))
        self.unread_pages = 0
        return running

    def requeue(self, req: Request) -> None:
        """req (reset) waits at the head of the queue, to run again from its tokens so far."""
        req.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)

    def stats(self) -> dict:
        return self.pool.stats() | {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "preemptions": self.preemptions,
            "prompt_tokens": self.prompt_tokens,
            "hit_tokens": self.hit_tokens,
            "host_hit_tokens": self.host_hit_tokens,
        }
