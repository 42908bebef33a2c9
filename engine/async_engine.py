"""Drives an Engine on its own thread for asyncio callers (the HTTP server).

The engine thread owns the Engine: it takes submissions and aborts from an inbox between
steps, steps while there is work, and pushes each request's new tokens to the asyncio queue of
whoever waits for them. Callers never touch the Engine directly; `call` runs a function on the
engine thread between steps (flush the cache, read stats).
"""

import asyncio
import dataclasses
import logging
import queue
import threading
import time

from engine.engine import Engine
from engine.metrics import Metrics
from engine.scheduler import Request

log = logging.getLogger("hybridkv")


@dataclasses.dataclass(frozen=True)
class Update:
    tokens: tuple[int, ...]      # new output tokens since the last update
    finish_reason: str | None    # set on the last update: "stop", "length" or "abort"


class AsyncEngine:
    def __init__(self, engine: Engine, metrics: Metrics):
        self.engine, self.metrics = engine, metrics
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, list]] = {}
        self._thread = threading.Thread(target=self._run, name="hybridkv-engine", daemon=True)
        self._stop = False
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._inbox.put(("wake",))
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    # -- asyncio side -----------------------------------------------------------------------
    async def generate(self, req: Request):
        """Submits req and yields its Updates until it finishes. Cancelling the iteration (a
        client that went away) aborts the request, which frees its row and pages."""
        if not self.alive:
            raise RuntimeError("the engine thread has stopped")
        updates: asyncio.Queue = asyncio.Queue()
        self._inbox.put(("add", req, asyncio.get_running_loop(), updates))
        finished = False
        try:
            while not finished:
                update = await updates.get()
                if isinstance(update, BaseException):
                    raise RuntimeError("the engine failed") from update
                finished = update.finish_reason is not None
                yield update
        finally:
            if not finished:
                self._inbox.put(("abort", req.rid))

    def abort(self, rid: str) -> None:
        self._inbox.put(("abort", rid))

    async def call(self, fn):
        """fn() on the engine thread, between steps; returns its result."""
        future = asyncio.get_running_loop().create_future()
        self._inbox.put(("call", fn, asyncio.get_running_loop(), future))
        return await future

    # -- engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop:
                if self.engine.has_work():
                    self._drain(block=False)
                else:   # sleep until work arrives or an elastic pool's shrink is due
                    wait = self.engine.maintain()
                    self.metrics.snapshot(self.engine)
                    self._drain(block=True, timeout=wait)
                if self.engine.has_work():
                    start = time.perf_counter()
                    advanced = self.engine.step()
                    self.metrics.step(time.perf_counter() - start)
                    self._publish(advanced)
                self.metrics.snapshot(self.engine)
        except BaseException as e:   # noqa: BLE001 - every waiter must hear of it
            log.exception("the engine thread failed")
            self.error = e
            for loop, q, _ in self._streams.values():
                loop.call_soon_threadsafe(q.put_nowait, e)
            self._streams.clear()

    def _drain(self, block: bool, timeout: float | None = None) -> None:
        while True:
            try:
                item = self._inbox.get(block=block, timeout=timeout)
            except queue.Empty:
                return
            block = False
            kind = item[0]
            if kind == "add":
                _, req, loop, q = item
                self.engine.add(req)
                self._streams[req.rid] = (loop, q, [time.monotonic(), 0])
            elif kind == "abort":
                self._finish_aborted(item[1])
            elif kind == "call":
                _, fn, loop, future = item
                try:
                    result = fn()
                except Exception as e:   # noqa: BLE001 - handed to the caller
                    loop.call_soon_threadsafe(future.set_exception, e)
                else:
                    loop.call_soon_threadsafe(future.set_result, result)

    def _finish_aborted(self, rid: str) -> None:
        self.engine.abort(rid)
        stream = self._streams.pop(rid, None)
        if stream is not None:
            loop, q, _ = stream
            loop.call_soon_threadsafe(q.put_nowait, Update((), "abort"))

    def _publish(self, advanced: list[Request]) -> None:
        now = time.monotonic()
        for req in advanced:
            stream = self._streams.get(req.rid)
            if stream is None:
                continue
            loop, q, seen = stream            # seen: [time of the last update, tokens sent]
            new = tuple(req.output[seen[1]:])
            if new:
                self.metrics.tokens(now - seen[0], len(new), first=seen[1] == 0)
            seen[0], seen[1] = now, len(req.output)
            if req.finish_reason is not None:
                del self._streams[req.rid]
            loop.call_soon_threadsafe(q.put_nowait, Update(new, req.finish_reason))
