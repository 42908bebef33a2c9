"""The server's side of the engine's process (server.worker is the other side): AsyncEngine
starts an Engine in a process of its own and serves it to asyncio callers (the HTTP routes).

The server's process parses HTTP, tokenizes and checks requests (engine.front.Front),
detokenizes and streams; the engine's process only plans, launches and reads steps. In one
process the two shared one GIL: on the H100 (Llama-3.2-1B shapes, 768 random prompts of 512
tokens, 128 out, 64 at a time) the engine driven by a plain loop ran 18.3k output tokens/s while
the server around it reached 13.2k, its event-loop thread on the CPU for 43% of the run.

One duplex pipe (multiprocessing.connection, pickled tuples) joins them:
  server -> engine: ("add", Request), ("abort", rid), ("call", id, method name), ("stop",)
  engine -> server: ("ready", Front) once started, then per step ("step", updates, seconds,
                    stats) with updates [(rid, new tokens, their logprobs or None,
                    finish_reason, meta, prompt logprobs)] (meta, on a
                    request's last update: its layout, cached and host-cached prompt tokens,
                    and the error that failed it, if one did; the prompt's log probabilities,
                    if asked for, on its first update with tokens); ("result", id, ok, value) per
                    call; ("error", message) if it fails for good.
The server's copy of each Request gets its output, finish reason and meta from the updates.
Each side's process learns of the other's end from the pipe (EOF): a server that goes away
takes its engine with it.

A device error in a launch fails that launch's requests, not the engine (Engine.recover); the
engine's process ends only on an error it cannot recover from, or when it is killed. Then the
supervisor (the reader thread) fails every waiting request at once (EngineUnavailable, a 503),
reports why on /health, and starts a new engine process after a back-off (1 s, doubling while
starts fail): at most `max_restarts` restarts in any `restart_window` seconds. Past that it
gives up and calls `on_give_up` (serve.py then exits with status 1, for a supervisor such as
systemd or Kubernetes to restart the whole server).
"""

import asyncio
import dataclasses
import itertools
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable

from engine.front import Front
from engine.request import Request
from server.metrics import Metrics
from server.worker import engine_process

log = logging.getLogger("hybridkv")


class EngineUnavailable(RuntimeError):
    """The engine's process is down (restarting, or given up): the server answers 503."""


class RequestFailed(RuntimeError):
    """The engine failed this request (a device error in a launch that held it): a 500 that
    names the cause. The engine goes on serving."""


@dataclasses.dataclass(frozen=True)
class Update:
    tokens: tuple[int, ...]      # new output tokens since the last update
    finish_reason: str | None    # set on the last update: "stop", "length", "abort" or "error"
    logprobs: list | None = None  # per token, as engine.request.Request.logprobs holds them


