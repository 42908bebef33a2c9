"""Runs an Engine in a process of its own for asyncio callers (the HTTP server).

The server's process parses HTTP, tokenizes and checks requests (engine.front.Front),
detokenizes and streams; the engine's process only plans, launches and reads steps. In one
process the two shared one GIL: on the H100 (Llama-3.2-1B shapes, 768 random prompts of 512
tokens, 128 out, 64 at a time) the engine driven by a plain loop ran 18.3k output tokens/s while
the server around it reached 13.2k, its event-loop thread on the CPU for 43% of the run.

One duplex pipe (multiprocessing.connection, pickled tuples) joins them:
  server -> engine: ("add", Request), ("abort", rid), ("call", id, method name), ("stop",)
  engine -> server: ("ready", Front) once started, then per step ("step", updates, seconds,
                    stats) with updates [(rid, new tokens, finish_reason, meta)] (meta, on a
                    request's last update: its layout, cached and host-cached prompt tokens);
                    ("result", id, ok, value) per call; ("error", message) if it fails.
The server's copy of each Request gets its output, finish reason and meta from the updates.
Each side's process learns of the other's end from the pipe (EOF): a server that goes away
takes its engine with it.
"""

import asyncio
import dataclasses
import itertools
import logging
import multiprocessing
import pickle
import signal
import threading
import time
from collections.abc import Callable

from engine.front import Front
from engine.metrics import Metrics
from engine.scheduler import Request

log = logging.getLogger("hybridkv")


@dataclasses.dataclass(frozen=True)
class Update:
    tokens: tuple[int, ...]      # new output tokens since the last update
    finish_reason: str | None    # set on the last update: "stop", "length" or "abort"


class AsyncEngine:
    def __init__(self, start: Callable, metrics: Metrics):
        """Starts the engine's process, which runs start() (picklable; it returns the Engine,
        warmed up as the caller wants), and waits until it is ready. Raises what start()
        raised (as a RuntimeError when that cannot be pickled)."""
        self.metrics = metrics
        ctx = multiprocessing.get_context("spawn")      # the parent's threads do not fork well
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_engine_process, args=(start, child),
                                 name="hybridkv-engine", daemon=True)
        self._proc.start()
        child.close()
        try:
            kind, value = self._conn.recv()
        except EOFError:
            self._proc.join()
            raise RuntimeError(f"the engine process exited with code {self._proc.exitcode} "
                               "before it was ready") from None
        if kind == "failed":
            self._proc.join()
            raise value
        self.front: Front = value
        self._send_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, tuple[Request, asyncio.Queue, list]] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self.error: BaseException | None = None
        self._reader = threading.Thread(target=self._read, name="hybridkv-engine-reader",
                                        daemon=True)

    def start(self) -> None:
        self._reader.start()

    def shutdown(self) -> None:
        try:
            self._send(("stop",))
        except OSError:
            pass
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join()
        self._conn.close()

    @property
    def alive(self) -> bool:
        return self._proc.is_alive() and self.error is None

    # -- asyncio side -----------------------------------------------------------------------
    async def generate(self, req: Request):
        """Submits req and yields its Updates until it finishes. Cancelling the iteration (a
        client that went away) aborts the request, which frees its row and pages."""
        if not self.alive:
            raise RuntimeError("the engine has stopped")
        self._loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        self._streams[req.rid] = (req, updates, [time.monotonic()])
        self._send(("add", req))
        finished = False
        try:
            while not finished:
                update = await updates.get()
                if isinstance(update, BaseException):
                    raise RuntimeError("the engine failed") from update
                finished = update.finish_reason is not None
                yield update
        finally:
            self._streams.pop(req.rid, None)
            if not finished and self.alive:
                self._send(("abort", req.rid))

    def abort(self, rid: str) -> None:
        self._send(("abort", rid))

    async def call(self, method: str):
        """Engine.<method>() in the engine's process, between steps; returns its result."""
        self._loop = asyncio.get_running_loop()
        key = next(self._ids)
        future = self._calls[key] = self._loop.create_future()
        self._send(("call", key, method))
        return await future

    def _send(self, message) -> None:
        with self._send_lock:
            self._conn.send(message)

    def _deliver(self, updates: list[tuple], now: float) -> None:
        """On the event loop: each update to its request and stream, timing its tokens for the
        metrics."""
        for rid, tokens, reason, meta in updates:
            stream = self._streams.get(rid)
            if stream is None:
                continue
            req, queue, last = stream         # last: [time of the last update]
            if tokens:
                self.metrics.tokens(now - last[0], len(tokens), first=not req.output)
            last[0] = now
            req.output += tokens
            if reason is not None:
                req.finish_reason = reason
            if meta is not None:
                req.layout, req.cached_tokens, req.host_cached_tokens = meta
            queue.put_nowait(Update(tokens, reason))

    def _resolve(self, key: int, ok: bool, value) -> None:
        future = self._calls.pop(key)
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def _fail(self, error: BaseException) -> None:
        """On the event loop: every waiter hears of the engine's failure."""
        for _, queue, _ in self._streams.values():
            queue.put_nowait(error)
        self._streams.clear()
        for future in self._calls.values():
            future.set_exception(error)
        self._calls.clear()

    # -- reader thread ----------------------------------------------------------------------
    def _read(self) -> None:
        """Reads the engine's messages: step statistics go to the metrics here, updates and
        call results to the event loop. Ends when the engine fails or its process exits, and
        then fails every waiter."""
        error = RuntimeError("the engine process has exited")
        try:
            while True:
                message = self._conn.recv()
                now = time.monotonic()
                kind = message[0]
                if kind == "step":
                    _, updates, seconds, stats = message
                    self.metrics.snapshot(stats)
                    if seconds is not None:
                        self.metrics.step(seconds)
                    if updates and self._loop is not None:
                        self._loop.call_soon_threadsafe(self._deliver, updates, now)
                elif kind == "result":
                    self._loop.call_soon_threadsafe(self._resolve, *message[1:])
                elif kind == "error":
                    error = RuntimeError(f"the engine failed: {message[1]}")
                    break
        except (EOFError, OSError):
            pass
        self.error = error
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._fail, error)