def _exit_text(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class AsyncEngine:
    def __init__(self, start: Callable, metrics: Metrics, *, max_restarts: int = 3,
                 restart_window: float = 600.0, on_give_up: Callable[[], None] | None = None):
        """Starts the engine's process, which runs start() (picklable; it returns the Engine,
        warmed up as the caller wants), and waits until it is ready. Raises what start()
        raised (as a RuntimeError when that cannot be pickled)."""
        self.metrics = metrics
        self._start_engine = start
        self._max_restarts, self._window = max_restarts, restart_window
        self._restarts: list[float] = []       # when the engine was restarted
        self._on_give_up = on_give_up
        self._send_lock = threading.Lock()
        self._proc, self._conn, self.front = self._spawn()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, tuple[Request, asyncio.Queue, list]] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self.error: str | None = None          # why the engine is down; None while it is up
        self.gave_up = False
        self._closing = False
        self._reader = threading.Thread(target=self._supervise, name="hybridkv-engine-reader",
                                        daemon=True)

    def _spawn(self) -> tuple[multiprocessing.Process, object, Front]:
        """A new engine process, once ready: (process, its pipe, its Front)."""
        ctx = multiprocessing.get_context("spawn")      # the parent's threads do not fork well
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=engine_process, args=(self._start_engine, child),
                           name="hybridkv-engine", daemon=True)
        proc.start()
        child.close()
        try:
            kind, value = conn.recv()
        except EOFError:
            proc.join()
            conn.close()
            raise RuntimeError(f"the engine process {_exit_text(proc.exitcode)} before it was "
                               "ready") from None
        if kind == "failed":
            proc.join()
            conn.close()
            raise value
        return proc, conn, value

    def start(self) -> None:
        self._reader.start()

    def shutdown(self) -> None:
        self._closing = True
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
        return self.error is None and self._proc.is_alive()

    @property
    def pid(self) -> int:
        return self._proc.pid

    # -- asyncio side -----------------------------------------------------------------------
    async def generate(self, req: Request):
        """Submits req and yields its Updates until it finishes. Raises RequestFailed if the
        engine failed it, EngineUnavailable if the engine is down or goes down meanwhile.
        Cancelling the iteration (a client that went away) aborts the request, which frees its
        row and pages."""
        self._loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        self._streams[req.rid] = (req, updates, [time.monotonic()])
        finished = False
        try:
            if not self.alive:
                raise EngineUnavailable(f"the engine is not running: {self.error}")
            try:
                self._send(("add", req))
            except OSError:
                raise EngineUnavailable("the engine is not running") from None
            while not finished:
                update = await updates.get()
                if isinstance(update, BaseException):
                    raise update
                finished = update.finish_reason is not None
                if update.finish_reason == "error":
                    raise RequestFailed(req.error)
                yield update
        finally:
            self._streams.pop(req.rid, None)
            if not finished and self.alive:
                self.abort(req.rid)

    def abort(self, rid: str) -> None:
        try:
            self._send(("abort", rid))
        except OSError:          # the engine is gone, and the request with it
            pass

    async def call(self, method: str):
        """Engine.<method>() in the engine's process, between steps; returns its result."""
        if not self.alive:
            raise EngineUnavailable(f"the engine is not running: {self.error}")
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
        for rid, tokens, logprobs, reason, meta, prompt_logprobs in updates:
            stream = self._streams.get(rid)
            if stream is None:
                continue
            req, queue, last = stream         # last: [time of the last update]
            if tokens:
                self.metrics.tokens(now - last[0], len(tokens), first=not req.output)
            last[0] = now
            req.output += tokens
            if logprobs is not None:
                req.logprobs += logprobs
            if prompt_logprobs:
                req.prompt_logprobs = prompt_logprobs
            if reason is not None:
                req.finish_reason = reason
            if meta is not None:
                req.layout, req.cached_tokens, req.host_cached_tokens, req.error = meta
            queue.put_nowait(Update(tokens, reason, logprobs))

    def _resolve(self, key: int, ok: bool, value) -> None:
        future = self._calls.pop(key, None)
        if future is None:
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def _fail(self, error: BaseException) -> None:
        """On the event loop: every waiter hears that the engine went down."""
        for _, queue, _ in self._streams.values():
            queue.put_nowait(error)
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)
        self._calls.clear()

    # -- reader thread: reads the engine, restarts it -----------------------------------------
    def _supervise(self) -> None:
        while True:
            reason = self._read()
            if self._closing:
                return
            log.error("%s", reason)
            self.error = reason
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(
                    self._fail, EngineUnavailable(f"the engine is not running: {reason}"))
            if not self._restart(reason):
                self.gave_up = True
                if self._on_give_up is not None:
                    self._on_give_up()
                return

    def _read(self) -> str:
        """Reads the engine's messages until it ends: step statistics go to the metrics here,
        updates and call results to the event loop. Returns why it ended."""
        reason = None
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
                    reason = f"the engine failed: {message[1]}"
                    break
        except (EOFError, OSError):
            pass
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        return reason or f"the engine process {_exit_text(self._proc.exitcode)}"

    def _restart(self, reason: str) -> bool:
        """Starts a new engine process, backing off while starts fail; False once the restart
        limit is spent (self.error then says so)."""
        delay = 1.0
        while not self._closing:
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < self._window]
            if len(self._restarts) >= self._max_restarts:
                self.error = (f"{reason}; gave up after {len(self._restarts)} restart(s) in "
                              f"{self._window:g} s")
                log.error("%s", self.error)
                return False
            self._restarts.append(now)
            self.error = (f"{reason}; restarting it (restart {len(self._restarts)} of at most "
                          f"{self._max_restarts} in {self._window:g} s)")
            log.warning("%s", self.error)
            time.sleep(delay)
            try:
                proc, conn, _ = self._spawn()
            except Exception as e:   # noqa: BLE001 - counted, retried, reported on /health
                reason = f"the engine failed to restart: {type(e).__name__}: {e}"
                log.error("%s", reason)
                delay = min(2 * delay, 60.0)
                continue
            old = self._conn
            with self._send_lock:
                self._proc, self._conn = proc, conn
            old.close()
            self.metrics.engine_restarts += 1
            self.error = None
            log.warning("the engine process is running again")
            return True
        return False