# -- the engine's process -------------------------------------------------------------------
def _engine_process(start: Callable, conn) -> None:
    # Ctrl-C reaches the whole process group: the server shuts the engine down itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        engine = start()
    except BaseException as e:   # noqa: BLE001 - the server reports it
        try:
            pickle.dumps(e)
        except Exception:        # noqa: BLE001 - e.g. an exception with extra init arguments
            e = RuntimeError(f"{type(e).__name__}: {e}")
        conn.send(("failed", e))
        return
    conn.send(("ready", engine.front))
    try:
        _EngineLoop(engine, conn).run()
    except (EOFError, OSError):
        pass                     # the server went away
    except BaseException as e:   # noqa: BLE001 - the server must hear of it
        log.exception("the engine failed")
        conn.send(("error", f"{type(e).__name__}: {e}"))


class _EngineLoop:
    """Takes messages between steps, steps while there is work, and sends each step's new
    tokens with the engine's statistics."""

    def __init__(self, engine, conn):
        self.engine, self.conn = engine, conn
        self.sent: dict[str, int] = {}        # tokens sent so far, per running request

    def run(self) -> None:
        engine = self.engine
        while True:
            if engine.has_work():
                wait = 0.0
            else:        # idle until a message arrives or an elastic pool's shrink is due
                wait = engine.maintain()
                self.conn.send(("step", [], None, engine.stats()))
            if not self._drain(wait):
                return
            if engine.has_work():
                start = time.perf_counter()
                advanced = engine.step()
                seconds = time.perf_counter() - start
                self.conn.send(("step", self._updates(advanced), seconds, engine.stats()))

    def _drain(self, wait: float | None) -> bool:
        """Handles the messages waiting (the first after up to `wait` seconds; None: until one
        comes); False on ("stop",)."""
        updates = []
        while self.conn.poll(wait):
            wait = 0.0
            message = self.conn.recv()
            kind = message[0]
            if kind == "add":
                req = message[1]
                self.engine.add(req)
                self.sent[req.rid] = 0
            elif kind == "abort":
                rid = message[1]
                req = self.engine.requests.get(rid)
                self.engine.abort(rid)
                if self.sent.pop(rid, None) is not None and req is not None:
                    updates.append((rid, (), "abort", _meta(req)))
            elif kind == "call":
                _, key, method = message
                try:
                    result = (key, True, getattr(self.engine, method)())
                except Exception as e:   # noqa: BLE001 - handed to the caller
                    result = (key, False, RuntimeError(f"{method}: {e}"))
                self.conn.send(("result", *result))
            elif kind == "stop":
                return False
        if updates:
            self.conn.send(("step", updates, None, self.engine.stats()))
        return True

    def _updates(self, advanced) -> list[tuple]:
        out = []
        for req in advanced:
            sent = self.sent.get(req.rid)
            if sent is None:
                continue
            new = tuple(req.output[sent:])
            meta = None
            if req.finish_reason is not None:
                del self.sent[req.rid]
                meta = _meta(req)
            else:
                self.sent[req.rid] = len(req.output)
            out.append((req.rid, new, req.finish_reason, meta))
        return out


def _meta(req: Request) -> tuple:
    return req.layout, req.cached_tokens, req.host_cached_tokens
